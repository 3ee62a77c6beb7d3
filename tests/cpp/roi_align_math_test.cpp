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
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("OK\n");
  return 0;
}
