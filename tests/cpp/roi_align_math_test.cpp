// Host unit test of csrc/roi_align/roi_align_math.h, the math shared by the CPU and
// CUDA kernels; compiled (with UBSan where available) and run by
// tests/test_roi_align.py::test_shared_math_host_unit. It checks the per-pixel
// gathers that the CUDA kernels use (tap_window, bin_range, bin_weight_at,
// profile_at, axis_span) against a brute-force scatter of every sample, so the
// CUDA-only deterministic backward's window logic is tested without a GPU.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "common/launch_geometry.h"
#include "roi_align/roi_align_math.h"

using namespace mmkernels::roi_align;
using mmkernels::GridShape;

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

// ---- the CUDA deterministic backward's binned gather, emulated on the host ----------
// launch_bin_regions and _roi_align_bwd_det_kernel, step by step and sequentially:
// each region's RegionBox on its own level, its tile count (region_tile_count), the
// inclusive prefix sums, one bin_key per slot (the region of slot s: search_sorted
// on the sums; region_tile_at), the sort, each tile's run (search_sorted) and k_cut
// (first_cut_region); then every tile walks the regions of its run below k_cut and
// tests the regions from k_cut on in order (region_in_tile), kListCap (`cap`) at a
// time, and each pixel gathers visit_pixel_bins over them. Small tiles, small list
// capacities and few slots per region exercise tile edges, list flushes and the
// overflow rule; one or two levels exercise the level bases. Checked against a
// brute-force scatter of every sample (the atomic kernel's algorithm).
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

struct Bins {
  std::vector<int64_t> count, incl, start;
  std::vector<uint64_t> sorted;
  int64_t tiles = 0, k_cut = 0;
  bool binned = false;
};

// launch_bin_regions on the host; slots_per_region < 0: plan_bins's slots.
Bins bin_regions(const std::vector<RegionBox>& boxes, int64_t N, int L, const int* H,
                 const int* W, int tile_h, int tile_w, int64_t slots_per_region,
                 int64_t* base) {
  const int64_t K = static_cast<int64_t>(boxes.size());
  Bins b;
  BinPlan plan = plan_bins(K, N, L, H, W, tile_h, tile_w, base);
  b.tiles = plan.tiles;
  b.binned = plan.binned;
  if (!plan.binned) return b;
  if (slots_per_region >= 0) {
    int64_t max_tiles = 0;
    for (int l = 0; l < L; ++l) {
      const int64_t t = tiles_per_image(H[l], W[l], tile_h, tile_w);
      max_tiles = t > max_tiles ? t : max_tiles;
    }
    plan.slots = bin_slots(K, max_tiles, plan.tiles, slots_per_region);
  }
  b.count.resize(K);
  b.incl.resize(K);
  int64_t sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    b.count[k] = region_tile_count(boxes[k], tile_h, tile_w);
    b.incl[k] = sum += b.count[k];
  }
  std::vector<uint64_t> keys(plan.slots);
  for (int64_t s = 0; s < plan.slots; ++s) {
    const int64_t k = search_sorted<int64_t>(b.incl.data(), K, s, /*upper=*/true);
    keys[s] = kNoPair;
    if (k < K) {
      const RegionBox& bx = boxes[k];
      const int64_t tiles_w = (W[bx.level] + tile_w - 1) / tile_w;
      const int64_t t = base[bx.level] + bx.n * tiles_per_image(H[bx.level], W[bx.level], tile_h,
                                                                tile_w) +
                        region_tile_at(bx, tile_h, tile_w, tiles_w, s - (b.incl[k] - b.count[k]));
      CHECK(t >= 0 && t < plan.tiles, "tile %lld of %lld", (long long)t, (long long)plan.tiles);
      keys[s] = bin_key(t, k);
    }
  }
  b.sorted = keys;
  std::sort(b.sorted.begin(), b.sorted.end());
  b.start.resize(plan.tiles + 1);
  for (int64_t t = 0; t <= plan.tiles; ++t) {
    b.start[t] = search_sorted<uint64_t>(b.sorted.data(), plan.slots, bin_key(t, 0), false);
  }
  b.k_cut = first_cut_region(b.incl.data(), K, plan.slots);
  const bool overflow = sum > plan.slots;
  CHECK(overflow == (b.k_cut < K), "k_cut %lld, %lld pairs in %lld slots", (long long)b.k_cut,
        (long long)sum, (long long)plan.slots);
  return b;
}

template <typename T>
int check_tiled_gather(std::mt19937& rng, int tile_h, int tile_w, int cap, double tol,
                       int64_t slots_per_region) {
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const int N = 1 + static_cast<int>(u(rng) * 3), L = u(rng) < 0.5 ? 1 : 2;
  int H[2], W[2];
  T scale[2];
  H[0] = 1 + static_cast<int>(u(rng) * 20);
  W[0] = 1 + static_cast<int>(u(rng) * 20);
  scale[0] = static_cast<T>(u(rng) < 0.5 ? 1.0 : 0.5);
  H[1] = (H[0] + 1) / 2;
  W[1] = (W[0] + 1) / 2;
  scale[1] = scale[0] / T(2);
  const int PH = 1 + static_cast<int>(u(rng) * 4), PW = 1 + static_cast<int>(u(rng) * 4);
  const int sr = u(rng) < 0.5 ? 0 : 1 + static_cast<int>(u(rng) * 3);
  const bool aligned = u(rng) < 0.5;
  const int K = static_cast<int>(u(rng) * 30);
  std::vector<RoiGeometry<T>> geo(K);
  std::vector<RegionBox> boxes(K);
  std::vector<T> grad(static_cast<size_t>(K) * PH * PW);
  for (auto& g : grad) g = static_cast<T>(u(rng) * 2.0 - 1.0);
  for (int k = 0; k < K; ++k) {
    // Boxes inside, across and outside the map; a few invalid batch indices.
    const int l = u(rng) < 0.5 ? 0 : L - 1;
    const double x1 = -6.0 + u(rng) * (W[0] / scale[0] + 8.0);
    const double y1 = -6.0 + u(rng) * (H[0] / scale[0] + 8.0);
    const double bw = u(rng) * (W[0] / scale[0]), bh = u(rng) * (H[0] / scale[0]);
    const double nd = u(rng) < 0.1 ? -1.0 : std::floor(u(rng) * N);
    geo[k] = roi_geometry<T>(static_cast<T>(x1), static_cast<T>(y1), static_cast<T>(x1 + bw),
                             static_cast<T>(y1 + bh), scale[l], PH, PW, sr, aligned);
    int64_t n = 0;
    const bool valid = batch_index(static_cast<T>(nd), N, n);
    boxes[k] = region_box(geo[k], valid, n, l, PH, PW, H[l], W[l]);
  }
  // Reference: scatter every sample of every valid region.
  std::vector<T> ref[2];
  for (int l = 0; l < L; ++l) ref[l].assign(static_cast<size_t>(N) * H[l] * W[l], T(0));
  for (int k = 0; k < K; ++k) {
    const auto& g = geo[k];
    const RegionBox& bx = boxes[k];
    if (bx.n < 0) continue;
    const int h_ = H[bx.level], w_ = W[bx.level];
    for (int ph = 0; ph < PH; ++ph)
      for (int pw = 0; pw < PW; ++pw)
        for (int iy = 0; iy < g.grid_h; ++iy)
          for (int ix = 0; ix < g.grid_w; ++ix) {
            const auto ty = axis_tap(h_, sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h));
            const auto tx = axis_tap(w_, sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w));
            const auto sm = combine_taps(ty, tx);
            if (!sm.inside) continue;
            const int ys[4] = {sm.y_lo, sm.y_lo, sm.y_hi, sm.y_hi};
            const int xs[4] = {sm.x_lo, sm.x_hi, sm.x_lo, sm.x_hi};
            for (int t = 0; t < 4; ++t) {
              CHECK(ys[t] >= bx.y0 && ys[t] <= bx.y1 && xs[t] >= bx.x0 && xs[t] <= bx.x1,
                    "region %d taps (%d, %d) outside its box [%d, %d] x [%d, %d]", k, ys[t],
                    xs[t], bx.y0, bx.y1, bx.x0, bx.x1);
              ref[bx.level][(static_cast<size_t>(bx.n) * h_ + ys[t]) * w_ + xs[t]] +=
                  sm.w[t] * (grad[(static_cast<size_t>(k) * PH + ph) * PW + pw] / g.count);
            }
          }
  }
  int64_t base[2];
  const Bins b = bin_regions(boxes, N, L, H, W, tile_h, tile_w, slots_per_region, base);
  // The gather, level by level, tile by tile.
  for (int l = 0; l < L; ++l) {
    const int64_t tiles_w = (W[l] + tile_w - 1) / tile_w;
    std::vector<T> out(ref[l].size(), T(0));
    for (int n = 0; n < N; ++n)
      for (int ty0 = 0; ty0 < H[l]; ty0 += tile_h)
        for (int tx0 = 0; tx0 < W[l]; tx0 += tile_w) {
          const int64_t tg = base[l] + n * tiles_per_image(H[l], W[l], tile_h, tile_w) +
                             (ty0 / tile_h) * tiles_w + tx0 / tile_w;
          std::vector<T> acc(static_cast<size_t>(tile_h) * tile_w, T(0));
          std::vector<int64_t> list;
          int64_t last = -1;
          auto flush = [&] {
            for (int dy = 0; dy < tile_h; ++dy)
              for (int dx = 0; dx < tile_w; ++dx) {
                const int h = ty0 + dy, w = tx0 + dx;
                if (h >= H[l] || w >= W[l]) continue;
                for (const int64_t k : list) {
                  const RegionBox& bx = boxes[k];
                  if (h < bx.y0 || h > bx.y1 || w < bx.x0 || w > bx.x1) continue;
                  HostVisitor<T> v{grad.data() + static_cast<size_t>(k) * PH * PW, PW,
                                   geo[k].count};
                  v.acc = acc[dy * tile_w + dx];
                  visit_pixel_bins(geo[k], PH, PW, H[l], W[l], h, w, v);
                  acc[dy * tile_w + dx] = v.acc;
                }
              }
            list.clear();
          };
          auto push = [&](int64_t k) {
            CHECK(k > last, "tile %lld visits region %lld after %lld", (long long)tg,
                  (long long)k, (long long)last);
            last = k;
            if (static_cast<int>(list.size()) == cap) flush();
            list.push_back(k);
          };
          int64_t from = 0;
          if (b.binned) {
            for (int64_t i = b.start[tg]; i < b.start[tg + 1]; ++i) {
              const int64_t k = bin_key_region(b.sorted[i]);
              if (k >= b.k_cut) break;
              CHECK(region_in_tile(boxes[k], n, l, ty0, ty0 + tile_h - 1, tx0, tx0 + tile_w - 1),
                    "region %lld binned into a tile it does not meet", (long long)k);
              push(k);
            }
            from = b.k_cut;
          }
          for (int64_t k = from; k < K; ++k) {
            if (region_in_tile(boxes[k], n, l, ty0, ty0 + tile_h - 1, tx0, tx0 + tile_w - 1)) {
              push(k);
            }
          }
          flush();
          for (int dy = 0; dy < tile_h && ty0 + dy < H[l]; ++dy)
            for (int dx = 0; dx < tile_w && tx0 + dx < W[l]; ++dx)
              out[(static_cast<size_t>(n) * H[l] + ty0 + dy) * W[l] + tx0 + dx] =
                  acc[dy * tile_w + dx];
        }
    for (size_t i = 0; i < ref[l].size(); ++i) {
      const double d = std::fabs(static_cast<double>(out[i]) - static_cast<double>(ref[l][i]));
      CHECK(d <= tol * (1.0 + std::fabs(static_cast<double>(ref[l][i]))),
            "tiled gather level %d pixel %zu: %.17g vs scatter %.17g (H=%d W=%d PH=%d PW=%d "
            "sr=%d K=%d)",
            l, i, static_cast<double>(out[i]), static_cast<double>(ref[l][i]), H[l], W[l], PH, PW,
            sr, K);
    }
  }
  return b.binned && b.k_cut < K ? 1 : 0;  // overflowed
}

// Plans, slot budgets, key bits and launch shapes: pure host logic.
void check_plans() {
  // 8 x 32 tiles on a 200 x 336 P2 map (25 x 11 per image) and its 100 x 168 P3 (13 x 6),
  // two images: a region may meet up to 275 tiles, more than its share of the budget.
  const int H[2] = {200, 100}, W[2] = {336, 168};
  int64_t base[2];
  BinPlan p = plan_bins(1000, 2, 2, H, W, 8, 32, base);
  CHECK(base[0] == 0 && base[1] == 2 * 25 * 11 && p.tiles == 2 * 25 * 11 + 2 * 13 * 6,
        "bases %lld %lld tiles %lld", (long long)base[0], (long long)base[1],
        (long long)p.tiles);
  CHECK(p.binned && p.slots == kBinSlotsPerRegion * 1000 + p.tiles && p.key_bits == 32 + 10,
        "budget: slots %lld bits %d", (long long)p.slots, p.key_bits);
  // A 64 x 64 map (8 x 2 tiles): every pair of every region fits, never an overflow.
  const int Hs[1] = {64}, Ws[1] = {64};
  p = plan_bins(1000, 3, 1, Hs, Ws, 8, 32, base);
  CHECK(p.binned && p.tiles == 48 && p.slots == 1000 * 16 && p.key_bits == 32 + 6,
        "exact: slots %lld bits %d", (long long)p.slots, p.key_bits);
  // A large map: the budget of kBinSlotsPerRegion slots per region plus one per tile.
  const int Hb[1] = {1024}, Wb[1] = {1024};
  p = plan_bins(5000, 4, 1, Hb, Wb, 8, 32, base);
  CHECK(p.tiles == 4 * 128 * 32 && p.slots == kBinSlotsPerRegion * 5000 + p.tiles,
        "budget %lld", (long long)p.slots);
  CHECK(!plan_bins(0, 4, 1, Hb, Wb, 8, 32, base).binned, "no regions, no bins");
  CHECK(!plan_bins(int64_t(1) << 32, 1, 1, Hb, Wb, 8, 32, base).binned, "K past the key");
  CHECK(bins_fit(0xffffffffLL, (int64_t(1) << 31) - 1) && !bins_fit(1, int64_t(1) << 31),
        "bins_fit bounds");
  // No overflow of K * max_tiles for a huge map.
  CHECK(bin_slots(int64_t(1) << 31, int64_t(1) << 40, 5) == kBinSlotsPerRegion * (int64_t(1) << 31) + 5,
        "bin_slots overflow guard");
  CHECK(bin_key_bits(1) == 32 && bin_key_bits(2) == 33 && bin_key_bits(1025) == 43,
        "bin_key_bits");
  CHECK(bin_key(5, 7) > bin_key(4, 0xffffffffLL) && bin_key_region(bin_key(3, 9)) == 9 &&
            kNoPair > bin_key((int64_t(1) << 31) - 1, 0xffffffffLL),
        "key order");
  // Regions' tile counts and tiles.
  RegionBox bx{1, 0, 7, 16, 31, 64, 0};  // rows 0..2, columns 0..2 of 8 x 32 tiles
  CHECK(region_tile_count(bx, 8, 32) == 9, "count %lld", (long long)region_tile_count(bx, 8, 32));
  CHECK(region_tile_at(bx, 8, 32, 11, 0) == 0 && region_tile_at(bx, 8, 32, 11, 4) == 12 &&
            region_tile_at(bx, 8, 32, 11, 8) == 24,
        "tile_at");
  bx.n = -1;
  CHECK(region_tile_count(bx, 8, 32) == 0, "no gradient, no tiles");
  const int64_t incl[5] = {2, 2, 5, 9, 9};
  CHECK(first_cut_region(incl, 5, 9) == 5 && first_cut_region(incl, 5, 5) == 3 &&
            first_cut_region(incl, 5, 4) == 2 && first_cut_region(incl, 5, 0) == 0,
        "first_cut_region");
}

// strided_grid (common/launch_geometry.h): grid dimensions that scale with the data are
// clamped to the hardware limits, the kernels stride over the rest. C = 262144
// channels in groups of 4 once asked for gridDim.y = 65536 and failed to launch.
void check_launch_geometry() {
  const GridShape g = mmkernels::strided_grid(550, (262144 + 3) / 4);
  CHECK(g.x == 550 && g.y == 65535 && g.z == 1, "C = 262144: %u x %u", g.x, g.y);
  const GridShape e = mmkernels::strided_grid(0, 0, 0);
  CHECK(e.x == 1 && e.y == 1 && e.z == 1, "empty: %u %u %u", e.x, e.y, e.z);
  const GridShape b = mmkernels::strided_grid(int64_t(1) << 40, 65535, 70000);
  CHECK(b.x == 2147483647u && b.y == 65535 && b.z == 65535, "huge: %u %u %u", b.x, b.y, b.z);
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
  check_plans();
  check_launch_geometry();
  {
    std::mt19937 rng(99);
    int overflowed = 0;
    for (int it = 0; it < 300; ++it) {
      // slots per region: every 3rd run 1 (the overflow rule), else the plan's.
      overflowed += check_tiled_gather<double>(rng, 1 + it % 5, 1 + (it / 5) % 7, 1 + it % 4,
                                               1e-12, it % 3 == 0 ? 1 : -1);
      check_tiled_gather<float>(rng, 8, 32, 1024, 2e-5, -1);
    }
    CHECK(overflowed >= 20, "only %d runs exercised the overflow rule", overflowed);
  }
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("OK\n");
  return 0;
}
