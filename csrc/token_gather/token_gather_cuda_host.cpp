// Token gather family, CUDA registration. Index maps are built with a few small
// ATen ops on the device (cumsum, scatter to distinct slots, where); the rows move
// in one _move_rows_kernel launch. Data-dependent checks are device-side
// assertions: no host synchronisation except in masked_select_rows without
// max_rows, whose output size depends on the data (as x[mask]).
#ifdef MMKERNELS_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_check.h"

#include <tuple>

#include "token_gather/token_gather_common.h"
#include "token_gather/token_gather_cuda.h"

namespace mmkernels {
namespace token_gather {
namespace {

cuda::RowSource rows_of(const at::Tensor& t) {  // (B, N, D) or (M, D)
  if (t.dim() == 3) return {t.const_data_ptr(), t.size(1), t.stride(0), t.stride(1), t.stride(2)};
  return {t.const_data_ptr(), 1, t.stride(0), 0, t.stride(1)};
}

cuda::RowSource zeros_source() { return {nullptr, 1, 0, 0, 0}; }

void move_rows(at::Tensor& out, const at::Tensor& map, const cuda::RowSource& a,
               const cuda::RowSource& b, bool broadcast_b, const char* op) {
  const int64_t D = out.size(-1);
  const int64_t R = D == 0 ? 0 : out.numel() / D;
  const cudaError_t err = cuda::launch_move_rows(
      out.mutable_data_ptr(), R, D, static_cast<int>(out.element_size()),
      map.defined() ? map.const_data_ptr<int64_t>() : nullptr, a, b, broadcast_b,
      c10::cuda::getCurrentCUDAStream());
  check_launch(op, err);
}

int noise_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    case at::kBFloat16: return 3;
    default: TORCH_CHECK(false, "random_masking: noise dtype ", t, " is not supported");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> random_masking_cuda(
    const at::Tensor& x, const at::Tensor& noise, int64_t n_keep) {
  const char* op = "random_masking";
  check_random_masking_args(op, x, noise, n_keep);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const c10::cuda::CUDAGuard guard(x.device());
  auto x_kept = at::empty({B, n_keep, D}, x.options());
  auto ids_restore = at::empty({B, N}, x.options().dtype(at::kLong));
  auto ids_keep = at::empty({B, n_keep}, x.options().dtype(at::kLong));
  if (B == 0 || N == 0) return {x_kept, at::empty({B, N}, x.options()), ids_restore, ids_keep};
  const cudaError_t err = cuda::launch_masking_ranks(
      noise.const_data_ptr(), noise_code(noise.scalar_type()), noise.stride(0), noise.stride(1),
      B, N, n_keep, ids_restore.mutable_data_ptr<int64_t>(), ids_keep.mutable_data_ptr<int64_t>(),
      c10::cuda::getCurrentCUDAStream());
  check_launch(op, err);
  auto mask = ids_restore.ge(n_keep).to(x.scalar_type());
  auto map = ids_keep + at::arange(B, ids_keep.options()).mul_(N).unsqueeze(1);
  move_rows(x_kept, map, rows_of(x), zeros_source(), false, op);
  return {x_kept, mask, ids_restore, ids_keep};
}

at::Tensor restore_tokens_cuda(const at::Tensor& x_kept, const at::Tensor& ids_restore,
                               const std::optional<at::Tensor>& mask_token) {
  const char* op = "restore_tokens";
  const int64_t N = check_restore_args(op, x_kept, ids_restore, mask_token);
  const int64_t B = x_kept.size(0), K = x_kept.size(1), D = x_kept.size(2);
  const c10::cuda::CUDAGuard guard(x_kept.device());
  check_permutation(op, ids_restore, /*permutation=*/false);
  auto out = at::empty({B, N, D}, x_kept.options());
  if (out.numel() == 0) return out;
  auto base = at::arange(B, ids_restore.options()).mul_(K).unsqueeze(1);
  auto map = at::where(ids_restore.lt(K), ids_restore + base, at::full({}, -1, ids_restore.options()));
  cuda::RowSource fill = zeros_source();
  if (mask_token.has_value()) fill = {mask_token->const_data_ptr(), 1, 0, 0, mask_token->stride(0)};
  move_rows(out, map, rows_of(x_kept), fill, true, op);
  return out;
}

std::tuple<at::Tensor, at::Tensor> restore_tokens_backward_cuda(const at::Tensor& grad,
                                                                const at::Tensor& ids_restore,
                                                                int64_t n_keep) {
  const char* op = "restore_tokens_backward";
  check_restore_backward_args(op, grad, ids_restore, n_keep);
  const int64_t B = grad.size(0), N = grad.size(1), D = grad.size(2);
  const c10::cuda::CUDAGuard guard(grad.device());
  check_permutation(op, ids_restore);
  auto grad_kept = at::empty({B, n_keep, D}, grad.options());
  // ids_shuffle = inverse permutation (a scatter to distinct slots), then a gather.
  auto ids = ids_restore.clamp(0, N - 1);
  auto shuffle = at::empty({B, N}, ids.options())
                     .scatter_(1, ids, at::arange(N, ids.options()).expand({B, N}));
  auto map = shuffle.narrow(1, 0, n_keep) + at::arange(B, ids.options()).mul_(N).unsqueeze(1);
  move_rows(grad_kept, map.contiguous(), rows_of(grad), zeros_source(), false, op);
  // mask_token gradient: the masked rows summed in float32 (or float64).
  const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto masked = ids_restore.ge(n_keep).unsqueeze(-1);
  auto grad_token = grad.to(acc).mul(masked).sum({0, 1}).to(grad.scalar_type());
  return {grad_kept, grad_token};
}

std::tuple<at::Tensor, at::Tensor> masked_select_rows_cuda(const at::Tensor& x,
                                                           const at::Tensor& mask,
                                                           int64_t max_rows) {
  const char* op = "masked_select_rows";
  check_masked_select_args(op, x, mask);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const c10::cuda::CUDAGuard guard(x.device());
  auto flat = mask.reshape({B * N});
  at::Tensor index;
  if (max_rows < 0) {
    index = at::nonzero(flat).squeeze(1);  // one host sync: the size depends on the data
  } else {
    auto pos = at::cumsum(flat, 0, at::kLong).sub_(1);
    at::_assert_async(flat.sum().le(max_rows),
                      "masked_select_rows: more positions are selected than max_rows");
    // Slot max_rows collects the unselected positions and is dropped.
    auto slot = at::where(flat.logical_and(pos.lt(max_rows)), pos,
                          at::full({}, max_rows, pos.options()));
    index = at::full({max_rows + 1}, -1, pos.options())
                .scatter_(0, slot, at::arange(B * N, pos.options()))
                .narrow(0, 0, max_rows)
                .contiguous();
  }
  auto rows = at::empty({index.size(0), D}, x.options());
  move_rows(rows, index, rows_of(x), zeros_source(), false, op);
  return {rows, index};
}

at::Tensor scatter_rows_cuda(const at::Tensor& src, const at::Tensor& index, int64_t num_rows) {
  const char* op = "_scatter_rows";
  check_scatter_rows_args(op, src, index, num_rows);
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t M = src.size(0);
  auto out = at::empty({num_rows, src.size(1)}, src.options());
  at::_assert_async(at::logical_and(index.ge(-1), index.lt(num_rows)).all(),
                    "_scatter_rows: index outside [-1, num_rows)");
  // Inverse map (distinct targets; slot num_rows collects the -1 entries).
  auto slot = at::where(index.ge(0).logical_and(index.lt(num_rows)), index,
                        at::full({}, num_rows, index.options()));
  auto map = at::full({num_rows + 1}, -1, index.options())
                 .scatter_(0, slot, at::arange(M, index.options()))
                 .narrow(0, 0, num_rows)
                 .contiguous();
  move_rows(out, map, rows_of(src), zeros_source(), false, op);
  return out;
}

at::Tensor scatter_image_features_cuda(const at::Tensor& embeds, const at::Tensor& mask,
                                       const at::Tensor& feats) {
  const char* op = "scatter_image_features";
  check_scatter_image_args(op, embeds, mask, feats);
  const int64_t B = embeds.size(0), L = embeds.size(1), D = embeds.size(2);
  const c10::cuda::CUDAGuard guard(embeds.device());
  const int64_t T = feats.size(0);
  auto flat = mask.reshape({B * L});
  // The count check is a device-side assertion: no host sync on the fast path.
  at::_assert_async(flat.sum().eq(T),
                    "scatter_image_features: image tokens and image features do not match");
  auto pos = at::cumsum(flat, 0, at::kLong).sub_(1);
  auto map = at::where(flat.logical_and(pos.lt(T)), pos, at::full({}, -1, pos.options()));
  auto out = at::empty({B, L, D}, embeds.options());
  move_rows(out, map, rows_of(feats), rows_of(embeds), false, op);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) {
  m.impl("random_masking", TORCH_FN(random_masking_cuda));
  m.impl("restore_tokens", TORCH_FN(restore_tokens_cuda));
  m.impl("_restore_tokens_backward", TORCH_FN(restore_tokens_backward_cuda));
  m.impl("masked_select_rows", TORCH_FN(masked_select_rows_cuda));
  m.impl("_scatter_rows", TORCH_FN(scatter_rows_cuda));
  m.impl("scatter_image_features", TORCH_FN(scatter_image_features_cuda));
}

}  // namespace token_gather
}  // namespace mmkernels

#endif  // MMKERNELS_WITH_CUDA
