// Host-side validation shared by the CPU and CUDA registrations of the token
// gather family. Data-dependent checks on indices (ranges, permutations) are
// explicit checks on the CPU and device-side assertions (at::_assert_async) on CUDA,
// so they add no host synchronisation; the maps (token_gather_maps.h) and the row
// movers never read or write out of bounds whatever the indices hold. The image-token
// count of scatter_image_features is checked on the host on both backends (one sync
// on CUDA) unless the caller opts out.
#pragma once

#include <ATen/ATen.h>

#include <optional>

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
// permutation of [0, N). The forward gather only needs the range (the maps send any
// other value to the fill row, so nothing is read out of bounds); the backward, a
// gather through the inverse permutation, needs the permutation. On the CPU these
// raise ValueError naming ids_restore; on CUDA they are device-side assertions (no
// host sync; token_gather_maps.h keeps every map in range meanwhile).
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
  TORCH_CHECK_VALUE(in_range.item<bool>(), op, ": ids_restore values must lie in [0, N) = [0, ",
                    N, "); got values in [", ids.min().item<int64_t>(), ", ",
                    ids.max().item<int64_t>(), "]");
  if (!permutation) return;
  auto sorted = std::get<0>(ids.sort(1));
  const bool perm = sorted.eq(at::arange(N, ids.options()).expand({B, N})).all().item<bool>();
  TORCH_CHECK_VALUE(perm, op, ": each row of ids_restore must be a permutation of [0, N) (as "
                    "returned by random_masking); found a repeated index");
}

// scatter_image_features: the image-position count must equal the feature rows, as
// Hugging Face LLaVA requires (same message, raised as ValueError).
inline void check_image_count(const char* op, int64_t tokens, int64_t features) {
  TORCH_CHECK_VALUE(tokens == features, op,
                    ": Image features and image tokens do not match: tokens: ", tokens,
                    ", features ", features, " (image_mask selects ", tokens,
                    " positions, image_features has ", features, " rows)");
}


// ---- per-op argument checks (shapes, dtypes, devices), shared by CPU and CUDA ----------

inline void check_random_masking_args(const char* op, const at::Tensor& x,
                                      const at::Tensor& noise, int64_t n_keep) {
  check_rows_tensor(op, "x", x);
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK(noise.dim() == 2 && noise.size(0) == B && noise.size(1) == N, op,
              ": noise must have shape (B, N) = (", B, ", ", N, "), got ", noise.sizes());
  TORCH_CHECK(at::isFloatingType(noise.scalar_type()), op, ": noise must be floating point, got ",
              noise.scalar_type());
  TORCH_CHECK(noise.device() == x.device(), op, ": noise must be on x's device");
  TORCH_CHECK(n_keep >= 0 && n_keep <= N, op, ": n_keep must lie in [0, N] = [0, ", N, "], got ",
              n_keep);
}

// Returns N (the full token count).
inline int64_t check_restore_args(const char* op, const at::Tensor& x_kept,
                                  const at::Tensor& ids_restore,
                                  const std::optional<at::Tensor>& mask_token) {
  check_rows_tensor(op, "x_kept", x_kept);
  check_index(op, "ids_restore", ids_restore, x_kept);
  const int64_t B = x_kept.size(0), K = x_kept.size(1), D = x_kept.size(2);
  TORCH_CHECK(ids_restore.dim() == 2 && ids_restore.size(0) == B, op,
              ": ids_restore must have shape (B, N) with B = ", B, ", got ", ids_restore.sizes());
  const int64_t N = ids_restore.size(1);
  TORCH_CHECK(K <= N, op, ": x_kept has ", K, " tokens, more than N = ", N);
  if (mask_token.has_value()) {
    TORCH_CHECK(mask_token->dim() == 1 && mask_token->size(0) == D, op,
                ": mask_token must have D = ", D, " elements, got shape ", mask_token->sizes());
    TORCH_CHECK(mask_token->scalar_type() == x_kept.scalar_type(), op, ": mask_token dtype ",
                mask_token->scalar_type(), " must match x_kept dtype ", x_kept.scalar_type());
    TORCH_CHECK(mask_token->device() == x_kept.device(), op, ": mask_token must be on ",
                x_kept.device());
  }
  return N;
}

inline void check_restore_backward_args(const char* op, const at::Tensor& grad,
                                        const at::Tensor& ids_restore, int64_t n_keep) {
  check_rows_tensor(op, "grad", grad);
  check_index(op, "ids_restore", ids_restore, grad);
  const int64_t B = grad.size(0), N = grad.size(1);
  TORCH_CHECK(ids_restore.dim() == 2 && ids_restore.size(0) == B && ids_restore.size(1) == N, op,
              ": ids_restore must have shape (B, N) = (", B, ", ", N, "), got ",
              ids_restore.sizes());
  TORCH_CHECK(n_keep >= 0 && n_keep <= N, op, ": n_keep must lie in [0, N]");
}

inline void check_masked_select_args(const char* op, const at::Tensor& x, const at::Tensor& mask) {
  check_rows_tensor(op, "x", x);
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == N, op,
              ": mask must have shape (B, N) = (", B, ", ", N, "), got ", mask.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.device() == x.device(), op, ": mask must be on x's device");
}

inline void check_scatter_rows_args(const char* op, const at::Tensor& src,
                                    const at::Tensor& index, int64_t num_rows) {
  TORCH_CHECK(src.dim() == 2, op, ": src must be (M, D), got ", src.sizes());
  check_index(op, "index", index, src);
  TORCH_CHECK(index.dim() == 1 && index.size(0) == src.size(0), op, ": index must be (M,) = (",
              src.size(0), ",), got ", index.sizes());
  TORCH_CHECK(num_rows >= 0, op, ": num_rows must be non-negative");
}

inline void check_scatter_image_args(const char* op, const at::Tensor& embeds,
                                     const at::Tensor& mask, const at::Tensor& feats) {
  check_rows_tensor(op, "inputs_embeds", embeds);
  const int64_t B = embeds.size(0), L = embeds.size(1), D = embeds.size(2);
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == L, op,
              ": image_mask must have shape (B, L) = (", B, ", ", L, "), got ", mask.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": image_mask must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK(feats.dim() == 2 && feats.size(1) == D, op,
              ": image_features must be (num_image_tokens, D) with D = ", D, ", got ",
              feats.sizes());
  TORCH_CHECK(feats.scalar_type() == embeds.scalar_type(), op, ": image_features dtype ",
              feats.scalar_type(), " must match inputs_embeds dtype ", embeds.scalar_type());
  TORCH_CHECK(mask.device() == embeds.device() && feats.device() == embeds.device(), op,
              ": all tensors must be on ", embeds.device());
}

}  // namespace token_gather
}  // namespace mmkernels
