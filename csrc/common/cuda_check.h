// Host-side launch check shared by the CUDA registrations (only compiled with CUDA).
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace mmkernels {

// Raise a RuntimeError naming the op when a kernel launch returned an error.
inline void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace mmkernels
