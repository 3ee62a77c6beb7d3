"""RoIAlign family: ``roi_align``, ``region_features``, ``multiscale_roi_align``.

Layers, in order:
  1. kernels: C++ CPU (csrc/roi_align/roi_align_cpu.cpp) and CUDA
     (csrc/roi_align/roi_align_cuda.cu), schemas in csrc/registration.cpp;
  2. registration: fake kernels and autograd for the ``mmkernels::`` ops;
  3. functional API: argument checking, box conversion, backend choice;
  4. modules live in :mod:`mmkernels.nn`.

Backends: CPU and CUDA tensors go to the C++/CUDA kernels through the
dispatcher; ``MMKERNELS_BACKEND=reference`` routes to :mod:`mmkernels.reference`.
Gradients flow to the feature maps, not to the boxes (as in torchvision).

Contract shared by the three ops (details in :func:`roi_align`):

* Numerics: the CPU float32/float64 forward of ``roi_align`` (and of each level
  of ``multiscale_roi_align``) is bitwise equal to torchvision's CPU kernel; the
  rest is within :mod:`mmkernels.testing`'s tolerance of the float64 reference.
* ``sampling_ratio``: -1 or 0 (adaptive: ``ceil(bin size)`` per axis, capped at
  :data:`MAX_SAMPLING_RATIO`), or an int in [1, :data:`MAX_SAMPLING_RATIO`].
* A box that is not finite after scaling gives a NaN row at once.
* A NaN read by a sample's bilinear taps gives NaN, on every layout and backend.
* A batch index outside [0, N) raises on CPU; on CUDA (no host sync) its row is NaN.
* Deterministic by default: CPU forward and backward (independent of the thread
  count), CUDA forward. The CUDA backward uses atomics unless
  ``torch.use_deterministic_algorithms(True)``, which selects a gather kernel:
  the regions are binned per image tile once (independent of C), then each tile's
  pixels gather the regions of their tile in ascending order (cost in
  :func:`roi_align`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from mmkernels import _extension, reference

__all__ = ["roi_align", "region_features", "multiscale_roi_align", "convert_boxes_to_rois",
           "assign_fpn_levels", "MAX_SAMPLING_RATIO"]

#: Largest sampling grid per bin and axis (``kMaxSamplingRatio`` in
#: csrc/roi_align/roi_align_math.h): the largest explicit ``sampling_ratio``, and the
#: cap of the adaptive grid ``ceil(bin size)``, which it therefore leaves unchanged
#: for bins of up to 8192 feature-map pixels.
MAX_SAMPLING_RATIO = 8192

_INT_MAX = 2 ** 31 - 1

_OPS = ("roi_align", "_roi_align_backward", "region_features", "_region_features_backward",
        "multiscale_roi_align", "_multiscale_roi_align_backward")


# ---------------------------------------------------------------------------------
# 2. torch.library registration: fake kernels and autograd
# ---------------------------------------------------------------------------------


def _is_channels_last(t: Tensor) -> bool:
    return suggest_memory_format(t) == torch.channels_last


def _register() -> None:
    lib = "mmkernels::"

    @torch.library.register_fake(lib + "roi_align")
    def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                        aligned):
        fmt = torch.channels_last if _is_channels_last(input) else torch.contiguous_format
        return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width)
                               ).contiguous(memory_format=fmt)

    @torch.library.register_fake(lib + "_roi_align_backward")
    def _roi_align_backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width,
                                 batch_size, channels, height, width, sampling_ratio, aligned,
                                 channels_last):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return grad.new_empty((batch_size, channels, height, width)).contiguous(memory_format=fmt)

    @torch.library.register_fake(lib + "region_features")
    def _region_features_fake(input, rois, spatial_scale, pooled_height, pooled_width,
                              sampling_ratio, aligned):
        return input.new_empty((rois.shape[0], input.shape[1]))

    @torch.library.register_fake(lib + "_region_features_backward")
    def _region_features_backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width,
                                       batch_size, channels, height, width, sampling_ratio,
                                       aligned, channels_last):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return grad.new_empty((batch_size, channels, height, width)).contiguous(memory_format=fmt)

    @torch.library.register_fake(lib + "multiscale_roi_align")
    def _multiscale_fake(features, rois, levels, scales, pooled_height, pooled_width,
                         sampling_ratio, aligned):
        f0 = features[0]
        fmt = torch.channels_last if _is_channels_last(f0) else torch.contiguous_format
        return f0.new_empty((rois.shape[0], f0.shape[1], pooled_height, pooled_width)
                            ).contiguous(memory_format=fmt)

    @torch.library.register_fake(lib + "_multiscale_roi_align_backward")
    def _multiscale_backward_fake(grad, rois, levels, scales, batch_size, channels, heights,
                                  widths, sampling_ratio, aligned, channels_last):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return [grad.new_empty((batch_size, channels, h, w)).contiguous(memory_format=fmt)
                for h, w in zip(heights, widths)]

    # -- autograd: gradients w.r.t. the feature maps; boxes get none -----------------

    def _single_setup(ctx, inputs, output):
        input, rois, spatial_scale, ph, pw, sampling_ratio, aligned = inputs
        ctx.save_for_backward(rois)
        ctx.args = (spatial_scale, ph, pw, sampling_ratio, aligned)
        ctx.input_shape = tuple(input.shape)
        ctx.channels_last = _is_channels_last(input)

    def _make_single_backward(backward_op):
        def _backward(ctx, grad):
            (rois,) = ctx.saved_tensors
            spatial_scale, ph, pw, sampling_ratio, aligned = ctx.args
            grad_input = None
            if ctx.needs_input_grad[0]:
                n, c, h, w = ctx.input_shape
                grad_input = backward_op(grad, rois, spatial_scale, ph, pw, n, c, h, w,
                                         sampling_ratio, aligned, ctx.channels_last)
            return grad_input, None, None, None, None, None, None
        return _backward

    torch.library.register_autograd(
        lib + "roi_align", _make_single_backward(torch.ops.mmkernels._roi_align_backward),
        setup_context=_single_setup)
    torch.library.register_autograd(
        lib + "region_features",
        _make_single_backward(torch.ops.mmkernels._region_features_backward),
        setup_context=_single_setup)

    # The ops are linear in the feature maps, so the backward of a backward op is
    # the forward op applied to the incoming gradient: double backward is exact.
    def _bwd_setup(ctx, inputs, output):
        grad, rois, spatial_scale, ph, pw = inputs[:5]
        ctx.save_for_backward(rois)
        ctx.args = (spatial_scale, ph, pw, inputs[9], inputs[10])

    def _make_double_backward(forward_op):
        def _double_backward(ctx, grad_grad_input):
            (rois,) = ctx.saved_tensors
            spatial_scale, ph, pw, sampling_ratio, aligned = ctx.args
            gg = None
            if ctx.needs_input_grad[0]:
                gg = forward_op(grad_grad_input, rois, spatial_scale, ph, pw, sampling_ratio,
                                aligned)
            return (gg,) + (None,) * 11
        return _double_backward

    torch.library.register_autograd(
        lib + "_roi_align_backward", _make_double_backward(torch.ops.mmkernels.roi_align),
        setup_context=_bwd_setup)
    torch.library.register_autograd(
        lib + "_region_features_backward",
        _make_double_backward(torch.ops.mmkernels.region_features), setup_context=_bwd_setup)

    def _multi_setup(ctx, inputs, output):
        features, rois, levels, scales, ph, pw, sampling_ratio, aligned = inputs
        ctx.save_for_backward(rois, levels)
        ctx.args = (list(scales), sampling_ratio, aligned)
        ctx.shapes = [tuple(f.shape) for f in features]
        ctx.channels_last = _is_channels_last(features[0])

    def _multi_backward(ctx, grad):
        rois, levels = ctx.saved_tensors
        scales, sampling_ratio, aligned = ctx.args
        n, c = ctx.shapes[0][:2]
        grads = torch.ops.mmkernels._multiscale_roi_align_backward(
            grad, rois, levels, scales, n, c, [s[2] for s in ctx.shapes],
            [s[3] for s in ctx.shapes], sampling_ratio, aligned, ctx.channels_last)
        return list(grads), None, None, None, None, None, None, None

    torch.library.register_autograd(lib + "multiscale_roi_align", _multi_backward,
                                    setup_context=_multi_setup)

    def _multi_bwd_setup(ctx, inputs, output):
        grad, rois, levels, scales = inputs[:4]
        ctx.save_for_backward(rois, levels)
        ctx.args = (list(scales), grad.shape[2], grad.shape[3], inputs[8], inputs[9])
        ctx.shapes = [(inputs[4], inputs[5], h, w) for h, w in zip(inputs[6], inputs[7])]

    def _multi_double_backward(ctx, grad_grads):
        rois, levels = ctx.saved_tensors
        scales, ph, pw, sampling_ratio, aligned = ctx.args
        gg = None
        if ctx.needs_input_grad[0]:
            like = next(g for g in grad_grads if g is not None)
            feats = [g if g is not None else like.new_zeros(shape)
                     for g, shape in zip(grad_grads, ctx.shapes)]
            gg = torch.ops.mmkernels.multiscale_roi_align(feats, rois, levels, scales, ph, pw,
                                                          sampling_ratio, aligned)
        return (gg,) + (None,) * 10

    torch.library.register_autograd(lib + "_multiscale_roi_align_backward",
                                    _multi_double_backward, setup_context=_multi_bwd_setup)


if _extension.is_available():
    _register()


# ---------------------------------------------------------------------------------
# 3. functional API
# ---------------------------------------------------------------------------------

BoxesLike = Tensor | Sequence[Tensor]


def _pair(output_size, name: str = "output_size") -> tuple[int, int]:
    if isinstance(output_size, int) and not isinstance(output_size, bool):
        size = (output_size, output_size)
    elif (isinstance(output_size, Sequence) and len(output_size) == 2
          and all(isinstance(s, int) and not isinstance(s, bool) for s in output_size)):
        size = (int(output_size[0]), int(output_size[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {output_size!r}")
    if not (0 < size[0] <= _INT_MAX and 0 < size[1] <= _INT_MAX):
        raise ValueError(f"{name} must be positive and below 2^31, got {size}")
    return size


def _check_sampling_ratio(sampling_ratio) -> int:
    """-1 or 0 (adaptive), or an int in [1, MAX_SAMPLING_RATIO]; returns it as an int."""
    if isinstance(sampling_ratio, bool):
        raise TypeError(f"sampling_ratio must be an int, got {sampling_ratio!r}")
    try:
        sr = operator.index(sampling_ratio)
    except TypeError:
        raise TypeError(f"sampling_ratio must be an int, got {sampling_ratio!r}") from None
    if not (sr in (-1, 0) or 1 <= sr <= MAX_SAMPLING_RATIO):
        raise ValueError(f"sampling_ratio must be -1 or 0 (adaptive) or in [1, "
                         f"{MAX_SAMPLING_RATIO}], got {sr}")
    return sr


def convert_boxes_to_rois(boxes: BoxesLike, like: Tensor | None = None) -> Tensor:
    """Boxes in either accepted format → rois (K, 5) = (batch_index, x1, y1, x2, y2).

    Args:
        boxes: Tensor[K, 5] (returned as is), or a list of Tensor[L_i, 4], one per
            image, in (x1, y1, x2, y2) format; image ``i``'s boxes get batch index ``i``.
        like: the feature map, for the dtype/device of an all-empty list.
    """
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(
                "boxes must be a Tensor[K, 5] of (batch_index, x1, y1, x2, y2) or a list of "
                f"Tensor[L, 4]; got a tensor of shape {tuple(boxes.shape)}")
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got "
                        f"{type(boxes).__name__}")
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor):
            raise TypeError(f"boxes[{i}] must be a Tensor[L, 4], got {type(b).__name__}")
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes[{i}] must be a Tensor[L, 4], got shape {tuple(b.shape)}")
    if len(boxes) == 0:
        if like is None:
            raise ValueError("boxes is an empty list and no feature map gives its dtype")
        return like.new_zeros((0, 5))
    dtype, device = boxes[0].dtype, boxes[0].device
    for i, b in enumerate(boxes):
        if b.dtype != dtype or b.device != device:
            raise ValueError(f"boxes[{i}] has dtype/device {b.dtype}/{b.device}, expected "
                             f"{dtype}/{device} like boxes[0]")
    idx = torch.cat([torch.full((b.shape[0], 1), float(i), dtype=dtype, device=device)
                     for i, b in enumerate(boxes)])
    return torch.cat([idx, torch.cat(list(boxes))], dim=1)


def _check_input(input, name: str = "input") -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"{name} must be a 4-D (N, C, H, W) tensor, got shape "
                         f"{tuple(input.shape)}")
    if input.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} dtype must be float32, float64, float16 or bfloat16, got "
                        f"{input.dtype}")


def _prepare(input: Tensor, boxes: BoxesLike, output_size, sampling_ratio
             ) -> tuple[Tensor, int, int, int]:
    _check_input(input)
    ph, pw = _pair(output_size)
    sampling_ratio = _check_sampling_ratio(sampling_ratio)
    rois = convert_boxes_to_rois(boxes, like=input)
    if rois.dtype != input.dtype:
        raise TypeError(f"boxes dtype ({rois.dtype}) must match input dtype ({input.dtype})")
    if rois.device != input.device:
        raise ValueError(f"boxes are on {rois.device} but input is on {input.device}")
    return rois, ph, pw, sampling_ratio


def roi_align(input: Tensor, boxes: BoxesLike, output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoIAlign (Mask R-CNN), with the signature and results of ``torchvision.ops.roi_align``.

    Args:
        input: Tensor[N, C, H, W], float32/float64/float16/bfloat16, any strides
            (NCHW, channels_last, views, expanded).
        boxes: Tensor[K, 5] of (batch_index, x1, y1, x2, y2), or a list of Tensor[L_i, 4]
            (x1, y1, x2, y2), one per image; input's dtype and device.
        output_size: int or (PH, PW), each in [1, 2^31).
        spatial_scale: maps box coordinates to feature-map coordinates (e.g. 1/16).
        sampling_ratio: samples per bin along each axis: -1 or 0 for adaptive,
            ``ceil(bin size)`` capped at :data:`MAX_SAMPLING_RATIO` (8192; no bin of a
            real box is that large, so the cap changes no result), or an int in
            [1, 8192].
        aligned: shift boxes by -0.5 pixel (half-pixel centres, as in Detectron2).

    Returns:
        Tensor[K, C, PH, PW] in input's dtype (channels_last when input is).
        Differentiable w.r.t. ``input`` (boxes get no gradient). Accumulation is in
        float32 for half inputs.

    Numerics: on CPU the float32/float64 forward is bitwise equal to
    ``torchvision.ops.roi_align`` (the same operations in the same order; the
    extension is built with ``-ffp-contract=off`` whatever ``-march``). The
    backward, float16/bfloat16 and the CUDA kernels agree with the float64
    reference within :mod:`mmkernels.testing`'s tolerances.

    Special values:
        * A box that is not finite after scaling (an Inf or NaN coordinate, or an
          extent that overflows the dtype) gives a NaN row at once, and no gradient.
        * Each sample on the map reads its four bilinear taps and weights every one,
          a zero weight too, like torchvision's multiply-add: a NaN on any of them
          gives NaN (+-Inf gives +-Inf or NaN), on every layout and backend. A sample
          off the map reads nothing (torchvision's CPU kernel reads pixel (0, 0)
          with weight 0 there, so a NaN at (0, 0) leaks into its output; its CUDA
          kernel and this one do not).
        * Cost: only samples that can land on the map are visited, so a huge box
          costs what its samples on the map cost, never the full capped grid.

    Determinism: CPU forward and backward are deterministic and independent of the
    thread count; the CUDA forward is deterministic; the CUDA backward uses atomics
    unless ``torch.use_deterministic_algorithms(True)``, which selects a gather kernel,
    bitwise identical run to run and equal to the atomic one within rounding:

        * binning, once per call and independent of C: each region's pixel box gives
          the 8 x 32-pixel tiles of its image that it meets; one (tile, region) key
          per pair is radix-sorted, so each tile holds its regions in ascending order.
          O(K * tiles per box) work, in a fixed number of pair slots sized from the
          shapes (64 per region plus one per tile, or every possible pair when fewer):
          no host sync, so the backward can be captured in a CUDA graph;
        * gather: per tile and group of 4 channels, each pixel sums, region by region
          in ascending order, the contributions of the regions of its tile only:
          O(K * samples * C + N * C * H * W) in all (the former kernel tested every
          region in every tile and channel group: O(N * H * W * C * K / 1024)).
        * Memory: about 24 bytes per pair slot and 32 bytes per region, besides the
          float32 (float64) gradient buffers, which the gather writes whole.
        * When the pairs do not fit their slots (regions meeting more than ~64 tiles
          each on average), the regions past the last one that fits are tested in
          order by every tile: slower, the same result.

    Raises:
        TypeError / ValueError for malformed arguments (naming the argument).
        An out-of-range batch index in ``boxes[:, 0]`` (outside [0, N), or NaN):
        on CPU, RuntimeError; on CUDA no host sync is made (so the op can be
        captured in a CUDA graph), and the region reads nothing: its row is NaN and
        it gets no gradient.
    """
    rois, ph, pw, sampling_ratio = _prepare(input, boxes, output_size, sampling_ratio)
    if _extension.backend_override() == "reference":
        return reference.roi_align(input, rois, (ph, pw), spatial_scale, sampling_ratio, aligned)
    _extension.require("roi_align", input.device.type)
    return torch.ops.mmkernels.roi_align(input, rois, float(spatial_scale), ph, pw,
                                         sampling_ratio, bool(aligned))


def region_features(input: Tensor, boxes: BoxesLike, output_size, spatial_scale: float = 1.0,
                    sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """Pooled region vectors: ``roi_align(...).mean((2, 3))`` in one fused pass.

    These are the bottom-up region features that ViLBERT/LXMERT feed their visual
    stream. The (K, C, PH, PW) tensor is never allocated: each region averages all
    of its PH*PW*grid samples directly, so the extra memory is O(K*C).

    Args: as :func:`roi_align`.

    Returns:
        Tensor[K, C] in input's dtype, differentiable w.r.t. ``input``.

    Special values, batch-index rule and determinism: as :func:`roi_align` (NaN
    exactly where ``roi_align(...).mean((2, 3))`` is NaN: only the taps of samples
    on the map are read, on both layouts and backends, and an Inf that some sample
    weights by 0 gives NaN as torchvision's ``0 * Inf`` does, also when other samples
    weight that pixel positively; the same for an Inf gradient in the backward).
    Not bitwise equal to torchvision: the sum runs in another order (a bilinear
    form, see the README's design notes). On CUDA both backward kernels use the
    same per-region profiles; the deterministic one bins the regions per image tile
    on their spans and gathers per input element, as :func:`roi_align`'s does.
    Cost: building a region's profiles visits each of its samples on the map a few
    times, O((PH + PW) * grid) per region at most, and the form costs its window
    per (k, c); nothing scales with PH * PW, on CPU or CUDA.
    On CPU, an input that is neither contiguous nor channels_last (a slice, an
    expanded tensor) is copied once to its suggested dense layout.
    """
    rois, ph, pw, sampling_ratio = _prepare(input, boxes, output_size, sampling_ratio)
    if _extension.backend_override() == "reference":
        return reference.region_features(input, rois, (ph, pw), spatial_scale, sampling_ratio,
                                         aligned)
    _extension.require("region_features", input.device.type)
    return torch.ops.mmkernels.region_features(input, rois, float(spatial_scale), ph, pw,
                                               sampling_ratio, bool(aligned))


def _infer_scale(feature: Tensor, original_size: tuple[int, int]) -> float:
    # torchvision.ops.poolers._infer_scale: a power of two, from the height ratio.
    approx = float(feature.shape[-2]) / float(original_size[0])
    return 2.0 ** float(torch.tensor(approx).log2().round())


def assign_fpn_levels(rois: Tensor, k_min: int, k_max: int, canonical_scale: int = 224,
                      canonical_level: int = 4, eps: float = 1e-6) -> Tensor:
    """FPN level of each box (Lin et al. 2017, eq. 1), as torchvision's LevelMapper.

    Args:
        rois: Tensor[K, 5]. Returns Tensor[K] int64 in [0, k_max - k_min]; a box whose
        level is NaN (negative area, or a NaN coordinate) gets 0.
    """
    boxes = rois[:, 1:]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    s = torch.sqrt(area)
    # eps as a 0-d CPU tensor in s's dtype, as torchvision adds it: the same rounding,
    # and it enters a CUDA op as a scalar (no host-to-device copy, no sync).
    lvl = torch.floor(canonical_level + torch.log2(s / canonical_scale)
                      + torch.tensor(eps, dtype=s.dtype))
    # A NaN box (NaN area, or a negative one) gets the finest level, where its row
    # is NaN anyway (or zero, as torchvision's); the cast of NaN to int is undefined.
    lvl = torch.where(torch.isnan(lvl), torch.full_like(lvl, k_min), lvl)
    lvl = torch.clamp(lvl, min=k_min, max=k_max)
    return lvl.to(torch.int64) - k_min


def multiscale_roi_align(features: Sequence[Tensor] | dict[str, Tensor], boxes: BoxesLike,
                         image_sizes: Sequence[tuple[int, int]], output_size,
                         sampling_ratio: int = -1, canonical_scale: int = 224,
                         canonical_level: int = 4) -> Tensor:
    """Multi-scale RoIAlign over an FPN, equal to ``torchvision.ops.MultiScaleRoIAlign``.

    Each box is assigned a level with torchvision's LevelMapper
    (``floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6)``, clamped),
    and all boxes are pooled in one launch, each from its own level.

    Args:
        features: the pyramid levels, finest first: a list of Tensor[N, C, H_l, W_l]
            (or a dict, whose values are taken in order, as the ``featmap_names`` of
            torchvision's module select them); one dtype, at most 8 levels on CUDA.
        boxes: list of Tensor[L_i, 4] (x1, y1, x2, y2) in image coordinates, or Tensor[K, 5].
        image_sizes: the (height, width) of each image before batching; the level
            scales are inferred from them as torchvision does.
        output_size: int or (PH, PW).

    Returns:
        Tensor[K, C, PH, PW], differentiable w.r.t. every level (aligned=False, as
        torchvision's MultiScaleRoIAlign). With more than one level, an inverted box
        (negative area) gets a zero row, as in torchvision, whose level mapper
        assigns it no level. Other special values, the batch-index rule and
        determinism: as :func:`roi_align`.
    """
    if isinstance(features, dict):
        features = list(features.values())
    if not isinstance(features, (list, tuple)) or len(features) == 0:
        raise TypeError("features must be a non-empty list (or dict) of Tensor[N, C, H, W]")
    for i, f in enumerate(features):
        _check_input(f, f"features[{i}]")
        if f.dtype != features[0].dtype:
            raise TypeError(f"features[{i}] dtype ({f.dtype}) must match features[0] "
                            f"({features[0].dtype})")
        if f.device != features[0].device or f.shape[:2] != features[0].shape[:2]:
            raise ValueError(f"features[{i}] ({tuple(f.shape)} on {f.device}) must share N, C "
                             f"and the device with features[0] ({tuple(features[0].shape)} on "
                             f"{features[0].device})")
    if not image_sizes:
        raise ValueError("image_sizes must list the (height, width) of each image")
    rois, ph, pw, sampling_ratio = _prepare(features[0], boxes, output_size, sampling_ratio)
    max_h = max(int(s[0]) for s in image_sizes)
    max_w = max(int(s[1]) for s in image_sizes)
    scales = [_infer_scale(f, (max_h, max_w)) for f in features]
    k_min = int(-math.log2(scales[0]))
    k_max = int(-math.log2(scales[-1]))
    unassigned = None
    if len(features) == 1:
        levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    else:
        levels = assign_fpn_levels(rois, k_min, k_max, canonical_scale, canonical_level)
        # torchvision's LevelMapper gives a finite box of negative area (an inverted
        # box) a NaN level that matches no level, so its row stays zero; do the same
        # without a host sync. A non-finite box keeps its NaN row (see roi_align).
        area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
        unassigned = (area < 0) & torch.isfinite(rois[:, 1:]).all(1)
    if _extension.backend_override() == "reference":
        out = reference.multiscale_roi_align(list(features), rois, levels, scales, (ph, pw),
                                             sampling_ratio, False)
    else:
        _extension.require("multiscale_roi_align", features[0].device.type)
        out = torch.ops.mmkernels.multiscale_roi_align(list(features), rois, levels, scales, ph,
                                                       pw, sampling_ratio, False)
    if unassigned is not None:
        out = torch.where(unassigned[:, None, None, None], out.new_zeros(()), out)
    return out
