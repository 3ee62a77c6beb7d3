// Host-side validation shared by the CPU and CUDA registrations of the token
// gather family. Data-dependent checks (index ranges, permutations, counts) are
// explicit TORCH_CHECKs on the CPU; on CUDA they are device-side assertions
// (at::_assert_async), so no host synchronisation is added, and the kernels
// themselves never read or write out of bounds whatever the indices hold.
#pragma once

#include <ATen/ATen.h>

namespace mmkernels {
namespace token_gather {

inline void check_rows_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be a 3-D (B, N, D) tensor, got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                  t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              op, ": ", name, " dtype must be float32, float64, float16 or bfloat16, got ",
              t.scalar_type());
}

inline void check_index(const char* op, const char* name, const at::Tensor& idx,
                        const at::Tensor& like) {
  TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
              idx.scalar_type());
  TORCH_CHECK(idx.device() == like.device(), op, ": ", name, " must be on ", like.device(),
              ", got ", idx.device());
}

// ids (B, N) int64 with values in [0, N); with `permutation`, every row must be a
// permutation of [0, N). The forward gather only needs the range (the kernels map
// any other value to the fill row, so nothing is read out of bounds); the backward,
// a scatter to distinct rows, needs the permutation.
inline void check_permutation(const char* op, const at::Tensor& ids, bool permutation = true) {
  const int64_t B = ids.size(0), N = ids.size(1);
  if (ids.numel() == 0) return;
  const auto in_range = at::logical_and(ids >= 0, ids < N).all();
  if (ids.is_cuda()) {
    at::_assert_async(in_range, "ids_restore values out of range [0, N)");
    if (!permutation) return;
    auto counts = at::zeros({B, N}, ids.options());
    counts.scatter_add_(1, ids.clamp(0, N - 1), at::ones_like(ids));
    at::_assert_async((counts == 1).all(), "ids_restore rows must be permutations of [0, N)");
    return;
  }
  TORCH_CHECK(in_range.item<bool>(), op, ": ids_restore values must lie in [0, N) = [0, ", N,
              "); got values in [", ids.min().item<int64_t>(), ", ", ids.max().item<int64_t>(),
              "]");
  if (!permutation) return;
  auto sorted = std::get<0>(ids.sort(1));
  const bool perm = sorted.eq(at::arange(N, ids.options()).expand({B, N})).all().item<bool>();
  TORCH_CHECK(perm, op, ": each row of ids_restore must be a permutation of [0, N) (as returned "
              "by random_masking); found a repeated index");
}

}  // namespace token_gather
}  // namespace mmkernels
