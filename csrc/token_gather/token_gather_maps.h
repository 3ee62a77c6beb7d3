// Index maps of the token gather family, written once as small device-agnostic
// ATen formulations and used unchanged by the CPU registrations
// (token_gather_cpu.cpp) and the CUDA host code (token_gather_cuda_host.cpp). Both
// backends then move the rows with the same rule (take_a in token_gather_math.h),
// so everything but the final row move is exercised by the CPU tests.
//
// Every map is a contiguous (R,) int64 tensor read as a flat array by the row
// movers: map[r] = source row of output row r, or -1 (fill row). The inputs may have
// any layout (transposed, expanded, sliced); the maps never inherit it. Building a
// map never needs a host synchronisation and never uses uninitialised memory: a
// value the checks would reject still gives an in-range map entry or -1.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "token_gather/token_gather_math.h"

namespace mmkernels {
namespace token_gather {

// Row r of a (B, N, D) tensor is (r / N, r % N); of an (M, D) tensor, row r.
inline RowSource rows_of(const at::Tensor& t) {
  if (t.dim() == 3) {
    return {t.const_data_ptr(), std::max<int64_t>(t.size(1), 1), t.stride(0), t.stride(1),
            t.stride(2)};
  }
  return {t.const_data_ptr(), 1, t.stride(0), 0, t.stride(1)};
}

inline RowSource zeros_source() { return {nullptr, 1, 0, 0, 0}; }

// Rows of a (B, N, D) or (M, D) output (also when D == 0).
inline int64_t out_rows(const at::Tensor& out) {
  return out.dim() == 3 ? out.size(0) * out.size(1) : out.size(0);
}

// The map contract of the row movers: contiguous int64 with one entry per output row.
inline const int64_t* map_data(const char* op, const at::Tensor& map, int64_t R) {
  if (!map.defined()) return nullptr;
  TORCH_CHECK(map.scalar_type() == at::kLong && map.is_contiguous() && map.numel() == R, op,
              ": internal error: row map must be a contiguous int64 (", R, ",) tensor, got ",
              map.scalar_type(), " ", map.sizes(), " with strides ", map.strides());
  return map.const_data_ptr<int64_t>();
}

// (B, 1) offsets b * stride, on ids' device.
inline at::Tensor row_base(const at::Tensor& like, int64_t B, int64_t stride) {
  return at::arange(B, like.options().dtype(at::kLong)).mul_(stride).unsqueeze(1);
}

// random_masking: x_kept row (b, r) comes from x row b * N + ids_keep[b, r].
inline at::Tensor keep_map(const at::Tensor& ids_keep, int64_t N) {
  const int64_t B = ids_keep.size(0);
  return (ids_keep.contiguous() + row_base(ids_keep, B, N)).contiguous().view(-1);
}

// restore_tokens forward: out row (b, j) comes from x_kept row b * K + ids_restore[b, j]
// when 0 <= ids_restore[b, j] < K (restore_source), else from the mask token (-1).
// ids_restore may have any layout: the map is built from a contiguous copy, so it is
// row-major whatever the input's strides (a transposed ids_restore once gave a map in
// the input's layout, which the CUDA kernel read as row-major).
inline at::Tensor restore_map(const at::Tensor& ids_restore, int64_t K) {
  const auto ids = ids_restore.contiguous();
  const int64_t B = ids.size(0);
  const auto kept = ids.ge(0).logical_and_(ids.lt(K));
  return at::where(kept, ids + row_base(ids, B, K), at::full({}, -1, ids.options()))
      .contiguous()
      .view(-1);
}

// restore_tokens backward: grad_x_kept row (b, k) comes from grad row b * N + j for the
// j with ids_restore[b, j] == k (the inverse permutation, restricted to the kept
// slots), or -1 (a zero row) where no j has it. The scatter builds it into a buffer
// initialised to -1, and only in-range ids land in a real slot; every other j lands
// in a dropped slot of its own (n_keep + j: distinct addresses, so the masked
// majority of the tokens does not serialise on one dummy slot). Nothing here depends
// on a check having passed: a repeated id (rejected before the call on the CPU, a
// device-side assertion on CUDA) still gives an in-range map.
inline at::Tensor restore_backward_map(const at::Tensor& ids_restore, int64_t n_keep) {
  const auto ids = ids_restore.contiguous();
  const int64_t B = ids.size(0), N = ids.size(1);
  const auto in_keep = ids.ge(0).logical_and_(ids.lt(n_keep));
  const auto cols = at::arange(N, ids.options()).expand({B, N}).contiguous();
  const auto slot = at::where(in_keep, ids, cols + n_keep);
  const auto inv = at::full({B, n_keep + N}, -1, ids.options()).scatter_(1, slot, cols)
                       .narrow(1, 0, n_keep);
  return at::where(inv.ge(0), inv + row_base(ids, B, N), at::full({}, -1, ids.options()))
      .contiguous()
      .view(-1);
}

// restore_tokens backward: the (B, N) rows the mask token filled (restore_source < 0).
// Their sum is the mask token's gradient; the kept rows are skipped, never multiplied
// by zero (an Inf in a kept row must not become NaN).
inline at::Tensor mask_token_rows(const at::Tensor& ids_restore, int64_t n_keep) {
  const auto ids = ids_restore.contiguous();
  return ids.ge(0).logical_and_(ids.lt(n_keep)).logical_not_();
}

// masked_select_rows: the flat positions b * N + n of the selected entries, row-major.
// max_rows < 0: exactly those (the size depends on the data: one host sync on CUDA,
// as x[mask]). max_rows >= 0: max_rows entries, padded with -1; the first max_rows
// selected positions when more are selected (the caller checks that case).
inline at::Tensor select_index(const at::Tensor& mask, int64_t max_rows) {
  const auto flat = mask.contiguous().view(-1);
  if (max_rows < 0) return at::nonzero(flat).squeeze(1).contiguous();
  // The t-th selected position is the first p with inclusive cumsum[p] >= t + 1: a
  // search in a sorted array, so no scatter (and no write conflict) is involved.
  const auto csum = at::cumsum(flat, 0, at::kLong);
  const auto want = at::arange(1, max_rows + 1, csum.options());
  const auto pos = at::searchsorted(csum, want);
  return at::where(pos.lt(flat.numel()), pos, at::full({}, -1, pos.options())).contiguous();
}

// Scatter slots of an (M,) index into num_rows rows: index[m] where it lies in
// [0, num_rows), else num_rows + m, a dropped slot of its own. A single shared dummy
// slot would make every padded entry (-1) write one address, and those stores (or
// atomic adds) serialise.
inline at::Tensor dropped_slots(const at::Tensor& index, int64_t num_rows) {
  const auto idx = index.contiguous();
  const auto ok = idx.ge(0).logical_and_(idx.lt(num_rows));
  return at::where(ok, idx, at::arange(num_rows, num_rows + idx.numel(), idx.options()));
}

// _scatter_rows: out row i comes from src row m where index[m] == i, or -1 (zeros).
// Out-of-range entries go to dropped slots (dropped_slots); distinctness is checked
// by the caller.
inline at::Tensor scatter_rows_map(const at::Tensor& index, int64_t num_rows) {
  const int64_t M = index.numel();
  return at::full({num_rows + M}, -1, index.options())
      .scatter_(0, dropped_slots(index, num_rows), at::arange(M, index.options()))
      .narrow(0, 0, num_rows)
      .contiguous();
}

// scatter_image_features: position p (flat, row-major) takes feature row t when it is
// the t-th image position and t < T; every other position keeps its embedding (-1).
// With matching counts that is HF's masked_scatter; with more image positions than
// features, the surplus positions keep their embeddings and nothing is read past
// feature row T - 1.
inline at::Tensor image_map(const at::Tensor& image_mask, int64_t T) {
  const auto flat = image_mask.contiguous().view(-1);
  const auto pos = at::cumsum(flat, 0, at::kLong).sub_(1);
  return at::where(flat.logical_and(pos.lt(T)), pos, at::full({}, -1, pos.options()))
      .contiguous();
}

// Number of image positions (a host sync on CUDA; the caller decides when to pay it).
inline int64_t count_selected(const at::Tensor& mask) {
  return mask.sum(at::kLong).item<int64_t>();
}

}  // namespace token_gather
}  // namespace mmkernels
