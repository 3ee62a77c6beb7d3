// Launch geometry shared by the CUDA launchers: plain C++ (no CUDA types), so the
// host unit tests (tests/cpp/) check it without a GPU.
//
// A grid dimension that scales with the data (channels, rows, batch) must not be
// launched as is: gridDim.y and gridDim.z stop at 65535 (C > 262140 channels in
// groups of 4 once failed to launch), gridDim.x at 2^31 - 1. strided_grid clamps
// each dimension; the kernel then strides over it,
//   for (int64_t i = blockIdx.y; i < n_y; i += gridDim.y) { ... }
// so every legal shape launches, and the work per block is unchanged below the limits.
#pragma once

#include <cstdint>

namespace mmkernels {

constexpr int64_t kMaxGridX = 2147483647;  // gridDim.x
constexpr int64_t kMaxGridYZ = 65535;      // gridDim.y, gridDim.z

struct GridShape {
  unsigned x, y, z;
};

// Blocks per dimension for a kernel that strides over n_x * n_y * n_z blocks: each
// clamped to [1, its limit] (1 for an empty dimension; the caller skips empty launches).
inline GridShape strided_grid(int64_t n_x, int64_t n_y = 1, int64_t n_z = 1) {
  auto clamp = [](int64_t n, int64_t most) {
    return static_cast<unsigned>(n < 1 ? 1 : (n > most ? most : n));
  };
  return {clamp(n_x, kMaxGridX), clamp(n_y, kMaxGridYZ), clamp(n_z, kMaxGridYZ)};
}

}  // namespace mmkernels
