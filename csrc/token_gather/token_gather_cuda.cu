// Token gather family, CUDA kernels. Index rules and the masking order come from
// token_gather_math.h (shared with the CPU kernels).
//
//   _move_rows_kernel      every op's data movement (take_a, token_gather_math.h):
//                          out[r] = a[map[r]] if 0 <= map[r] < rows_a, else b[r];
//                          one thread per element, coalesced along D. Each output
//                          row has exactly one writer: deterministic, no atomics.
//   _masking_rank_kernel   one block per noise row; the row sits in shared memory
//                          and each thread counts, for its tokens, how many tokens
//                          come before them (an O(N) selection per token, no sort).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "token_gather/token_gather_cuda.h"
#include "token_gather/token_gather_math.h"

namespace mmkernels {
namespace token_gather {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename E>
__global__ void _move_rows_kernel(E* __restrict__ out, const int64_t R, const int64_t D,
                                  const int64_t* __restrict__ map, const int64_t rows_a,
                                  const RowSource a, const RowSource b, const bool broadcast_b) {
  const int64_t total = R * D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / D, d = i % D;
    const int64_t m = map != nullptr ? map[r] : -1;
    E v;
    if (take_a(m, rows_a)) {
      v = static_cast<const E*>(a.base)[row_offset(a, m, d)];
    } else if (b.base != nullptr) {
      v = static_cast<const E*>(b.base)[row_offset(b, broadcast_b ? 0 : r, d)];
    } else {
      v = E(0);
    }
    out[i] = v;
  }
}

// Widening is exact and monotone, so ranks are those of the original dtype.
template <typename W, typename T> __device__ __forceinline__ W widen(T v) {
  return static_cast<W>(v);
}
template <> __device__ __forceinline__ float widen<float, __half>(__half v) {
  return __half2float(v);
}
template <> __device__ __forceinline__ float widen<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// W: the comparison type (float for 16/32-bit noise, exact; double for double).
template <typename T, typename W>
__global__ void _masking_rank_kernel(const T* __restrict__ noise, const int64_t ns0,
                                     const int64_t ns1, const int64_t N, const int64_t n_keep,
                                     const bool use_shared, int64_t* __restrict__ ids_restore,
                                     int64_t* __restrict__ ids_keep) {
  extern __shared__ unsigned char smem_raw[];
  W* row = reinterpret_cast<W*>(smem_raw);
  const int64_t b = blockIdx.x;
  const T* nz = noise + b * ns0;
  if (use_shared) {
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) row[j] = widen<W>(nz[j * ns1]);
    __syncthreads();
  }
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    int64_t r;
    if (use_shared) {
      r = rank_of<W>(j, N, [&](int64_t i) { return row[i]; });
    } else {
      r = rank_of<W>(j, N, [&](int64_t i) { return widen<W>(nz[i * ns1]); });
    }
    ids_restore[b * N + j] = r;
    if (r < n_keep) ids_keep[b * n_keep + r] = j;
  }
}

inline int blocks_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 * 32 ? b : 65535 * 32);
}

template <typename T, typename W>
cudaError_t launch_ranks(const void* noise, int64_t ns0, int64_t ns1, int64_t B, int64_t N,
                         int64_t n_keep, int64_t* ids_restore, int64_t* ids_keep,
                         cudaStream_t stream) {
  const bool use_shared = N <= kMaxSharedTokens;
  const size_t smem = use_shared ? static_cast<size_t>(N) * sizeof(W) : 0;
  _masking_rank_kernel<T, W><<<static_cast<unsigned>(B), kThreads, smem, stream>>>(
      static_cast<const T*>(noise), ns0, ns1, N, n_keep, use_shared, ids_restore, ids_keep);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_move_rows(void* out, int64_t R, int64_t D, int elem_size, const int64_t* map,
                             int64_t rows_a, RowSource a, RowSource b, bool broadcast_b,
                             cudaStream_t stream) {
  const int64_t total = R * D;
  if (total == 0) return cudaSuccess;
  const int grid = blocks_for(total);
  switch (elem_size) {
    case 1:
      _move_rows_kernel<uint8_t><<<grid, kThreads, 0, stream>>>(static_cast<uint8_t*>(out), R, D,
                                                                map, rows_a, a, b, broadcast_b);
      break;
    case 2:
      _move_rows_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(static_cast<uint16_t*>(out), R,
                                                                 D, map, rows_a, a, b, broadcast_b);
      break;
    case 4:
      _move_rows_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(static_cast<uint32_t*>(out), R,
                                                                 D, map, rows_a, a, b, broadcast_b);
      break;
    case 8:
      _move_rows_kernel<uint64_t><<<grid, kThreads, 0, stream>>>(static_cast<uint64_t*>(out), R,
                                                                 D, map, rows_a, a, b, broadcast_b);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_masking_ranks(const void* noise, int noise_dtype, int64_t ns0, int64_t ns1,
                                 int64_t B, int64_t N, int64_t n_keep, int64_t* ids_restore,
                                 int64_t* ids_keep, cudaStream_t stream) {
  if (B == 0 || N == 0) return cudaSuccess;
  switch (noise_dtype) {
    case 0: return launch_ranks<float, float>(noise, ns0, ns1, B, N, n_keep, ids_restore, ids_keep, stream);
    case 1: return launch_ranks<double, double>(noise, ns0, ns1, B, N, n_keep, ids_restore, ids_keep, stream);
    case 2: return launch_ranks<__half, float>(noise, ns0, ns1, B, N, n_keep, ids_restore, ids_keep, stream);
    case 3: return launch_ranks<__nv_bfloat16, float>(noise, ns0, ns1, B, N, n_keep, ids_restore, ids_keep, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace token_gather
}  // namespace mmkernels
