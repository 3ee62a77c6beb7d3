// RoIAlign family, CUDA kernels. The per-sample math is in roi_align_math.h,
// shared with the CPU kernels; this file only maps threads to outputs.
//
//   _roi_align_fwd_kernel     one thread per output element (k, c, ph, pw).
//   _roi_align_bwd_kernel     one thread per grad element, atomicAdd into an
//                             fp32/fp64 buffer (fp32 even for half inputs).
//   _roi_align_bwd_det_kernel one thread per grad_input element, gathering the
//                             contributions of every region in ascending order.
//   _region_*_kernel          region_features, in the CPU's profile formulation
//                             (axis_profile in roi_align_math.h): per-region axis
//                             profiles, then the bilinear form per (k, c); the work
//                             of a thread is bounded by its region's window, never
//                             by output_size * samples.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

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
// A block owns a tile of kTileH x kTileW pixels of one (image, level) plane and
// kTileChannels channels; a thread owns one pixel. The block scans the regions'
// pixel boxes (RegionBox, precomputed once per region) in chunks of blockDim, keeps
// the ids of those that meet its tile in shared memory in ascending order (a
// ballot/popc prefix, no atomics), and each thread then gathers, region by region
// in that order, the contributions to its pixel (visit_pixel_bins): the same result
// every run. Work: O(K) box tests per block, which are cheap next to the per-pixel
// gathers, so the whole is O(K * samples * C + N * C * H * W) instead of one test of
// every region by every grad_input element.
constexpr int kTileH = 8;
constexpr int kTileW = 32;
constexpr int kTileThreads = kTileH * kTileW;  // one pixel per thread
constexpr int kTileChannels = 4;               // accumulators per thread
constexpr int kListCap = 1024;                 // region ids held at once per tile

static_assert(sizeof(RegionBox) == 32, "RegionBox is allocated as (K, 8) int32 on the host");

// Calls flush(list, count) with the ids k < K for which hit(k) holds, in ascending
// order, at most kListCap at a time. Every thread of the block must call it (it
// synchronises); hit may be called for any k < K, flush by every thread.
template <typename Hit, typename Flush>
__device__ __forceinline__ void scan_tile_regions(const int64_t K, const Hit& hit,
                                                  const Flush& flush) {
  __shared__ int64_t list[kListCap];
  __shared__ int warp_total[kTileThreads / 32];
  __shared__ int count;
  const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
  if (tid == 0) count = 0;
  __syncthreads();
  for (int64_t base = 0; base < K; base += kTileThreads) {
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
  flush(list, count);
}

// The pixel and channels of this thread: block x is tile (x mod tiles) of image
// x / tiles of an H x W plane, block y the channels [y * kTileChannels, ...).
struct TilePixel {
  int64_t n, c0;
  int ty0, tx0, h, w, nc;
  bool on_map;
};

__device__ __forceinline__ TilePixel tile_pixel(const Level& lv, int64_t C) {
  TilePixel tp;
  // (int64: W + kTileW - 1 overflows int for W near 2^31)
  const int64_t tiles_w = (int64_t(lv.W) + kTileW - 1) / kTileW;
  const int64_t tiles_h = (int64_t(lv.H) + kTileH - 1) / kTileH;
  const int64_t tiles = tiles_h * tiles_w;
  tp.n = blockIdx.x / tiles;
  const int t = static_cast<int>(blockIdx.x % tiles);
  tp.ty0 = (t / tiles_w) * kTileH;
  tp.tx0 = (t % tiles_w) * kTileW;
  tp.h = tp.ty0 + static_cast<int>(threadIdx.x) / kTileW;
  tp.w = tp.tx0 + static_cast<int>(threadIdx.x) % kTileW;
  tp.on_map = tp.h < lv.H && tp.w < lv.W;
  tp.c0 = int64_t(blockIdx.y) * kTileChannels;
  tp.nc = static_cast<int>(C - tp.c0 < kTileChannels ? C - tp.c0 : kTileChannels);
  return tp;
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

// Deterministic backward of one level: grid (N * tiles, ceil(C / kTileChannels)).
template <typename T>
__global__ void __launch_bounds__(kTileThreads, 1)
    _roi_align_bwd_det_kernel(const Params p, const int level, const T* __restrict__ grad,
                              const int64_t gs0, const int64_t gs1, const int64_t gs2,
                              const int64_t gs3, const RegionBox* __restrict__ boxes) {
  using A = typename Acc<T>::type;
  const T* rois = static_cast<const T*>(p.rois);
  const Level lv = level_at(p, level);
  const TilePixel tp = tile_pixel(lv, p.C);
  const int64_t n = tp.n, c0 = tp.c0;
  const int h = tp.h, w = tp.w, nc = tp.nc, ty0 = tp.ty0, tx0 = tp.tx0;
  const bool on_map = tp.on_map;
  ChannelVisitor<T, A> v;
  v.gs1 = gs1;
  v.gs2 = gs2;
  v.gs3 = gs3;
  v.nc = nc;
#pragma unroll
  for (int j = 0; j < kTileChannels; ++j) v.acc[j] = A(0);
  const int ty1 = ty0 + kTileH - 1, tx1 = tx0 + kTileW - 1;
  scan_tile_regions(
      p.K, [&](int64_t k) { return region_in_tile(boxes[k], n, level, ty0, ty1, tx0, tx1); },
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
      wk.nidx[k] = valid && !g.nan ? n : -1;
      int* sp = wk.span + k * 4;
      axis_span(g.start_h, g.bin_h, p.PH, g.grid_h, lv.H, sp[0], sp[1]);
      axis_span(g.start_w, g.bin_w, p.PW, g.grid_w, lv.W, sp[2], sp[3]);
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

// Deterministic backward: the tiles of scan_tile_regions (grid (N * tiles,
// ceil(C / kTileChannels))), binned on the regions' spans; each pixel then adds, in
// ascending region order, the CPU's NCHW expression (nvcc may fuse it into an FMA,
// so equal to the CPU within rounding, not bitwise).
template <typename T>
__global__ void __launch_bounds__(kTileThreads, 1)
    _region_bwd_det_kernel(const Params p, const RegionWork wk, const T* __restrict__ grad,
                           const int64_t gs0, const int64_t gs1) {
  using A = typename Acc<T>::type;
  const Level lv = p.lv[0];
  const int64_t HW = int64_t(lv.H) + lv.W;
  const TilePixel tp = tile_pixel(lv, p.C);
  const int64_t n = tp.n, c0 = tp.c0;
  const int h = tp.h, w = tp.w, nc = tp.nc, ty0 = tp.ty0, tx0 = tp.tx0;
  const bool on_map = tp.on_map;
  const int ty1 = ty0 + kTileH - 1, tx1 = tx0 + kTileW - 1;
  A acc[kTileChannels];
#pragma unroll
  for (int j = 0; j < kTileChannels; ++j) acc[j] = A(0);
  scan_tile_regions(
      p.K,
      [&](int64_t k) {
        const int* sp = wk.span + k * 4;
        const RegionBox bx{wk.nidx[k], 0, sp[0], sp[1], sp[2], sp[3], 0};
        return region_in_tile(bx, n, 0, ty0, ty1, tx0, tx1);
      },
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

// (N * tiles, channel groups) for the tiled deterministic backward of an H x W level.
static cudaError_t tile_grid(const Params& p, int H, int W, dim3& grid) {
  const int64_t tiles = ((int64_t(H) + kTileH - 1) / kTileH) * ((int64_t(W) + kTileW - 1) / kTileW);
  const int64_t gx = p.N * tiles, gy = (p.C + kTileChannels - 1) / kTileChannels;
  if (gx > 0x7fffffff || gy > 65535) return cudaErrorInvalidConfiguration;
  grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  return cudaSuccess;
}

cudaError_t launch_backward_deterministic(DType dtype, const Params& p, int level,
                                          const void* grad, const int64_t gs[4],
                                          const RegionBox* boxes, cudaStream_t stream) {
  const int64_t total = p.N * p.C * int64_t(p.lv[level].H) * p.lv[level].W;
  if (total == 0) return cudaSuccess;
  dim3 grid;
  const cudaError_t e = tile_grid(p, p.lv[level].H, p.lv[level].W, grid);
  if (e != cudaSuccess) return e;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    _roi_align_bwd_det_kernel<T><<<grid, kTileThreads, 0, stream>>>(
        p, level, static_cast<const T*>(grad), gs[0], gs[1], gs[2], gs[3], boxes);
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
                                   const void* grad, const int64_t gs[2], bool deterministic,
                                   cudaStream_t stream) {
  const int64_t total = deterministic ? p.N * p.C * int64_t(p.lv[0].H) * p.lv[0].W
                                      : p.K * p.C * int64_t(p.lv[0].H);
  if (total == 0) return cudaSuccess;
  dim3 grid;
  if (deterministic) {
    const cudaError_t e = tile_grid(p, p.lv[0].H, p.lv[0].W, grid);
    if (e != cudaSuccess) return e;
  }
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (deterministic) {
      _region_bwd_det_kernel<T><<<grid, kTileThreads, 0, stream>>>(
          p, w, static_cast<const T*>(grad), gs[0], gs[1]);
    } else {
      _region_bwd_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
          p, w, static_cast<const T*>(grad), gs[0], gs[1], total);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace roi_align
}  // namespace mmkernels
