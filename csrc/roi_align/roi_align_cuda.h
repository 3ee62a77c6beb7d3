// Interface between the host-side CUDA registration (roi_align_cuda_host.cpp,
// compiled by the host compiler) and the kernels (roi_align_cuda.cu, compiled by
// nvcc). Plain types only, so the .cu file needs no torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "roi_align/roi_align_math.h"

namespace mmkernels {
namespace roi_align {
namespace cuda {

enum class DType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

constexpr int kMaxLevels = 8;

struct Level {      // one feature map, any strides (NCHW or channels-last)
  const void* data; // input dtype (forward) or the accumulation dtype (backward buffer)
  int64_t sN, sC, sH, sW;
  int H, W;
  double scale;
};

struct Params {
  Level lv[kMaxLevels];
  int L;
  const void* rois;       // (K, 5) contiguous, input dtype
  const int64_t* levels;  // (K,) or nullptr (single level)
  int64_t K, N, C;
  int PH, PW, sampling_ratio;
  bool aligned;
  bool channels_inner;    // thread index runs fastest along C (channels-last input)
};

// out[k, c, ph, pw] with strides os (roi_align, multiscale_roi_align). Channels-last
// input and output, dense along C with 16-byte aligned pixels, take a kernel that
// moves 16-byte channel vectors; anything else one thread per output element.
cudaError_t launch_forward(DType dtype, const Params& p, void* out, const int64_t os[4],
                           cudaStream_t stream);

// Backward into per-level accumulation buffers p.lv[l] (float for half/bfloat16/float
// input, double for double), which must be zero-filled. Atomic scatter, one thread
// per grad element.
cudaError_t launch_backward_atomic(DType dtype, const Params& p, const void* grad,
                                   const int64_t gs[4], cudaStream_t stream);

// RegionBox (roi_align_math.h) of every region on its own level: boxes is (K,), 32
// bytes each; the input of launch_bin_regions and launch_backward_deterministic.
cudaError_t launch_region_boxes(DType dtype, const Params& p, RegionBox* boxes,
                                cudaStream_t stream);

// ---- the deterministic backward: regions binned per image tile ------------------------
// Tiles of kTileH x kTileW pixels (one thread per pixel), kTileChannels channels per
// block and pass.
constexpr int kTileH = 8;
constexpr int kTileW = 32;
constexpr int kTileChannels = 4;

// The sorted (tile, region) pairs as the gather kernels read them (roi_align_math.h:
// bin_key): start[t] is tile t's first slot in `sorted`, start[tiles] the end of the
// real pairs, start[tiles + 1] k_cut (first_cut_region). sorted == nullptr: no bins,
// every tile tests every region in order.
struct TileRuns {
  const uint64_t* sorted;
  const int64_t* start;
  int64_t tiles;
};

// Device buffers of launch_bin_regions, allocated by the caller from plan_bins
// (roi_align_math.h): every size is a function of the shapes.
struct TileBins {
  int64_t* count;     // (K) region_tile_count of each region
  int64_t* incl;      // (K) inclusive prefix sums of count
  uint64_t* keys;     // (slots) bin_key of pair j of region k at slot incl[k] - count[k] + j;
                      // kNoPair in the slots past the pairs
  uint64_t* sorted;   // (slots) keys, sorted
  int64_t* start;     // (tiles + 2) see TileRuns
  void* temp;         // (temp_bytes) scratch of the prefix sum and the sort
  size_t temp_bytes;
  int64_t slots, tiles;
  int key_bits;
  int64_t base[kMaxLevels];  // first tile of each level (plan_bins)
  TileRuns runs() const { return {sorted, start, tiles}; }
};

// temp_bytes for K regions, `slots` pair slots and key_bits sort bits (the sort's
// scratch, as CUB sizes it for the current device).
cudaError_t bin_temp_bytes(int64_t K, int64_t slots, int key_bits, size_t& bytes);

// Bins the regions' boxes (all levels at once, independent of C): counts, prefix
// sums, one key per slot, a radix sort of the keys, each tile's run. O(K log K +
// slots * (log K + key_bits / 8) + tiles * log slots) work, no host sync.
cudaError_t launch_bin_regions(const Params& p, const RegionBox* boxes, const TileBins& b,
                               cudaStream_t stream);

// Deterministic backward of `level`, after launch_bin_regions: per (image tile,
// channel group) the block walks its tile's regions in ascending order (its run of
// the sorted pairs, then the regions from k_cut on, tested in order), and one thread
// per pixel gathers their contributions; no atomics, same result run to run,
// O(K * samples * C + N * C * H * W) work. Every element of the level's buffer is
// written (no zero fill needed). Grid-strided over tiles and channel groups: any C.
cudaError_t launch_backward_deterministic(DType dtype, const Params& p, int level,
                                          const void* grad, const int64_t gs[4],
                                          const RegionBox* boxes, const TileBins& bins,
                                          cudaStream_t stream);

// ---- region_features: the profile (bilinear-form) formulation of the CPU ----------
// Per-region workspace, filled by launch_region_profiles and read by the others:
//   prof  (K, H + W) accumulation dtype: the y profile then the x profile
//   flags (K, H + W) kTouched | kZeroTap per pixel (roi_align_math.h)
//   norm  (K) accumulation dtype: count * PH * PW
//   nidx  (K) batch index, -1 for an invalid index or a non-finite box (NaN row,
//         no gradient)
//   span  (K, 4) int: y0, y1, x0, x1, the pixels any sample can tap (axis_span)
struct RegionWork {
  void* prof;
  unsigned char* flags;
  void* norm;
  int64_t* nidx;
  int* span;
  RegionBox* box;  // (K) or nullptr: RegionBox of (nidx, span), for the binned backward
};

// Uses p.lv[0] (H, W, scale) and p.rois; one thread per (region, pixel of either
// axis), each gathering only the samples within its tap window (profile_at).
cudaError_t launch_region_profiles(DType dtype, const Params& p, const RegionWork& w,
                                   cudaStream_t stream);

// out[k, c] = sum over the touched window of py * px * in / norm: one thread per (k, c),
// c fastest, for channels-last input (p.channels_inner); one warp per (k, c), the lanes
// along x, for row-major input (coalesced rows).
cudaError_t launch_region_forward(DType dtype, const Params& p, const RegionWork& w, void* out,
                                  const int64_t os[2], cudaStream_t stream);

// Backward into the accumulation buffer p.lv[0]: atomic (zero-filled buffer; one
// thread per (k, c, y), a row of atomicAdds) or deterministic (bins != nullptr: the
// regions binned per image tile by launch_bin_regions on w.box, then one thread per
// pixel gathers them in ascending order: run-to-run identical, every element written).
cudaError_t launch_region_backward(DType dtype, const Params& p, const RegionWork& w,
                                   const void* grad, const int64_t gs[2], const TileBins* bins,
                                   cudaStream_t stream);

}  // namespace cuda
}  // namespace roi_align
}  // namespace mmkernels
