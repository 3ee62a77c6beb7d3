// Host-side helpers shared by the CPU and CUDA registrations of the RoIAlign
// family: argument validation and output allocation. Not compiled by nvcc.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "roi_align/roi_align_math.h"

namespace mmkernels {
namespace roi_align {

// rois[:, 0] in [0, N) and levels in [0, L): the only data-dependent indices.
// The CPU backend checks them here and raises (reading CPU memory costs no sync).
// The CUDA backend does not call this: a host check would synchronise and break
// CUDA-graph capture, so its kernels apply the same rule (batch_index in
// roi_align_math.h) per region and write NaN rows for an invalid index instead.
inline void check_indices_cpu(const char* op, const at::Tensor& rois, const at::Tensor* levels,
                              int64_t N, int64_t L) {
  const int64_t K = rois.size(0);
  if (K == 0) return;
  const at::Tensor idx = rois.select(1, 0).to(at::kDouble).contiguous();
  const double* v = idx.const_data_ptr<double>();
  for (int64_t k = 0; k < K; ++k) {
    int64_t n;
    TORCH_CHECK(batch_index(v[k], N, n), op, ": boxes[", k,
                ", 0] (the batch index; rois in the op's schema) must lie in [0, ", N,
                ") for an input of batch size ", N, "; got ", v[k]);
  }
  if (levels != nullptr) {
    const at::Tensor lv = levels->contiguous();
    const int64_t* l = lv.const_data_ptr<int64_t>();
    for (int64_t k = 0; k < K; ++k) {
      TORCH_CHECK(l[k] >= 0 && l[k] < L, op, ": levels must lie in [0, ", L, "); levels[", k,
                  "] = ", l[k]);
    }
  }
}

// Everything about (levels) that needs no data: shape, dtype, device.
inline void check_levels_meta(const char* op, const at::Tensor& rois, const at::Tensor* levels) {
  if (levels == nullptr) return;
  const int64_t K = rois.size(0);
  TORCH_CHECK(levels->dim() == 1 && levels->size(0) == K, op, ": levels must be (K,) = (", K,
              ",), got ", levels->sizes());
  TORCH_CHECK(levels->scalar_type() == at::kLong, op, ": levels must be int64, got ",
              levels->scalar_type());
  TORCH_CHECK(levels->device() == rois.device(), op, ": levels must be on the rois' device");
}

// output_size and sampling_ratio: the kernels hold them in int, and one bin's
// grid is bounded (kMaxSamplingRatio in roi_align_math.h).
inline void check_sizes(const char* op, int64_t pooled_height, int64_t pooled_width,
                        int64_t sampling_ratio) {
  constexpr int64_t kIntMax = (1LL << 31) - 1;
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0 && pooled_height <= kIntMax &&
                  pooled_width <= kIntMax,
              op, ": output_size must be positive and below 2^31, got (", pooled_height, ", ",
              pooled_width, ")");
  TORCH_CHECK(sampling_ratio >= -1 && sampling_ratio <= kMaxSamplingRatio, op,
              ": sampling_ratio must be -1 or 0 (adaptive) or in [1, ", kMaxSamplingRatio,
              "], got ", sampling_ratio);
}

// Validates everything the kernels rely on to never read out of bounds. With
// check_data (the CPU backend) it also checks the batch indices and levels.
inline void check_inputs(const char* op, at::TensorList features, const at::Tensor& rois,
                         const at::Tensor* levels, int64_t pooled_height, int64_t pooled_width,
                         int64_t sampling_ratio, int64_t num_scales, bool check_data) {
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
  check_sizes(op, pooled_height, pooled_width, sampling_ratio);
  TORCH_CHECK(num_scales == static_cast<int64_t>(features.size()), op, ": got ", num_scales,
              " scales for ", features.size(), " feature maps");
  check_levels_meta(op, rois, levels);
  if (check_data) {
    check_indices_cpu(op, rois, levels, f0.size(0), static_cast<int64_t>(features.size()));
  }
}

inline void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& rois,
                       at::IntArrayRef expected, const at::Tensor* levels, int64_t N, int64_t L,
                       int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                       bool check_data) {
  TORCH_CHECK(grad.sizes() == expected, op, ": grad must have shape ", expected, ", got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == rois.scalar_type(), op, ": grad dtype ", grad.scalar_type(),
              " must match rois dtype ", rois.scalar_type());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op, ": rois must be (K, 5), got ",
              rois.sizes());
  TORCH_CHECK(grad.device() == rois.device(), op, ": grad and rois must share a device");
  check_sizes(op, pooled_height, pooled_width, sampling_ratio);
  check_levels_meta(op, rois, levels);
  if (check_data) check_indices_cpu(op, rois, levels, N, L);
}

}  // namespace roi_align
}  // namespace mmkernels
