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

// Sum of the samples of bins [ph0, ph1) x [pw0, pw1) of one (n, c) plane, bin by
// bin and each bin's samples row by row (the CPU and torchvision order). Only the
// samples that can land on the map are visited (sample_range).
template <typename T, typename A>
__device__ __forceinline__ A sum_bins(const T* plane, const Level& lv, const RoiGeometry<A>& g,
                                      int ph0, int ph1, int pw0, int pw1) {
  A acc = A(0);
  for (int ph = ph0; ph < ph1; ++ph) {
    const SampleRange ry = sample_range(g.start_h, g.bin_h, ph, g.grid_h, -1.0, lv.H);
    for (int pw = pw0; pw < pw1; ++pw) {
      const SampleRange rx = sample_range(g.start_w, g.bin_w, pw, g.grid_w, -1.0, lv.W);
      for (int iy = ry.begin; iy < ry.end; ++iy) {
        const auto ty = axis_tap(lv.H, sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h));
        if (!ty.inside) continue;
        const T* r0 = plane + ty.lo * lv.sH;
        const T* r1 = plane + ty.hi * lv.sH;
        for (int ix = rx.begin; ix < rx.end; ++ix) {
          const auto tx = axis_tap(lv.W, sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w));
          const auto s = combine_taps(ty, tx);
          if (!s.inside) continue;
          // All four taps are read and weighted, a zero weight too: a NaN tap gives NaN.
          acc += blend4<A>(s, to_acc(r0[s.x_lo * lv.sW]), to_acc(r0[s.x_hi * lv.sW]),
                           to_acc(r1[s.x_lo * lv.sW]), to_acc(r1[s.x_hi * lv.sW]));
        }
      }
    }
  }
  return acc;
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

// (n, c, h, w) of flat element i of an (N, C, H, W) gradient buffer: w fastest, or c
// fastest for channels-last buffers.
__device__ __forceinline__ void decode_element(int64_t i, int64_t C, int H, int W,
                                               bool channels_inner, int64_t& n, int64_t& c,
                                               int& h, int& w) {
  if (channels_inner) {
    c = i % C;
    int64_t t = i / C;
    w = static_cast<int>(t % W);
    t /= W;
    h = static_cast<int>(t % H);
    n = t / H;
  } else {
    w = static_cast<int>(i % W);
    int64_t t = i / W;
    h = static_cast<int>(t % H);
    t /= H;
    c = t % C;
    n = t / C;
  }
}

template <typename T>
__global__ void _roi_align_fwd_kernel(const Params p, T* __restrict__ out, const int64_t os0,
                                      const int64_t os1, const int64_t os2, const int64_t os3,
                                      const int64_t total) {
  using A = typename Acc<T>::type;
  const T* rois = static_cast<const T*>(p.rois);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t k, c;
    int ph, pw;
    unravel(p, i, k, c, ph, pw);
    const T* r = rois + k * 5;
    int64_t n = 0;
    int l = 0;
    const bool valid = region_index(p, r, k, n, l);
    const Level lv = level_at(p, l);
    const auto g = geometry<T, A>(p, r, lv.scale);
    A v;
    if (!valid || g.nan) {
      // An invalid batch index or level (never read out of bounds), or a non-finite box.
      v = A(NAN);
    } else {
      const T* plane = static_cast<const T*>(lv.data) + n * lv.sN + c * lv.sC;
      v = sum_bins<T, A>(plane, lv, g, ph, ph + 1, pw, pw + 1) / g.count;
    }
    out[k * os0 + c * os1 + ph * os2 + pw * os3] = from_acc<T>(v);
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
  const T* rois = static_cast<const T*>(p.rois);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t k, c;
    int ph, pw;
    unravel(p, i, k, c, ph, pw);
    const T* r = rois + k * 5;
    int64_t n = 0;
    int l = 0;
    if (!region_index(p, r, k, n, l)) continue;  // an invalid region gets no gradient
    const Level lv = level_at(p, l);
    const auto g = geometry<T, A>(p, r, lv.scale);
    if (g.nan) continue;  // nor does a non-finite box
    A* plane = const_cast<A*>(static_cast<const A*>(lv.data)) + n * lv.sN + c * lv.sC;
    const A gv = to_acc(grad[k * gs0 + c * gs1 + ph * gs2 + pw * gs3]);
    scatter_bins<A>(plane, lv, g, ph, ph + 1, pw, pw + 1, gv / g.count);
  }
}

template <typename T>
__global__ void _roi_align_bwd_det_kernel(const Params p, const int level,
                                          const T* __restrict__ grad, const int64_t gs0,
                                          const int64_t gs1, const int64_t gs2, const int64_t gs3,
                                          const int64_t total) {
  using A = typename Acc<T>::type;
  const T* rois = static_cast<const T*>(p.rois);
  const Level lv = level_at(p, level);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c;
    int h, w;
    decode_element(i, p.C, lv.H, lv.W, p.channels_inner, n, c, h, w);
    // The sample coordinates that can tap (h, w), whatever the weight (tap_window:
    // pixel 1 is tapped by the clamped samples in [-1, 0) too).
    double ylo, yhi, xlo, xhi;
    tap_window(h, ylo, yhi);
    tap_window(w, xlo, xhi);
    A acc = A(0);
    for (int64_t k = 0; k < p.K; ++k) {
      const T* r = rois + k * 5;
      int64_t nk = 0;
      int lk = 0;
      if (!region_index(p, r, k, nk, lk) || lk != level || nk != n) continue;
      const auto g = geometry<T, A>(p, r, lv.scale);
      if (g.nan) continue;
      // Per-region early-out: the bins with a sample in the window, on each axis.
      const SampleRange yb = bin_range(g.start_h, g.bin_h, p.PH, g.grid_h, ylo, yhi);
      if (yb.begin >= yb.end) continue;
      const SampleRange xb = bin_range(g.start_w, g.bin_w, p.PW, g.grid_w, xlo, xhi);
      if (xb.begin >= xb.end) continue;
      for (int ph = yb.begin; ph < yb.end; ++ph) {
        // Separable: the bin's samples tap (h, w) with total weight sy * sx, and one
        // of them with weight 0 iff a zero tap on either axis (then 0 * grad is added,
        // as the atomic kernel does: a NaN/Inf gradient gives NaN).
        A sy = A(0);
        unsigned char fy = 0;
        bin_weight_at(g.start_h, g.bin_h, ph, g.grid_h, lv.H, h, sy, fy);
        if (!(fy & kTouched)) continue;
        A bin_acc = A(0);
        for (int pw = xb.begin; pw < xb.end; ++pw) {
          A sx = A(0);
          unsigned char fx = 0;
          bin_weight_at(g.start_w, g.bin_w, pw, g.grid_w, lv.W, w, sx, fx);
          if (!(fx & kTouched)) continue;
          const A gv = to_acc(grad[k * gs0 + c * gs1 + ph * gs2 + pw * gs3]);
          bin_acc += sy * sx * gv + (((fy | fx) & kZeroTap) ? A(0) * gv : A(0));
        }
        acc += bin_acc / g.count;
      }
    }
    A* buf = const_cast<A*>(static_cast<const A*>(lv.data));
    buf[n * lv.sN + c * lv.sC + h * lv.sH + w * lv.sW] = acc;
  }
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
      const A* py = static_cast<const A*>(wk.prof) + k * HW;
      const A* px = py + lv.H;
      const unsigned char* fy = wk.flags + k * HW;
      const unsigned char* fx = fy + lv.H;
      const int* sp = wk.span + k * 4;
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

// Deterministic backward: one thread per grad_input element (n, c, h, w), the
// regions in ascending order, the CPU's NCHW expression (nvcc may fuse it into an
// FMA, so equal to the CPU within rounding, not bitwise).
template <typename T>
__global__ void _region_bwd_det_kernel(const Params p, const RegionWork wk,
                                       const T* __restrict__ grad, const int64_t gs0,
                                       const int64_t gs1, const int64_t total) {
  using A = typename Acc<T>::type;
  const Level lv = p.lv[0];
  const int64_t HW = int64_t(lv.H) + lv.W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c;
    int h, w;
    decode_element(i, p.C, lv.H, lv.W, p.channels_inner, n, c, h, w);
    A acc = A(0);
    for (int64_t k = 0; k < p.K; ++k) {
      if (wk.nidx[k] != n) continue;
      const int* sp = wk.span + k * 4;
      if (h < sp[0] || h > sp[1] || w < sp[2] || w > sp[3]) continue;
      const unsigned char fy = wk.flags[k * HW + h];
      const unsigned char fx = wk.flags[k * HW + lv.H + w];
      if (!(fy & kTouched) || !(fx & kTouched)) continue;
      const A* py = static_cast<const A*>(wk.prof) + k * HW;
      const A coef = to_acc(grad[k * gs0 + c * gs1]) / static_cast<const A*>(wk.norm)[k];
      const A cy = coef * py[h];
      acc += cy * py[lv.H + w] + (((fy | fx) & kZeroTap) ? A(0) * coef : A(0));
    }
    A* buf = const_cast<A*>(static_cast<const A*>(lv.data));
    buf[n * lv.sN + c * lv.sC + h * lv.sH + w * lv.sW] = acc;
  }
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

}  // namespace

cudaError_t launch_forward(DType dtype, const Params& p, void* out, const int64_t os[4],
                           cudaStream_t stream) {
  const int64_t total = grad_elements(p);
  if (total == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    _roi_align_fwd_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
        p, static_cast<T*>(out), os[0], os[1], os[2], os[3], total);
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

cudaError_t launch_backward_deterministic(DType dtype, const Params& p, int level,
                                          const void* grad, const int64_t gs[4],
                                          cudaStream_t stream) {
  const int64_t total = p.N * p.C * int64_t(p.lv[level].H) * p.lv[level].W;
  if (total == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    _roi_align_bwd_det_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
        p, level, static_cast<const T*>(grad), gs[0], gs[1], gs[2], gs[3], total);
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
    _region_fwd_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
        p, w, static_cast<T*>(out), os[0], os[1], total);
    return cudaGetLastError();
  });
}

cudaError_t launch_region_backward(DType dtype, const Params& p, const RegionWork& w,
                                   const void* grad, const int64_t gs[2], bool deterministic,
                                   cudaStream_t stream) {
  const int64_t total = deterministic ? p.N * p.C * int64_t(p.lv[0].H) * p.lv[0].W
                                      : p.K * p.C * int64_t(p.lv[0].H);
  if (total == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (deterministic) {
      _region_bwd_det_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
          p, w, static_cast<const T*>(grad), gs[0], gs[1], total);
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
