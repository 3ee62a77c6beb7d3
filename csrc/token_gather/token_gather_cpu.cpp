// Token gather family, CPU kernels. The index maps come from token_gather_maps.h,
// the same code the CUDA host path runs; the rows then move whole (memcpy when the
// row is contiguous) with the rule of the CUDA kernel (take_a, token_gather_math.h),
// split over rows with at::parallel_for. Every write goes to a distinct row and the
// one reduction (the mask token's gradient) runs in a fixed order per element, so
// results are bit-identical for any thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <tuple>
#include <vector>

#include "token_gather/token_gather_common.h"
#include "token_gather/token_gather_maps.h"
#include "token_gather/token_gather_math.h"

namespace mmkernels {
namespace token_gather {
namespace {

constexpr int64_t kRowGrain = 16;

inline void copy_row(char* dst, int64_t dst_cs, const char* src, int64_t src_cs, int64_t D,
                     int64_t elem) {
  if (D == 0) return;  // empty rows may have null data pointers: memcpy(nullptr, ..) is UB
  if (dst_cs == elem && src_cs == elem) {
    std::memcpy(dst, src, D * elem);
    return;
  }
  for (int64_t d = 0; d < D; ++d) std::memcpy(dst + d * dst_cs, src + d * src_cs, elem);
}

inline void zero_row(char* dst, int64_t dst_cs, int64_t D, int64_t elem) {
  if (D == 0) return;
  if (dst_cs == elem) {
    std::memset(dst, 0, D * elem);
    return;
  }
  for (int64_t d = 0; d < D; ++d) std::memset(dst + d * dst_cs, 0, elem);
}

// The CPU twin of _move_rows_kernel: out (R, D) contiguous; row r is row map[r] of
// `a` when take_a(map[r], rows_a), else row (broadcast_b ? 0 : r) of `b`, else zeros.
void move_rows(const char* op, at::Tensor& out, const at::Tensor& map, int64_t rows_a,
               const RowSource& a, const RowSource& b, bool broadcast_b) {
  const int64_t D = out.size(-1), R = out_rows(out);
  const int64_t* mp = map_data(op, map, R);
  if (R == 0 || D == 0) return;
  TORCH_CHECK(out.is_contiguous(), op, ": internal error: output must be contiguous");
  const int64_t elem = out.element_size();
  char* ob = static_cast<char*>(out.mutable_data_ptr());
  const char* ab = static_cast<const char*>(a.base);
  const char* bb = static_cast<const char*>(b.base);
  at::parallel_for(0, R, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t m = mp != nullptr ? mp[r] : -1;
      char* dst = ob + r * D * elem;
      if (take_a(m, rows_a)) {
        copy_row(dst, elem, ab + row_offset(a, m, 0) * elem, a.s2 * elem, D, elem);
      } else if (bb != nullptr) {
        copy_row(dst, elem, bb + row_offset(b, broadcast_b ? 0 : r, 0) * elem, b.s2 * elem, D,
                 elem);
      } else {
        zero_row(dst, elem, D, elem);
      }
    }
  });
}

// ---- random_masking ---------------------------------------------------------------

template <typename noise_t>
void masking_order(const noise_t* noise, int64_t ns, int64_t N, int64_t n_keep, int64_t* order) {
  // order <- the first n_keep tokens (sorted), then the rest (sorted): an O(N)
  // selection splits kept from removed, and each side is sorted on its own.
  std::iota(order, order + N, int64_t(0));
  auto before = [&](int64_t a, int64_t b) {
    return noise_before<noise_t>(noise[a * ns], a, noise[b * ns], b);
  };
  if (n_keep > 0 && n_keep < N) std::nth_element(order, order + n_keep, order + N, before);
  std::sort(order, order + n_keep, before);
  std::sort(order + n_keep, order + N, before);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> random_masking_cpu(
    const at::Tensor& x, const at::Tensor& noise, int64_t n_keep) {
  const char* op = "random_masking";
  check_random_masking_args(op, x, noise, n_keep);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  auto x_kept = at::empty({B, n_keep, D}, x.options());
  auto ids_restore = at::empty({B, N}, x.options().dtype(at::kLong));
  auto ids_keep = at::empty({B, n_keep}, x.options().dtype(at::kLong));
  if (B == 0 || N == 0) return {x_kept, at::empty({B, N}, x.options()), ids_restore, ids_keep};
  int64_t* restore = ids_restore.mutable_data_ptr<int64_t>();
  int64_t* keep = ids_keep.mutable_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, noise.scalar_type(), "masking_order",
                                  [&] {
    const scalar_t* nz = noise.const_data_ptr<scalar_t>();
    const int64_t ns0 = noise.stride(0), ns1 = noise.stride(1);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<int64_t> order(N);
      for (int64_t b = b0; b < b1; ++b) {
        masking_order<scalar_t>(nz + b * ns0, ns1, N, n_keep, order.data());
        for (int64_t r = 0; r < N; ++r) restore[b * N + order[r]] = r;
        std::copy(order.begin(), order.begin() + n_keep, keep + b * n_keep);
      }
    });
  });
  // From here on, the CUDA host path's code (token_gather_maps.h, the row rule).
  auto mask = ids_restore.ge(n_keep).to(x.scalar_type());
  move_rows(op, x_kept, keep_map(ids_keep, N), B * N, rows_of(x), zeros_source(), false);
  return {x_kept, mask, ids_restore, ids_keep};
}

// ---- restore_tokens -----------------------------------------------------------------

at::Tensor restore_tokens_cpu(const at::Tensor& x_kept, const at::Tensor& ids_restore,
                              const std::optional<at::Tensor>& mask_token) {
  const char* op = "restore_tokens";
  const int64_t N = check_restore_args(op, x_kept, ids_restore, mask_token);
  const int64_t B = x_kept.size(0), K = x_kept.size(1), D = x_kept.size(2);
  check_permutation(op, ids_restore, /*permutation=*/false);
  auto out = at::empty({B, N, D}, x_kept.options());
  if (out.numel() == 0) return out;
  RowSource fill = zeros_source();
  if (mask_token.has_value()) fill = {mask_token->const_data_ptr(), 1, 0, 0, mask_token->stride(0)};
  move_rows(op, out, restore_map(ids_restore, K), B * K, rows_of(x_kept), fill, true);
  return out;
}

std::tuple<at::Tensor, at::Tensor> restore_tokens_backward_cpu(const at::Tensor& grad,
                                                               const at::Tensor& ids_restore,
                                                               int64_t n_keep) {
  const char* op = "restore_tokens_backward";
  check_restore_backward_args(op, grad, ids_restore, n_keep);
  const int64_t B = grad.size(0), N = grad.size(1), D = grad.size(2);
  check_permutation(op, ids_restore);
  auto grad_kept = at::empty({B, n_keep, D}, grad.options());
  const auto acc_type = at::toOpMathType(grad.scalar_type());
  auto grad_token = at::zeros({D}, grad.options().dtype(acc_type));
  if (grad.numel() == 0) return {grad_kept.zero_(), grad_token.to(grad.scalar_type())};
  // grad_x_kept: a gather through the inverse permutation (the CUDA host path's map).
  move_rows(op, grad_kept, restore_backward_map(ids_restore, n_keep), B * N, rows_of(grad),
            zeros_source(), false);
  // mask_token gradient: the sum of the filled rows (mask_token_rows; kept rows are
  // skipped, not multiplied by zero), split over D, each element summed in row order.
  const at::Tensor filled = mask_token_rows(ids_restore, n_keep);
  const bool* fp = filled.const_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mask_token_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    acc_t* t = grad_token.mutable_data_ptr<acc_t>();
    const int64_t s0 = grad.stride(0), s1 = grad.stride(1), s2 = grad.stride(2);
    at::parallel_for(0, D, 64, [&](int64_t d0, int64_t d1) {
      for (int64_t r = 0; r < B * N; ++r) {
        if (!fp[r]) continue;
        const scalar_t* row = g + (r / N) * s0 + (r % N) * s1;
        for (int64_t d = d0; d < d1; ++d) t[d] += static_cast<acc_t>(row[d * s2]);
      }
    });
  });
  return {grad_kept, grad_token.to(grad.scalar_type())};
}

// ---- masked_select_rows / _scatter_rows ---------------------------------------------------

std::tuple<at::Tensor, at::Tensor> masked_select_rows_cpu(const at::Tensor& x,
                                                          const at::Tensor& mask,
                                                          int64_t max_rows) {
  const char* op = "masked_select_rows";
  check_masked_select_args(op, x, mask);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  if (max_rows >= 0) {
    const int64_t M = count_selected(mask);
    TORCH_CHECK_VALUE(M <= max_rows, op, ": mask selects ", M,
                      " positions, more than max_rows = ", max_rows);
  }
  auto index = select_index(mask, max_rows);
  auto rows = at::empty({index.size(0), D}, x.options());
  move_rows(op, rows, index, B * N, rows_of(x), zeros_source(), false);
  return {rows, index};
}

at::Tensor scatter_rows_cpu(const at::Tensor& src, const at::Tensor& index, int64_t num_rows) {
  const char* op = "_scatter_rows";
  check_scatter_rows_args(op, src, index, num_rows);
  const int64_t M = src.size(0);
  const at::Tensor idx = index.contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  std::vector<char> seen(num_rows, 0);
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(ip[m] >= -1 && ip[m] < num_rows, op, ": index[", m, "] = ", ip[m],
                " outside [-1, ", num_rows, ")");
    if (ip[m] >= 0) {
      TORCH_CHECK(!seen[ip[m]], op, ": index holds ", ip[m], " twice; rows must be distinct");
      seen[ip[m]] = 1;
    }
  }
  auto out = at::empty({num_rows, src.size(1)}, src.options());
  move_rows(op, out, scatter_rows_map(index, num_rows), M, rows_of(src), zeros_source(), false);
  return out;
}

// ---- scatter_image_features ------------------------------------------------------------

at::Tensor scatter_image_features_cpu(const at::Tensor& embeds, const at::Tensor& mask,
                                      const at::Tensor& feats, bool check_count) {
  const char* op = "scatter_image_features";
  check_scatter_image_args(op, embeds, mask, feats);
  const int64_t B = embeds.size(0), L = embeds.size(1), D = embeds.size(2);
  const int64_t T = feats.size(0);
  if (check_count) check_image_count(op, count_selected(mask), T);
  auto out = at::empty({B, L, D}, embeds.options());
  move_rows(op, out, image_map(mask, T), T, rows_of(feats), rows_of(embeds), false);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("random_masking", TORCH_FN(random_masking_cpu));
  m.impl("restore_tokens", TORCH_FN(restore_tokens_cpu));
  m.impl("_restore_tokens_backward", TORCH_FN(restore_tokens_backward_cpu));
  m.impl("masked_select_rows", TORCH_FN(masked_select_rows_cpu));
  m.impl("_scatter_rows", TORCH_FN(scatter_rows_cpu));
  m.impl("scatter_image_features", TORCH_FN(scatter_image_features_cpu));
}

}  // namespace token_gather
}  // namespace mmkernels
