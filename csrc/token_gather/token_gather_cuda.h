// Interface between token_gather_cuda_host.cpp (host compiler) and
// token_gather_cuda.cu (nvcc). Plain types only.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mmkernels {
namespace token_gather {
namespace cuda {

// Rows of a (B, N, D) tensor: row m = (m / inner, m % inner), element d at
// base + (m / inner) * s0 + (m % inner) * s1 + d * s2 (strides in elements).
struct RowSource {
  const void* base;  // nullptr: zeros
  int64_t inner, s0, s1, s2;
};

// out[r, :] = map[r] >= 0 ? a.row(map[r]) : b.row(broadcast_b ? 0 : r), for r < R.
// out is (R, D) contiguous; elem_size in {1, 2, 4, 8} bytes.
cudaError_t launch_move_rows(void* out, int64_t R, int64_t D, int elem_size, const int64_t* map,
                             RowSource a, RowSource b, bool broadcast_b, cudaStream_t stream);

// MAE masking order of each noise row (B, N): ids_restore[b, j] = rank of token j
// (ascending noise, NaN last, ties to the lower index) and ids_keep[b, r] = j for
// r < n_keep. noise_dtype: 0 float, 1 double, 2 half, 3 bfloat16.
cudaError_t launch_masking_ranks(const void* noise, int noise_dtype, int64_t ns0, int64_t ns1,
                                 int64_t B, int64_t N, int64_t n_keep, int64_t* ids_restore,
                                 int64_t* ids_keep, cudaStream_t stream);

// Largest N ranked in shared memory; longer rows are ranked from global memory.
constexpr int64_t kMaxSharedTokens = 6144;

}  // namespace cuda
}  // namespace token_gather
}  // namespace mmkernels
