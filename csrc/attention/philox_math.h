// Per-element math of the attention dropout stream: Philox4x32-10 (Random123, and
// triton.language.random.philox_impl bit for bit) and its map to a float32 uniform
// (tl.rand's uint_to_uniform_float). Shared, unchanged, by the C++ CPU kernel
// (csrc/attention/dropout_cpu.cpp) and any CUDA kernel; the definition is
// mmkernels/reference.py (dropout_uniform), the Triton kernels' is
// mmkernels/triton/attention.py (_dropout_keep).
//
// Element (stream s, packed query row r, key column j) under the Philox state
// (seed, offset) is output word j % 4 of Philox4x32-10 keyed by the 64-bit seed,
// with the counter
//     words 0-1 = offset / 4 + j / 4   (64-bit, low word first)
//     word 2    = s
//     word 3    = r
// all taken modulo 2^32 (words 2 and 3) or 2^64 (words 0-1); j / 4 and j % 4 are the
// floor division and remainder of the int64 column (its two's complement bits): one
// Philox call gives four consecutive columns.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace mmkernels {
namespace attention {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
// tl.random.uint_to_uniform_float's scale for uint32 (the float32 nearest to it)
constexpr float kPhiloxToUnit = 4.6566127342e-10f;

struct Philox4 {
  uint32_t x0, x1, x2, x3;
};

// Philox4x32 with `rounds` rounds on the counter (c0, c1, c2, c3), key (k0, k1).
HOST_DEVICE_INLINE Philox4 philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                      uint32_t k0, uint32_t k1, int rounds = 10) {
  for (int i = 0; i < rounds; ++i) {
    const uint64_t a = static_cast<uint64_t>(c0) * kPhiloxRoundA;
    const uint64_t b = static_cast<uint64_t>(c2) * kPhiloxRoundB;
    const uint32_t hi_a = static_cast<uint32_t>(a >> 32), lo_a = static_cast<uint32_t>(a);
    const uint32_t hi_b = static_cast<uint32_t>(b >> 32), lo_b = static_cast<uint32_t>(b);
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Philox4{c0, c1, c2, c3};
}

// uint32 -> [0, 1) as tl.rand: bitcast to int32, negatives to ~x (= -x - 1), then
// float32(x) * scale (one rounding for the conversion, one for the product).
HOST_DEVICE_INLINE float philox_uint_to_uniform(uint32_t x) {
  const uint32_t y = x >= 0x80000000u ? ~x : x;  // < 2^31
  return static_cast<float>(static_cast<int32_t>(y)) * kPhiloxToUnit;
}

// The column group col / 4 (floor: an arithmetic shift of the two's complement bits)
// as a uint64 bit pattern, and the output word col % 4 within it.
HOST_DEVICE_INLINE uint64_t dropout_group(int64_t col) {
  const uint64_t u = static_cast<uint64_t>(col);
  return (u >> 2) | (col < 0 ? 0xC000000000000000ull : 0ull);
}
HOST_DEVICE_INLINE int dropout_word(int64_t col) {
  return static_cast<int>(static_cast<uint64_t>(col) & 3u);
}

// The four outputs of the counter of column group `group` (dropout_group) in the
// row/stream whose counter words 2-3 are given; `base` = offset / 4 as a uint64,
// (k0, k1) the seed's low and high words.
HOST_DEVICE_INLINE Philox4 dropout_philox(uint64_t base, uint64_t group, uint32_t stream,
                                          uint32_t row, uint32_t k0, uint32_t k1) {
  const uint64_t lo = group + (base & 0xFFFFFFFFull);  // mod 2^64, as the reference
  const uint32_t c0 = static_cast<uint32_t>(lo);
  const uint32_t c1 = static_cast<uint32_t>((base >> 32) + (lo >> 32));
  return philox4x32(c0, c1, stream, row, k0, k1);
}

HOST_DEVICE_INLINE uint32_t philox_word(const Philox4& x, int word) {
  return word == 0 ? x.x0 : word == 1 ? x.x1 : word == 2 ? x.x2 : x.x3;
}

// The dropout uniform of key column `col` (any int64: only its two's complement bits
// count, as in the reference) in the row/stream whose counter words 2-3 are given.
HOST_DEVICE_INLINE float dropout_uniform_at(uint64_t base, int64_t col, uint32_t stream,
                                            uint32_t row, uint32_t k0, uint32_t k1) {
  return philox_uint_to_uniform(
      philox_word(dropout_philox(base, dropout_group(col), stream, row, k0, k1),
                  dropout_word(col)));
}

}  // namespace attention
}  // namespace mmkernels
