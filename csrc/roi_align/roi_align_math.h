// RoIAlign math, written once and shared by roi_align_cpu.cpp and roi_align_cuda.cu.
//
// Semantics are those of torchvision.ops.roi_align (Mask R-CNN, He et al. 2017):
//   * a box (x1, y1, x2, y2) is scaled by spatial_scale and, when `aligned`,
//     shifted by -0.5 (half-pixel centres);
//   * without `aligned`, width and height are clamped to at least 1;
//   * the box is split into pooled_h x pooled_w bins, and each bin averages a
//     grid_h x grid_w grid of bilinear samples at the sub-bin centres, where
//     grid = sampling_ratio if > 0, else ceil(bin size) (adaptive);
//   * a sample outside [-1, size] on either axis contributes 0; inside, the
//     coordinate is clamped to [0, size - 1] and interpolated bilinearly.
//
// Forward:  out[k, c, ph, pw] = 1/count * sum_{iy, ix} sum_{t in 4 taps} w_t * in[n_k, c, y_t, x_t]
// Backward: grad_in[n_k, c, y_t, x_t] += w_t / count * grad_out[k, c, ph, pw]   (same taps, same weights)
// The bilinear weight is separable, w = w_y * w_x, so the taps are computed per axis.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace mmkernels {
namespace roi_align {

// Largest sampling grid per bin and axis: an explicit sampling_ratio may not exceed
// it, and the adaptive grid ceil(bin size) is capped at it. The cap changes no
// result for bins up to 8192 feature-map pixels per axis, far beyond any real box
// (a 1333-pixel image at stride 1 pooled to one bin needs 1333); it keeps the
// sample count of a bin, grid_h * grid_w <= 2^26, exact and in 64 bits.
constexpr int kMaxSamplingRatio = 1 << 13;

// Geometry of one region of interest, all in feature-map pixels.
template <typename T>
struct RoiGeometry {
  T start_h, start_w;  // top-left corner after scaling and the aligned shift
  T bin_h, bin_w;      // bin size
  int grid_h, grid_w;  // samples per bin along each axis, in [0, kMaxSamplingRatio]
  T count;             // normaliser: max(grid_h * grid_w, 1), the product taken in 64 bits
  bool nan;            // the scaled box is not finite: the region's outputs are NaN
};

// v - v is 0 for a finite v and NaN for +-Inf and NaN (no <cmath> call, so the
// same test compiles for host and device).
template <typename T>
HOST_DEVICE_INLINE bool is_finite(T v) {
  return v - v == T(0);
}

template <typename T>
HOST_DEVICE_INLINE int adaptive_grid(T extent) {
  // ceil(extent) for extent > 0, else 0 (also for NaN); capped, see above.
  if (!(extent > T(0))) return 0;
  if (extent >= T(kMaxSamplingRatio)) return kMaxSamplingRatio;
  return static_cast<int>(ceil(extent));
}

template <typename T>
HOST_DEVICE_INLINE RoiGeometry<T> roi_geometry(T x1, T y1, T x2, T y2, T spatial_scale,
                                               int pooled_h, int pooled_w, int sampling_ratio,
                                               bool aligned) {
  RoiGeometry<T> g;
  const T offset = aligned ? T(0.5) : T(0);
  g.start_w = x1 * spatial_scale - offset;
  g.start_h = y1 * spatial_scale - offset;
  const T end_w = x2 * spatial_scale - offset;
  const T end_h = y2 * spatial_scale - offset;
  T roi_w = end_w - g.start_w;
  T roi_h = end_h - g.start_h;
  if (!aligned) {  // legacy behaviour: force malformed boxes to 1x1
    roi_w = roi_w > T(1) ? roi_w : T(1);
    roi_h = roi_h > T(1) ? roi_h : T(1);
  }
  g.bin_h = roi_h / static_cast<T>(pooled_h);
  g.bin_w = roi_w / static_cast<T>(pooled_w);
  // An Inf or NaN coordinate (x2 = -Inf too, which the legacy clamp would hide), or a
  // finite box whose scaled extent overflows: the region is NaN at once, with no
  // samples to visit.
  g.nan = !(is_finite(g.start_h) && is_finite(g.start_w) && is_finite(end_h) &&
            is_finite(end_w) && is_finite(g.bin_h) && is_finite(g.bin_w));
  if (g.nan) {
    g.grid_h = g.grid_w = 0;
  } else {
    g.grid_h = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(roi_h / static_cast<T>(pooled_h));
    g.grid_w = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(roi_w / static_cast<T>(pooled_w));
  }
  const int64_t n = static_cast<int64_t>(g.grid_h) * g.grid_w;
  g.count = static_cast<T>(n > 1 ? n : 1);
  return g;
}

// Batch index of a region: rois[k, 0] must lie in [0, N) (NaN fails both
// comparisons); the value is compared as a double before it is truncated, so the
// conversion is always defined. Shared by the CPU check, which raises, and the
// CUDA kernels, which cannot raise without a host sync: there a region with an
// invalid index reads nothing, its outputs are NaN and it gets no gradient.
template <typename T>
HOST_DEVICE_INLINE bool batch_index(T v, int64_t N, int64_t& n) {
  const double d = static_cast<double>(v);
  if (!(d >= 0.0 && d < static_cast<double>(N))) return false;
  n = static_cast<int64_t>(d);
  return true;
}

// Coordinate of sample i of bin b along one axis (the sub-bin centre).
template <typename T>
HOST_DEVICE_INLINE T sample_coord(T start, T bin, int b, int i, int grid) {
  return start + static_cast<T>(b) * bin + static_cast<T>(i + .5f) * bin / static_cast<T>(grid);
}

// Samples [begin, end) of one bin along one axis.
struct SampleRange {
  int begin, end;
};

// The samples i of bin b whose coordinate sample_coord(start, bin, b, i, grid) can
// lie in [lo, hi]: a superset (the float coordinate is bounded by its rounding
// error, and one index of margin is added on each side), so the per-sample test in
// axis_tap stays authoritative and skipping the others changes no result. Loops
// visit only these samples, so a huge box costs what its samples on the map cost,
// not grid_h * grid_w; the range is computed in double on host and device alike.
template <typename T>
HOST_DEVICE_INLINE SampleRange sample_range(T start, T bin, int b, int grid, double lo,
                                            double hi) {
  SampleRange r{0, grid > 0 ? grid : 0};
  const double base = static_cast<double>(start) + static_cast<double>(b) * static_cast<double>(bin);
  const double step = static_cast<double>(bin) / static_cast<double>(grid);
  if (grid <= 0 || !(step != 0.0)) return r;  // coinciding samples: visit them all
  // sample_coord rounds at most four times, each time by at most half an ulp of a
  // value bounded by m; eight ulps of m bound its error with a wide margin.
  const double eps = sizeof(T) >= 8 ? 2.220446049250313e-16 : 1.1920928955078125e-07;
  const double m = fabs(static_cast<double>(start)) +
                   fabs(static_cast<double>(b) * static_cast<double>(bin)) +
                   fabs(static_cast<double>(bin));
  const double err = 8.0 * eps * m;
  double ta = (lo - err - base) / step - 0.5;
  double tb = (hi + err - base) / step - 0.5;
  if (!(ta == ta) || !(tb == tb)) return r;  // cannot happen for a finite geometry
  if (ta > tb) {  // a negative bin (aligned, inverted box): coordinates decrease with i
    const double t = ta;
    ta = tb;
    tb = t;
  }
  if (tb < 0.0 || ta > static_cast<double>(grid)) {
    r.end = 0;
    return r;
  }
  if (ta > 1.0) r.begin = static_cast<int>(floor(ta)) - 1;
  if (tb < static_cast<double>(grid) - 2.0) r.end = static_cast<int>(ceil(tb)) + 2;
  return r;
}

// The two bilinear taps along one axis. `inside` is false when the sample lies
// outside [-1, size] (or is NaN); it then contributes nothing.
template <typename T>
struct AxisTap {
  int lo, hi;
  T w_lo, w_hi;
  bool inside;
};

template <typename T>
HOST_DEVICE_INLINE AxisTap<T> axis_tap(int size, T coord) {
  AxisTap<T> t;
  t.inside = coord >= T(-1) && coord <= static_cast<T>(size);
  if (!t.inside) {
    t.lo = t.hi = 0;
    t.w_lo = t.w_hi = T(0);
    return t;
  }
  if (coord <= T(0)) coord = T(0);
  // Compare in T before converting: for a float map with size near 2^31,
  // static_cast<T>(size) rounds up to 2^31, a sample there is inside, and
  // static_cast<int>(2^31) would be undefined (INT_MIN on x86).
  int lo = coord >= static_cast<T>(size - 1) ? size - 1 : static_cast<int>(coord);
  int hi;
  if (lo >= size - 1) {
    hi = lo = size - 1;
    coord = static_cast<T>(lo);
  } else {
    hi = lo + 1;
  }
  const T frac = coord - static_cast<T>(lo);
  t.lo = lo;
  t.hi = hi;
  t.w_lo = T(1) - frac;
  t.w_hi = frac;
  return t;
}

// The four taps of one 2-D sample: value = w[0]*in[y_lo,x_lo] + w[1]*in[y_lo,x_hi]
// + w[2]*in[y_hi,x_lo] + w[3]*in[y_hi,x_hi]; the gradient of the value with
// respect to in[y_t, x_t] is w[t].
template <typename T>
struct Taps2D {
  int y_lo, y_hi, x_lo, x_hi;
  T w[4];
  bool inside;
};

template <typename T>
HOST_DEVICE_INLINE Taps2D<T> combine_taps(const AxisTap<T>& ty, const AxisTap<T>& tx) {
  Taps2D<T> s;
  s.inside = ty.inside && tx.inside;
  s.y_lo = ty.lo;
  s.y_hi = ty.hi;
  s.x_lo = tx.lo;
  s.x_hi = tx.hi;
  s.w[0] = ty.w_lo * tx.w_lo;
  s.w[1] = ty.w_lo * tx.w_hi;
  s.w[2] = ty.w_hi * tx.w_lo;
  s.w[3] = ty.w_hi * tx.w_hi;
  return s;
}

// The bilinear blend of the four tap values v00 = in[y_lo, x_lo], v01 = in[y_lo, x_hi],
// v10 = in[y_hi, x_lo], v11 = in[y_hi, x_hi] (in this order, as torchvision sums them).
template <typename T>
HOST_DEVICE_INLINE T blend4(const Taps2D<T>& s, T v00, T v01, T v10, T v11) {
  return s.w[0] * v00 + s.w[1] * v01 + s.w[2] * v10 + s.w[3] * v11;
}

// ---- per-pixel gathers (CPU region_features, CUDA region_features and the CUDA
// deterministic backward all go through these) -----------------------------------

// Coordinates [lo, hi] of every sample that taps pixel p along an axis, whatever
// the weight (a weight of 0 too, so that 0 * Inf gives NaN as in torchvision):
// a sample c in [-1, 0] is clamped to 0 and taps pixels 0 and 1 (weights 1, 0);
// c in (0, size - 1) taps floor(c) and floor(c) + 1; c in [size - 1, size] taps
// size - 1 only. So pixel p is tapped by c in [p - 1, p + 1), and pixel 1 also by
// c in [-1, 0): the window starts at -1 for p <= 1.
HOST_DEVICE_INLINE void tap_window(int p, double& lo, double& hi) {
  lo = p <= 1 ? -1.0 : static_cast<double>(p) - 1.0;
  hi = static_cast<double>(p) + 1.0;
}

// Margin of the double-precision bounds below on the float sample coordinates
// (see sample_range): eight ulps of the largest magnitude involved.
template <typename T>
HOST_DEVICE_INLINE double coord_error(T start, T bin, int pooled) {
  const double eps = sizeof(T) >= 8 ? 2.220446049250313e-16 : 1.1920928955078125e-07;
  const double m = fabs(static_cast<double>(start)) +
                   fabs(static_cast<double>(pooled) * static_cast<double>(bin)) +
                   fabs(static_cast<double>(bin));
  return 8.0 * eps * m;
}

// Bins [begin, end) whose samples can lie in [lo, hi]: a superset (bin b's
// samples lie between start + b * bin and start + (b + 1) * bin, up to rounding;
// one bin of margin on each side), so that sample_range and axis_tap stay
// authoritative. A zero bin puts every sample at `start`: all bins or none.
template <typename T>
HOST_DEVICE_INLINE SampleRange bin_range(T start, T bin, int pooled, int grid, double lo,
                                         double hi) {
  SampleRange r{0, 0};
  if (grid <= 0 || pooled <= 0) return r;
  const double err = coord_error(start, bin, pooled);
  const double s = static_cast<double>(start);
  const double d = static_cast<double>(bin);
  if (!(d != 0.0)) {
    if (s >= lo - err - 1.0 && s <= hi + err + 1.0) r.end = pooled;
    return r;
  }
  double ta = (lo - err - s) / d;
  double tb = (hi + err - s) / d;
  if (!(ta == ta) || !(tb == tb)) {  // cannot happen for a finite geometry
    r.end = pooled;
    return r;
  }
  if (ta > tb) {  // a negative bin: coordinates decrease with b
    const double t = ta;
    ta = tb;
    tb = t;
  }
  // bin b can meet [ta, tb] (in bin units) when b + 1 >= ta and b <= tb.
  const double P = static_cast<double>(pooled);
  if (tb < -1.0 || ta > P) return r;
  r.begin = ta > 1.0 ? static_cast<int>(floor(ta)) - 1 : 0;
  r.end = tb < P - 2.0 ? static_cast<int>(floor(tb)) + 2 : pooled;
  if (r.begin > r.end) r.begin = r.end;
  return r;
}

// Pixels [first, last] of an axis that any sample of the region can tap: the
// samples lie between start and start + pooled * bin (up to rounding), and a sample
// c taps pixels within [floor(c), floor(c) + 1], clamped to the map (c <= 0 taps
// 0 and 1). first > last when there is none.
template <typename T>
HOST_DEVICE_INLINE void axis_span(T start, T bin, int pooled, int grid, int size, int& first,
                                  int& last) {
  first = 0;
  last = -1;
  if (grid <= 0 || pooled <= 0 || size <= 0) return;
  const double err = coord_error(start, bin, pooled);
  const double a = static_cast<double>(start);
  const double b = a + static_cast<double>(pooled) * static_cast<double>(bin);
  double cmin = (a < b ? a : b) - err;
  double cmax = (a < b ? b : a) + err;
  if (!(cmin == cmin) || !(cmax == cmax)) {  // cannot happen for a finite geometry
    last = size - 1;
    return;
  }
  if (cmax < -1.0 || cmin > static_cast<double>(size)) return;
  const double S = static_cast<double>(size);
  cmin = cmin < -2.0 ? -2.0 : cmin;
  cmax = cmax > S + 1.0 ? S + 1.0 : cmax;
  const int f = static_cast<int>(floor(cmin)) - 1;
  const int l = static_cast<int>(ceil(cmax)) + 1;
  first = f < 0 ? 0 : f;
  last = l > size - 1 ? size - 1 : l;
}

// Flags of a pixel in an axis profile.
constexpr unsigned char kTouched = 1;  // a tap of an inside sample, whatever its weight
constexpr unsigned char kZeroTap = 2;  // ... and one of those taps has weight exactly 0

// The taps on pixel p of the samples of bin b along one axis, in sample order:
// adds their weights to w and sets kTouched / kZeroTap in `flags`.
template <typename T>
HOST_DEVICE_INLINE void bin_weight_at(T start, T bin, int b, int grid, int size, int p, T& w,
                                      unsigned char& flags) {
  double lo, hi;
  tap_window(p, lo, hi);
  const SampleRange r = sample_range(start, bin, b, grid, lo, hi);
  for (int i = r.begin; i < r.end; ++i) {
    const AxisTap<T> t = axis_tap(size, sample_coord(start, bin, b, i, grid));
    if (!t.inside) continue;
    if (t.lo == p) {
      w += t.w_lo;
      flags |= t.w_lo == T(0) ? (kTouched | kZeroTap) : kTouched;
    }
    if (t.hi == p) {
      w += t.w_hi;
      flags |= t.w_hi == T(0) ? (kTouched | kZeroTap) : kTouched;
    }
  }
}

// Total bilinear weight that every sample of every bin puts on pixel p along one
// axis: profile[p] = sum of w over the taps (p, w) of the inside samples, added in
// bin and sample order. Because the samples of a region form a Cartesian grid and a
// sample counts only when inside on both axes, the sum over all samples of
// w_y * w_x * in[y, x] equals sum_y profile_y[y] * sum_x profile_x[x] * in[y, x]:
// region_features is a bilinear form with two 1-D profiles.
//
// Non-finite values: torchvision multiplies every tap, so a NaN on a touched pixel,
// or an Inf on a pixel that some sample taps with weight 0 (0 * Inf = NaN, even
// when other samples give it a positive weight), gives NaN. A 2-D sample taps
// (y, x) with weight w_y * w_x = 0 iff one of its axis taps has weight 0; with a
// Cartesian grid of samples, such a sample exists iff
//   (zero_y[y] && touched_x[x]) || (touched_y[y] && zero_x[x]),
// and the kernels add 0 * in[y, x] (0 * grad in the backward) exactly there.
//
// Cost: the samples within the tap window of p (bin_range, sample_range), so one
// thread per pixel (CUDA) or a loop over axis_span (CPU) visits each sample a few
// times, not pooled * grid times per pixel.
template <typename T>
HOST_DEVICE_INLINE T profile_at(T start, T bin, int pooled, int grid, int size, int p,
                                unsigned char& flags) {
  double lo, hi;
  tap_window(p, lo, hi);
  const SampleRange bins = bin_range(start, bin, pooled, grid, lo, hi);
  T w = T(0);
  flags = 0;
  for (int b = bins.begin; b < bins.end; ++b) bin_weight_at(start, bin, b, grid, size, p, w, flags);
  return w;
}

// The whole profile of one axis (size zeroed entries in `profile` and `flags`);
// [first, last] receives the touched range (first > last when none).
template <typename T>
HOST_DEVICE_INLINE void axis_profile(T start, T bin, int pooled, int grid, int size, T* profile,
                                     unsigned char* flags, int& first, int& last) {
  int a, z;
  axis_span(start, bin, pooled, grid, size, a, z);
  first = size;
  last = -1;
  for (int p = a; p <= z; ++p) {
    profile[p] = profile_at(start, bin, pooled, grid, size, p, flags[p]);
    if (flags[p] & kTouched) {
      first = p < first ? p : first;
      last = p;
    }
  }
}

// ---- the deterministic backward as a gather (CUDA), testable on the host -----------
//
// grad_in[n, c, h, w] = sum over the regions k of image n, in ascending k, of the
// contribution of k to pixel (h, w) (visit_pixel_bins). The CUDA backward first bins
// the regions per image tile, once per call and independent of C: each region emits
// one (tile, k) pair per tile its pixel box meets (region_tile_count /
// region_tile_at), the pairs are sorted by bin_key (tile, then k), and each tile's
// pixels then visit only the regions of their tile's run of the sorted pairs, in
// ascending k. Work: O(K * tiles per box) to bin, O(K * samples * C + N * C * H * W)
// to gather, instead of O(N * C * H * W * K). The pairs have a fixed number of slots
// (bin_slots, from the shapes only: no host sync, nothing sized by the data); when
// the pairs of regions k >= k_cut do not fit (first_cut_region), every tile walks its
// pairs of the regions below k_cut, then tests the regions from k_cut on in order
// (region_in_tile): the same sums in the same order. tests/cpp/roi_align_math_test.cpp
// runs this binned gather on the host against a brute-force scatter.

// The pixels a region can tap (axis_span on both axes), its image, and its level;
// n < 0 for a region that gets no gradient (invalid index or level, non-finite box).
struct RegionBox {
  int64_t n;
  int level, y0, y1, x0, x1, pad;
};

// Whether region box b can tap a pixel of tile [ty0, ty1] x [tx0, tx1] of image n, level l.
HOST_DEVICE_INLINE bool region_in_tile(const RegionBox& b, int64_t n, int l, int ty0, int ty1,
                                       int tx0, int tx1) {
  return b.n == n && b.level == l && b.y0 <= b.y1 && b.x0 <= b.x1 && b.y0 <= ty1 &&
         b.y1 >= ty0 && b.x0 <= tx1 && b.x1 >= tx0;
}

// Tiles of tile_h x tile_w pixels covering an H x W map (row-major, per image).
HOST_DEVICE_INLINE int64_t tiles_per_image(int H, int W, int tile_h, int tile_w) {
  // (int64: H + tile_h - 1 overflows int for H near 2^31)
  return ((int64_t(H) + tile_h - 1) / tile_h) * ((int64_t(W) + tile_w - 1) / tile_w);
}

// Number of tiles (of its level's grid) that region box b meets; 0 for a region with
// no gradient or an empty box. (y0, x0 >= 0: axis_span clamps them to the map.)
HOST_DEVICE_INLINE int64_t region_tile_count(const RegionBox& b, int tile_h, int tile_w) {
  if (b.n < 0 || b.y0 > b.y1 || b.x0 > b.x1) return 0;
  return int64_t(b.y1 / tile_h - b.y0 / tile_h + 1) * (b.x1 / tile_w - b.x0 / tile_w + 1);
}

// The i-th of those tiles (row-major over the box's tiles), as its index in the
// (level, image) tile grid of tiles_w tiles per row, i in [0, region_tile_count).
HOST_DEVICE_INLINE int64_t region_tile_at(const RegionBox& b, int tile_h, int tile_w,
                                          int64_t tiles_w, int64_t i) {
  const int64_t cols = b.x1 / tile_w - b.x0 / tile_w + 1;
  return (b.y0 / tile_h + i / cols) * tiles_w + b.x0 / tile_w + i % cols;
}

// Sort key of the pair (tile t, region k): t in the high 32 bits, k in the low ones,
// so ascending keys list each tile's regions in ascending k. kNoPair (all ones) pads
// the unused slots and sorts after every real key (t < 2^31, bins_fit).
constexpr uint64_t kNoPair = ~uint64_t(0);
HOST_DEVICE_INLINE uint64_t bin_key(int64_t t, int64_t k) {
  return (static_cast<uint64_t>(t) << 32) | static_cast<uint64_t>(k);
}
HOST_DEVICE_INLINE int64_t bin_key_region(uint64_t key) {
  return static_cast<int64_t>(key & 0xffffffffu);
}

// Whether the pair keys can hold K regions and T tiles (k < 2^32, t < 2^31).
HOST_DEVICE_INLINE bool bins_fit(int64_t K, int64_t T) {
  return K >= 0 && K <= 0xffffffffLL && T >= 0 && T < (int64_t(1) << 31);
}

// Pair slots for K regions binned into T tiles, the largest level having
// max_tiles (per image): every pair fits when K * max_tiles <= slots_per_region * K
// + T, else that many slots (the overflow rule of first_cut_region then applies).
// From the shapes only, so the buffers are allocated without a host sync.
constexpr int64_t kBinSlotsPerRegion = 64;
HOST_DEVICE_INLINE int64_t bin_slots(int64_t K, int64_t max_tiles, int64_t T,
                                     int64_t slots_per_region = kBinSlotsPerRegion) {
  if (K <= 0) return 0;
  const int64_t budget = slots_per_region * K + T;
  return max_tiles <= budget / K ? K * max_tiles : budget;  // (no K * max_tiles overflow)
}

// Sort bits of the keys: the region half and enough bits for tiles < T.
HOST_DEVICE_INLINE int bin_key_bits(int64_t T) {
  int bits = 32;
  while (bits < 64 && (int64_t(1) << (bits - 32)) < T) ++bits;
  return bits;
}

// The bins of one deterministic backward (host side): K regions on L levels of N
// images, level l of H[l] x W[l] pixels; level l's tiles are numbered from base[l]
// (levels one after the other, images one after the other, tiles row-major).
struct BinPlan {
  int64_t tiles;  // T, over every level
  int64_t slots;  // pair slots (bin_slots)
  int key_bits;   // bin_key_bits(T)
  bool binned;    // false when the keys cannot hold K and T (bins_fit): no bins, every
                  // tile tests every region in order (the same sums, slower)
};
inline BinPlan plan_bins(int64_t K, int64_t N, int L, const int* H, const int* W, int tile_h,
                         int tile_w, int64_t* base) {
  BinPlan b{0, 0, 32, false};
  int64_t max_tiles = 0;
  for (int l = 0; l < L; ++l) {
    const int64_t t = tiles_per_image(H[l], W[l], tile_h, tile_w);
    base[l] = b.tiles;
    b.tiles += N * t;
    max_tiles = t > max_tiles ? t : max_tiles;
  }
  b.binned = K > 0 && b.tiles > 0 && bins_fit(K, b.tiles);
  if (b.binned) {
    b.slots = bin_slots(K, max_tiles, b.tiles);
    b.key_bits = bin_key_bits(b.tiles);
  }
  return b;
}

// First index i in [0, n) with a[i] >= v (upper: a[i] > v), n if none; a ascending.
template <typename V>
HOST_DEVICE_INLINE int64_t search_sorted(const V* a, int64_t n, V v, bool upper) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (upper ? !(v < a[mid]) : a[mid] < v) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// k_cut: the first region whose pairs do not all fit in `slots`, given the inclusive
// prefix sums `incl` of the regions' tile counts (K if every pair fits). Pair j of
// region k has slot incl[k] - count_k + j, so the regions below k_cut are complete.
HOST_DEVICE_INLINE int64_t first_cut_region(const int64_t* incl, int64_t K, int64_t slots) {
  return search_sorted<int64_t>(incl, K, slots, /*upper=*/true);
}

// Box of a region with geometry g on an H x W map (n < 0: no gradient).
template <typename T>
HOST_DEVICE_INLINE RegionBox region_box(const RoiGeometry<T>& g, bool valid, int64_t n, int level,
                                        int PH, int PW, int H, int W) {
  RegionBox b;
  b.n = valid && !g.nan ? n : -1;
  b.level = level;
  b.pad = 0;
  axis_span(g.start_h, g.bin_h, PH, g.grid_h, H, b.y0, b.y1);
  axis_span(g.start_w, g.bin_w, PW, g.grid_w, W, b.x0, b.x1);
  return b;
}

// The bins of region g whose samples tap pixel (h, w), in the order the deterministic
// backward sums them: for each bin row ph with a sample on row h, v.row_begin(), then
// v.tap(ph, pw, sy * sx, zero) for each bin column pw with a sample on column w (sy,
// sx: the bin's total axis weights on h and w; zero: one of those samples taps the
// pixel with weight 0, so 0 * grad must be added, as the atomic path does), then
// v.row_end(). The visitor scales by 1 / count (per bin row, as the kernels do).
template <typename A, typename Visitor>
HOST_DEVICE_INLINE void visit_pixel_bins(const RoiGeometry<A>& g, int PH, int PW, int H, int W,
                                         int h, int w, Visitor& v) {
  double ylo, yhi, xlo, xhi;
  tap_window(h, ylo, yhi);
  tap_window(w, xlo, xhi);
  const SampleRange yb = bin_range(g.start_h, g.bin_h, PH, g.grid_h, ylo, yhi);
  if (yb.begin >= yb.end) return;
  const SampleRange xb = bin_range(g.start_w, g.bin_w, PW, g.grid_w, xlo, xhi);
  if (xb.begin >= xb.end) return;
  for (int ph = yb.begin; ph < yb.end; ++ph) {
    A sy = A(0);
    unsigned char fy = 0;
    bin_weight_at(g.start_h, g.bin_h, ph, g.grid_h, H, h, sy, fy);
    if (!(fy & kTouched)) continue;
    v.row_begin();
    for (int pw = xb.begin; pw < xb.end; ++pw) {
      A sx = A(0);
      unsigned char fx = 0;
      bin_weight_at(g.start_w, g.bin_w, pw, g.grid_w, W, w, sx, fx);
      if (!(fx & kTouched)) continue;
      v.tap(ph, pw, sy * sx, ((fy | fx) & kZeroTap) != 0);
    }
    v.row_end();
  }
}

// FPN level of a box (torchvision LevelMapper, Lin et al. 2017 eq. 1) is
// computed on the host in Python with the same float32 formula as torchvision,
// so that the assignment is bit-identical; the kernels take it as an index.

}  // namespace roi_align
}  // namespace mmkernels
