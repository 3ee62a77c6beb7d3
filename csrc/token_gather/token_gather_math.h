// Token gather math, written once and shared by token_gather_cpu.cpp and
// token_gather_cuda.cu: the masking order and the index rules of each op.
//
//   random_masking  MAE (He et al. 2022): ids_shuffle = argsort(noise) (stable:
//                   ties go to the lower index; NaN sorts last, as torch.sort),
//                   keep ids_shuffle[:n_keep], ids_restore = argsort(ids_shuffle),
//                   i.e. ids_restore[j] = rank of token j.
//   restore_tokens  out[j] = x_kept[ids_restore[j]] if ids_restore[j] < n_keep,
//                   else mask_token.
//   masked rows     the m-th selected position (row-major) goes to output row m.
// Every op is a permutation or a selection, so every backward is a gather or a
// scatter to distinct rows: deterministic, without atomics.
#pragma once

#include <cstdint>

#include "common/host_device.h"
#include "common/launch_geometry.h"

namespace mmkernels {
namespace token_gather {

// True when token (a, ia) comes before token (b, ib) in the masking order:
// ascending noise, NaN last, ties broken by the lower index.
template <typename T>
HOST_DEVICE_INLINE bool noise_before(T a, int64_t ia, T b, int64_t ib) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan || b_nan) {
    if (a_nan && b_nan) return ia < ib;
    return b_nan;  // a is a number, b is NaN
  }
  if (a < b) return true;
  if (b < a) return false;
  return ia < ib;
}

// The tokens i in [i0, i1) that come before token j (noise v) in the masking order.
// Summed over [0, n), the rank of token j (= ids_restore[j]): the CUDA kernel counts
// so, each thread for its tokens, against the row staged in shared memory in chunks.
template <typename T, typename Load>
HOST_DEVICE_INLINE int64_t rank_count(T v, int64_t j, int64_t i0, int64_t i1, const Load& noise) {
  int64_t r = 0;
  for (int64_t i = i0; i < i1; ++i) r += noise_before<T>(noise(i), i, v, j) ? 1 : 0;
  return r;
}

// Launch shape of the CUDA rank count (host side): `splits` blocks per noise row of N
// tokens, `chunk` tokens each, so that B * splits is about 4 blocks per SM (sms),
// with at most ceil(N / threads) blocks per row (a thread per token at least) and at
// most kMaxGridYZ (gridDim.y). No result depends on it: each rank is counted whole.
struct RankSplit {
  int64_t splits, chunk;
};
inline RankSplit rank_split(int64_t B, int64_t N, int sms, int threads) {
  const int64_t want = (4 * int64_t(sms > 0 ? sms : 1) + B - 1) / (B > 0 ? B : 1);
  const int64_t most = (N + threads - 1) / threads;
  int64_t splits = want < most ? want : most;
  splits = splits < 1 ? 1 : (splits > kMaxGridYZ ? kMaxGridYZ : splits);
  const int64_t chunk = N > 0 ? (N + splits - 1) / splits : 1;
  return {N > 0 ? (N + chunk - 1) / chunk : 1, chunk};
}

// Widest word, among 16, 8 and 4 bytes and wider than the E-byte element, in which a
// contiguous row can move from address src to address dst: the two agree modulo the
// word, so a scalar head aligns both at once and a scalar tail ends the row (any row
// size). E when none does (the row moves element by element).
HOST_DEVICE_INLINE int row_word_bytes(uint64_t src, uint64_t dst, int E) {
  const uint64_t rel = src ^ dst;
  for (int w = 16; w >= 4 && w > E; w >>= 1) {
    if ((rel & static_cast<uint64_t>(w - 1)) == 0) return w;
  }
  return E;
}

// restore_tokens: source row of output token j, or -1 for the mask token.
HOST_DEVICE_INLINE int64_t restore_source(int64_t id, int64_t n_keep) {
  return (id >= 0 && id < n_keep) ? id : -1;
}

// Rows of a (B, N, D) or (M, D) tensor: row m = (m / inner, m % inner), element d at
// base + (m / inner) * s0 + (m % inner) * s1 + d * s2 (strides in elements, int64).
struct RowSource {
  const void* base;  // nullptr: zeros
  int64_t inner, s0, s1, s2;
};

// Element offset of (row m, element d) of a RowSource, in elements.
HOST_DEVICE_INLINE int64_t row_offset(const RowSource& s, int64_t m, int64_t d) {
  return (m / s.inner) * s.s0 + (m % s.inner) * s.s1 + d * s.s2;
}

// The one data-movement rule of the family (both backends): output row r of an
// (R, D) contiguous result is row map[r] of `a` when 0 <= map[r] < rows_a, else row
// (broadcast_b ? 0 : r) of `b`, else zeros. `map` is read as a contiguous (R,) int64
// array; a map value outside [0, rows_a) never reads `a`, so no index can read out
// of bounds whatever it holds.
HOST_DEVICE_INLINE bool take_a(int64_t m, int64_t rows_a) { return m >= 0 && m < rows_a; }

}  // namespace token_gather
}  // namespace mmkernels
