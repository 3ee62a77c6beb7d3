// RoIAlign family, CPU kernels (forward and backward), parallelised with
// at::parallel_for. The per-sample math is in roi_align_math.h.
//
// Layout: the feature maps are read as channels-last (N, H, W, C), converting
// NCHW input once (O(NCHW), small next to the O(K * bins * samples * C) work).
// Each bilinear sample then blends four contiguous C-vectors, which the compiler
// vectorises; torchvision's CPU kernel gathers one scalar per channel instead.
//
// Forward parallelises over regions (each writes its own outputs).
// Backward parallelises over (level, image, channel block) work items; each item
// owns a disjoint slice of grad_input and visits its regions in ascending order,
// so the result is deterministic and independent of the thread count, with no
// atomics and no per-thread copies of grad_input.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "roi_align/roi_align_common.h"
#include "roi_align/roi_align_math.h"

namespace mmkernels {
namespace roi_align {
namespace {

constexpr int64_t kChannelBlock = 64;  // backward work-item width along C

template <typename T>
struct PlaneCL {  // one level, channels-last (N, H, W, C) contiguous
  T* data;
  int H, W;
};

template <typename scalar_t, typename acc_t>
RoiGeometry<acc_t> geometry_of(const scalar_t* r, double scale, int PH, int PW, int sr,
                               bool aligned) {
  return roi_geometry<acc_t>(static_cast<acc_t>(r[1]), static_cast<acc_t>(r[2]),
                             static_cast<acc_t>(r[3]), static_cast<acc_t>(r[4]),
                             static_cast<acc_t>(scale), PH, PW, sr, aligned);
}

// out[k, c, ph, pw] (or out[k, c] when kMean) for every region k.
template <typename scalar_t, bool kMean>
void forward_kernel(const std::vector<PlaneCL<const scalar_t>>& levels, int64_t C,
                    const scalar_t* rois, const int64_t* level_of, int64_t K,
                    const std::vector<double>& scales, int PH, int PW, int sr, bool aligned,
                    scalar_t* out, const int64_t* os) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> acc(C);
    for (int64_t k = k0; k < k1; ++k) {
      const scalar_t* r = rois + k * 5;
      const int l = level_of != nullptr ? static_cast<int>(level_of[k]) : 0;
      const auto& lv = levels[l];
      const int64_t n = static_cast<int64_t>(static_cast<acc_t>(r[0]));
      const auto g = geometry_of<scalar_t, acc_t>(r, scales[l], PH, PW, sr, aligned);
      const scalar_t* base = lv.data + n * lv.H * lv.W * C;
      scalar_t* o = out + k * os[0];
      if (kMean) std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int ph = 0; ph < PH; ++ph) {
        for (int pw = 0; pw < PW; ++pw) {
          if (!kMean) std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int iy = 0; iy < g.grid_h; ++iy) {
            const auto ty = axis_tap(lv.H, sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h));
            for (int ix = 0; ix < g.grid_w; ++ix) {
              const auto tx = axis_tap(lv.W, sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w));
              const auto s = combine_taps(ty, tx);
              if (!s.inside) continue;
              const scalar_t* p00 = base + (int64_t(s.y_lo) * lv.W + s.x_lo) * C;
              const scalar_t* p01 = base + (int64_t(s.y_lo) * lv.W + s.x_hi) * C;
              const scalar_t* p10 = base + (int64_t(s.y_hi) * lv.W + s.x_lo) * C;
              const scalar_t* p11 = base + (int64_t(s.y_hi) * lv.W + s.x_hi) * C;
              acc_t* a = acc.data();
              for (int64_t c = 0; c < C; ++c) {
                a[c] += blend4<acc_t>(s, static_cast<acc_t>(p00[c]), static_cast<acc_t>(p01[c]),
                                      static_cast<acc_t>(p10[c]), static_cast<acc_t>(p11[c]));
              }
            }
          }
          if (!kMean) {
            for (int64_t c = 0; c < C; ++c) {
              const acc_t v = g.nan ? acc_t(NAN) : acc[c] / g.count;
              o[c * os[1] + ph * os[2] + pw * os[3]] = static_cast<scalar_t>(v);
            }
          }
        }
      }
      if (kMean) {
        const acc_t norm = g.count * static_cast<acc_t>(PH * PW);
        for (int64_t c = 0; c < C; ++c) {
          o[c * os[1]] = static_cast<scalar_t>(g.nan ? acc_t(NAN) : acc[c] / norm);
        }
      }
    }
  });
}

// grad_in[level][n, y, x, c] += w / count * grad[k, c, ph, pw] (or grad[k, c] / (count*PH*PW)).
template <typename scalar_t, bool kMean>
void backward_kernel(const std::vector<PlaneCL<at::opmath_type<scalar_t>>>& levels, int64_t N,
                     int64_t C, const scalar_t* rois, const int64_t* level_of, int64_t K,
                     const std::vector<double>& scales, int PH, int PW, int sr, bool aligned,
                     const scalar_t* grad, const int64_t* gs) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = static_cast<int64_t>(levels.size());
  // Regions of each (level, image), in ascending k.
  std::vector<std::vector<int64_t>> bucket(L * N);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t l = level_of != nullptr ? level_of[k] : 0;
    const int64_t n = static_cast<int64_t>(static_cast<acc_t>(rois[k * 5]));
    bucket[l * N + n].push_back(k);
  }
  const int64_t nblocks = (C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, L * N * nblocks, 1, [&](int64_t i0, int64_t i1) {
    acc_t gbuf[kChannelBlock];
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t ln = item / nblocks;
      const int64_t c0 = (item % nblocks) * kChannelBlock;
      const int64_t cn = std::min(kChannelBlock, C - c0);
      const int64_t l = ln / N, n = ln % N;
      const auto& lv = levels[l];
      acc_t* base = lv.data + n * lv.H * lv.W * C + c0;
      for (const int64_t k : bucket[ln]) {
        const auto g = geometry_of<scalar_t, acc_t>(rois + k * 5, scales[l], PH, PW, sr, aligned);
        const scalar_t* gk = grad + k * gs[0] + c0 * gs[1];
        if (kMean) {
          const acc_t norm = g.count * static_cast<acc_t>(PH * PW);
          for (int64_t c = 0; c < cn; ++c) gbuf[c] = static_cast<acc_t>(gk[c * gs[1]]) / norm;
        }
        for (int ph = 0; ph < PH; ++ph) {
          for (int pw = 0; pw < PW; ++pw) {
            if (!kMean) {
              for (int64_t c = 0; c < cn; ++c) {
                gbuf[c] = static_cast<acc_t>(gk[c * gs[1] + ph * gs[2] + pw * gs[3]]) / g.count;
              }
            }
            for (int iy = 0; iy < g.grid_h; ++iy) {
              const auto ty = axis_tap(lv.H, sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h));
              for (int ix = 0; ix < g.grid_w; ++ix) {
                const auto tx =
                    axis_tap(lv.W, sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w));
                const auto s = combine_taps(ty, tx);
                if (!s.inside) continue;
                acc_t* p00 = base + (int64_t(s.y_lo) * lv.W + s.x_lo) * C;
                acc_t* p01 = base + (int64_t(s.y_lo) * lv.W + s.x_hi) * C;
                acc_t* p10 = base + (int64_t(s.y_hi) * lv.W + s.x_lo) * C;
                acc_t* p11 = base + (int64_t(s.y_hi) * lv.W + s.x_hi) * C;
                // Sequential, not fused: taps may coincide at the border.
                for (int64_t c = 0; c < cn; ++c) p00[c] += s.w[0] * gbuf[c];
                for (int64_t c = 0; c < cn; ++c) p01[c] += s.w[1] * gbuf[c];
                for (int64_t c = 0; c < cn; ++c) p10[c] += s.w[2] * gbuf[c];
                for (int64_t c = 0; c < cn; ++c) p11[c] += s.w[3] * gbuf[c];
              }
            }
          }
        }
      }
    }
  });
}

at::Tensor forward_cpu(const char* op, at::TensorList features, const at::Tensor& rois,
                       const at::Tensor* levels, const std::vector<double>& scales, int64_t PH,
                       int64_t PW, int64_t sr, bool aligned, bool mean) {
  check_inputs(op, features, rois, levels, PH, PW, static_cast<int64_t>(scales.size()));
  const auto& f0 = features[0];
  const int64_t K = rois.size(0), C = f0.size(1);
  at::Tensor out = mean ? at::empty({K, C}, f0.options())
                        : at::empty({K, C, PH, PW},
                                    f0.options().memory_format(f0.suggest_memory_format()));
  if (out.numel() == 0) return out;
  std::vector<at::Tensor> cl;
  for (const auto& f : features) {
    TORCH_CHECK(f.size(2) > 0 && f.size(3) > 0, op,
                ": input height and width must be positive, got ", f.sizes());
    cl.push_back(f.contiguous(at::MemoryFormat::ChannelsLast));
  }
  const at::Tensor r = rois.contiguous();
  const at::Tensor lvl = levels != nullptr ? levels->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "roi_align_forward_cpu", [&] {
    std::vector<PlaneCL<const scalar_t>> planes;
    for (const auto& t : cl) {
      planes.push_back({t.const_data_ptr<scalar_t>(), static_cast<int>(t.size(2)),
                        static_cast<int>(t.size(3))});
    }
    const int64_t os[4] = {out.stride(0), out.stride(1), mean ? 0 : out.stride(2),
                           mean ? 0 : out.stride(3)};
    const int64_t* lp = levels != nullptr ? lvl.const_data_ptr<int64_t>() : nullptr;
    if (mean) {
      forward_kernel<scalar_t, true>(planes, C, r.const_data_ptr<scalar_t>(), lp, K, scales,
                                     PH, PW, sr, aligned, out.mutable_data_ptr<scalar_t>(), os);
    } else {
      forward_kernel<scalar_t, false>(planes, C, r.const_data_ptr<scalar_t>(), lp, K, scales,
                                      PH, PW, sr, aligned, out.mutable_data_ptr<scalar_t>(), os);
    }
  });
  return out;
}

std::vector<at::Tensor> backward_cpu(const char* op, const at::Tensor& grad,
                                     const at::Tensor& rois, const at::Tensor* levels,
                                     const std::vector<double>& scales, int64_t PH, int64_t PW,
                                     int64_t N, int64_t C, at::IntArrayRef heights,
                                     at::IntArrayRef widths, int64_t sr, bool aligned,
                                     bool channels_last, bool mean) {
  const int64_t L = static_cast<int64_t>(heights.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(widths.size()) == L &&
                  static_cast<int64_t>(scales.size()) == L,
              op, ": heights, widths and scales must have one entry per level");
  TORCH_CHECK(N >= 0 && C >= 0, op, ": batch_size and channels must be non-negative");
  TORCH_CHECK(PH > 0 && PW > 0, op, ": output_size must be positive");
  const int64_t K = rois.size(0);
  if (mean) {
    check_grad(op, grad, rois, {K, C}, levels, N, L);
  } else {
    check_grad(op, grad, rois, {K, C, PH, PW}, levels, N, L);
  }
  const auto acc_type = at::toOpMathType(grad.scalar_type());
  std::vector<at::Tensor> bufs;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(heights[l] >= 0 && widths[l] >= 0, op, ": negative height/width");
    bufs.push_back(at::zeros({N, heights[l], widths[l], C}, grad.options().dtype(acc_type)));
  }
  if (K > 0 && C > 0) {
    for (int64_t l = 0; l < L; ++l) {
      TORCH_CHECK(heights[l] > 0 && widths[l] > 0, op,
                  ": input height and width must be positive");
    }
    const at::Tensor r = rois.contiguous();
    const at::Tensor lvl = levels != nullptr ? levels->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      std::vector<PlaneCL<acc_t>> planes;
      for (auto& b : bufs) {
        planes.push_back({b.mutable_data_ptr<acc_t>(), static_cast<int>(b.size(1)),
                          static_cast<int>(b.size(2))});
      }
      const int64_t gs[4] = {grad.stride(0), grad.stride(1), mean ? 0 : grad.stride(2),
                             mean ? 0 : grad.stride(3)};
      const int64_t* lp = levels != nullptr ? lvl.const_data_ptr<int64_t>() : nullptr;
      if (mean) {
        backward_kernel<scalar_t, true>(planes, N, C, r.const_data_ptr<scalar_t>(), lp, K,
                                        scales, PH, PW, sr, aligned,
                                        grad.const_data_ptr<scalar_t>(), gs);
      } else {
        backward_kernel<scalar_t, false>(planes, N, C, r.const_data_ptr<scalar_t>(), lp, K,
                                         scales, PH, PW, sr, aligned,
                                         grad.const_data_ptr<scalar_t>(), gs);
      }
    });
  }
  std::vector<at::Tensor> grads;
  for (auto& b : bufs) {
    at::Tensor g = b.permute({0, 3, 1, 2}).to(grad.scalar_type());  // NCHW view, NHWC memory
    grads.push_back(channels_last ? g : g.contiguous());
  }
  return grads;
}

// ---- operator entry points -------------------------------------------------------

at::Tensor roi_align_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                         int64_t PH, int64_t PW, int64_t sr, bool aligned) {
  return forward_cpu("roi_align", {input}, rois, nullptr, {spatial_scale}, PH, PW, sr, aligned,
                     /*mean=*/false);
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                  double spatial_scale, int64_t PH, int64_t PW, int64_t N,
                                  int64_t C, int64_t H, int64_t W, int64_t sr, bool aligned,
                                  bool channels_last) {
  return backward_cpu("roi_align_backward", grad, rois, nullptr, {spatial_scale}, PH, PW, N, C,
                      {H}, {W}, sr, aligned, channels_last, /*mean=*/false)[0];
}

at::Tensor region_features_cpu(const at::Tensor& input, const at::Tensor& rois,
                               double spatial_scale, int64_t PH, int64_t PW, int64_t sr,
                               bool aligned) {
  return forward_cpu("region_features", {input}, rois, nullptr, {spatial_scale}, PH, PW, sr,
                     aligned, /*mean=*/true);
}

at::Tensor region_features_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                        double spatial_scale, int64_t PH, int64_t PW, int64_t N,
                                        int64_t C, int64_t H, int64_t W, int64_t sr,
                                        bool aligned, bool channels_last) {
  return backward_cpu("region_features_backward", grad, rois, nullptr, {spatial_scale}, PH, PW,
                      N, C, {H}, {W}, sr, aligned, channels_last, /*mean=*/true)[0];
}

at::Tensor multiscale_roi_align_cpu(at::TensorList features, const at::Tensor& rois,
                                    const at::Tensor& levels, at::ArrayRef<double> scales,
                                    int64_t PH, int64_t PW, int64_t sr, bool aligned) {
  return forward_cpu("multiscale_roi_align", features, rois, &levels, scales.vec(), PH, PW, sr,
                     aligned, /*mean=*/false);
}

std::vector<at::Tensor> multiscale_roi_align_backward_cpu(
    const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& levels,
    at::ArrayRef<double> scales, int64_t N, int64_t C, at::IntArrayRef heights,
    at::IntArrayRef widths, int64_t sr, bool aligned, bool channels_last) {
  TORCH_CHECK(grad.dim() == 4, "multiscale_roi_align_backward: grad must be (K, C, PH, PW), got ",
              grad.sizes());
  return backward_cpu("multiscale_roi_align_backward", grad, rois, &levels, scales.vec(),
                      grad.size(2), grad.size(3), N, C, heights, widths, sr, aligned,
                      channels_last, /*mean=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("roi_align", TORCH_FN(roi_align_cpu));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_cpu));
  m.impl("region_features", TORCH_FN(region_features_cpu));
  m.impl("_region_features_backward", TORCH_FN(region_features_backward_cpu));
  m.impl("multiscale_roi_align", TORCH_FN(multiscale_roi_align_cpu));
  m.impl("_multiscale_roi_align_backward", TORCH_FN(multiscale_roi_align_backward_cpu));
}

}  // namespace roi_align
}  // namespace mmkernels
