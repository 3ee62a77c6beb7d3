// Contrastive losses: the per-element math of the fused CPU panel passes.
//
// The chunked CPU path computes each (rows x B) similarity panel with one GEMM and then
// makes one or two passes over it; these functions are what those passes apply to each
// element. They are written without calls or data-dependent branches (selects only) so
// that the compiler vectorises the panel loops (AVX2 / AVX-512 lanes under -march);
// libm's expf/log1pf are scalar calls and would leave the passes several times slower
// than the GEMMs they follow. The GPU runs the Triton kernels, which use exp2/log2.
//
// Accuracy (float, checked against double in tests/test_contrastive.py):
//   exp_lanes     relative error < 2 ulp for x in [-87, 88]; -inf < x < -87 gives
//                 exp(-87) (~1.6e-38, a normal number: the CPU never enters slow
//                 denormal arithmetic, and the sums it enters hold at least one term
//                 >= 1); x = -inf gives exactly 0 (an all -inf row or column sums to
//                 0, so its log-sum-exp is -inf, as torch.logsumexp); x > 88.7 gives
//                 inf; NaN gives NaN.
//   log1p_small   log(1 + e) for e in [0, 1], relative error < 3 ulp, also for tiny e
//                 (no 1 + e rounding: SigLIP's negatives are mostly e ~ 1e-5).
// The double overloads call the C library (the float64 path is a reference, not a
// fast path).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/host_device.h"

// Host: always inlined, so that the run-time dispatched AVX2 clones of the panel loops
// (contrastive_cpu.cpp) inline this math and vectorise it (GCC does not inline a
// plain `inline` function into a function with another target by default).
#if defined(__CUDACC__) || defined(__HIPCC__) || !defined(__GNUC__)
#define MMK_LANE_INLINE HOST_DEVICE_INLINE
#else
#define MMK_LANE_INLINE inline __attribute__((always_inline))
#endif

namespace mmkernels {
namespace contrastive {

// exp(x): Cody-Waite range reduction x = n ln2 + r, |r| <= ln2 / 2 (+ rounding), a degree-6
// polynomial for exp(r) (Cephes expf), and 2^n assembled in the exponent bits.
MMK_LANE_INLINE float exp_lanes(float x) {
  const float lo = -87.0f, hi = 88.0f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  xc = xc == xc ? xc : 0.0f;  // NaN: any finite value here, NaN restored below
  // n = round(xc / ln2) by the 1.5 * 2^23 shifter (exact for |n| < 2^22; std::floor
  // would keep GCC from vectorising the loop)
  const float shifter = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float two_n = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  float out = p * two_n;
  out = x > 88.72283935546875f ? std::numeric_limits<float>::infinity() : out;
  out = x == -std::numeric_limits<float>::infinity() ? 0.0f : out;
  return x == x ? out : x;
}

MMK_LANE_INLINE double exp_lanes(double x) { return std::exp(x); }

// log(1 + e) for e in [1e-18, 1]: 2 atanh(z) with z = e / (2 + e) in [0, 1/3], as the
// odd series 2 z (1 + z^2/3 + ... + z^16/17) (truncation < 2e-10 relative at z = 1/3).
// Every intermediate stays a normal float down to e = 1e-18 (denormal operands cost
// the CPU a microcode assist each); below that log(1 + e) = e to float precision.
MMK_LANE_INLINE float log1p_small(float e) {
  const float es = e > 1e-18f ? e : 1e-18f;
  const float z = es / (2.0f + es);
  const float w = z * z;
  float p = 1.0f / 17.0f;
  p = p * w + 1.0f / 15.0f;
  p = p * w + 1.0f / 13.0f;
  p = p * w + 1.0f / 11.0f;
  p = p * w + 1.0f / 9.0f;
  p = p * w + 1.0f / 7.0f;
  p = p * w + 1.0f / 5.0f;
  p = p * w + 1.0f / 3.0f;
  return e > 1e-18f ? 2.0f * z * (1.0f + w * p) : e;
}

MMK_LANE_INLINE double log1p_small(double e) { return std::log1p(e); }

// SigLIP, one element taken as a negative pair with logit x: the loss
// -log sigmoid(-x) = softplus(x) = max(x, 0) + log(1 + exp(-|x|)), and its derivative
// sigmoid(x) times the gradient weight w, both from the one exponential e = exp(-|x|).
// A weighted derivative whose magnitude is below the smallest normal float is returned
// as 0 (it is below exp_lanes' floor anyway, and the GEMMs that read it must not meet
// denormals); w may be negative (a negative upstream gradient), which flips the sign
// of every derivative and flushes nothing else.
template <typename T>
struct SoftplusGrad {
  T loss;
  T grad;
};

template <typename T>
MMK_LANE_INLINE SoftplusGrad<T> softplus_and_sigmoid(T x, T w) {
  const T ax = x < T(0) ? -x : x;
  const T e = exp_lanes(-ax);
  const T inv = T(1) / (T(1) + e);
  const T pos = x > T(0) ? x : T(0);
  T grad = w * (x < T(0) ? e * inv : inv);
  const T mag = grad < T(0) ? -grad : grad;
  grad = mag < std::numeric_limits<T>::min() ? T(0) : grad;
  // NaN: every comparison is false, so loss = log1p(NaN) = NaN and grad = NaN
  return {pos + log1p_small(e), grad};
}

}  // namespace contrastive
}  // namespace mmkernels
