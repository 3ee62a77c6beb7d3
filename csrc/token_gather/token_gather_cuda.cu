// Token gather family, CUDA kernels. Index rules and the masking order come from
// token_gather_math.h (shared with the CPU kernels).
//
//   _move_rows_kernel      every op's data movement (take_a, token_gather_math.h):
//                          out[r] = a[map[r]] if 0 <= map[r] < rows_a, else b[r];
//                          a group of lanes (up to a warp) per row, 16-byte vector
//                          loads and stores with a scalar head/tail (any D, any
//                          offset). Each output row has exactly one writer:
//                          deterministic, no atomics.
//   _masking_rank_kernel   blocks (row, chunk); the row sits in shared memory and
//                          each thread counts, for its tokens, how many tokens come
//                          before them (an O(N) selection per token, no sort); a
//                          row is split over several blocks when B is small.
//   _masked_colsum_kernel  restore_tokens' mask-token gradient: fixed-order column
//                          sums of the filled rows, straight from the gradient.
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

// An E-byte word (the element moved when a row is not 16-byte aligned).
template <int E> struct Word;
template <> struct Word<1> { using type = uint8_t; };
template <> struct Word<2> { using type = uint16_t; };
template <> struct Word<4> { using type = uint32_t; };
template <> struct Word<8> { using type = uint64_t; };

// Copy (or zero, src == nullptr) one row of D E-byte elements with `lanes` threads
// (lane in [0, lanes)). A contiguous source whose address agrees with dst modulo 16
// moves as a scalar head up to dst's 16-byte boundary, then 16-byte words
// (LDG.E.128 / STG.E.128), then a scalar tail: any D, any storage offset. A strided
// source, or one misaligned relative to dst, moves element by element, still one
// coalesced element per lane. Every index is a loop counter: no div/mod per element.
template <int E>
__device__ __forceinline__ void move_row(char* __restrict__ dst, const char* __restrict__ src,
                                         const int64_t s2, const int64_t D, const int lane,
                                         const int lanes) {
  using W = typename Word<E>::type;
  W* d = reinterpret_cast<W*>(dst);
  const W* s = reinterpret_cast<const W*>(src);
  const uintptr_t da = reinterpret_cast<uintptr_t>(dst);
  if (src != nullptr && s2 != 1) {
    for (int64_t i = lane; i < D; i += lanes) d[i] = s[i * s2];
    return;
  }
  const uintptr_t sa = reinterpret_cast<uintptr_t>(src);
  const bool vec = src == nullptr || ((sa ^ da) & 15) == 0;
  int64_t head = vec ? static_cast<int64_t>(((16 - (da & 15)) & 15) / E) : D;
  head = head < D ? head : D;
  const int64_t nvec = (D - head) * E / 16;
  const int64_t tail = head + nvec * (16 / E);
  if (src == nullptr) {
    for (int64_t i = lane; i < head; i += lanes) d[i] = W(0);
    uint4* dv = reinterpret_cast<uint4*>(d + head);
    const uint4 z = make_uint4(0, 0, 0, 0);
    for (int64_t i = lane; i < nvec; i += lanes) dv[i] = z;
    for (int64_t i = tail + lane; i < D; i += lanes) d[i] = W(0);
    return;
  }
  for (int64_t i = lane; i < head; i += lanes) d[i] = s[i];
  uint4* dv = reinterpret_cast<uint4*>(d + head);
  const uint4* sv = reinterpret_cast<const uint4*>(s + head);
#pragma unroll 4
  for (int64_t i = lane; i < nvec; i += lanes) dv[i] = __ldg(sv + i);
  for (int64_t i = tail + lane; i < D; i += lanes) d[i] = s[i];
}

// One group of 2^log_lanes threads per output row (a warp for rows of 512 bytes or
// more, fewer lanes for short rows, so a warp moves several short rows at once);
// grid-stride over the rows. The per-row source (take_a) costs one 64-bit div/mod
// (row_offset), once per row.
template <int E>
__global__ void _move_rows_kernel(char* __restrict__ out, const int64_t R, const int64_t D,
                                  const int64_t* __restrict__ map, const int64_t rows_a,
                                  const RowSource a, const RowSource b, const bool broadcast_b,
                                  const int log_lanes) {
  const int lanes = 1 << log_lanes;
  const int lane = threadIdx.x & (lanes - 1);
  const int64_t group = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> log_lanes;
  const int64_t groups = (int64_t(gridDim.x) * blockDim.x) >> log_lanes;
  for (int64_t r = group; r < R; r += groups) {
    const int64_t m = map != nullptr ? map[r] : -1;
    const char* src = nullptr;
    int64_t s2 = 1;
    if (take_a(m, rows_a)) {
      src = static_cast<const char*>(a.base) + row_offset(a, m, 0) * E;
      s2 = a.s2;
    } else if (b.base != nullptr) {
      src = static_cast<const char*>(b.base) + row_offset(b, broadcast_b ? 0 : r, 0) * E;
      s2 = b.s2;
    }
    move_row<E>(out + r * D * E, src, s2, D, lane, lanes);
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

// Deterministic column sums of the rows flagged in `filled` (restore_tokens' mask-token
// gradient): block (x, y) sums rows [y * rows_per, (y + 1) * rows_per) of columns
// [x * kThreads, ...) in row order into partial[y, d] (float, or double for double
// input); the host then sums the (S, D) partials with torch's fixed-order reduction.
// Only the flagged rows are read, straight from the gradient in its own dtype and
// strides: no float copy of the gradient, no atomics.
template <typename T, typename A>
__global__ void _masked_colsum_kernel(const T* __restrict__ grad, const int64_t N,
                                      const int64_t D, const int64_t s0, const int64_t s1,
                                      const int64_t s2, const bool* __restrict__ filled,
                                      const int64_t R, const int64_t rows_per,
                                      A* __restrict__ partial) {
  const int64_t d = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (d >= D) return;
  const int64_t r0 = blockIdx.y * rows_per;
  const int64_t r1 = r0 + rows_per < R ? r0 + rows_per : R;
  int64_t b = r0 / N, n = r0 % N;  // once per thread, then incremented
  A acc = A(0);
  for (int64_t r = r0; r < r1; ++r) {
    if (filled[r]) acc += widen<A>(grad[b * s0 + n * s1 + d * s2]);
    if (++n == N) {
      n = 0;
      ++b;
    }
  }
  partial[blockIdx.y * D + d] = acc;
}

// W: the comparison type (float for 16/32-bit noise, exact; double for double).
// Block (b, y) ranks tokens [y * chunk, (y + 1) * chunk) of noise row b: the whole
// row sits in shared memory (each block loads it: O(N), small next to its
// O(chunk * N) compares) and each thread counts, for its tokens, how many tokens
// come before them. Splitting a row over gridDim.y blocks keeps the GPU full when B
// is small (B < 2 * SMs): one block per row left most SMs idle on the O(N^2) count.
template <typename T, typename W>
__global__ void _masking_rank_kernel(const T* __restrict__ noise, const int64_t ns0,
                                     const int64_t ns1, const int64_t N, const int64_t n_keep,
                                     const int64_t chunk, const bool use_shared,
                                     int64_t* __restrict__ ids_restore,
                                     int64_t* __restrict__ ids_keep) {
  extern __shared__ unsigned char smem_raw[];
  W* row = reinterpret_cast<W*>(smem_raw);
  const int64_t b = blockIdx.x;
  const T* nz = noise + b * ns0;
  if (use_shared) {
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) row[j] = widen<W>(nz[j * ns1]);
    __syncthreads();
  }
  const int64_t j0 = blockIdx.y * chunk;
  const int64_t j1 = j0 + chunk < N ? j0 + chunk : N;
  for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
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

// Streaming multiprocessors of the current device (for the launch shapes only; no
// result depends on it).
inline int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();  // clear it: the launch reports its own errors
    return 132;
  }
  return sms > 0 ? sms : 132;
}

// f(T(), W()) for dtype code 0 float, 1 double, 2 half, 3 bfloat16: T the stored type,
// W the one computed in (float, or double for double).
template <typename F>
cudaError_t dispatch(int code, F&& f) {
  switch (code) {
    case 0: return f(float(0), float(0));
    case 1: return f(double(0), double(0));
    case 2: return f(__half(), float(0));
    case 3: return f(__nv_bfloat16(), float(0));
  }
  return cudaErrorInvalidValue;
}

template <typename T, typename W>
cudaError_t launch_ranks(const void* noise, int64_t ns0, int64_t ns1, int64_t B, int64_t N,
                         int64_t n_keep, int64_t* ids_restore, int64_t* ids_keep,
                         cudaStream_t stream) {
  const bool use_shared = N <= kMaxSharedTokens;
  const size_t smem = use_shared ? static_cast<size_t>(N) * sizeof(W) : 0;
  // Blocks per row: enough for about 4 blocks per SM in all, at least kThreads tokens
  // per block (each thread ranks one or more), at most 65535 (gridDim.y).
  const int64_t want = (4 * int64_t(sm_count()) + B - 1) / B;
  const int64_t most = (N + kThreads - 1) / kThreads;
  int64_t splits = want < most ? want : most;
  splits = splits < 1 ? 1 : (splits > 65535 ? 65535 : splits);
  const int64_t chunk = (N + splits - 1) / splits;
  splits = (N + chunk - 1) / chunk;
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(splits));
  _masking_rank_kernel<T, W><<<grid, kThreads, smem, stream>>>(
      static_cast<const T*>(noise), ns0, ns1, N, n_keep, chunk, use_shared, ids_restore,
      ids_keep);
  return cudaGetLastError();
}

template <int E>
cudaError_t launch_rows(void* out, int64_t R, int64_t D, const int64_t* map, int64_t rows_a,
                        const RowSource& a, const RowSource& b, bool broadcast_b,
                        cudaStream_t stream) {
  // Lanes per row: one per 16-byte word up to a warp (rows of 512 bytes or more).
  const int64_t words = (D * E + 15) / 16;
  int log_lanes = 2;
  while (log_lanes < 5 && (int64_t(1) << log_lanes) < words) ++log_lanes;
  const int64_t rows_per_block = kThreads >> log_lanes;
  int64_t grid = (R + rows_per_block - 1) / rows_per_block;
  grid = grid < 65535 * 32 ? grid : 65535 * 32;  // grid-stride beyond
  _move_rows_kernel<E><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      static_cast<char*>(out), R, D, map, rows_a, a, b, broadcast_b, log_lanes);
  return cudaGetLastError();
}

template <typename T, typename A>
cudaError_t launch_colsum(const void* grad, int64_t B, int64_t N, int64_t D, const int64_t gs[3],
                          const bool* filled, void* partial, int64_t S, cudaStream_t stream) {
  const int64_t R = B * N;
  const int64_t rows_per = (R + S - 1) / S;
  const dim3 grid(static_cast<unsigned>((D + kThreads - 1) / kThreads), static_cast<unsigned>(S));
  _masked_colsum_kernel<T, A><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(grad), N, D, gs[0], gs[1], gs[2], filled, R, rows_per,
      static_cast<A*>(partial));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_move_rows(void* out, int64_t R, int64_t D, int elem_size, const int64_t* map,
                             int64_t rows_a, RowSource a, RowSource b, bool broadcast_b,
                             cudaStream_t stream) {
  if (R == 0 || D == 0) return cudaSuccess;
  switch (elem_size) {
    case 1: return launch_rows<1>(out, R, D, map, rows_a, a, b, broadcast_b, stream);
    case 2: return launch_rows<2>(out, R, D, map, rows_a, a, b, broadcast_b, stream);
    case 4: return launch_rows<4>(out, R, D, map, rows_a, a, b, broadcast_b, stream);
    case 8: return launch_rows<8>(out, R, D, map, rows_a, a, b, broadcast_b, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t masked_colsum_splits(int64_t R) {
  const int64_t s = (R + kColsumRows - 1) / kColsumRows;
  return s < 1 ? 1 : (s > kMaxColsumSplits ? kMaxColsumSplits : s);
}

cudaError_t launch_masked_colsum(const void* grad, int grad_dtype, int64_t B, int64_t N,
                                 int64_t D, const int64_t gs[3], const bool* filled,
                                 void* partial, int64_t S, cudaStream_t stream) {
  if (B * N == 0 || D == 0) return cudaSuccess;
  return dispatch(grad_dtype, [&](auto t, auto w) {
    return launch_colsum<decltype(t), decltype(w)>(grad, B, N, D, gs, filled, partial, S, stream);
  });
}

cudaError_t launch_masking_ranks(const void* noise, int noise_dtype, int64_t ns0, int64_t ns1,
                                 int64_t B, int64_t N, int64_t n_keep, int64_t* ids_restore,
                                 int64_t* ids_keep, cudaStream_t stream) {
  if (B == 0 || N == 0) return cudaSuccess;
  return dispatch(noise_dtype, [&](auto t, auto w) {
    return launch_ranks<decltype(t), decltype(w)>(noise, ns0, ns1, B, N, n_keep, ids_restore,
                                                  ids_keep, stream);
  });
}

}  // namespace cuda
}  // namespace token_gather
}  // namespace mmkernels
