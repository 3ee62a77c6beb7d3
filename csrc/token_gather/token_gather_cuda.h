// Interface between token_gather_cuda_host.cpp (host compiler) and
// token_gather_cuda.cu (nvcc). Plain types only.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "token_gather/token_gather_math.h"

namespace mmkernels {
namespace token_gather {
namespace cuda {

using token_gather::RowSource;

// out[r, :] = take_a(map[r], rows_a) ? a.row(map[r]) : b.row(broadcast_b ? 0 : r), for
// r < R (token_gather_math.h). out is (R, D) contiguous, map (R,) contiguous int64 or
// nullptr (every row from b); elem_size in {1, 2, 4, 8} bytes.
cudaError_t launch_move_rows(void* out, int64_t R, int64_t D, int elem_size, const int64_t* map,
                             int64_t rows_a, RowSource a, RowSource b, bool broadcast_b,
                             cudaStream_t stream);

// MAE masking order of each noise row (B, N): ids_restore[b, j] = rank of token j
// (ascending noise, NaN last, ties to the lower index) and ids_keep[b, r] = j for
// r < n_keep. noise_dtype: 0 float, 1 double, 2 half, 3 bfloat16. sms: the device's
// multiprocessors (the launch shape only, rank_split; no result depends on it).
cudaError_t launch_masking_ranks(const void* noise, int noise_dtype, int64_t ns0, int64_t ns1,
                                 int64_t B, int64_t N, int64_t n_keep, int64_t* ids_restore,
                                 int64_t* ids_keep, int sms, cudaStream_t stream);

// The mask-token gradient: partial[s, d] = sum of grad[b, n, d] over the rows r = b * N + n
// with filled[r], for rows [s * ceil(R / S), (s + 1) * ceil(R / S)), in row order
// (R = B * N). partial (S, D) contiguous, float (double for double grad); the caller
// sums it over s. grad_dtype as noise_dtype; gs the (B, N, D) strides in elements.
cudaError_t launch_masked_colsum(const void* grad, int grad_dtype, int64_t B, int64_t N,
                                 int64_t D, const int64_t gs[3], const bool* filled,
                                 void* partial, int64_t S, cudaStream_t stream);

// S for launch_masked_colsum: a function of R only (so the result does not depend on
// the device): about kColsumRows rows per block.
constexpr int64_t kColsumRows = 128;
constexpr int64_t kMaxColsumSplits = 1024;
int64_t masked_colsum_splits(int64_t R);

// Noise values staged in shared memory at once by the rank count (48 KiB in double):
// a row of up to kStageTokens tokens is staged whole, a longer one in chunks.
constexpr int64_t kStageTokens = 6144;

}  // namespace cuda
}  // namespace token_gather
}  // namespace mmkernels
