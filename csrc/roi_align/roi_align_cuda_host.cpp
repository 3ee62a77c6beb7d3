// RoIAlign family, CUDA registration: validation, allocation, device guard and
// stream, then the launchers in roi_align_cuda.cu. Compiled by the host
// compiler, only when the extension is built with CUDA.
//
// No host synchronisation: nothing here reads tensor data (check_inputs runs with
// check_data=false), so every op can be captured in a CUDA graph. The kernels
// apply the batch-index/level rule per region instead (NaN rows, no gradient).
#ifdef MMKERNELS_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_check.h"

#include <cstdint>
#include <optional>
#include <vector>

#include "roi_align/roi_align_common.h"
#include "roi_align/roi_align_cuda.h"

namespace mmkernels {
namespace roi_align {
namespace {

cuda::DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat;
    case at::kDouble: return cuda::DType::kDouble;
    case at::kHalf: return cuda::DType::kHalf;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "mmkernels roi_align: unsupported dtype ", t);
  }
}

// A value the caller has range-checked (check_sizes, check_inputs: sizes, output
// sizes and sampling_ratio fit in int), narrowed with the check repeated.
int to_int(const char* what, int64_t v) {
  TORCH_CHECK(v >= INT32_MIN && v <= INT32_MAX, "mmkernels roi_align: ", what,
              " does not fit in int: ", v);
  return static_cast<int>(v);
}

// Any strides, read as they are (expanded inputs with stride 0 too): the kernels
// index with int64 products, so no copy and no 32-bit offset.
void fill_level(cuda::Level& lv, const at::Tensor& t, double scale) {
  lv.data = t.const_data_ptr();
  lv.sN = t.stride(0);
  lv.sC = t.stride(1);
  lv.sH = t.stride(2);
  lv.sW = t.stride(3);
  lv.H = to_int("height", t.size(2));
  lv.W = to_int("width", t.size(3));
  lv.scale = scale;
}

cuda::Params make_params(const at::Tensor& rois, const at::Tensor* levels, int64_t N, int64_t C,
                         int64_t PH, int64_t PW, int64_t sr, bool aligned,
                         bool channels_inner) {
  cuda::Params p{};
  p.rois = rois.const_data_ptr();
  p.levels = levels != nullptr ? levels->const_data_ptr<int64_t>() : nullptr;
  p.K = rois.size(0);
  p.N = N;
  p.C = C;
  p.PH = to_int("pooled_height", PH);
  p.PW = to_int("pooled_width", PW);
  p.sampling_ratio = to_int("sampling_ratio", sr);
  p.aligned = aligned;
  p.channels_inner = channels_inner;
  return p;
}

at::ScalarType grad_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// region_features workspace (see cuda::RegionWork), on the map's device: K * (H + W)
// profile weights and flags, as on the CPU, and a few values per region.
struct RegionWorkspace {
  at::Tensor prof, flags, norm, nidx, span, box;
  cuda::RegionWork w{};
  // with_boxes: also each region's RegionBox (the input of the binned backward).
  RegionWorkspace(const at::Tensor& rois, const at::Tensor& map, at::ScalarType acc,
                  bool with_boxes = false) {
    const int64_t K = rois.size(0), HW = map.size(2) + map.size(3);
    const auto opts = map.options();
    prof = at::empty({K, HW}, opts.dtype(acc));
    flags = at::empty({K, HW}, opts.dtype(at::kByte));
    norm = at::empty({K}, opts.dtype(acc));
    nidx = at::empty({K}, opts.dtype(at::kLong));
    span = at::empty({K, 4}, opts.dtype(at::kInt));
    w.prof = prof.mutable_data_ptr();
    w.flags = flags.mutable_data_ptr<uint8_t>();
    w.norm = norm.mutable_data_ptr();
    w.nidx = nidx.mutable_data_ptr<int64_t>();
    w.span = span.mutable_data_ptr<int>();
    if (with_boxes) {
      box = at::empty({K, 8}, opts.dtype(at::kInt));
      w.box = reinterpret_cast<RegionBox*>(box.mutable_data_ptr<int32_t>());
    }
  }
};

// Buffers of the deterministic backward's binning (cuda::TileBins) for K regions on
// levels of heights x widths, N images: sizes from plan_bins, i.e. from the shapes
// only (no host sync). Without bins (plan.binned false) nothing is allocated and the
// kernels test every region in order.
struct BinWorkspace {
  at::Tensor count, incl, keys, sorted, start, temp;
  cuda::TileBins b{};
  BinWorkspace(const char* op, int64_t K, int64_t N, at::IntArrayRef heights,
               at::IntArrayRef widths, const at::TensorOptions& opts) {
    int H[cuda::kMaxLevels], W[cuda::kMaxLevels];
    const int L = static_cast<int>(heights.size());
    for (int l = 0; l < L; ++l) {
      H[l] = static_cast<int>(heights[l]);
      W[l] = static_cast<int>(widths[l]);
    }
    const BinPlan plan = plan_bins(K, N, L, H, W, cuda::kTileH, cuda::kTileW, b.base);
    if (!plan.binned) return;
    const auto i64 = opts.dtype(at::kLong);
    count = at::empty({K}, i64);
    incl = at::empty({K}, i64);
    keys = at::empty({plan.slots}, i64);
    sorted = at::empty({plan.slots}, i64);
    start = at::empty({plan.tiles + 2}, i64);
    check_launch(op, cuda::bin_temp_bytes(K, plan.slots, plan.key_bits, b.temp_bytes));
    temp = at::empty({static_cast<int64_t>(b.temp_bytes)}, opts.dtype(at::kByte));
    b.count = count.mutable_data_ptr<int64_t>();
    b.incl = incl.mutable_data_ptr<int64_t>();
    b.keys = reinterpret_cast<uint64_t*>(keys.mutable_data_ptr<int64_t>());
    b.sorted = reinterpret_cast<uint64_t*>(sorted.mutable_data_ptr<int64_t>());
    b.start = start.mutable_data_ptr<int64_t>();
    b.temp = temp.mutable_data_ptr();
    b.slots = plan.slots;
    b.tiles = plan.tiles;
    b.key_bits = plan.key_bits;
  }
};

at::Tensor forward_cuda(const char* op, at::TensorList features, const at::Tensor& rois,
                        const at::Tensor* levels, at::ArrayRef<double> scales, int64_t PH,
                        int64_t PW, int64_t sr, bool aligned, bool mean) {
  check_inputs(op, features, rois, levels, PH, PW, sr, static_cast<int64_t>(scales.size()),
               /*check_data=*/false);
  TORCH_CHECK(static_cast<int>(features.size()) <= cuda::kMaxLevels, op, ": at most ",
              cuda::kMaxLevels, " feature levels on CUDA, got ", features.size());
  const auto& f0 = features[0];
  const c10::cuda::CUDAGuard guard(f0.device());
  const int64_t K = rois.size(0), N = f0.size(0), C = f0.size(1);
  const bool cl = f0.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  at::Tensor out = mean ? at::empty({K, C}, f0.options())
                        : at::empty({K, C, PH, PW}, f0.options().memory_format(
                                                        cl ? at::MemoryFormat::ChannelsLast
                                                           : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor r = rois.contiguous();
  const at::Tensor lvl = levels != nullptr ? levels->contiguous() : at::Tensor();
  // channels_inner: roi_align's thread order (c fastest for channels-last) and, for
  // region_features, the kernel (thread per (k, c) on channels-last input, warp per
  // (k, c) along the rows on row-major input).
  auto p = make_params(r, levels != nullptr ? &lvl : nullptr, N, C, PH, PW, sr, aligned, cl);
  p.L = static_cast<int>(features.size());
  for (int l = 0; l < p.L; ++l) {
    TORCH_CHECK(features[l].size(2) > 0 && features[l].size(3) > 0, op,
                ": input height and width must be positive, got ", features[l].sizes());
    fill_level(p.lv[l], features[l], scales[l]);
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (mean) {
    RegionWorkspace ws(rois, f0, grad_acc_type(f0.scalar_type()));
    check_launch(op, cuda::launch_region_profiles(dtype_of(f0.scalar_type()), p, ws.w, stream));
    const int64_t os[2] = {out.stride(0), out.stride(1)};
    check_launch(op, cuda::launch_region_forward(dtype_of(f0.scalar_type()), p, ws.w,
                                                 out.mutable_data_ptr(), os, stream));
    return out;
  }
  const int64_t os[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  const cudaError_t err = cuda::launch_forward(dtype_of(f0.scalar_type()), p,
                                               out.mutable_data_ptr(), os, stream);
  check_launch(op, err);
  return out;
}

std::vector<at::Tensor> backward_cuda(const char* op, const at::Tensor& grad,
                                      const at::Tensor& rois, const at::Tensor* levels,
                                      at::ArrayRef<double> scales, int64_t PH, int64_t PW,
                                      int64_t N, int64_t C, at::IntArrayRef heights,
                                      at::IntArrayRef widths, int64_t sr, bool aligned,
                                      bool channels_last, bool mean) {
  const int64_t L = static_cast<int64_t>(heights.size());
  TORCH_CHECK(L >= 1 && L <= cuda::kMaxLevels && static_cast<int64_t>(widths.size()) == L &&
                  static_cast<int64_t>(scales.size()) == L,
              op, ": heights, widths and scales must have one entry per level (at most ",
              cuda::kMaxLevels, ")");
  TORCH_CHECK(N >= 0 && C >= 0, op, ": batch_size and channels must be non-negative");
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op, ": rois must be (K, 5), got ",
              rois.sizes());
  const int64_t K = rois.size(0);
  if (mean) {
    check_grad(op, grad, rois, {K, C}, levels, N, L, PH, PW, sr, /*check_data=*/false);
  } else {
    check_grad(op, grad, rois, {K, C, PH, PW}, levels, N, L, PH, PW, sr, /*check_data=*/false);
  }
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto acc_type = grad_acc_type(grad.scalar_type());
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const bool det = at::globalContext().deterministicAlgorithms();
  // The deterministic gather writes every element of every level's buffer; the atomic
  // scatter adds into it, so only then (or with nothing to launch) is it zero-filled.
  // (In deterministic mode at::empty itself NaN-fills unless the user turned off
  // torch.utils.deterministic.fill_uninitialized_memory: PyTorch's choice, not ours.)
  const bool launch = K > 0 && C > 0;
  std::vector<at::Tensor> bufs;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(heights[l] >= 0 && widths[l] >= 0 && heights[l] < (1LL << 31) &&
                    widths[l] < (1LL << 31),
                op, ": height/width must lie in [0, 2^31), got ", heights[l], " x ", widths[l]);
    auto buf = at::empty({N, C, heights[l], widths[l]},
                         grad.options().dtype(acc_type).memory_format(fmt));
    if (!(det && launch)) buf.zero_();
    bufs.push_back(buf);
  }
  if (launch) {
    const at::Tensor r = rois.contiguous();
    const at::Tensor lvl = levels != nullptr ? levels->contiguous() : at::Tensor();
    auto p = make_params(r, levels != nullptr ? &lvl : nullptr, N, C, PH, PW, sr, aligned,
                         channels_last);
    p.L = static_cast<int>(L);
    for (int l = 0; l < p.L; ++l) {
      TORCH_CHECK(heights[l] > 0 && widths[l] > 0, op, ": input height and width must be positive");
      fill_level(p.lv[l], bufs[l], scales[l]);
    }
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const auto dt = dtype_of(grad.scalar_type());
    if (mean) {
      // Profiles (the geometry of the regions on this map), then the bilinear form;
      // deterministic: the regions binned per image tile on their spans first.
      RegionWorkspace ws(rois, bufs[0], acc_type, /*with_boxes=*/det);
      check_launch(op, cuda::launch_region_profiles(dt, p, ws.w, stream));
      const int64_t gs[2] = {grad.stride(0), grad.stride(1)};
      std::optional<BinWorkspace> bins;
      if (det) {
        bins.emplace(op, K, N, heights, widths, grad.options());
        check_launch(op, cuda::launch_bin_regions(p, ws.w.box, bins->b, stream));
      }
      check_launch(op, cuda::launch_region_backward(dt, p, ws.w, grad.const_data_ptr(), gs,
                                                    det ? &bins->b : nullptr, stream));
    } else if (det) {
      // Each region's pixel box once (RegionBox, 32 bytes), the regions binned per
      // image tile once (every level, independent of C), then per level the gather.
      static_assert(sizeof(RegionBox) == 8 * sizeof(int32_t), "RegionBox layout");
      auto boxes = at::empty({K, 8}, grad.options().dtype(at::kInt));
      auto* bp = reinterpret_cast<RegionBox*>(boxes.mutable_data_ptr<int32_t>());
      check_launch(op, cuda::launch_region_boxes(dt, p, bp, stream));
      const BinWorkspace bins(op, K, N, heights, widths, grad.options());
      check_launch(op, cuda::launch_bin_regions(p, bp, bins.b, stream));
      const int64_t gs[4] = {grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
      for (int l = 0; l < p.L; ++l) {
        const cudaError_t err = cuda::launch_backward_deterministic(
            dt, p, l, grad.const_data_ptr(), gs, bp, bins.b, stream);
        check_launch(op, err);
      }
    } else {
      const int64_t gs[4] = {grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
      const cudaError_t err = cuda::launch_backward_atomic(dt, p, grad.const_data_ptr(), gs, stream);
      check_launch(op, err);
    }
  }
  std::vector<at::Tensor> grads;
  for (auto& b : bufs) grads.push_back(b.to(grad.scalar_type()));
  return grads;
}

at::Tensor roi_align_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                          int64_t PH, int64_t PW, int64_t sr, bool aligned) {
  return forward_cuda("roi_align", {input}, rois, nullptr, {spatial_scale}, PH, PW, sr, aligned,
                      false);
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                   double spatial_scale, int64_t PH, int64_t PW, int64_t N,
                                   int64_t C, int64_t H, int64_t W, int64_t sr, bool aligned,
                                   bool channels_last) {
  return backward_cuda("roi_align_backward", grad, rois, nullptr, {spatial_scale}, PH, PW, N, C,
                       {H}, {W}, sr, aligned, channels_last, false)[0];
}

at::Tensor region_features_cuda(const at::Tensor& input, const at::Tensor& rois,
                                double spatial_scale, int64_t PH, int64_t PW, int64_t sr,
                                bool aligned) {
  return forward_cuda("region_features", {input}, rois, nullptr, {spatial_scale}, PH, PW, sr,
                      aligned, true);
}

at::Tensor region_features_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                         double spatial_scale, int64_t PH, int64_t PW, int64_t N,
                                         int64_t C, int64_t H, int64_t W, int64_t sr,
                                         bool aligned, bool channels_last) {
  return backward_cuda("region_features_backward", grad, rois, nullptr, {spatial_scale}, PH, PW,
                       N, C, {H}, {W}, sr, aligned, channels_last, true)[0];
}

at::Tensor multiscale_roi_align_cuda(at::TensorList features, const at::Tensor& rois,
                                     const at::Tensor& levels, at::ArrayRef<double> scales,
                                     int64_t PH, int64_t PW, int64_t sr, bool aligned) {
  return forward_cuda("multiscale_roi_align", features, rois, &levels, scales, PH, PW, sr,
                      aligned, false);
}

std::vector<at::Tensor> multiscale_roi_align_backward_cuda(
    const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& levels,
    at::ArrayRef<double> scales, int64_t N, int64_t C, at::IntArrayRef heights,
    at::IntArrayRef widths, int64_t sr, bool aligned, bool channels_last) {
  TORCH_CHECK(grad.dim() == 4, "multiscale_roi_align_backward: grad must be (K, C, PH, PW), got ",
              grad.sizes());
  return backward_cuda("multiscale_roi_align_backward", grad, rois, &levels, scales,
                       grad.size(2), grad.size(3), N, C, heights, widths, sr, aligned,
                       channels_last, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) {
  m.impl("roi_align", TORCH_FN(roi_align_cuda));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_cuda));
  m.impl("region_features", TORCH_FN(region_features_cuda));
  m.impl("_region_features_backward", TORCH_FN(region_features_backward_cuda));
  m.impl("multiscale_roi_align", TORCH_FN(multiscale_roi_align_cuda));
  m.impl("_multiscale_roi_align_backward", TORCH_FN(multiscale_roi_align_backward_cuda));
}

}  // namespace roi_align
}  // namespace mmkernels

#endif  // MMKERNELS_WITH_CUDA
