// Host-side helpers shared by the CPU and CUDA registrations of the RoIAlign
// family: argument validation and output allocation. Not compiled by nvcc.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace mmkernels {
namespace roi_align {

// Validates everything about (features, rois, levels) that the kernels rely on
// to never read out of bounds. Reads rois[:, 0] (and levels) on the host, so on
// CUDA it synchronises once; RoIAlign sits after a detector, where that is cheap.
// rois[:, 0] in [0, N) and levels in [0, L): the only data-dependent indices.
inline void check_indices(const char* op, const at::Tensor& rois, const at::Tensor* levels,
                          int64_t N, int64_t L) {
  const int64_t K = rois.size(0);
  if (K == 0) return;
  // NaN fails both comparisons, so it is rejected too.
  auto idx = rois.select(1, 0).to(at::kDouble);
  const bool bad = at::logical_not(at::logical_and(idx >= 0, idx < static_cast<double>(N)))
                       .any()
                       .item<bool>();
  TORCH_CHECK(!bad, op, ": rois[:, 0] (batch index) must lie in [0, ", N,
              ") for an input of batch size ", N, "; got values in [",
              idx.min().item<double>(), ", ", idx.max().item<double>(), "]");
  if (levels != nullptr) {
    TORCH_CHECK(levels->dim() == 1 && levels->size(0) == K, op, ": levels must be (K,) = (", K,
                ",), got ", levels->sizes());
    TORCH_CHECK(levels->scalar_type() == at::kLong, op, ": levels must be int64, got ",
                levels->scalar_type());
    TORCH_CHECK(levels->device() == rois.device(), op, ": levels must be on the rois' device");
    const bool bad_level = at::logical_or(*levels < 0, *levels >= L).any().item<bool>();
    TORCH_CHECK(!bad_level, op, ": levels must lie in [0, ", L, ")");
  }
}

inline void check_inputs(const char* op, at::TensorList features, const at::Tensor& rois,
                         const at::Tensor* levels, int64_t pooled_height, int64_t pooled_width,
                         int64_t num_scales) {
  TORCH_CHECK(!features.empty(), op, ": expected at least one feature map");
  const auto& f0 = features[0];
  for (size_t l = 0; l < features.size(); ++l) {
    const auto& f = features[l];
    TORCH_CHECK(f.dim() == 4, op, ": input must be a 4-D (N, C, H, W) tensor, got ", f.dim(),
                "-D with shape ", f.sizes());
    TORCH_CHECK(f.scalar_type() == at::kFloat || f.scalar_type() == at::kDouble ||
                    f.scalar_type() == at::kHalf || f.scalar_type() == at::kBFloat16,
                op, ": input dtype must be float32, float64, float16 or bfloat16, got ",
                f.scalar_type());
    TORCH_CHECK(f.scalar_type() == f0.scalar_type(), op,
                ": all feature maps must share one dtype, got ", f0.scalar_type(), " and ",
                f.scalar_type());
    TORCH_CHECK(f.device() == f0.device(), op, ": all feature maps must be on one device");
    TORCH_CHECK(f.size(0) == f0.size(0) && f.size(1) == f0.size(1), op,
                ": all feature maps must share N and C, got ", f0.sizes(), " and ", f.sizes());
    TORCH_CHECK(f.size(2) < (1LL << 31) && f.size(3) < (1LL << 31), op,
                ": feature map height/width too large");
  }
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op,
              ": rois (boxes) must be a (K, 5) tensor of (batch_index, x1, y1, x2, y2), got shape ",
              rois.sizes());
  TORCH_CHECK(rois.scalar_type() == f0.scalar_type(), op,
              ": rois (boxes) dtype must match input dtype, got input ", f0.scalar_type(),
              " and boxes ", rois.scalar_type());
  TORCH_CHECK(rois.device() == f0.device(), op, ": rois (boxes) must be on the input's device (",
              f0.device(), "), got ", rois.device());
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0, op,
              ": output_size must be positive, got (", pooled_height, ", ", pooled_width, ")");
  TORCH_CHECK(num_scales == static_cast<int64_t>(features.size()), op, ": got ", num_scales,
              " scales for ", features.size(), " feature maps");
  check_indices(op, rois, levels, f0.size(0), static_cast<int64_t>(features.size()));
}

inline void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& rois,
                       at::IntArrayRef expected, const at::Tensor* levels, int64_t N, int64_t L) {
  TORCH_CHECK(grad.sizes() == expected, op, ": grad must have shape ", expected, ", got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == rois.scalar_type(), op, ": grad dtype ", grad.scalar_type(),
              " must match rois dtype ", rois.scalar_type());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op, ": rois must be (K, 5), got ",
              rois.sizes());
  TORCH_CHECK(grad.device() == rois.device(), op, ": grad and rois must share a device");
  check_indices(op, rois, levels, N, L);
}

}  // namespace roi_align
}  // namespace mmkernels
