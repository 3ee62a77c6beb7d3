// Token gather family, CUDA registration. The index maps come from
// token_gather_maps.h (small device-agnostic ATen ops, the same code the CPU
// registrations run, so the CPU tests cover it); the rows move in one
// _move_rows_kernel launch. Data-dependent index checks are device-side assertions,
// and the maps stay in range whatever they find. Host synchronisations: the
// image-token count of scatter_image_features (by default; check_count=False skips
// it), and masked_select_rows without max_rows, whose output size depends on the
// data (as x[mask]).
#ifdef MMKERNELS_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_check.h"
#include "common/cuda_device.h"

#include <tuple>

#include "token_gather/token_gather_common.h"
#include "token_gather/token_gather_cuda.h"
#include "token_gather/token_gather_maps.h"

namespace mmkernels {
namespace token_gather {
namespace {

// out (R, D) contiguous; see take_a (token_gather_math.h) for the rule.
void move_rows(const char* op, at::Tensor& out, const at::Tensor& map, int64_t rows_a,
               const RowSource& a, const RowSource& b, bool broadcast_b) {
  const int64_t D = out.size(-1), R = out_rows(out);
  const int64_t* mp = map_data(op, map, R);
  TORCH_CHECK(out.is_contiguous(), op, ": internal error: output must be contiguous");
  const cudaError_t err = cuda::launch_move_rows(
      out.mutable_data_ptr(), R, D, static_cast<int>(out.element_size()), mp, rows_a, a, b,
      broadcast_b, c10::cuda::getCurrentCUDAStream());
  check_launch(op, err);
}

// dtype code of launch_masking_ranks / launch_masked_colsum.
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
      sm_count(x.device().index()), c10::cuda::getCurrentCUDAStream());
  check_launch(op, err);
  auto mask = ids_restore.ge(n_keep).to(x.scalar_type());
  move_rows(op, x_kept, keep_map(ids_keep, N), B * N, rows_of(x), zeros_source(), false);
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
  RowSource fill = zeros_source();
  if (mask_token.has_value()) fill = {mask_token->const_data_ptr(), 1, 0, 0, mask_token->stride(0)};
  // restore_map is row-major whatever ids_restore's layout (it once kept a transposed layout).
  move_rows(op, out, restore_map(ids_restore, K), B * K, rows_of(x_kept), fill, true);
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
  // The inverse permutation is built in a buffer initialised to -1 (token_gather_maps.h):
  // rows no id reaches are zeros, never uninitialised memory, even if the device-side
  // permutation assertion fails.
  move_rows(op, grad_kept, restore_backward_map(ids_restore, n_keep), B * N, rows_of(grad),
            zeros_source(), false);
  // mask_token gradient: the filled rows (mask_token_rows; kept rows are skipped, never
  // multiplied by zero, so an Inf there stays out) summed column-wise in float32 (or
  // float64) straight from grad: (S, D) fixed-order partial sums, then torch's
  // deterministic sum over S. No float copy of the (B, N, D) gradient.
  const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (B * N == 0 || D == 0) return {grad_kept, at::zeros({D}, grad.options())};
  const int64_t S = cuda::masked_colsum_splits(B * N);
  auto partial = at::empty({S, D}, grad.options().dtype(acc));
  const auto filled = mask_token_rows(ids_restore, n_keep);
  const int64_t gs[3] = {grad.stride(0), grad.stride(1), grad.stride(2)};
  check_launch(op, cuda::launch_masked_colsum(grad.const_data_ptr(), noise_code(grad.scalar_type()),
                                              B, N, D, gs, filled.const_data_ptr<bool>(),
                                              partial.mutable_data_ptr(), S,
                                              c10::cuda::getCurrentCUDAStream()));
  auto grad_token = partial.sum(0).to(grad.scalar_type());
  return {grad_kept, grad_token};
}

std::tuple<at::Tensor, at::Tensor> masked_select_rows_cuda(const at::Tensor& x,
                                                           const at::Tensor& mask,
                                                           int64_t max_rows) {
  const char* op = "masked_select_rows";
  check_masked_select_args(op, x, mask);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const c10::cuda::CUDAGuard guard(x.device());
  if (max_rows >= 0) {
    // No host sync with max_rows: a device-side assertion; the first max_rows selected
    // rows are kept meanwhile (select_index), nothing is read out of bounds.
    at::_assert_async(mask.sum(at::kLong).le(max_rows),
                      "masked_select_rows: mask selects more positions than max_rows");
  }
  auto index = select_index(mask, max_rows);  // max_rows < 0: one host sync (nonzero)
  auto rows = at::empty({index.size(0), D}, x.options());
  move_rows(op, rows, index, B * N, rows_of(x), zeros_source(), false);
  return {rows, index};
}

at::Tensor scatter_rows_cuda(const at::Tensor& src, const at::Tensor& index, int64_t num_rows) {
  const char* op = "_scatter_rows";
  check_scatter_rows_args(op, src, index, num_rows);
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t M = src.size(0);
  auto out = at::empty({num_rows, src.size(1)}, src.options());
  if (M > 0) {
    at::_assert_async(at::logical_and(index.ge(-1), index.lt(num_rows)).all(),
                      "_scatter_rows: index outside [-1, num_rows)");
    // Out-of-range entries (the -1 padding) count in slots of their own (dropped_slots):
    // one shared dummy slot would serialise their atomic adds.
    const auto counts = at::zeros({num_rows + M}, index.options())
                            .scatter_add_(0, dropped_slots(index, num_rows), at::ones_like(index));
    at::_assert_async(counts.narrow(0, 0, num_rows).le(1).all(),
                      "_scatter_rows: index holds a row twice; rows must be distinct");
  }
  move_rows(op, out, scatter_rows_map(index, num_rows), M, rows_of(src), zeros_source(), false);
  return out;
}

at::Tensor scatter_image_features_cuda(const at::Tensor& embeds, const at::Tensor& mask,
                                       const at::Tensor& feats, bool check_count) {
  const char* op = "scatter_image_features";
  check_scatter_image_args(op, embeds, mask, feats);
  const int64_t B = embeds.size(0), L = embeds.size(1), D = embeds.size(2);
  const c10::cuda::CUDAGuard guard(embeds.device());
  const int64_t T = feats.size(0);
  // By default the count is checked on the host (one sync) and a mismatch raises
  // ValueError, as Hugging Face does; a device-side assertion here would take down the
  // CUDA context. check_count=False skips it: no sync, and image_map's rule decides
  // (surplus positions keep their embeddings, surplus features are unused).
  if (check_count) check_image_count(op, count_selected(mask), T);
  auto out = at::empty({B, L, D}, embeds.options());
  move_rows(op, out, image_map(mask, T), T, rows_of(feats), rows_of(embeds), false);
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
