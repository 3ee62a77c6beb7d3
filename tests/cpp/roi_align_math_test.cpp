// Host unit test of csrc/roi_align/roi_align_math.h, the math shared by the CPU and
// CUDA kernels; compiled (with UBSan where available) and run by
// tests/test_roi_align.py::test_shared_math_host_unit. It checks the per-pixel
// gathers that the CUDA kernels use (tap_window, bin_range, bin_weight_at,
// profile_at, axis_span) against a brute-force scatter of every sample, so the
// CUDA-only deterministic backward's window logic is tested without a GPU.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "roi_align/roi_align_math.h"

using namespace mmkernels::roi_align;

static int failures = 0;
#define CHECK(cond, ...)                                         \
  do {                                                           \
    if (!(cond)) {                                               \
      if (++failures <= 20) {                                    \
        std::printf("FAIL line %d: %s: ", __LINE__, #cond);      \
        std::printf(__VA_ARGS__);                                \
        std::printf("\n");                                       \
      }                                                          \
    }                                                            \
  } while (0)

// Every sample of bins [b0, b1), scattered (the reference for the gathers): the
// weights in bin and sample order, and kTouched / kZeroTap per pixel.
template <typename T>
void scatter(T start, T bin, int b0, int b1, int grid, int size, std::vector<T>& prof,
             std::vector<unsigned char>& flags) {
  prof.assign(size, T(0));
  flags.assign(size, 0);
  for (int b = b0; b < b1; ++b) {
    for (int i = 0; i < grid; ++i) {
      const AxisTap<T> t = axis_tap(size, sample_coord(start, bin, b, i, grid));
      if (!t.inside) continue;
      prof[t.lo] += t.w_lo;
      flags[t.lo] |= t.w_lo == T(0) ? (kTouched | kZeroTap) : kTouched;
      prof[t.hi] += t.w_hi;
      flags[t.hi] |= t.w_hi == T(0) ? (kTouched | kZeroTap) : kTouched;
    }
  }
}

template <typename T>
void check_geometry(T start, T bin, int pooled, int grid, int size, const char* what) {
  std::vector<T> ref;
  std::vector<unsigned char> rf;
  scatter(start, bin, 0, pooled, grid, size, ref, rf);
  int first, last;
  axis_span(start, bin, pooled, grid, size, first, last);
  for (int p = 0; p < size; ++p) {
    unsigned char f = 0;
    const T w = profile_at(start, bin, pooled, grid, size, p, f);
    // Bit-identical: the same adds in the same order.
    CHECK(w == ref[p] && f == rf[p],
          "%s profile_at start=%.9g bin=%.9g pooled=%d grid=%d size=%d p=%d: %.9g/%d vs %.9g/%d",
          what, double(start), double(bin), pooled, grid, size, p, double(w), f, double(ref[p]),
          rf[p]);
    CHECK(!(rf[p] & kTouched) || (p >= first && p <= last),
          "%s axis_span misses pixel %d: [%d, %d] start=%.9g bin=%.9g", what, p, first, last,
          double(start), double(bin));
  }
  // Per bin (the deterministic backward's gather): bin_range and bin_weight_at.
  for (int p = 0; p < size; ++p) {
    double lo, hi;
    tap_window(p, lo, hi);
    const SampleRange br = bin_range(start, bin, pooled, grid, lo, hi);
    for (int b = 0; b < pooled; ++b) {
      std::vector<T> bref;
      std::vector<unsigned char> bf;
      scatter(start, bin, b, b + 1, grid, size, bref, bf);
      T w = T(0);
      unsigned char f = 0;
      bin_weight_at(start, bin, b, grid, size, p, w, f);
      CHECK(w == bref[p] && f == bf[p], "%s bin_weight_at b=%d p=%d start=%.9g bin=%.9g grid=%d",
            what, b, p, double(start), double(bin), grid);
      CHECK(!(bf[p] & kTouched) || (b >= br.begin && b < br.end),
            "%s bin_range [%d, %d) misses bin %d for pixel %d, start=%.9g bin=%.9g", what,
            br.begin, br.end, b, p, double(start), double(bin));
    }
  }
}

template <typename T>
void random_geometries(const char* what, int n) {
  std::mt19937 rng(1234);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int it = 0; it < n; ++it) {
    const int size = 1 + static_cast<int>(u(rng) * 12);
    const int pooled = 1 + static_cast<int>(u(rng) * 6);
    const int grid = 1 + static_cast<int>(u(rng) * 8);
    // Starts on the half-pixel grid (samples exactly on pixels: zero taps) or anywhere.
    double start = -4.0 + u(rng) * (size + 8.0);
    if (u(rng) < 0.5) start = std::round(start * 2.0) / 2.0;
    double extent = u(rng) * (size + 4.0);
    const double kind = u(rng);
    if (kind < 0.1) extent = 0.0;                      // zero-size box: coinciding samples
    else if (kind < 0.2) extent = -extent;             // inverted (aligned) box
    else if (kind < 0.3) extent = std::round(extent);  // integer bins
    else if (kind < 0.35) extent = 1e-3 * u(rng);      // sub-pixel
    const T s = static_cast<T>(start);
    const T b = static_cast<T>(extent) / static_cast<T>(pooled);
    check_geometry<T>(s, b, pooled, grid, size, what);
  }
}

// ---- the CUDA deterministic backward's tiled gather, emulated on the host ----------
// The kernel (_roi_align_bwd_det_kernel) bins the regions per image tile with
// region_in_tile on their RegionBox, keeps the hits in ascending order (at most
// kListCap at a time), and each pixel gathers visit_pixel_bins over that list. Here
// the same steps run sequentially, with small tiles and a small list capacity so
// that tile edges and list flushes are exercised, against a brute-force scatter of
// every sample (the atomic kernel's algorithm).
template <typename T>
struct HostVisitor {
  const T* grad;  // grad[k, :, :] (PH, PW) contiguous
  int PW;
  T count, acc = T(0), row = T(0);
  void row_begin() { row = T(0); }
  void tap(int ph, int pw, T wgt, bool zero) {
    const T gv = grad[ph * PW + pw];
    row += wgt * gv + (zero ? T(0) * gv : T(0));
  }
  void row_end() { acc += row / count; }
};

template <typename T>
void check_tiled_gather(std::mt19937& rng, int tile_h, int tile_w, int cap, double tol) {
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const int N = 1 + static_cast<int>(u(rng) * 3), H = 1 + static_cast<int>(u(rng) * 20),
            W = 1 + static_cast<int>(u(rng) * 20);
  const int PH = 1 + static_cast<int>(u(rng) * 4), PW = 1 + static_cast<int>(u(rng) * 4);
  const int sr = u(rng) < 0.5 ? 0 : 1 + static_cast<int>(u(rng) * 3);
  const bool aligned = u(rng) < 0.5;
  const T scale = static_cast<T>(u(rng) < 0.5 ? 1.0 : 0.5);
  const int K = static_cast<int>(u(rng) * 30);
  std::vector<RoiGeometry<T>> geo(K);
  std::vector<RegionBox> boxes(K);
  std::vector<T> grad(static_cast<size_t>(K) * PH * PW);
  for (auto& g : grad) g = static_cast<T>(u(rng) * 2.0 - 1.0);
  for (int k = 0; k < K; ++k) {
    // Boxes inside, across and outside the map; a few invalid batch indices.
    const double x1 = -6.0 + u(rng) * (W / scale + 8.0), y1 = -6.0 + u(rng) * (H / scale + 8.0);
    const double bw = u(rng) * (W / scale), bh = u(rng) * (H / scale);
    const double nd = u(rng) < 0.1 ? -1.0 : std::floor(u(rng) * N);
    geo[k] = roi_geometry<T>(static_cast<T>(x1), static_cast<T>(y1), static_cast<T>(x1 + bw),
                             static_cast<T>(y1 + bh), scale, PH, PW, sr, aligned);
    int64_t n = 0;
    const bool valid = batch_index(static_cast<T>(nd), N, n);
    boxes[k] = region_box(geo[k], valid, n, 0, PH, PW, H, W);
  }
  // Reference: scatter every sample of every valid region.
  std::vector<T> ref(static_cast<size_t>(N) * H * W, T(0));
  for (int k = 0; k < K; ++k) {
    const auto& g = geo[k];
    if (boxes[k].n < 0) continue;
    for (int ph = 0; ph < PH; ++ph)
      for (int pw = 0; pw < PW; ++pw)
        for (int iy = 0; iy < g.grid_h; ++iy)
          for (int ix = 0; ix < g.grid_w; ++ix) {
            const auto ty = axis_tap(H, sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h));
            const auto tx = axis_tap(W, sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w));
            const auto sm = combine_taps(ty, tx);
            if (!sm.inside) continue;
            const int ys[4] = {sm.y_lo, sm.y_lo, sm.y_hi, sm.y_hi};
            const int xs[4] = {sm.x_lo, sm.x_hi, sm.x_lo, sm.x_hi};
            for (int t = 0; t < 4; ++t) {
              CHECK(ys[t] >= boxes[k].y0 && ys[t] <= boxes[k].y1 && xs[t] >= boxes[k].x0 &&
                        xs[t] <= boxes[k].x1,
                    "region %d taps (%d, %d) outside its box [%d, %d] x [%d, %d]", k, ys[t],
                    xs[t], boxes[k].y0, boxes[k].y1, boxes[k].x0, boxes[k].x1);
              ref[(static_cast<size_t>(boxes[k].n) * H + ys[t]) * W + xs[t]] +=
                  sm.w[t] * (grad[(static_cast<size_t>(k) * PH + ph) * PW + pw] / g.count);
            }
          }
  }
  // The tiled gather.
  std::vector<T> out(ref.size(), T(0));
  for (int n = 0; n < N; ++n)
    for (int ty0 = 0; ty0 < H; ty0 += tile_h)
      for (int tx0 = 0; tx0 < W; tx0 += tile_w) {
        std::vector<T> acc(static_cast<size_t>(tile_h) * tile_w, T(0));
        std::vector<int> list;
        auto flush = [&] {
          for (int dy = 0; dy < tile_h; ++dy)
            for (int dx = 0; dx < tile_w; ++dx) {
              const int h = ty0 + dy, w = tx0 + dx;
              if (h >= H || w >= W) continue;
              for (const int k : list) {
                const RegionBox& b = boxes[k];
                if (h < b.y0 || h > b.y1 || w < b.x0 || w > b.x1) continue;
                HostVisitor<T> v{grad.data() + static_cast<size_t>(k) * PH * PW, PW,
                                 geo[k].count};
                v.acc = acc[dy * tile_w + dx];
                visit_pixel_bins(geo[k], PH, PW, H, W, h, w, v);
                acc[dy * tile_w + dx] = v.acc;
              }
            }
          list.clear();
        };
        for (int k = 0; k < K; ++k) {
          if (!region_in_tile(boxes[k], n, 0, ty0, ty0 + tile_h - 1, tx0, tx0 + tile_w - 1)) {
            continue;
          }
          if (static_cast<int>(list.size()) == cap) flush();
          list.push_back(k);
        }
        flush();
        for (int dy = 0; dy < tile_h && ty0 + dy < H; ++dy)
          for (int dx = 0; dx < tile_w && tx0 + dx < W; ++dx)
            out[(static_cast<size_t>(n) * H + ty0 + dy) * W + tx0 + dx] = acc[dy * tile_w + dx];
      }
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = std::fabs(static_cast<double>(out[i]) - static_cast<double>(ref[i]));
    CHECK(d <= tol * (1.0 + std::fabs(static_cast<double>(ref[i]))),
          "tiled gather pixel %zu: %.17g vs scatter %.17g (H=%d W=%d PH=%d PW=%d sr=%d K=%d)", i,
          static_cast<double>(out[i]), static_cast<double>(ref[i]), H, W, PH, PW, sr, K);
  }
}

int main(int argc, char**) {
  // Defect 1 (issue 10 review): aligned box (-0.5, -0.5, 0, 0) on a 4 x 4 map,
  // sampling_ratio 8, one bin: every sample lies in (-1, -0.5), is clamped to 0 and
  // taps pixel 1 with weight 0. Pixel 1 must be touched, with a zero tap.
  {
    const auto g = roi_geometry<float>(-0.5f, -0.5f, 0.f, 0.f, 1.f, 1, 1, 8, true);
    unsigned char f = 0;
    const float w = profile_at(g.start_h, g.bin_h, 1, g.grid_h, 4, 1, f);
    CHECK(w == 0.f && f == (kTouched | kZeroTap), "pixel 1: w=%g flags=%d", w, f);
    double lo, hi;
    tap_window(1, lo, hi);
    CHECK(lo == -1.0 && hi == 2.0, "tap_window(1) = [%g, %g]", lo, hi);
    check_geometry<float>(g.start_h, g.bin_h, 1, g.grid_h, 4, "repro");
  }
  // Defect 5: a float map of width 2^31 - 1: float(size) rounds to 2^31, a sample
  // at 2^31 is inside, and its taps must be the last pixel (the conversion of 2^31
  // to int is undefined; UBSan traps on it, x86 gives INT_MIN).
  {
    volatile int size = 2147483647 - argc + 1;
    volatile float coord = 2147483648.0f;
    const AxisTap<float> t = axis_tap<float>(size, coord);
    CHECK(t.inside && t.lo == size - 1 && t.hi == size - 1 && t.w_lo == 1.f && t.w_hi == 0.f,
          "axis_tap(2^31 - 1, 2^31): inside=%d lo=%d hi=%d", t.inside, t.lo, t.hi);
    volatile float below = 2147483520.0f;  // the float below 2^31: an interior pixel
    const AxisTap<float> u = axis_tap<float>(size, below);
    CHECK(u.inside && u.lo == 2147483520 && u.hi == 2147483521, "lo=%d hi=%d", u.lo, u.hi);
    const AxisTap<double> d = axis_tap<double>(size, 2147483646.5);
    CHECK(d.inside && d.lo == size - 1 && d.hi == size - 1, "double: lo=%d hi=%d", d.lo, d.hi);
  }
  random_geometries<float>("float", 3000);
  random_geometries<double>("double", 1500);
  {
    std::mt19937 rng(99);
    for (int it = 0; it < 300; ++it) {
      check_tiled_gather<double>(rng, 1 + it % 5, 1 + (it / 5) % 7, 1 + it % 4, 1e-12);
      check_tiled_gather<float>(rng, 8, 32, 1024, 2e-5);
    }
  }
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("OK\n");
  return 0;
}
