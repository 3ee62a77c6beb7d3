// RoIAlign family, CUDA kernels. The per-sample math is in roi_align_math.h,
// shared with the CPU kernels; this file only maps threads to outputs.
//
//   _roi_align_fwd_kernel     one thread per output element (k, c, ph, pw).
//   _roi_align_bwd_kernel     one thread per grad element, atomicAdd into an
//                             fp32/fp64 buffer (fp32 even for half inputs).
//   _bin_*_kernel             the deterministic backward's binning, once per call and
//                             independent of C: each region's tiles, prefix sums, one
//                             sort key per (tile, region) pair (radix-sorted by CUB),
//                             each tile's run of the sorted pairs.
//   _roi_align_bwd_det_kernel one thread per grad_input pixel and kTileChannels
//                             channels, gathering the contributions of its tile's
//                             regions in ascending order (no atomics).
//   _region_*_kernel          region_features, in the CPU's profile formulation
//                             (axis_profile in roi_align_math.h): per-region axis
//                             profiles, then the bilinear form per (k, c); the work
//                             of a thread is bounded by its region's window, never
//                             by output_size * samples.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// The radix sort of the deterministic backward's binning, in a
// namespace of our own (the kernels are hidden, this keeps the host symbols apart
// from torch's CUB too).
#define CUB_WRAPPED_NAMESPACE mmkernels_cub
#include <cub/device/device_radix_sort.cuh>

#include <cstdint>

#include "common/launch_geometry.h"
#include "roi_align/roi_align_cuda.h"
#include "roi_align/roi_align_math.h"

namespace mmkernels {
namespace roi_align {
namespace cuda {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// p.lv[l] with a run-time l, selected with constant indices so that the
// parameter struct is never copied to local memory.
__device__ __forceinline__ Level level_at(const Params& p, int l) {
  Level out = p.lv[0];
#pragma unroll
  for (int j = 1; j < kMaxLevels; ++j) {
    if (j == l) out = p.lv[j];
  }
  return out;
}

template <typename T, typename A>
__device__ __forceinline__ RoiGeometry<A> geometry(const Params& p, const T* r, double scale) {
  return roi_geometry<A>(to_acc(r[1]), to_acc(r[2]), to_acc(r[3]), to_acc(r[4]),
                         static_cast<A>(scale), p.PH, p.PW, p.sampling_ratio, p.aligned);
}

// Per-region validity shared by every kernel: the batch index (batch_index in
// roi_align_math.h, the rule the CPU backend raises on) and the level, compared
// in 64 bits before any narrowing. An invalid region reads nothing: its outputs
// are NaN and it gets no gradient. The host cannot check without a sync.
template <typename T>
__device__ __forceinline__ bool region_index(const Params& p, const T* r, int64_t k, int64_t& n,
                                             int& l) {
  const int64_t l64 = p.levels != nullptr ? p.levels[k] : 0;
  if (l64 < 0 || l64 >= p.L) return false;
  l = static_cast<int>(l64);
  return batch_index(to_acc(r[0]), p.N, n);
}

// The samples of bin (ph, pw) that can land on the map (sample_range), row by row
// (the CPU and torchvision order): f(s, o00, o01, o10, o11) for each inside sample s,
// with the element offsets of its four taps in blend4's order. All four taps are
// read and weighted by the callers, a zero weight too: a NaN tap gives NaN.
template <typename A, typename F>
__device__ __forceinline__ void for_each_sample(const Level& lv, const RoiGeometry<A>& g, int ph,
                                                int pw, const F& f) {
  const SampleRange ry = sample_range(g.start_h, g.bin_h, ph, g.grid_h, -1.0, lv.H);
  const SampleRange rx = sample_range(g.start_w, g.bin_w, pw, g.grid_w, -1.0, lv.W);
  for (int iy = ry.begin; iy < ry.end; ++iy) {
    const auto ty = axis_tap(lv.H, sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h));
    if (!ty.inside) continue;
    const int64_t r0 = ty.lo * lv.sH, r1 = ty.hi * lv.sH;
    for (int ix = rx.begin; ix < rx.end; ++ix) {
      const auto tx = axis_tap(lv.W, sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w));
      const auto s = combine_taps(ty, tx);
      if (!s.inside) continue;
      f(s, r0 + s.x_lo * lv.sW, r0 + s.x_hi * lv.sW, r1 + s.x_lo * lv.sW, r1 + s.x_hi * lv.sW);
    }
  }
}

// Region k: its batch index and level (region_index), its level, its geometry there.
template <typename A>
struct RegionAt {
  int64_t n;
  int l;
  bool valid;
  Level lv;
  RoiGeometry<A> g;
};

template <typename T, typename A>
__device__ __forceinline__ RegionAt<A> region_at(const Params& p, int64_t k) {
  const T* r = static_cast<const T*>(p.rois) + k * 5;
  RegionAt<A> ra;
  ra.n = 0;
  ra.l = 0;
  ra.valid = region_index(p, r, k, ra.n, ra.l);
  ra.lv = level_at(p, ra.l);
  ra.g = geometry<T, A>(p, r, ra.lv.scale);
  return ra;
}

// Decompose a linear thread index into (k, c, ph, pw).
__device__ __forceinline__ void unravel(const Params& p, int64_t i, int64_t& k, int64_t& c,
                                        int& ph, int& pw) {
  if (p.channels_inner) {
    c = i % p.C;
    int64_t t = i / p.C;
    pw = static_cast<int>(t % p.PW);
    t /= p.PW;
    ph = static_cast<int>(t % p.PH);
    k = t / p.PH;
  } else {
    pw = static_cast<int>(i % p.PW);
    int64_t t = i / p.PW;
    ph = static_cast<int>(t % p.PH);
    t /= p.PH;
    c = t % p.C;
    k = t / p.C;
  }
}

template <typename T>
__global__ void _roi_align_fwd_kernel(const Params p, T* __restrict__ out, const int64_t os0,
                                      const int64_t os1, const int64_t os2, const int64_t os3,
                                      const int64_t total) {
  using A = typename Acc<T>::type;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t k, c;
    int ph, pw;
    unravel(p, i, k, c, ph, pw);
    const RegionAt<A> ra = region_at<T, A>(p, k);
    const int64_t n = ra.n;
    const Level& lv = ra.lv;
    const auto& g = ra.g;
    const bool valid = ra.valid;
    A v;
    if (!valid || g.nan) {
      // An invalid batch index or level (never read out of bounds), or a non-finite box.
      v = A(NAN);
    } else {
      const T* plane = static_cast<const T*>(lv.data) + n * lv.sN + c * lv.sC;
      A acc = A(0);
      for_each_sample(lv, g, ph, pw, [&](const Taps2D<A>& s, int64_t o00, int64_t o01,
                                         int64_t o10, int64_t o11) {
        acc += blend4<A>(s, to_acc(plane[o00]), to_acc(plane[o01]), to_acc(plane[o10]),
                         to_acc(plane[o11]));
      });
      v = acc / g.count;
    }
    out[k * os0 + c * os1 + ph * os2 + pw * os3] = from_acc<T>(v);
  }
}

// Channels-last forward with 16-byte channel vectors: one thread per (k, ph, pw) and
// V = 16 / sizeof(T) consecutive channels; each tap is one 16-byte load (LDG.E.128)
// and the V results one 16-byte store. Taken when every level and the output are
// dense along C with 16-byte aligned pixels (launch_forward checks it). The samples,
// taps and summation order per channel are those of _roi_align_fwd_kernel.
template <typename T>
union Vec16 {
  static constexpr int V = 16 / sizeof(T);
  uint4 raw;
  T v[V];
  __device__ __forceinline__ Vec16() {}
};

template <typename T>
__device__ __forceinline__ Vec16<T> load16(const T* ptr) {
  Vec16<T> v;
  v.raw = __ldg(reinterpret_cast<const uint4*>(ptr));
  return v;
}

template <typename T>
__global__ void _roi_align_fwd_cl_vec_kernel(const Params p, T* __restrict__ out,
                                             const int64_t os0, const int64_t os2,
                                             const int64_t os3, const int64_t total) {
  using A = typename Acc<T>::type;
  constexpr int V = Vec16<T>::V;
  const int64_t CV = p.C / V;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = (i % CV) * V;
    int64_t t = i / CV;
    const int pw = static_cast<int>(t % p.PW);
    t /= p.PW;
    const int ph = static_cast<int>(t % p.PH);
    const int64_t k = t / p.PH;
    const RegionAt<A> ra = region_at<T, A>(p, k);
    const int64_t n = ra.n;
    const Level& lv = ra.lv;
    const auto& g = ra.g;
    const bool valid = ra.valid;
    A acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = A(0);
    const bool ok = valid && !g.nan;
    if (ok) {
      const T* base = static_cast<const T*>(lv.data) + n * lv.sN + c;
      for_each_sample(lv, g, ph, pw, [&](const Taps2D<A>& s, int64_t o00, int64_t o01,
                                         int64_t o10, int64_t o11) {
        const Vec16<T> v00 = load16(base + o00), v01 = load16(base + o01),
                       v10 = load16(base + o10), v11 = load16(base + o11);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          acc[j] += blend4<A>(s, to_acc(v00.v[j]), to_acc(v01.v[j]), to_acc(v10.v[j]),
                              to_acc(v11.v[j]));
        }
      });
    }
    Vec16<T> o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = from_acc<T>(ok ? acc[j] / g.count : A(NAN));
    // __stwb: one 16-byte store (a plain assignment of the union is split into scalar
    // stores by the front end); wb is the default write-back policy.
    __stwb(reinterpret_cast<uint4*>(out + k * os0 + c + ph * os2 + pw * os3), o.raw);
  }
}

// Scatter w / norm * grad into the buffer at the taps of bins [ph0, ph1) x [pw0, pw1).
template <typename A>
__device__ __forceinline__ void scatter_bins(A* plane, const Level& lv, const RoiGeometry<A>& g,
                                             int ph0, int ph1, int pw0, int pw1, A gv) {
  for (int ph = ph0; ph < ph1; ++ph) {
    const SampleRange ry = sample_range(g.start_h, g.bin_h, ph, g.grid_h, -1.0, lv.H);
    for (int iy = ry.begin; iy < ry.end; ++iy) {
      const auto ty = axis_tap(lv.H, sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h));
      if (!ty.inside) continue;
      for (int pw = pw0; pw < pw1; ++pw) {
        const SampleRange rx = sample_range(g.start_w, g.bin_w, pw, g.grid_w, -1.0, lv.W);
        for (int ix = rx.begin; ix < rx.end; ++ix) {
          const auto tx = axis_tap(lv.W, sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w));
          const auto s = combine_taps(ty, tx);
          if (!s.inside) continue;
          atomicAdd(plane + s.y_lo * lv.sH + s.x_lo * lv.sW, s.w[0] * gv);
          atomicAdd(plane + s.y_lo * lv.sH + s.x_hi * lv.sW, s.w[1] * gv);
          atomicAdd(plane + s.y_hi * lv.sH + s.x_lo * lv.sW, s.w[2] * gv);
          atomicAdd(plane + s.y_hi * lv.sH + s.x_hi * lv.sW, s.w[3] * gv);
        }
      }
    }
  }
}

template <typename T>
__global__ void _roi_align_bwd_kernel(const Params p, const T* __restrict__ grad,
                                      const int64_t gs0, const int64_t gs1, const int64_t gs2,
                                      const int64_t gs3, const int64_t total) {
  using A = typename Acc<T>::type;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t k, c;
    int ph, pw;
    unravel(p, i, k, c, ph, pw);
    const RegionAt<A> ra = region_at<T, A>(p, k);
    // An invalid region gets no gradient, nor does a non-finite box.
    if (!ra.valid || ra.g.nan) continue;
    const int64_t n = ra.n;
    const Level& lv = ra.lv;
    const auto& g = ra.g;
    A* plane = const_cast<A*>(static_cast<const A*>(lv.data)) + n * lv.sN + c * lv.sC;
    const A gv = to_acc(grad[k * gs0 + c * gs1 + ph * gs2 + pw * gs3]);
    scatter_bins<A>(plane, lv, g, ph, ph + 1, pw, pw + 1, gv / g.count);
  }
}

// ---- deterministic backward: regions binned per image tile -------------------------
//
// Once per call, independent of C (launch_bin_regions): each region's pixel box
// (RegionBox, once per region) gives the tiles it meets; one (tile, k) key per pair
// goes into a fixed number of slots, a radix sort orders the keys by tile, then k,
// and each tile's run of sorted keys is found by binary search (roi_align_math.h:
// region_tile_count, region_tile_at, bin_key, first_cut_region). Then a block owns a
// tile of kTileH x kTileW pixels of one (image, level) plane and kTileChannels
// channels (a thread per pixel); it stages its run of region ids in shared memory and
// each thread gathers, region by region in ascending order, the contributions to its
// pixel (visit_pixel_bins): the same result every run. Binning costs O(K log K +
// slots * log K) plus a sort of `slots` keys; each (tile, channel group) then reads
// only the regions that meet its tile, so the gather is O(K * samples * C + N * C *
// H * W), with no test of a region against a tile it does not meet (the former
// kernel re-tested all K regions in every (tile, channel group): O(N * H * W / 256 *
// C / 4 * K)). When the pairs do not fit their slots, the regions from k_cut on are
// tested in order by every tile (scan_tile_regions): slower, the same sums.
constexpr int kTileThreads = kTileH * kTileW;  // one pixel per thread
constexpr int kListCap = 1024;                 // region ids held at once per tile

static_assert(sizeof(RegionBox) == 32, "RegionBox is allocated as (K, 8) int32 on the host");
static_assert(kListCap >= kTileThreads, "a staged chunk of a tile's run fits the list");

// Calls flush(list, count) with the ids k in [from, K) for which hit(k) holds, in
// ascending order, at most kListCap at a time, in the shared `list`. Every thread of
// the block must call it (it synchronises); hit may be called for any k < K, flush by
// every thread.
template <typename Hit, typename Flush>
__device__ __forceinline__ void scan_tile_regions(int64_t* list, const int64_t from,
                                                  const int64_t K, const Hit& hit,
                                                  const Flush& flush) {
  __shared__ int warp_total[kTileThreads / 32];
  __shared__ int count;
  const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
  if (tid == 0) count = 0;
  __syncthreads();
  for (int64_t base = from; base < K; base += kTileThreads) {
    const int64_t k = base + tid;
    const bool h = k < K && hit(k);
    const unsigned bal = __ballot_sync(0xffffffffu, h);
    if (lane == 0) warp_total[wid] = __popc(bal);
    __syncthreads();
    int before = 0, total = 0;
#pragma unroll
    for (int j = 0; j < kTileThreads / 32; ++j) {
      before += j < wid ? warp_total[j] : 0;
      total += warp_total[j];
    }
    int c = count;  // the same in every thread: a uniform branch
    if (c + total > kListCap) {
      flush(list, c);
      __syncthreads();
      c = 0;
    }
    if (h) list[c + before + __popc(bal & ((1u << lane) - 1u))] = k;
    __syncthreads();
    if (tid == 0) count = c + total;
    __syncthreads();
  }
  const int c = count;
  flush(list, c);
}

// Calls flush(list, count) with the regions of tile tg (its index in the bins) in
// ascending order, at most kListCap at a time: first the regions below k_cut of the
// tile's run of sorted pairs (all of them meet the tile), then the regions from k_cut
// on for which hit(k) holds, tested in order (from 0 without bins). Every thread of
// the block must call it (it synchronises).
template <typename Hit, typename Flush>
__device__ __forceinline__ void for_tile_regions(const TileRuns& runs, const int64_t tg,
                                                 const int64_t K, const Hit& hit,
                                                 const Flush& flush) {
  __shared__ __align__(16) int64_t list[kListCap];
  __syncthreads();  // the previous tile's flush has read the list
  int64_t from = 0;
  if (runs.sorted != nullptr) {
    const int64_t s = runs.start[tg], e = runs.start[tg + 1], k_cut = runs.start[runs.tiles + 1];
    for (int64_t at = s; at < e; at += kTileThreads) {
      const int64_t i = at + threadIdx.x;
      // The run is ascending in k, so the regions below k_cut are a prefix of it.
      const int64_t k = i < e ? bin_key_region(runs.sorted[i]) : K;
      const bool keep = k < k_cut;
      if (keep) list[threadIdx.x] = k;
      const int n = __syncthreads_count(keep);  // also: the chunk is in `list`
      flush(list, n);
      __syncthreads();  // read before the next chunk overwrites it
      if (n < kTileThreads) break;  // the run's end, or k_cut: uniform
    }
    from = k_cut;
  }
  if (from < K) scan_tile_regions(list, from, K, hit, flush);
}

// The pixel and channels of this thread in tile tb (tile tb mod tiles of image
// tb / tiles of an H x W plane), channel group cg (channels [cg * kTileChannels, ...)).
struct TilePixel {
  int64_t n, c0;
  int ty0, tx0, h, w, nc;
  bool on_map;
};

__device__ __forceinline__ TilePixel tile_pixel(const Level& lv, int64_t C, int64_t tb,
                                                int64_t cg) {
  TilePixel tp;
  // (int64: W + kTileW - 1 overflows int for W near 2^31)
  const int64_t tiles_w = (int64_t(lv.W) + kTileW - 1) / kTileW;
  const int64_t tiles = tiles_per_image(lv.H, lv.W, kTileH, kTileW);
  tp.n = tb / tiles;
  const int64_t t = tb % tiles;
  tp.ty0 = static_cast<int>(t / tiles_w) * kTileH;
  tp.tx0 = static_cast<int>(t % tiles_w) * kTileW;
  tp.h = tp.ty0 + static_cast<int>(threadIdx.x) / kTileW;
  tp.w = tp.tx0 + static_cast<int>(threadIdx.x) % kTileW;
  tp.on_map = tp.h < lv.H && tp.w < lv.W;
  tp.c0 = cg * kTileChannels;
  tp.nc = static_cast<int>(C - tp.c0 < kTileChannels ? C - tp.c0 : kTileChannels);
  return tp;
}

// f(tb, tp) for each (tile, channel group) of this block: tiles blockIdx.x,
// blockIdx.x + gridDim.x, ... of the level's N * tiles, channel groups blockIdx.y,
// blockIdx.y + gridDim.y, ... (a grid clamped by strided_grid still covers any C).
template <typename F>
__device__ __forceinline__ void for_each_tile(const Level& lv, int64_t N, int64_t C,
                                              const F& f) {
  const int64_t tiles = N * tiles_per_image(lv.H, lv.W, kTileH, kTileW);
  const int64_t groups = (C + kTileChannels - 1) / kTileChannels;
  for (int64_t tb = blockIdx.x; tb < tiles; tb += gridDim.x) {
    for (int64_t cg = blockIdx.y; cg < groups; cg += gridDim.y) f(tb, tile_pixel(lv, C, tb, cg));
  }
}

// The pixel's kTileChannels results into the accumulation buffer lv.data (every
// pixel is written: the gather owns it).
template <typename A>
__device__ __forceinline__ void store_tile_pixel(const Level& lv, const TilePixel& tp,
                                                 const A (&acc)[kTileChannels]) {
  if (!tp.on_map) return;
  A* buf = const_cast<A*>(static_cast<const A*>(lv.data)) + tp.n * lv.sN + tp.h * lv.sH +
           tp.w * lv.sW;
#pragma unroll
  for (int j = 0; j < kTileChannels; ++j) {
    if (j < tp.nc) buf[(tp.c0 + j) * lv.sC] = acc[j];
  }
}

// Per-channel accumulation of visit_pixel_bins for kTileChannels channels at once.
template <typename T, typename A>
struct ChannelVisitor {
  const T* grad;  // grad[k, c0, 0, 0]
  int64_t gs1, gs2, gs3;
  int nc;
  A count;
  A acc[kTileChannels], row[kTileChannels];
  __device__ __forceinline__ void row_begin() {
#pragma unroll
    for (int j = 0; j < kTileChannels; ++j) row[j] = A(0);
  }
  __device__ __forceinline__ void tap(int ph, int pw, A wgt, bool zero) {
    const T* gp = grad + ph * gs2 + pw * gs3;
#pragma unroll
    for (int j = 0; j < kTileChannels; ++j) {
      if (j < nc) {
        const A gv = to_acc(gp[j * gs1]);
        row[j] += wgt * gv + (zero ? A(0) * gv : A(0));
      }
    }
  }
  __device__ __forceinline__ void row_end() {
#pragma unroll
    for (int j = 0; j < kTileChannels; ++j) acc[j] += row[j] / count;
  }
};

// RegionBox of every region on its own level (roi_align_math.h): one thread per region.
template <typename T>
__global__ void _region_box_kernel(const Params p, RegionBox* __restrict__ boxes) {
  using A = typename Acc<T>::type;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < p.K;
       k += int64_t(gridDim.x) * blockDim.x) {
    const RegionAt<A> ra = region_at<T, A>(p, k);
    boxes[k] = region_box(ra.g, ra.valid, ra.n, ra.l, p.PH, p.PW, ra.lv.H, ra.lv.W);
  }
}

// Binning, steps 1 and 2: the number of tiles each region's box meets and its
// inclusive prefix sum over the regions (integers: exact, the same every run). Block g
// of G <= kScanBlocks owns regions [g * chunk, (g + 1) * chunk): step 1 writes their
// counts and their sum; step 2 adds the sums of blocks 0..g-1 and scans its regions
// kScanThreads at a time. Two launches, O(K + G^2 / kScanThreads) work.
constexpr int kScanThreads = 1024;
constexpr int64_t kScanBlocks = 1024;

// Inclusive scan of v over the block (blockDim.x == kScanThreads); total: the
// block's sum. `warp` holds kScanThreads / 32 values; every thread must call it.
__device__ __forceinline__ int64_t block_inclusive_scan(int64_t v, int64_t* warp,
                                                        int64_t& total) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int64_t u = __shfl_up_sync(0xffffffffu, v, off);
    v += lane >= off ? u : 0;
  }
  __syncthreads();  // `warp` is free (a previous call has read it)
  if (lane == 31) warp[wid] = v;
  __syncthreads();
  int64_t before = 0;
  total = 0;
#pragma unroll 8
  for (int j = 0; j < kScanThreads / 32; ++j) {
    before += j < wid ? warp[j] : 0;
    total += warp[j];
  }
  return v + before;
}

__global__ void __launch_bounds__(kScanThreads)
    _bin_count_kernel(const RegionBox* __restrict__ boxes, const int64_t K, const int64_t chunk,
                      int64_t* __restrict__ count, int64_t* __restrict__ block_sum) {
  __shared__ int64_t warp[kScanThreads / 32];
  const int64_t lo = blockIdx.x * chunk, hi = lo + chunk < K ? lo + chunk : K;
  int64_t sum = 0;
  for (int64_t k = lo + threadIdx.x; k < hi; k += kScanThreads) {
    const int64_t c = region_tile_count(boxes[k], kTileH, kTileW);
    count[k] = c;
    sum += c;
  }
  int64_t total;
  block_inclusive_scan(sum, warp, total);
  if (threadIdx.x == 0) block_sum[blockIdx.x] = total;
}

__global__ void __launch_bounds__(kScanThreads)
    _bin_scan_kernel(const int64_t* __restrict__ count, const int64_t K, const int64_t chunk,
                     const int64_t* __restrict__ block_sum, int64_t* __restrict__ incl) {
  __shared__ int64_t warp[kScanThreads / 32];
  int64_t before = 0, carry, total;
  for (int64_t g = threadIdx.x; g < blockIdx.x; g += kScanThreads) before += block_sum[g];
  block_inclusive_scan(before, warp, carry);  // carry: the sum of the blocks before this
  const int64_t lo = blockIdx.x * chunk, hi = lo + chunk < K ? lo + chunk : K;
  for (int64_t base = lo; base < hi; base += kScanThreads) {  // uniform
    const int64_t k = base + threadIdx.x;
    const int64_t v = block_inclusive_scan(k < hi ? count[k] : 0, warp, total);
    if (k < hi) incl[k] = carry + v;
    carry += total;
  }
}

// Step 3 (after the prefix sums): one thread per slot s writes the key of the pair
// that has slot s (its region: the first k with incl[k] > s), or kNoPair past the
// pairs; every slot is written.
__global__ void _bin_emit_kernel(const Params p, const RegionBox* __restrict__ boxes,
                                 const TileBins b, const int64_t K) {
  for (int64_t s = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; s < b.slots;
       s += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = search_sorted<int64_t>(b.incl, K, s, /*upper=*/true);
    uint64_t key = kNoPair;
    if (k < K) {
      const RegionBox bx = boxes[k];
      const Level lv = level_at(p, bx.level);
      int64_t base = b.base[0];
#pragma unroll
      for (int l = 1; l < kMaxLevels; ++l) base = l == bx.level ? b.base[l] : base;
      const int64_t tiles_w = (int64_t(lv.W) + kTileW - 1) / kTileW;
      const int64_t t = base + bx.n * tiles_per_image(lv.H, lv.W, kTileH, kTileW) +
                        region_tile_at(bx, kTileH, kTileW, tiles_w, s - (b.incl[k] - b.count[k]));
      key = bin_key(t, k);
    }
    b.keys[s] = key;
  }
}

// Step 5 (after the sort): start[t] for t <= tiles (each tile's first sorted slot;
// start[tiles] the end of the real pairs), start[tiles + 1] = k_cut.
__global__ void _bin_runs_kernel(const TileBins b, const int64_t K) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t <= b.tiles + 1;
       t += int64_t(gridDim.x) * blockDim.x) {
    b.start[t] = t <= b.tiles ? search_sorted<uint64_t>(b.sorted, b.slots, bin_key(t, 0), false)
                              : first_cut_region(b.incl, K, b.slots);
  }
}

// Deterministic backward of one level, after the binning: block (x, y) owns tiles
// x, x + gridDim.x, ... (of N * tiles) and channel groups y, y + gridDim.y, ...
template <typename T>
__global__ void __launch_bounds__(kTileThreads, 1)
    _roi_align_bwd_det_kernel(const Params p, const int level, const T* __restrict__ grad,
                              const int64_t gs0, const int64_t gs1, const int64_t gs2,
                              const int64_t gs3, const RegionBox* __restrict__ boxes,
                              const TileRuns runs, const int64_t tile_base) {
  using A = typename Acc<T>::type;
  const T* rois = static_cast<const T*>(p.rois);
  const Level lv = level_at(p, level);
  for_each_tile(lv, p.N, p.C, [&](int64_t tb, const TilePixel& tp) {
    const int64_t n = tp.n, c0 = tp.c0;
    const int h = tp.h, w = tp.w, ty0 = tp.ty0, tx0 = tp.tx0;
    const bool on_map = tp.on_map;
    ChannelVisitor<T, A> v;
    v.gs1 = gs1;
    v.gs2 = gs2;
    v.gs3 = gs3;
    v.nc = tp.nc;
#pragma unroll
    for (int j = 0; j < kTileChannels; ++j) v.acc[j] = A(0);
    const int ty1 = ty0 + kTileH - 1, tx1 = tx0 + kTileW - 1;
    for_tile_regions(
        runs, tile_base + tb, p.K,
        [&](int64_t k) { return region_in_tile(boxes[k], n, level, ty0, ty1, tx0, tx1); },
        [&](const int64_t* list, int count) {
          if (!on_map) return;
          for (int i = 0; i < count; ++i) {
            const int64_t k = list[i];
            const RegionBox bx = boxes[k];
            if (h < bx.y0 || h > bx.y1 || w < bx.x0 || w > bx.x1) continue;
            const auto g = geometry<T, A>(p, rois + k * 5, lv.scale);
            v.grad = grad + k * gs0 + c0 * gs1;
            v.count = g.count;
            visit_pixel_bins(g, p.PH, p.PW, lv.H, lv.W, h, w, v);
          }
        });
    store_tile_pixel(lv, tp, v.acc);
  });
}

// ---- region_features ---------------------------------------------------------------

// One thread per (k, j): j < H is pixel j of the y profile, j < H + W pixel j - H of
// the x profile, j == H + W the region's norm, batch index and span.
template <typename T>
__global__ void _region_profile_kernel(const Params p, const RegionWork wk, const int64_t total) {
  using A = typename Acc<T>::type;
  const T* rois = static_cast<const T*>(p.rois);
  const Level lv = p.lv[0];
  const int64_t HW = int64_t(lv.H) + lv.W;
  A* prof = static_cast<A*>(wk.prof);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = i / (HW + 1);
    const int64_t j = i % (HW + 1);
    const T* r = rois + k * 5;
    int64_t n = 0;
    int l = 0;
    const bool valid = region_index(p, r, k, n, l);
    const auto g = geometry<T, A>(p, r, lv.scale);
    if (j == HW) {
      static_cast<A*>(wk.norm)[k] = g.count * A(p.PH) * A(p.PW);
      const RegionBox bx = region_box(g, valid, n, 0, p.PH, p.PW, lv.H, lv.W);
      wk.nidx[k] = bx.n;
      int* sp = wk.span + k * 4;
      sp[0] = bx.y0;
      sp[1] = bx.y1;
      sp[2] = bx.x0;
      sp[3] = bx.x1;
      if (wk.box != nullptr) wk.box[k] = bx;
      continue;
    }
    A v = A(0);
    unsigned char f = 0;
    if (valid && !g.nan) {  // (a non-finite box has no samples anyway)
      if (j < lv.H) {
        v = profile_at(g.start_h, g.bin_h, p.PH, g.grid_h, lv.H, static_cast<int>(j), f);
      } else {
        v = profile_at(g.start_w, g.bin_w, p.PW, g.grid_w, lv.W, static_cast<int>(j - lv.H), f);
      }
    }
    prof[k * HW + j] = v;
    wk.flags[k * HW + j] = f;
  }
}

// Region k's slice of the workspace: its y and x profiles, their flags, its span.
template <typename A>
struct RegionView {
  const A *py, *px;
  const unsigned char *fy, *fx;
  const int* span;
  __device__ __forceinline__ RegionView(const RegionWork& wk, int H, int64_t HW, int64_t k)
      : py(static_cast<const A*>(wk.prof) + k * HW),
        px(py + H),
        fy(wk.flags + k * HW),
        fx(fy + H),
        span(wk.span + k * 4) {}
};

// One thread per (k, c), c fastest: the touched window, row by row, summed as the
// CPU's channels-last kernel does.
template <typename T>
__global__ void _region_fwd_kernel(const Params p, const RegionWork wk, T* __restrict__ out,
                                   const int64_t os0, const int64_t os1, const int64_t total) {
  using A = typename Acc<T>::type;
  const Level lv = p.lv[0];
  const int64_t HW = int64_t(lv.H) + lv.W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % p.C;
    const int64_t k = i / p.C;
    const int64_t n = wk.nidx[k];
    A v;
    if (n < 0) {
      v = A(NAN);  // an invalid batch index (never read) or a non-finite box
    } else {
      const RegionView<A> rv(wk, lv.H, HW, k);
      const A *py = rv.py, *px = rv.px;
      const unsigned char *fy = rv.fy, *fx = rv.fx;
      const int* sp = rv.span;
      const T* plane = static_cast<const T*>(lv.data) + n * lv.sN + c * lv.sC;
      A acc = A(0);
      for (int y = sp[0]; y <= sp[1]; ++y) {
        if (!(fy[y] & kTouched)) continue;
        for (int x = sp[2]; x <= sp[3]; ++x) {
          if (!(fx[x] & kTouched)) continue;
          const A wgt = py[y] * px[x];  // may be 0: a NaN tap still gives NaN
          const A val = to_acc(plane[y * lv.sH + x * lv.sW]);
          acc += ((fy[y] | fx[x]) & kZeroTap) ? wgt * val + A(0) * val : wgt * val;
        }
      }
      v = acc / static_cast<const A*>(wk.norm)[k];
    }
    out[k * os0 + c * os1] = from_acc<T>(v);
  }
}

// Row-major input (NCHW): one warp per (k, c), the lanes along x, so that each load
// of a row reads consecutive pixels (coalesced; the thread-per-(k, c) kernel above
// would read C different planes per warp). The separable form of the CPU's NCHW
// kernel: per column x, col = sum over the touched rows y of py[y] * in[y, x], then
// col * px[x]; the warp sums its lanes' columns (a tree: equal to the CPU within
// rounding, not bitwise).
template <typename T>
__global__ void _region_fwd_rows_kernel(const Params p, const RegionWork wk, T* __restrict__ out,
                                        const int64_t os0, const int64_t os1,
                                        const int64_t total) {
  using A = typename Acc<T>::type;
  const Level lv = p.lv[0];
  const int64_t HW = int64_t(lv.H) + lv.W;
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; i < total;
       i += warps) {
    const int64_t c = i % p.C;
    const int64_t k = i / p.C;
    const int64_t n = wk.nidx[k];
    if (n < 0) {
      if (lane == 0) out[k * os0 + c * os1] = from_acc<T>(A(NAN));
      continue;
    }
    const RegionView<A> rv(wk, lv.H, HW, k);
    const T* plane = static_cast<const T*>(lv.data) + n * lv.sN + c * lv.sC;
    A acc = A(0);
    for (int x = rv.span[2] + lane; x <= rv.span[3]; x += 32) {
      const unsigned char f = rv.fx[x];
      if (!(f & kTouched)) continue;
      A col = A(0);
      for (int y = rv.span[0]; y <= rv.span[1]; ++y) {
        const unsigned char g = rv.fy[y];
        if (!(g & kTouched)) continue;
        const A v = to_acc(plane[y * lv.sH + x * lv.sW]);
        col += (g & kZeroTap) ? rv.py[y] * v + A(0) * v : rv.py[y] * v;
      }
      acc += col * rv.px[x] + ((f & kZeroTap) ? col * A(0) : A(0));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) out[k * os0 + c * os1] = from_acc<T>(acc / static_cast<const A*>(wk.norm)[k]);
  }
}

// Atomic backward: one thread per (k, y, c), c fastest; a row of atomicAdds.
template <typename T>
__global__ void _region_bwd_kernel(const Params p, const RegionWork wk, const T* __restrict__ grad,
                                   const int64_t gs0, const int64_t gs1, const int64_t total) {
  using A = typename Acc<T>::type;
  const Level lv = p.lv[0];
  const int64_t HW = int64_t(lv.H) + lv.W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % p.C;
    const int64_t t = i / p.C;
    const int y = static_cast<int>(t % lv.H);
    const int64_t k = t / lv.H;
    const int64_t n = wk.nidx[k];
    if (n < 0) continue;  // no gradient
    const int* sp = wk.span + k * 4;
    const unsigned char* fy = wk.flags + k * HW;
    if (y < sp[0] || y > sp[1] || !(fy[y] & kTouched)) continue;
    const A* py = static_cast<const A*>(wk.prof) + k * HW;
    const A* px = py + lv.H;
    const unsigned char* fx = fy + lv.H;
    const A coef = to_acc(grad[k * gs0 + c * gs1]) / static_cast<const A*>(wk.norm)[k];
    const A cy = coef * py[y];
    const A zc = A(0) * coef;  // NaN iff the gradient is not finite
    const bool zy = fy[y] & kZeroTap;
    A* row = const_cast<A*>(static_cast<const A*>(lv.data)) + n * lv.sN + c * lv.sC + y * lv.sH;
    for (int x = sp[2]; x <= sp[3]; ++x) {
      if (!(fx[x] & kTouched)) continue;
      atomicAdd(row + x * lv.sW, cy * px[x] + ((zy || (fx[x] & kZeroTap)) ? zc : A(0)));
    }
  }
}

// Deterministic backward: the tiles and channel groups of _roi_align_bwd_det_kernel,
// the regions binned on their spans (w.box); each pixel then adds, in ascending region
// order, the CPU's NCHW expression (nvcc may fuse it into an FMA, so equal to the CPU
// within rounding, not bitwise).
template <typename T>
__global__ void __launch_bounds__(kTileThreads, 1)
    _region_bwd_det_kernel(const Params p, const RegionWork wk, const T* __restrict__ grad,
                           const int64_t gs0, const int64_t gs1, const TileRuns runs) {
  using A = typename Acc<T>::type;
  const Level lv = p.lv[0];
  const int64_t HW = int64_t(lv.H) + lv.W;
  for_each_tile(lv, p.N, p.C, [&](int64_t tb, const TilePixel& tp) {
    const int64_t n = tp.n, c0 = tp.c0;
    const int h = tp.h, w = tp.w, nc = tp.nc, ty0 = tp.ty0, tx0 = tp.tx0;
    const bool on_map = tp.on_map;
    const int ty1 = ty0 + kTileH - 1, tx1 = tx0 + kTileW - 1;
    A acc[kTileChannels];
#pragma unroll
    for (int j = 0; j < kTileChannels; ++j) acc[j] = A(0);
    for_tile_regions(
        runs, tb, p.K,
        [&](int64_t k) { return region_in_tile(wk.box[k], n, 0, ty0, ty1, tx0, tx1); },
        [&](const int64_t* list, int count) {
          if (!on_map) return;
          for (int i = 0; i < count; ++i) {
            const int64_t k = list[i];
            const int* sp = wk.span + k * 4;
            if (h < sp[0] || h > sp[1] || w < sp[2] || w > sp[3]) continue;
            const unsigned char fy = wk.flags[k * HW + h];
            const unsigned char fx = wk.flags[k * HW + lv.H + w];
            if (!(fy & kTouched) || !(fx & kTouched)) continue;
            const A* py = static_cast<const A*>(wk.prof) + k * HW;
            const A norm = static_cast<const A*>(wk.norm)[k];
            const A wy = py[h], wx = py[lv.H + w];
            const bool zero = (fy | fx) & kZeroTap;
            const T* gk = grad + k * gs0 + c0 * gs1;
#pragma unroll
            for (int j = 0; j < kTileChannels; ++j) {
              if (j < nc) {
                const A coef = to_acc(gk[j * gs1]) / norm;
                const A cy = coef * wy;
                acc[j] += cy * wx + (zero ? A(0) * coef : A(0));
              }
            }
          }
        });
    store_tile_pixel(lv, tp, acc);
  });
}

constexpr int kThreads = 256;

inline int blocks_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 * 32 ? b : 65535 * 32);  // grid-stride beyond
}

template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat: return f(float(0));
    case DType::kDouble: return f(double(0));
    case DType::kHalf: return f(__half());
    case DType::kBFloat16: return f(__nv_bfloat16());
  }
  return cudaErrorInvalidValue;
}

int64_t grad_elements(const Params& p) { return p.K * p.C * p.PH * p.PW; }

// Whether the channels-last forward can move 16-byte channel vectors: every level and
// the output dense along C (stride 1), C and every other stride a multiple of the
// vector, and the base pointers 16-byte aligned.
bool vec_channels_ok(const Params& p, int esize, const void* out, const int64_t os[4]) {
  const int64_t V = 16 / esize;
  auto aligned = [&](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; };
  if (!p.channels_inner || p.C % V != 0 || os[1] != 1 || !aligned(out)) return false;
  if (os[0] % V != 0 || os[2] % V != 0 || os[3] % V != 0) return false;
  for (int l = 0; l < p.L; ++l) {
    const Level& lv = p.lv[l];
    if (lv.sC != 1 || !aligned(lv.data) || lv.sN % V != 0 || lv.sH % V != 0 || lv.sW % V != 0) {
      return false;
    }
  }
  return true;
}

}  // namespace

cudaError_t launch_forward(DType dtype, const Params& p, void* out, const int64_t os[4],
                           cudaStream_t stream) {
  const int64_t total = grad_elements(p);
  if (total == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (vec_channels_ok(p, sizeof(T), out, os)) {
      const int64_t vtotal = total / Vec16<T>::V;
      _roi_align_fwd_cl_vec_kernel<T><<<blocks_for(vtotal), kThreads, 0, stream>>>(
          p, static_cast<T*>(out), os[0], os[2], os[3], vtotal);
    } else {
      _roi_align_fwd_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
          p, static_cast<T*>(out), os[0], os[1], os[2], os[3], total);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_backward_atomic(DType dtype, const Params& p, const void* grad,
                                   const int64_t gs[4], cudaStream_t stream) {
  const int64_t total = grad_elements(p);
  if (total == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    _roi_align_bwd_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
        p, static_cast<const T*>(grad), gs[0], gs[1], gs[2], gs[3], total);
    return cudaGetLastError();
  });
}

cudaError_t launch_region_boxes(DType dtype, const Params& p, RegionBox* boxes,
                                cudaStream_t stream) {
  if (p.K == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    _region_box_kernel<T><<<blocks_for(p.K), kThreads, 0, stream>>>(p, boxes);
    return cudaGetLastError();
  });
}

// Blocks of the prefix sum over K regions (_bin_count_kernel, _bin_scan_kernel).
static int64_t scan_chunk(int64_t K) {
  const int64_t per = (K + kScanBlocks - 1) / kScanBlocks;
  return ((per + kScanThreads - 1) / kScanThreads) * kScanThreads;  // whole rounds
}

cudaError_t bin_temp_bytes(int64_t K, int64_t slots, int key_bits, size_t& bytes) {
  size_t sort = 0;
  if (slots > 0) {
    const cudaError_t e = ::mmkernels_cub::cub::DeviceRadixSort::SortKeys(
        nullptr, sort, static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr),
        slots, 0, key_bits);
    if (e != cudaSuccess) return e;
  }
  const size_t sums = K > 0 ? kScanBlocks * sizeof(int64_t) : 0;  // _bin_count_kernel's
  bytes = sort > sums ? sort : sums;  // (used one after the other)
  return cudaSuccess;
}

cudaError_t launch_bin_regions(const Params& p, const RegionBox* boxes, const TileBins& b,
                               cudaStream_t stream) {
  if (p.K == 0 || b.slots == 0 || b.sorted == nullptr) return cudaSuccess;
  const int64_t chunk = scan_chunk(p.K);
  const unsigned blocks = static_cast<unsigned>((p.K + chunk - 1) / chunk);  // <= kScanBlocks
  int64_t* block_sum = static_cast<int64_t*>(b.temp);
  _bin_count_kernel<<<blocks, kScanThreads, 0, stream>>>(boxes, p.K, chunk, b.count, block_sum);
  _bin_scan_kernel<<<blocks, kScanThreads, 0, stream>>>(b.count, p.K, chunk, block_sum, b.incl);
  _bin_emit_kernel<<<blocks_for(b.slots), kThreads, 0, stream>>>(p, boxes, b, p.K);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  size_t bytes = b.temp_bytes;
  e = ::mmkernels_cub::cub::DeviceRadixSort::SortKeys(b.temp, bytes,
                                                      static_cast<const uint64_t*>(b.keys),
                                                      b.sorted, b.slots, 0, b.key_bits, stream);
  if (e != cudaSuccess) return e;
  _bin_runs_kernel<<<blocks_for(b.tiles + 2), kThreads, 0, stream>>>(b, p.K);
  return cudaGetLastError();
}

// The grid of a deterministic gather over level lv: its N * tiles and channel groups,
// clamped (strided_grid: the kernels stride over both, so any C launches); false
// when there is nothing to launch.
static bool tile_grid(const Params& p, const Level& lv, dim3& grid) {
  const int64_t tiles = p.N * tiles_per_image(lv.H, lv.W, kTileH, kTileW);
  const int64_t groups = (p.C + kTileChannels - 1) / kTileChannels;
  const GridShape g = strided_grid(tiles, groups);
  grid = dim3(g.x, g.y);
  return tiles > 0 && groups > 0;
}

cudaError_t launch_backward_deterministic(DType dtype, const Params& p, int level,
                                          const void* grad, const int64_t gs[4],
                                          const RegionBox* boxes, const TileBins& bins,
                                          cudaStream_t stream) {
  dim3 grid;
  if (!tile_grid(p, p.lv[level], grid)) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    _roi_align_bwd_det_kernel<T><<<grid, kTileThreads, 0, stream>>>(
        p, level, static_cast<const T*>(grad), gs[0], gs[1], gs[2], gs[3], boxes, bins.runs(),
        bins.base[level]);
    return cudaGetLastError();
  });
}

cudaError_t launch_region_profiles(DType dtype, const Params& p, const RegionWork& w,
                                   cudaStream_t stream) {
  const int64_t total = p.K * (int64_t(p.lv[0].H) + p.lv[0].W + 1);
  if (total == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    _region_profile_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(p, w, total);
    return cudaGetLastError();
  });
}

cudaError_t launch_region_forward(DType dtype, const Params& p, const RegionWork& w, void* out,
                                  const int64_t os[2], cudaStream_t stream) {
  const int64_t total = p.K * p.C;
  if (total == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.channels_inner) {
      _region_fwd_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
          p, w, static_cast<T*>(out), os[0], os[1], total);
    } else {  // one warp per (k, c)
      _region_fwd_rows_kernel<T><<<blocks_for(total * 32), kThreads, 0, stream>>>(
          p, w, static_cast<T*>(out), os[0], os[1], total);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_region_backward(DType dtype, const Params& p, const RegionWork& w,
                                   const void* grad, const int64_t gs[2], const TileBins* bins,
                                   cudaStream_t stream) {
  if (bins != nullptr) {
    dim3 grid;
    if (!tile_grid(p, p.lv[0], grid)) return cudaSuccess;
    return dispatch(dtype, [&](auto tag) {
      using T = decltype(tag);
      _region_bwd_det_kernel<T><<<grid, kTileThreads, 0, stream>>>(
          p, w, static_cast<const T*>(grad), gs[0], gs[1], bins->runs());
      return cudaGetLastError();
    });
  }
  const int64_t total = p.K * p.C * int64_t(p.lv[0].H);
  if (total == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    _region_bwd_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
        p, w, static_cast<const T*>(grad), gs[0], gs[1], total);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace roi_align
}  // namespace mmkernels
