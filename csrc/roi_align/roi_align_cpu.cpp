// RoIAlign family, CPU kernels (forward and backward), parallelised with
// at::parallel_for. The per-sample math is in roi_align_math.h.
//
// Layout: the feature maps are read as channels-last (N, H, W, C), converting
// NCHW input once (O(NCHW), small next to the O(K * bins * samples * C) work).
// Each bilinear sample then blends four contiguous C-vectors, which the compiler
// vectorises; torchvision's CPU kernel gathers one scalar per channel instead.
//
// Data-dependent indices (batch index, level) are checked on the host before any
// kernel runs (check_indices_cpu), so the kernels below only see valid ones.
// Samples are visited through sample_range (roi_align_math.h): those that cannot
// land on the map are skipped without changing any result.
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

// out[k, c, ph, pw] for every region k.
template <typename scalar_t>
void forward_kernel(const std::vector<PlaneCL<const scalar_t>>& levels, int64_t N, int64_t C,
                    const scalar_t* rois, const int64_t* level_of, int64_t K,
                    const std::vector<double>& scales, int PH, int PW, int sr, bool aligned,
                    scalar_t* out, const int64_t* os, bool channels_last_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bins = int64_t(PH) * PW;
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    // The region's (bins, C) result stays in this buffer until it is complete,
    // then is written out in the output's own order (contiguous for NCHW too).
    std::vector<acc_t> acc(static_cast<size_t>(bins) * C);
    for (int64_t k = k0; k < k1; ++k) {
      const scalar_t* r = rois + k * 5;
      const int64_t l = level_of != nullptr ? level_of[k] : 0;
      const auto& lv = levels[l];
      int64_t n = 0;
      batch_index(r[0], N, n);  // checked on the host: always valid here
      const auto g = geometry_of<scalar_t, acc_t>(r, scales[l], PH, PW, sr, aligned);
      const scalar_t* base = lv.data + n * lv.H * lv.W * C;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int ph = 0; ph < PH; ++ph) {
        const SampleRange ry = sample_range(g.start_h, g.bin_h, ph, g.grid_h, -1.0, lv.H);
        for (int pw = 0; pw < PW; ++pw) {
          const SampleRange rx = sample_range(g.start_w, g.bin_w, pw, g.grid_w, -1.0, lv.W);
          acc_t* a = acc.data() + (int64_t(ph) * PW + pw) * C;
          for (int iy = ry.begin; iy < ry.end; ++iy) {
            const auto ty = axis_tap(lv.H, sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h));
            if (!ty.inside) continue;
            for (int ix = rx.begin; ix < rx.end; ++ix) {
              const auto tx = axis_tap(lv.W, sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w));
              const auto s = combine_taps(ty, tx);
              if (!s.inside) continue;
              const scalar_t* p00 = base + (int64_t(s.y_lo) * lv.W + s.x_lo) * C;
              const scalar_t* p01 = base + (int64_t(s.y_lo) * lv.W + s.x_hi) * C;
              const scalar_t* p10 = base + (int64_t(s.y_hi) * lv.W + s.x_lo) * C;
              const scalar_t* p11 = base + (int64_t(s.y_hi) * lv.W + s.x_hi) * C;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) {
                a[c] += blend4<acc_t>(s, static_cast<acc_t>(p00[c]), static_cast<acc_t>(p01[c]),
                                      static_cast<acc_t>(p10[c]), static_cast<acc_t>(p11[c]));
              }
            }
          }
        }
      }
      scalar_t* o = out + k * os[0];
      auto value = [&](int64_t c, int64_t bin) {
        return static_cast<scalar_t>(g.nan ? acc_t(NAN) : acc[bin * C + c] / g.count);
      };
      // Every store goes through the output's own strides; the loop order only
      // follows the layout (channels_last: bins outer, C contiguous).
      if (channels_last_out) {
        for (int64_t ph = 0; ph < PH; ++ph)
          for (int64_t pw = 0; pw < PW; ++pw)
            for (int64_t c = 0; c < C; ++c) o[c * os[1] + ph * os[2] + pw * os[3]] = value(c, ph * PW + pw);
      } else {
        for (int64_t c = 0; c < C; ++c)
          for (int64_t ph = 0; ph < PH; ++ph)
            for (int64_t pw = 0; pw < PW; ++pw) o[c * os[1] + ph * os[2] + pw * os[3]] = value(c, ph * PW + pw);
      }
    }
  });
}

// grad_in[level][n, y, x, c] += w / count * grad[k, c, ph, pw].
template <typename scalar_t>
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
    int64_t n = 0;
    batch_index(rois[k * 5], N, n);  // checked on the host: always valid here
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
        if (g.nan) continue;  // a NaN region gets no gradient
        const scalar_t* gk = grad + k * gs[0] + c0 * gs[1];
        for (int ph = 0; ph < PH; ++ph) {
          const SampleRange ry = sample_range(g.start_h, g.bin_h, ph, g.grid_h, -1.0, lv.H);
          for (int pw = 0; pw < PW; ++pw) {
            const SampleRange rx = sample_range(g.start_w, g.bin_w, pw, g.grid_w, -1.0, lv.W);
            if (ry.begin >= ry.end || rx.begin >= rx.end) continue;
            for (int64_t c = 0; c < cn; ++c) {
              gbuf[c] = static_cast<acc_t>(gk[c * gs[1] + ph * gs[2] + pw * gs[3]]) / g.count;
            }
            for (int iy = ry.begin; iy < ry.end; ++iy) {
              const auto ty = axis_tap(lv.H, sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h));
              if (!ty.inside) continue;
              for (int ix = rx.begin; ix < rx.end; ++ix) {
                const auto tx =
                    axis_tap(lv.W, sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w));
                const auto s = combine_taps(ty, tx);
                if (!s.inside) continue;
                acc_t* p00 = base + (int64_t(s.y_lo) * lv.W + s.x_lo) * C;
                acc_t* p01 = base + (int64_t(s.y_lo) * lv.W + s.x_hi) * C;
                acc_t* p10 = base + (int64_t(s.y_hi) * lv.W + s.x_lo) * C;
                acc_t* p11 = base + (int64_t(s.y_hi) * lv.W + s.x_hi) * C;
                // Sequential, not fused: taps may coincide at the border.
#pragma omp simd
                for (int64_t c = 0; c < cn; ++c) p00[c] += s.w[0] * gbuf[c];
#pragma omp simd
                for (int64_t c = 0; c < cn; ++c) p01[c] += s.w[1] * gbuf[c];
#pragma omp simd
                for (int64_t c = 0; c < cn; ++c) p10[c] += s.w[2] * gbuf[c];
#pragma omp simd
                for (int64_t c = 0; c < cn; ++c) p11[c] += s.w[3] * gbuf[c];
              }
            }
          }
        }
      }
    }
  });
}

// ---- region_features: the separable (bilinear-form) formulation -----------------
//
// out[k, c] = 1/(count*PH*PW) * sum_y py[y] * sum_x px[x] * in[n, c, y, x], with the
// axis profiles of roi_align_math.h. It reads only the region's window, row by row
// (NCHW) or pixel by pixel with a C-vector (channels-last), straight from the
// input's own layout: no (K, C, PH, PW) tensor, so the extra memory is the output
// plus K*(H+W) profile weights and touched flags.
//
// Non-finite values: the sums run over the touched pixels only (kTouched on both
// axes: the taps of inside samples, whatever their weight), on both layouts. A NaN
// there gives NaN, as torchvision's multiply-add does even for a zero weight; a NaN
// elsewhere in the window is never read. Where a sample taps the pixel with weight
// 0 (kZeroTap on either axis, see axis_profile), a 0 * value term is added too, so
// that an Inf there gives NaN as in torchvision, although the profile weight of the
// pixel may be positive; the term is +-0 for a finite value and changes nothing.

template <typename acc_t>
struct Profiles {  // per region: py (H) and px (W), their touched flags and ranges
  std::vector<acc_t> w;
  std::vector<unsigned char> touched;  // kTouched | kZeroTap flags, per pixel
  std::vector<int> range;  // y0, y1, x0, x1 per region
  std::vector<acc_t> norm; // count * PH * PW, or NaN for a NaN box
  std::vector<unsigned char> nan;
  int64_t H, W;
  const acc_t* py(int64_t k) const { return w.data() + k * (H + W); }
  const acc_t* px(int64_t k) const { return w.data() + k * (H + W) + H; }
  const unsigned char* ty(int64_t k) const { return touched.data() + k * (H + W); }
  const unsigned char* tx(int64_t k) const { return touched.data() + k * (H + W) + H; }
};

template <typename scalar_t>
Profiles<at::opmath_type<scalar_t>> region_profiles(const scalar_t* rois, int64_t K, double scale,
                                                    int64_t H, int64_t W, int PH, int PW, int sr,
                                                    bool aligned) {
  using acc_t = at::opmath_type<scalar_t>;
  Profiles<acc_t> p;
  p.H = H;
  p.W = W;
  p.w.assign(K * (H + W), acc_t(0));
  p.touched.assign(K * (H + W), 0);
  p.range.resize(K * 4);
  p.norm.resize(K);
  p.nan.resize(K);
  at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const auto g = geometry_of<scalar_t, acc_t>(rois + k * 5, scale, PH, PW, sr, aligned);
      acc_t* py = p.w.data() + k * (H + W);
      unsigned char* ty = p.touched.data() + k * (H + W);
      int* r = p.range.data() + k * 4;
      axis_profile(g.start_h, g.bin_h, PH, g.grid_h, static_cast<int>(H), py, ty, r[0], r[1]);
      axis_profile(g.start_w, g.bin_w, PW, g.grid_w, static_cast<int>(W), py + H, ty + H, r[2],
                   r[3]);
      p.nan[k] = g.nan;
      p.norm[k] = g.count * static_cast<acc_t>(PH) * static_cast<acc_t>(PW);
    }
  });
  return p;
}

// in: (N, C, H, W) in one of two dense layouts, described by its canonical strides
// is[4]: row-major (sW == 1, the rows of a plane are contiguous) or channels-last
// (sC == 1, the C-vector of a pixel is contiguous).
template <typename scalar_t>
void region_forward_kernel(const scalar_t* in, const int64_t* is, bool row_major, int64_t N,
                           int64_t C, const Profiles<at::opmath_type<scalar_t>>& pr,
                           const scalar_t* rois, int64_t K, scalar_t* out, const int64_t* os) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> acc(row_major ? 0 : C);
    std::vector<acc_t> col;
    for (int64_t k = k0; k < k1; ++k) {
      if (pr.nan[k]) {
        for (int64_t c = 0; c < C; ++c) out[k * os[0] + c * os[1]] = static_cast<scalar_t>(NAN);
        continue;
      }
      int64_t n = 0;
      batch_index(rois[k * 5], N, n);  // checked on the host: always valid here
      const acc_t* py = pr.py(k);
      const acc_t* px = pr.px(k);
      const unsigned char* ty = pr.ty(k);
      const unsigned char* tx = pr.tx(k);
      const int* r = pr.range.data() + k * 4;
      const scalar_t* base = in + n * is[0];
      if (row_major) {
        // Per channel: column sums col[x] = sum_y py[y] * in[y, x] over the touched
        // rows (row axpys), then the touched columns of col . px.
        const int x0 = r[2], nx = std::max(r[3] - r[2] + 1, 0);
        if (static_cast<int>(col.size()) < nx) col.resize(nx);
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* plane = base + c * is[1] + x0;
          acc_t* cs = col.data();
          std::fill(cs, cs + nx, acc_t(0));
          for (int y = r[0]; y <= r[1]; ++y) {
            if (!(ty[y] & kTouched)) continue;
            const scalar_t* row = plane + y * is[2];
            const acc_t wy = py[y];
            if (ty[y] & kZeroTap) {  // zero_y[y] && touched_x[x]: add 0 * in[y, x]
#pragma omp simd
              for (int x = 0; x < nx; ++x) {
                const acc_t v = static_cast<acc_t>(row[x]);
                cs[x] += wy * v + acc_t(0) * v;
              }
            } else {
#pragma omp simd
              for (int x = 0; x < nx; ++x) cs[x] += wy * static_cast<acc_t>(row[x]);
            }
          }
          // touched_y[y] && zero_x[x]: cs[x] * 0 is NaN iff a touched row has a
          // non-finite value in column x.
          acc_t total = 0;
#pragma omp simd reduction(+ : total)
          for (int x = 0; x < nx; ++x) {
            const unsigned char f = tx[x0 + x];
            total += (f & kTouched)
                         ? cs[x] * px[x0 + x] + ((f & kZeroTap) ? cs[x] * acc_t(0) : acc_t(0))
                         : acc_t(0);
          }
          out[k * os[0] + c * os[1]] = static_cast<scalar_t>(total / pr.norm[k]);
        }
      } else {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int y = r[0]; y <= r[1]; ++y) {
          if (!(ty[y] & kTouched)) continue;
          for (int x = r[2]; x <= r[3]; ++x) {
            if (!(tx[x] & kTouched)) continue;
            const acc_t w = py[y] * px[x];  // may be 0: a NaN tap still gives NaN
            const scalar_t* p = base + y * is[2] + x * is[3];
            if ((ty[y] | tx[x]) & kZeroTap) {  // a zero-weight tap: 0 * Inf is NaN
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) {
                const acc_t v = static_cast<acc_t>(p[c]);
                acc[c] += w * v + acc_t(0) * v;
              }
            } else {
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) acc[c] += w * static_cast<acc_t>(p[c]);
            }
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          out[k * os[0] + c * os[1]] = static_cast<scalar_t>(acc[c] / pr.norm[k]);
        }
      }
    }
  });
}

// grad_in (N, C, H, W) acc_t, contiguous or channels-last: += g[k, c] / norm * py[y] * px[x]
// over the touched pixels, plus 0 * g[k, c] where a tap has weight 0 (so a NaN or
// Inf in grad gives NaN exactly on the pixels where torchvision's backward does).
template <typename scalar_t>
void region_backward_kernel(at::opmath_type<scalar_t>* gin, bool channels_last, int64_t N,
                            int64_t C, const Profiles<at::opmath_type<scalar_t>>& pr,
                            const scalar_t* rois, int64_t K, const scalar_t* grad,
                            const int64_t* gs) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = pr.H, W = pr.W;
  std::vector<std::vector<int64_t>> bucket(N);
  for (int64_t k = 0; k < K; ++k) {
    if (pr.nan[k]) continue;  // a NaN region gets no gradient
    int64_t n = 0;
    batch_index(rois[k * 5], N, n);  // checked on the host: always valid here
    bucket[n].push_back(k);
  }
  if (!channels_last) {
    // One (n, c) plane per work item: disjoint writes, regions in ascending order.
    at::parallel_for(0, N * C, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / C, c = i % C;
        acc_t* plane = gin + i * H * W;
        for (const int64_t k : bucket[n]) {
          const acc_t coef = static_cast<acc_t>(grad[k * gs[0] + c * gs[1]]) / pr.norm[k];
          const acc_t* py = pr.py(k);
          const acc_t* px = pr.px(k);
          const unsigned char* ty = pr.ty(k);
          const unsigned char* tx = pr.tx(k);
          const int* r = pr.range.data() + k * 4;
          const acc_t zc = acc_t(0) * coef;  // NaN iff coef is not finite
          if (zc == acc_t(0)) {
            // A finite coefficient: untouched pixels have px = 0 and zero-weight taps
            // add 0, so the flags change nothing and the row is a plain axpy (SIMD).
            for (int y = r[0]; y <= r[1]; ++y) {
              if (!(ty[y] & kTouched)) continue;
              const acc_t cy = coef * py[y];
              acc_t* row = plane + y * W;
#pragma omp simd
              for (int x = r[2]; x <= r[3]; ++x) row[x] += cy * px[x];
            }
            continue;
          }
          for (int y = r[0]; y <= r[1]; ++y) {
            if (!(ty[y] & kTouched)) continue;
            const acc_t cy = coef * py[y];
            const bool zy = ty[y] & kZeroTap;
            acc_t* row = plane + y * W;
            for (int x = r[2]; x <= r[3]; ++x) {
              row[x] += (tx[x] & kTouched)
                            ? cy * px[x] + ((zy || (tx[x] & kZeroTap)) ? zc : acc_t(0))
                            : acc_t(0);
            }
          }
        }
      }
    });
    return;
  }
  const int64_t nblocks = (C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, N * nblocks, 1, [&](int64_t i0, int64_t i1) {
    acc_t coef[kChannelBlock];
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t n = item / nblocks;
      const int64_t c0 = (item % nblocks) * kChannelBlock;
      const int64_t cn = std::min(kChannelBlock, C - c0);
      acc_t* base = gin + n * H * W * C + c0;
      for (const int64_t k : bucket[n]) {
        for (int64_t c = 0; c < cn; ++c) {
          coef[c] = static_cast<acc_t>(grad[k * gs[0] + (c0 + c) * gs[1]]) / pr.norm[k];
        }
        const acc_t* py = pr.py(k);
        const acc_t* px = pr.px(k);
        const unsigned char* ty = pr.ty(k);
        const unsigned char* tx = pr.tx(k);
        const int* r = pr.range.data() + k * 4;
        for (int y = r[0]; y <= r[1]; ++y) {
          if (!(ty[y] & kTouched)) continue;
          for (int x = r[2]; x <= r[3]; ++x) {
            if (!(tx[x] & kTouched)) continue;
            const acc_t w = py[y] * px[x];
            acc_t* p = base + (int64_t(y) * W + x) * C;
            if ((ty[y] | tx[x]) & kZeroTap) {
#pragma omp simd
              for (int64_t c = 0; c < cn; ++c) p[c] += w * coef[c] + acc_t(0) * coef[c];
            } else {
#pragma omp simd
              for (int64_t c = 0; c < cn; ++c) p[c] += w * coef[c];
            }
          }
        }
      }
    }
  });
}

at::Tensor region_forward_cpu(const at::Tensor& input, const at::Tensor& rois,
                              double spatial_scale, int64_t PH, int64_t PW, int64_t sr,
                              bool aligned) {
  const char* op = "region_features";
  check_inputs(op, {input}, rois, nullptr, PH, PW, sr, 1, /*check_data=*/true);
  const int64_t K = rois.size(0), N = input.size(0), C = input.size(1);
  at::Tensor out = at::empty({K, C}, input.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK(input.size(2) > 0 && input.size(3) > 0, op,
              ": input height and width must be positive, got ", input.sizes());
  // Read the input in place when it is dense in either layout, decided by
  // is_contiguous(memory_format), never by single strides: a size-1 dimension may
  // carry any stride (randn(N, C, 1, H).transpose(2, 3) is contiguous with
  // stride(3) == H). Anything else (sliced, expanded, permuted) is copied once to
  // its suggested dense layout. The kernel then uses the canonical strides of
  // that layout, so the strides of size-1 dimensions are never read.
  at::Tensor x = input;
  bool row_major = true;
  if (x.is_contiguous()) {
    row_major = true;
  } else if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    row_major = false;
  } else {
    const auto fmt = x.suggest_memory_format();
    x = x.contiguous(fmt);
    row_major = fmt != at::MemoryFormat::ChannelsLast;
  }
  const int64_t H = x.size(2), W = x.size(3);
  const int64_t is[4] = {C * H * W, row_major ? H * W : 1, row_major ? W : W * C,
                         row_major ? 1 : C};
  const at::Tensor r = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "region_forward_cpu",
                                  [&] {
    const auto pr = region_profiles<scalar_t>(r.const_data_ptr<scalar_t>(), K, spatial_scale,
                                              H, W, static_cast<int>(PH),
                                              static_cast<int>(PW), static_cast<int>(sr), aligned);
    const int64_t os[2] = {out.stride(0), out.stride(1)};
    region_forward_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), is, row_major, N, C, pr,
                                    r.const_data_ptr<scalar_t>(), K,
                                    out.mutable_data_ptr<scalar_t>(), os);
  });
  return out;
}

at::Tensor region_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                               double spatial_scale, int64_t PH, int64_t PW, int64_t N, int64_t C,
                               int64_t H, int64_t W, int64_t sr, bool aligned,
                               bool channels_last) {
  const char* op = "region_features_backward";
  TORCH_CHECK(N >= 0 && C >= 0 && H >= 0 && W >= 0, op, ": negative input size");
  TORCH_CHECK(H < (1LL << 31) && W < (1LL << 31), op, ": height/width too large");
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op, ": rois must be (K, 5), got ",
              rois.sizes());
  const int64_t K = rois.size(0);
  check_grad(op, grad, rois, {K, C}, nullptr, N, 1, PH, PW, sr, /*check_data=*/true);
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto acc_type = at::toOpMathType(grad.scalar_type());
  at::Tensor gin = at::empty({N, C, H, W}, grad.options().dtype(acc_type).memory_format(fmt)).zero_();
  if (K > 0 && C > 0) {
    TORCH_CHECK(H > 0 && W > 0, op, ": input height and width must be positive");
    const at::Tensor r = rois.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                    "region_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto pr = region_profiles<scalar_t>(r.const_data_ptr<scalar_t>(), K, spatial_scale,
                                                H, W, static_cast<int>(PH),
                                                static_cast<int>(PW), static_cast<int>(sr),
                                                aligned);
      const int64_t gs[2] = {grad.stride(0), grad.stride(1)};
      region_backward_kernel<scalar_t>(gin.mutable_data_ptr<acc_t>(), channels_last, N, C, pr,
                                       r.const_data_ptr<scalar_t>(), K,
                                       grad.const_data_ptr<scalar_t>(), gs);
    });
  }
  return gin.to(grad.scalar_type());
}

at::Tensor forward_cpu(const char* op, at::TensorList features, const at::Tensor& rois,
                       const at::Tensor* levels, const std::vector<double>& scales, int64_t PH,
                       int64_t PW, int64_t sr, bool aligned) {
  check_inputs(op, features, rois, levels, PH, PW, sr, static_cast<int64_t>(scales.size()),
               /*check_data=*/true);
  const auto& f0 = features[0];
  const int64_t K = rois.size(0), N = f0.size(0), C = f0.size(1);
  const auto out_fmt = f0.suggest_memory_format();
  at::Tensor out = at::empty({K, C, PH, PW}, f0.options().memory_format(out_fmt));
  if (out.numel() == 0) return out;
  std::vector<at::Tensor> cl;
  for (const auto& f : features) {
    TORCH_CHECK(f.size(2) > 0 && f.size(3) > 0, op,
                ": input height and width must be positive, got ", f.sizes());
    // A no-op when f is already dense channels-last (is_contiguous(ChannelsLast));
    // the kernel then indexes it as (N, H, W, C), whatever the strides of its
    // size-1 dimensions.
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
    const int64_t os[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
    const int64_t* lp = levels != nullptr ? lvl.const_data_ptr<int64_t>() : nullptr;
    forward_kernel<scalar_t>(planes, N, C, r.const_data_ptr<scalar_t>(), lp, K, scales,
                             static_cast<int>(PH), static_cast<int>(PW), static_cast<int>(sr),
                             aligned, out.mutable_data_ptr<scalar_t>(), os,
                             out_fmt == at::MemoryFormat::ChannelsLast);
  });
  return out;
}

std::vector<at::Tensor> backward_cpu(const char* op, const at::Tensor& grad,
                                     const at::Tensor& rois, const at::Tensor* levels,
                                     const std::vector<double>& scales, int64_t PH, int64_t PW,
                                     int64_t N, int64_t C, at::IntArrayRef heights,
                                     at::IntArrayRef widths, int64_t sr, bool aligned,
                                     bool channels_last) {
  const int64_t L = static_cast<int64_t>(heights.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(widths.size()) == L &&
                  static_cast<int64_t>(scales.size()) == L,
              op, ": heights, widths and scales must have one entry per level");
  TORCH_CHECK(N >= 0 && C >= 0, op, ": batch_size and channels must be non-negative");
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op, ": rois must be (K, 5), got ",
              rois.sizes());
  const int64_t K = rois.size(0);
  check_grad(op, grad, rois, {K, C, PH, PW}, levels, N, L, PH, PW, sr, /*check_data=*/true);
  const auto acc_type = at::toOpMathType(grad.scalar_type());
  std::vector<at::Tensor> bufs;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(heights[l] >= 0 && widths[l] >= 0 && heights[l] < (1LL << 31) &&
                    widths[l] < (1LL << 31),
                op, ": height/width must lie in [0, 2^31), got ", heights[l], " x ", widths[l]);
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
      const int64_t gs[4] = {grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
      const int64_t* lp = levels != nullptr ? lvl.const_data_ptr<int64_t>() : nullptr;
      backward_kernel<scalar_t>(planes, N, C, r.const_data_ptr<scalar_t>(), lp, K, scales,
                                static_cast<int>(PH), static_cast<int>(PW), static_cast<int>(sr),
                                aligned, grad.const_data_ptr<scalar_t>(), gs);
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
  return forward_cpu("roi_align", {input}, rois, nullptr, {spatial_scale}, PH, PW, sr, aligned);
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                  double spatial_scale, int64_t PH, int64_t PW, int64_t N,
                                  int64_t C, int64_t H, int64_t W, int64_t sr, bool aligned,
                                  bool channels_last) {
  return backward_cpu("roi_align_backward", grad, rois, nullptr, {spatial_scale}, PH, PW, N, C,
                      {H}, {W}, sr, aligned, channels_last)[0];
}

at::Tensor region_features_cpu(const at::Tensor& input, const at::Tensor& rois,
                               double spatial_scale, int64_t PH, int64_t PW, int64_t sr,
                               bool aligned) {
  return region_forward_cpu(input, rois, spatial_scale, PH, PW, sr, aligned);
}

at::Tensor region_features_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                        double spatial_scale, int64_t PH, int64_t PW, int64_t N,
                                        int64_t C, int64_t H, int64_t W, int64_t sr,
                                        bool aligned, bool channels_last) {
  return region_backward_cpu(grad, rois, spatial_scale, PH, PW, N, C, H, W, sr, aligned,
                             channels_last);
}

at::Tensor multiscale_roi_align_cpu(at::TensorList features, const at::Tensor& rois,
                                    const at::Tensor& levels, at::ArrayRef<double> scales,
                                    int64_t PH, int64_t PW, int64_t sr, bool aligned) {
  return forward_cpu("multiscale_roi_align", features, rois, &levels, scales.vec(), PH, PW, sr,
                     aligned);
}

std::vector<at::Tensor> multiscale_roi_align_backward_cpu(
    const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& levels,
    at::ArrayRef<double> scales, int64_t N, int64_t C, at::IntArrayRef heights,
    at::IntArrayRef widths, int64_t sr, bool aligned, bool channels_last) {
  TORCH_CHECK(grad.dim() == 4, "multiscale_roi_align_backward: grad must be (K, C, PH, PW), got ",
              grad.sizes());
  return backward_cpu("multiscale_roi_align_backward", grad, rois, &levels, scales.vec(),
                      grad.size(2), grad.size(3), N, C, heights, widths, sr, aligned,
                      channels_last);
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
