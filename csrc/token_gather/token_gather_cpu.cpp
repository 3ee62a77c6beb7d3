// Token gather family, CPU kernels. Rows are moved whole (memcpy when the row
// is contiguous); work is split over rows with at::parallel_for. Every write
// goes to a distinct row, so results are deterministic for any thread count.
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
#include "token_gather/token_gather_math.h"

namespace mmkernels {
namespace token_gather {
namespace {

constexpr int64_t kRowGrain = 16;

// A (rows, D) view in bytes: row r, element d at base + r*row_stride + d*col_stride.
struct ByteRows {
  char* base;
  int64_t row_stride, col_stride;  // bytes
};

inline void copy_row(char* dst, int64_t dst_cs, const char* src, int64_t src_cs, int64_t D,
                     int64_t elem) {
  if (dst_cs == elem && src_cs == elem) {
    std::memcpy(dst, src, D * elem);
    return;
  }
  for (int64_t d = 0; d < D; ++d) std::memcpy(dst + d * dst_cs, src + d * src_cs, elem);
}

inline void zero_row(char* dst, int64_t dst_cs, int64_t D, int64_t elem) {
  if (dst_cs == elem) {
    std::memset(dst, 0, D * elem);
    return;
  }
  for (int64_t d = 0; d < D; ++d) std::memset(dst + d * dst_cs, 0, elem);
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
  auto mask = at::empty({B, N}, x.options());
  auto ids_restore = at::empty({B, N}, x.options().dtype(at::kLong));
  auto ids_keep = at::empty({B, n_keep}, x.options().dtype(at::kLong));
  if (B == 0 || N == 0) return {x_kept, mask, ids_restore, ids_keep};
  const int64_t elem = x.element_size();
  const char* xb = static_cast<const char*>(x.const_data_ptr());
  char* kb = static_cast<char*>(x_kept.mutable_data_ptr());
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mask_fill", [&] {
    scalar_t* m = mask.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * N, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) m[i] = static_cast<scalar_t>(restore[i] >= n_keep ? 1 : 0);
    });
  });
  const int64_t xs0 = x.stride(0) * elem, xs1 = x.stride(1) * elem, xs2 = x.stride(2) * elem;
  at::parallel_for(0, B * n_keep, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / n_keep;
      copy_row(kb + r * D * elem, elem, xb + b * xs0 + keep[r] * xs1, xs2, D, elem);
    }
  });
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
  const int64_t elem = x_kept.element_size();
  const char* kb = static_cast<const char*>(x_kept.const_data_ptr());
  const int64_t ks0 = x_kept.stride(0) * elem, ks1 = x_kept.stride(1) * elem,
                ks2 = x_kept.stride(2) * elem;
  const char* tb = mask_token.has_value() ? static_cast<const char*>(mask_token->const_data_ptr())
                                          : nullptr;
  const int64_t ts = mask_token.has_value() ? mask_token->stride(0) * elem : 0;
  const at::Tensor ids = ids_restore.contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  char* ob = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, B * N, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / N;
      const int64_t src = restore_source(id[r], K);
      char* dst = ob + r * D * elem;
      if (src >= 0) {
        copy_row(dst, elem, kb + b * ks0 + src * ks1, ks2, D, elem);
      } else if (tb != nullptr) {
        copy_row(dst, elem, tb, ts, D, elem);
      } else {
        zero_row(dst, elem, D, elem);
      }
    }
  });
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
  const at::Tensor ids = ids_restore.contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  if (grad.numel() > 0) {
    // A permutation: every kept row receives exactly one source row.
    const int64_t elem = grad.element_size();
    const char* gb = static_cast<const char*>(grad.const_data_ptr());
    const int64_t gs0 = grad.stride(0) * elem, gs1 = grad.stride(1) * elem,
                  gs2 = grad.stride(2) * elem;
    char* kb = static_cast<char*>(grad_kept.mutable_data_ptr());
    at::parallel_for(0, B * N, kRowGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / N, j = r % N;
        const int64_t src = restore_source(id[r], n_keep);
        if (src >= 0) {
          copy_row(kb + (b * n_keep + src) * D * elem, elem, gb + b * gs0 + j * gs1, gs2, D, elem);
        }
      }
    });
    // mask_token gradient: sum of the masked rows, split over D (deterministic order).
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mask_token_grad", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      acc_t* t = grad_token.mutable_data_ptr<acc_t>();
      const int64_t s0 = grad.stride(0), s1 = grad.stride(1), s2 = grad.stride(2);
      at::parallel_for(0, D, 64, [&](int64_t d0, int64_t d1) {
        for (int64_t r = 0; r < B * N; ++r) {
          if (restore_source(id[r], n_keep) >= 0) continue;
          const scalar_t* row = g + (r / N) * s0 + (r % N) * s1;
          for (int64_t d = d0; d < d1; ++d) t[d] += static_cast<acc_t>(row[d * s2]);
        }
      });
    });
  }
  return {grad_kept, grad_token.to(grad.scalar_type())};
}

// ---- masked_select_rows / _scatter_rows ---------------------------------------------------

std::tuple<at::Tensor, at::Tensor> masked_select_rows_cpu(const at::Tensor& x,
                                                          const at::Tensor& mask,
                                                          int64_t max_rows) {
  const char* op = "masked_select_rows";
  check_masked_select_args(op, x, mask);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const at::Tensor m = mask.contiguous();
  const bool* mp = m.const_data_ptr<bool>();
  std::vector<int64_t> picked;
  picked.reserve(B * N);
  for (int64_t i = 0; i < B * N; ++i) {
    if (mp[i]) picked.push_back(i);
  }
  const int64_t M = static_cast<int64_t>(picked.size());
  TORCH_CHECK(max_rows < 0 || M <= max_rows, op, ": ", M, " positions are selected, more than max_rows = ",
              max_rows);
  const int64_t rows_out = max_rows < 0 ? M : max_rows;
  auto rows = at::empty({rows_out, D}, x.options());
  auto index = at::full({rows_out}, -1, x.options().dtype(at::kLong));
  if (rows_out == 0) return {rows, index};
  std::copy(picked.begin(), picked.end(), index.mutable_data_ptr<int64_t>());
  const int64_t elem = x.element_size();
  const char* xb = static_cast<const char*>(x.const_data_ptr());
  const int64_t xs0 = x.stride(0) * elem, xs1 = x.stride(1) * elem, xs2 = x.stride(2) * elem;
  char* rb = static_cast<char*>(rows.mutable_data_ptr());
  at::parallel_for(0, rows_out, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (r < M) {
        const int64_t i = picked[r];
        copy_row(rb + r * D * elem, elem, xb + (i / N) * xs0 + (i % N) * xs1, xs2, D, elem);
      } else {
        zero_row(rb + r * D * elem, elem, D, elem);
      }
    }
  });
  return {rows, index};
}

at::Tensor scatter_rows_cpu(const at::Tensor& src, const at::Tensor& index, int64_t num_rows) {
  const char* op = "_scatter_rows";
  check_scatter_rows_args(op, src, index, num_rows);
  const int64_t M = src.size(0), D = src.size(1);
  auto out = at::zeros({num_rows, D}, src.options());
  if (M == 0 || D == 0) return out;
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
  const int64_t elem = src.element_size();
  const char* sb = static_cast<const char*>(src.const_data_ptr());
  const int64_t ss0 = src.stride(0) * elem, ss1 = src.stride(1) * elem;
  char* ob = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, M, kRowGrain, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (ip[m] >= 0) copy_row(ob + ip[m] * D * elem, elem, sb + m * ss0, ss1, D, elem);
    }
  });
  return out;
}

// ---- scatter_image_features ------------------------------------------------------------

at::Tensor scatter_image_features_cpu(const at::Tensor& embeds, const at::Tensor& mask,
                                      const at::Tensor& feats) {
  const char* op = "scatter_image_features";
  check_scatter_image_args(op, embeds, mask, feats);
  const int64_t B = embeds.size(0), L = embeds.size(1), D = embeds.size(2);
  const at::Tensor m = mask.contiguous();
  const bool* mp = m.const_data_ptr<bool>();
  const int64_t T = feats.size(0);
  int64_t count = 0;
  for (int64_t i = 0; i < B * L; ++i) count += mp[i] ? 1 : 0;
  TORCH_CHECK(count == T, op, ": image_mask selects ", count, " image-token positions but ", T,
              " image feature rows were given (image tokens and features do not match)");
  auto out = embeds.contiguous().clone();
  if (T == 0 || D == 0) return out;
  std::vector<int64_t> pos;  // flat position of the t-th image token
  pos.reserve(T);
  for (int64_t i = 0; i < B * L; ++i) {
    if (mp[i]) pos.push_back(i);
  }
  const int64_t elem = embeds.element_size();
  const char* fb = static_cast<const char*>(feats.const_data_ptr());
  const int64_t fs0 = feats.stride(0) * elem, fs1 = feats.stride(1) * elem;
  char* ob = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, T, kRowGrain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) copy_row(ob + pos[t] * D * elem, elem, fb + t * fs0, fs1, D, elem);
  });
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
