"""Eager PyTorch versions of every mmkernels op.

Tests compare the kernels against these (run in float64), benchmarks time them
as the eager baseline, and ``MMKERNELS_BACKEND=reference`` routes every op here.
They favour clarity over speed, but are vectorised enough to run the test sizes
in seconds, and they are differentiable with ordinary autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------
# RoIAlign (torchvision semantics; see csrc/roi_align/roi_align_math.h)
# ---------------------------------------------------------------------------------


def _axis_interp_matrix(start: float, bin_size: float, pooled: int, grid: int, size: int,
                        dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Interpolation weights along one axis of one region.

    Returns ``weights`` (pooled, grid, size), where ``weights[p, i, s]`` is the
    bilinear weight of pixel ``s`` for sample ``i`` of bin ``p``, and ``inside``
    (pooled, grid) bool: whether the sample lies within [-1, size].
    """
    p = torch.arange(pooled, dtype=torch.float64, device=device)[:, None]
    i = torch.arange(grid, dtype=torch.float64, device=device)[None, :]
    coord = start + p * bin_size + (i + 0.5) * bin_size / grid
    inside = (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0.0)
    lo = coord.floor().long()
    at_end = lo >= size - 1
    lo = torch.where(at_end, torch.full_like(lo, size - 1), lo)
    hi = torch.where(at_end, lo, lo + 1)
    coord = torch.where(at_end, lo.double(), coord)
    frac = coord - lo.double()
    w = torch.zeros(pooled, grid, size, dtype=torch.float64, device=device)
    w.scatter_add_(2, lo[..., None].clamp(0, size - 1), (1.0 - frac)[..., None])
    w.scatter_add_(2, hi[..., None].clamp(0, size - 1), frac[..., None])
    w = w * inside[..., None]
    return w.to(dtype), inside


def roi_align(input: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """Eager RoIAlign with torchvision's semantics.

    Args:
        input: (N, C, H, W), any float dtype.
        rois: (K, 5) = (batch_index, x1, y1, x2, y2), any float dtype.
    Returns:
        (K, C, PH, PW) in input's dtype. The geometry is computed in float64 and
        each sample is the separable product ``Wy @ input[n] @ Wx^T``, so
        autograd gives the exact backward.
    """
    ph_, pw_ = output_size
    K, C = rois.shape[0], input.shape[1]
    H, W = input.shape[-2:]
    out = input.new_zeros((K, C, ph_, pw_))
    boxes = rois.detach().double().cpu().tolist()
    outs = []
    for k in range(K):
        n, x1, y1, x2, y2 = boxes[k]
        if any(math.isnan(v) for v in (x1, y1, x2, y2)):
            outs.append(torch.full((C, ph_, pw_), float("nan"), dtype=input.dtype,
                                   device=input.device))
            continue
        offset = 0.5 if aligned else 0.0
        sw, sh = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        rw, rh = x2 * spatial_scale - offset - sw, y2 * spatial_scale - offset - sh
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph_, rw / pw_
        gh = sampling_ratio if sampling_ratio > 0 else max(math.ceil(rh / ph_), 0)
        gw = sampling_ratio if sampling_ratio > 0 else max(math.ceil(rw / pw_), 0)
        count = max(gh * gw, 1)
        if gh == 0 or gw == 0:
            outs.append(input.new_zeros((C, ph_, pw_)))
            continue
        wy, _ = _axis_interp_matrix(sh, bh, ph_, gh, H, input.dtype, input.device)
        wx, _ = _axis_interp_matrix(sw, bw, pw_, gw, W, input.dtype, input.device)
        # sum over the grid first: (PH, H) and (PW, W)
        sy = wy.sum(1)
        sx = wx.sum(1)
        plane = input[int(n)]
        outs.append(torch.einsum("ph,chw,qw->cpq", sy, plane, sx) / count)
    if outs:
        out = torch.stack(outs)
    return out


def region_features(input: Tensor, rois: Tensor, output_size: tuple[int, int],
                    spatial_scale: float = 1.0, sampling_ratio: int = -1,
                    aligned: bool = False) -> Tensor:
    """(K, C): ``roi_align(...).mean((2, 3))``, materialising the pooled tensor."""
    return roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned).mean((2, 3))


def multiscale_roi_align(features: list[Tensor], rois: Tensor, levels: Tensor,
                         scales: list[float], output_size: tuple[int, int],
                         sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """(K, C, PH, PW): region k pooled from ``features[levels[k]]`` at ``scales[levels[k]]``
    (torchvision's per-level loop)."""
    K, C = rois.shape[0], features[0].shape[1]
    out = features[0].new_zeros((K, C, *output_size))
    for lvl, (feat, scale) in enumerate(zip(features, scales)):
        idx = torch.nonzero(levels == lvl).squeeze(1)
        if idx.numel():
            out = out.index_put((idx,), roi_align(feat, rois[idx], output_size, scale,
                                                  sampling_ratio, aligned))
    return out


# ---------------------------------------------------------------------------------
# Token gathers (MAE / FLIP masking, masked-region selection, LLaVA merge)
# ---------------------------------------------------------------------------------


def random_masking(x: Tensor, n_keep: int, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's random_masking (facebookresearch/mae, models_mae.py), given the noise.

    x (B, N, D), noise (B, N) → x_kept (B, n_keep, D), mask (B, N) in x's dtype
    (1 = removed), ids_restore (B, N) int64. The argsort is stable (ties go to the
    lower index).
    """
    B, N, D = x.shape
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :n_keep]
    x_kept = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones(B, N, dtype=x.dtype, device=x.device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_kept, mask, ids_restore


def restore_tokens(x_kept: Tensor, ids_restore: Tensor, mask_token: Tensor) -> Tensor:
    """MAE decoder unshuffle: ``gather(cat([x_kept, mask_tokens]), 1, ids_restore)``."""
    B, K, D = x_kept.shape
    N = ids_restore.shape[1]
    mask_tokens = mask_token.reshape(1, 1, D).expand(B, N - K, D)
    full = torch.cat([x_kept, mask_tokens], dim=1)
    return torch.gather(full, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, D))


def masked_select_rows(x: Tensor, mask: Tensor, max_rows: int | None = None
                       ) -> tuple[Tensor, Tensor]:
    """``x[mask]`` and the flat positions; padded to ``max_rows`` (index -1) when given."""
    B, N, D = x.shape
    rows = x[mask]
    index = torch.nonzero(mask.reshape(-1)).squeeze(1)
    if max_rows is not None:
        if rows.shape[0] > max_rows:
            raise ValueError(f"{rows.shape[0]} positions are selected, more than max_rows = "
                             f"{max_rows}")
        pad = max_rows - rows.shape[0]
        rows = torch.cat([rows, rows.new_zeros(pad, D)])
        index = torch.cat([index, index.new_full((pad,), -1)])
    return rows, index


def scatter_image_features(inputs_embeds: Tensor, image_mask: Tensor,
                           image_features: Tensor) -> Tensor:
    """Hugging Face LLaVA's merge: ``masked_scatter`` of the features at the image tokens."""
    mask = image_mask[..., None].expand_as(inputs_embeds)
    return inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.dtype))
