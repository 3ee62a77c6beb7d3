// Interface between the host-side CUDA registration (roi_align_cuda_host.cpp,
// compiled by the host compiler) and the kernels (roi_align_cuda.cu, compiled by
// nvcc). Plain types only, so the .cu file needs no torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mmkernels {
namespace roi_align {
namespace cuda {

enum class DType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

constexpr int kMaxLevels = 8;

struct Level {      // one feature map, any strides (NCHW or channels-last)
  const void* data; // input dtype (forward) or the accumulation dtype (backward buffer)
  int64_t sN, sC, sH, sW;
  int H, W;
  double scale;
};

struct Params {
  Level lv[kMaxLevels];
  int L;
  const void* rois;       // (K, 5) contiguous, input dtype
  const int64_t* levels;  // (K,) or nullptr (single level)
  int64_t K, N, C;
  int PH, PW, sampling_ratio;
  bool aligned;
  bool mean;              // region_features: (K, C) output, average of every bin
  bool channels_inner;    // thread index runs fastest along C (channels-last input)
};

// out[k, c, ph, pw] (or out[k, c]) with strides os.
cudaError_t launch_forward(DType dtype, const Params& p, void* out, const int64_t os[4],
                           cudaStream_t stream);

// Backward into per-level accumulation buffers p.lv[l] (float for half/bfloat16/float
// input, double for double), which must be zero-filled. Atomic scatter, one thread
// per grad element.
cudaError_t launch_backward_atomic(DType dtype, const Params& p, const void* grad,
                                   const int64_t gs[4], cudaStream_t stream);

// Deterministic backward: one thread per grad_input element of `level`, gathering
// over the regions in ascending order; no atomics, same result run to run.
cudaError_t launch_backward_deterministic(DType dtype, const Params& p, int level,
                                          const void* grad, const int64_t gs[4],
                                          cudaStream_t stream);

}  // namespace cuda
}  // namespace roi_align
}  // namespace mmkernels
