// Token gather family, CUDA kernels. Index rules and the masking order come from
// token_gather_math.h (shared with the CPU kernels).
//
//   _move_rows_kernel      every op's data movement (take_a, token_gather_math.h):
//                          out[r] = a[map[r]] if 0 <= map[r] < rows_a, else b[r];
//                          a group of lanes (up to a warp) per row, the widest
//                          vector loads and stores (16, 8 or 4 bytes) the row's
//                          source and destination addresses allow, with a scalar
//                          head/tail (any D, any offset). Each output row has
//                          exactly one writer: deterministic, no atomics.
//   _masking_rank_kernel   blocks (rows, chunk); the row is staged in shared memory
//                          (in chunks when long) and each thread counts, for its
//                          tokens, how many tokens come before them (an O(N)
//                          selection per token, no sort); a row is split over
//                          several blocks when B is small.
//   _masked_colsum_kernel  restore_tokens' mask-token gradient: fixed-order column
//                          sums of the filled rows, straight from the gradient.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/launch_geometry.h"
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
template <> struct Word<16> { using type = uint4; };

// Read-only cached load of a V-byte word (LDG.E.128 / .64 / 32).
__device__ __forceinline__ uint4 load_word(const uint4* p) { return __ldg(p); }
__device__ __forceinline__ uint64_t load_word(const uint64_t* p) {
  return __ldg(reinterpret_cast<const unsigned long long*>(p));
}
__device__ __forceinline__ uint32_t load_word(const uint32_t* p) { return __ldg(p); }
template <typename V> __device__ __forceinline__ V zero_word() { return V(0); }
template <> __device__ __forceinline__ uint4 zero_word<uint4>() { return make_uint4(0, 0, 0, 0); }

// Copy (or zero, src == nullptr) one row of D E-byte elements in V-byte words (V > E),
// src and dst agreeing modulo V: a scalar head up to dst's V-byte boundary, the
// words, a scalar tail. Lanes [0, lanes) of the row's group share it.
template <int E, int V>
__device__ __forceinline__ void move_row_words(char* __restrict__ dst,
                                               const char* __restrict__ src, const int64_t D,
                                               const int lane, const int lanes) {
  using W = typename Word<E>::type;
  using VW = typename Word<V>::type;
  W* d = reinterpret_cast<W*>(dst);
  const W* s = reinterpret_cast<const W*>(src);
  const uintptr_t da = reinterpret_cast<uintptr_t>(dst);
  int64_t head = static_cast<int64_t>(((V - (da & (V - 1))) & (V - 1)) / E);
  head = head < D ? head : D;
  const int64_t nvec = (D - head) * E / V;
  const int64_t tail = head + nvec * (V / E);
  VW* dv = reinterpret_cast<VW*>(d + head);
  if (src == nullptr) {
    for (int64_t i = lane; i < head; i += lanes) d[i] = W(0);
    const VW z = zero_word<VW>();
    for (int64_t i = lane; i < nvec; i += lanes) dv[i] = z;
    for (int64_t i = tail + lane; i < D; i += lanes) d[i] = W(0);
    return;
  }
  for (int64_t i = lane; i < head; i += lanes) d[i] = s[i];
  const VW* sv = reinterpret_cast<const VW*>(s + head);
#pragma unroll 4
  for (int64_t i = lane; i < nvec; i += lanes) dv[i] = load_word(sv + i);
  for (int64_t i = tail + lane; i < D; i += lanes) d[i] = s[i];
}

// One row element by element (s2: the source's element stride), one coalesced
// element per lane.
template <int E>
__device__ __forceinline__ void move_row_scalar(char* __restrict__ dst,
                                                const char* __restrict__ src, const int64_t s2,
                                                const int64_t D, const int lane,
                                                const int lanes) {
  using W = typename Word<E>::type;
  W* d = reinterpret_cast<W*>(dst);
  const W* s = reinterpret_cast<const W*>(src);
  for (int64_t i = lane; i < D; i += lanes) d[i] = s[i * s2];
}

// Copy (or zero, src == nullptr) one row of D E-byte elements with `lanes` threads
// (lane in [0, lanes)). A contiguous source moves in the widest word (16, 8 or 4
// bytes, row_word_bytes) in which its address agrees with dst's: a scalar head to
// dst's word boundary, then words (LDG.E.128 / STG.E.128 for 16 bytes), then a scalar
// tail: any D, any storage offset; a zero fill always in 16-byte words. A strided
// source, or one that agrees with dst on no word, moves element by element
// (move_row_scalar). Every index is a loop counter: no div/mod per element.
template <int E>
__device__ __forceinline__ void move_row(char* __restrict__ dst, const char* __restrict__ src,
                                         const int64_t s2, const int64_t D, const int lane,
                                         const int lanes) {
  if (src != nullptr && s2 != 1) return move_row_scalar<E>(dst, src, s2, D, lane, lanes);
  const int w = src == nullptr ? 16
                               : row_word_bytes(reinterpret_cast<uintptr_t>(src),
                                                reinterpret_cast<uintptr_t>(dst), E);
  // (E constant: the branches for words no wider than the element are removed)
  if (w == 16) {
    move_row_words<E, 16>(dst, src, D, lane, lanes);
  } else if (E < 8 && w == 8) {
    move_row_words<E, (E < 8 ? 8 : 16)>(dst, src, D, lane, lanes);
  } else if (E < 4 && w == 4) {
    move_row_words<E, (E < 4 ? 4 : 16)>(dst, src, D, lane, lanes);
  } else {
    move_row_scalar<E>(dst, src, 1, D, lane, lanes);
  }
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
// Block (x, y) ranks tokens [y * chunk, (y + 1) * chunk) of noise rows x, x +
// gridDim.x, ...: each thread counts, for its tokens, how many tokens come before
// them (rank_count). The row is staged in shared memory: whole when N <=
// kStageTokens (each block loads it: O(N), small next to its O(chunk * N) compares),
// else kStageTokens tokens at a time for each round of blockDim tokens (every load
// from global memory is then shared by blockDim compares). Splitting a row over
// gridDim.y blocks keeps the GPU full when B is small (B < 2 * SMs): one block per
// row left most SMs idle on the O(N^2) count.
template <typename T, typename W>
__global__ void _masking_rank_kernel(const T* __restrict__ noise, const int64_t ns0,
                                     const int64_t ns1, const int64_t B, const int64_t N,
                                     const int64_t n_keep, const int64_t chunk,
                                     int64_t* __restrict__ ids_restore,
                                     int64_t* __restrict__ ids_keep) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  W* row = reinterpret_cast<W*>(smem_raw);
  const int64_t j0 = blockIdx.y * chunk;
  const int64_t j1 = j0 + chunk < N ? j0 + chunk : N;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const T* nz = noise + b * ns0;
    if (N <= kStageTokens) {
      __syncthreads();  // the previous row has been read
      for (int64_t j = threadIdx.x; j < N; j += blockDim.x) row[j] = widen<W>(nz[j * ns1]);
      __syncthreads();
      for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
        const int64_t r = rank_count<W>(row[j], j, 0, N, [&](int64_t i) { return row[i]; });
        ids_restore[b * N + j] = r;
        if (r < n_keep) ids_keep[b * n_keep + r] = j;
      }
      continue;
    }
    for (int64_t jb = j0; jb < j1; jb += blockDim.x) {  // uniform: every thread syncs
      const int64_t j = jb + threadIdx.x;
      const bool mine = j < j1;
      const W v = mine ? widen<W>(nz[j * ns1]) : W(0);
      int64_t r = 0;
      for (int64_t i0 = 0; i0 < N; i0 += kStageTokens) {
        const int64_t n = N - i0 < kStageTokens ? N - i0 : kStageTokens;
        __syncthreads();  // the previous chunk has been read
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) row[i] = widen<W>(nz[(i0 + i) * ns1]);
        __syncthreads();
        if (mine) r += rank_count<W>(v, j, i0, i0 + n, [&](int64_t i) { return row[i - i0]; });
      }
      if (mine) {
        ids_restore[b * N + j] = r;
        if (r < n_keep) ids_keep[b * n_keep + r] = j;
      }
    }
  }
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
                         int64_t n_keep, int64_t* ids_restore, int64_t* ids_keep, int sms,
                         cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(N < kStageTokens ? N : kStageTokens) * sizeof(W);
  const RankSplit sp = rank_split(B, N, sms, kThreads);
  const GridShape g = strided_grid(B, sp.splits);
  _masking_rank_kernel<T, W><<<dim3(g.x, g.y), kThreads, smem, stream>>>(
      static_cast<const T*>(noise), ns0, ns1, B, N, n_keep, sp.chunk, ids_restore, ids_keep);
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
                                 int64_t* ids_keep, int sms, cudaStream_t stream) {
  if (B == 0 || N == 0) return cudaSuccess;
  return dispatch(noise_dtype, [&](auto t, auto w) {
    return launch_ranks<decltype(t), decltype(w)>(noise, ns0, ns1, B, N, n_keep, ids_restore,
                                                  ids_keep, sms, stream);
  });
}

}  // namespace cuda
}  // namespace token_gather
}  // namespace mmkernels
