"""The eager building blocks of the reference models, and their fused counterparts.

Every eager class here is plain PyTorch (the math of :mod:`mmkernels.reference`, or
the idiom the original models use). Each fused class is a subclass of its eager class
that adds **no parameters, buffers or attributes**: it only overrides ``forward`` to
call the fused functional API. That is what lets :func:`mmkernels.models.patch` swap
a module's class in place: the module object, its parameters (an optimizer that holds
them keeps working), its hooks and its ``state_dict`` all stay as they are.

Eager class -> fused class (registered in :mod:`mmkernels.models.patching`):

==========================  ================================  =============================
eager                       fused                             kernel
==========================  ================================  =============================
PaddedSelfAttention         FusedPaddedSelfAttention          varlen_attention (+ unpad)
PackedSelfAttention         FusedPackedSelfAttention          varlen_attention
BertBiAttention             mmkernels.nn.BiAttention          co_attention (+ unpad)
RegionPooling               FusedRegionPooling                region_features
RandomTokenMasking          FusedRandomTokenMasking           random_masking
MaskedRowSelect             FusedMaskedRowSelect              masked_select_rows
ImageFeatureMerge           FusedImageFeatureMerge            scatter_image_features
InfoNCELoss                 FusedInfoNCELoss                  info_nce
SigmoidContrastiveLoss      FusedSigmoidContrastiveLoss       sigmoid_contrastive
==========================  ================================  =============================
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mmkernels import reference
from mmkernels.ops.contrastive import info_nce, sigmoid_contrastive
from mmkernels.ops.roi_align import region_features
from mmkernels.ops.token_gather import masked_select_rows, random_masking, scatter_image_features
from mmkernels.ops.varlen_attention import varlen_attention

# ---------------------------------------------------------------------------------
# attention cores (no parameters: the projections live in the model)
# ---------------------------------------------------------------------------------


def _check_heads(q: Tensor, k: Tensor, v: Tensor, rank: int) -> None:
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, Tensor) or t.dim() != rank:
            raise ValueError(f"{n} must be a {rank}-d Tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must "
                         "share all but the heads dim (and k, v must match)")
    if q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"q's heads ({q.shape[-2]}) must be a multiple of k's ({k.shape[-2]})")


def _eager_attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float,
                     dropout_p: float) -> Tensor:
    """softmax(q k^T * scale, masked to ``visible``) v, heads first.

    q (..., H, Lq, D), k/v (..., H_kv, Lk, D), visible broadcastable to (..., H, Lq, Lk)
    bool. GQA repeats the k/v heads. The softmax runs in float32 (or float64). A row
    with no visible key gives zeros.
    """
    rep = q.shape[-3] // k.shape[-3]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    # a row with no visible key gives zeros (not softmax's NaN); a NaN input stays NaN
    probs = torch.softmax(scores, dim=-1).masked_fill(~visible.any(-1, keepdim=True), 0.0)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return (probs @ v.to(acc)).to(q.dtype)


class PaddedSelfAttention(nn.Module):
    """Eager multi-head attention core over a padded batch (BERT, ViT, CLIP text).

    forward(q (B, L, H, D), k (B, L, H_kv, D), v (B, L, H_kv, D),
    key_padding_mask: optional (B, L) bool, True at real tokens) -> (B, L, H, D) in q's
    dtype. ``causal`` masks keys after the query. Outputs at padded query positions are
    zeros (their values are never used; the fused version does not compute them).
    H % H_kv == 0 (GQA).
    """

    def __init__(self, causal: bool = False, dropout: float = 0.0,
                 softmax_scale: float | None = None) -> None:
        super().__init__()
        self.causal, self.dropout, self.softmax_scale = bool(causal), float(dropout), softmax_scale

    def _scale(self, head_dim: int) -> float:
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def _p(self) -> float:
        return self.dropout if self.training else 0.0

    def forward(self, q: Tensor, k: Tensor, v: Tensor,
                key_padding_mask: Tensor | None = None) -> Tensor:
        _check_heads(q, k, v, 4)
        B, L = q.shape[:2]
        visible = torch.ones(L, L, dtype=torch.bool, device=q.device)
        if self.causal:
            visible = visible.tril()
        if key_padding_mask is not None:
            visible = visible & key_padding_mask[:, None, None, :]
        out = _eager_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), visible,
                               self._scale(q.shape[-1]), self._p()).transpose(1, 2)
        if key_padding_mask is not None:
            out = out.masked_fill(~key_padding_mask[:, :, None, None], 0.0)
        return out

    def extra_repr(self) -> str:
        return f"causal={self.causal}, dropout={self.dropout}"


def padded_varlen_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
                            **varlen_kwargs) -> Tensor:
    """:func:`mmkernels.varlen_attention` over a padded batch, without work on padding.

    q: (B, L_q, H, D); k, v: (B, L_k, H_kv, D). Causal: L_q <= L_k, the queries are the
    last L_q key positions (a decoding step over a cache when L_q < L_k, bottom-right
    aligned, as flash-attn), and the query rows take the padding mask's last L_q columns
    (left padding, as Hugging Face's flash-attention path assumes). Not causal with
    L_q != L_k: cross-attention, every query is real and only the keys are masked.
    key_padding_mask: optional (B, L_k) bool, True at real tokens. ``varlen_kwargs`` go to varlen_attention
    (``softmax_scale``, ``causal``, ``dropout_p``).

    Without a mask the batch is viewed as B packed sequences (no copy when the layout
    allows). With one, only the real rows are gathered (one
    :func:`mmkernels.masked_select_rows` of q, k and v together when L_q == L_k),
    attended and scattered back. Returns (B, L_q, H, D) in q's dtype, zeros at padded
    query positions.
    """
    B, Lq, H, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    causal = bool(varlen_kwargs.get("causal", False))
    if causal and Lq > Lk:
        raise ValueError(f"q has {Lq} positions but k only {Lk}: causal queries must be the "
                         "last L_q of the L_k key positions")
    if B == 0 or Lq == 0 or Lk == 0:  # nothing to attend (a row without keys gives zeros)
        return q.new_zeros(B, Lq, H, D)
    step = functools.partial(torch.arange, dtype=torch.int32, device=q.device)
    if key_padding_mask is not None and not causal and Lq != Lk:
        # cross-attention (an encoder's padded keys): every query is real
        kv_rows, _ = masked_select_rows(torch.cat([k, v], dim=2).reshape(B, Lk, 2 * Hkv * D),
                                        key_padding_mask)
        ks, vs = kv_rows.view(-1, 2 * Hkv, D).split([Hkv, Hkv], dim=1)
        zero = torch.zeros(1, dtype=torch.int32, device=q.device)
        cu_k = torch.cat([zero, key_padding_mask.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32)])
        out = varlen_attention(q.reshape(B * Lq, H, D), ks, vs, step(0, (B + 1) * Lq, Lq), cu_k,
                               Lq, Lk, **varlen_kwargs)
        return out.view(B, Lq, H, D)
    if key_padding_mask is None:
        out = varlen_attention(q.reshape(B * Lq, H, D), k.reshape(B * Lk, Hkv, D),
                               v.reshape(B * Lk, Hkv, D), step(0, (B + 1) * Lq, Lq),
                               step(0, (B + 1) * Lk, Lk), Lq, Lk, **varlen_kwargs)
        return out.view(B, Lq, H, D)
    zero = torch.zeros(1, dtype=torch.int32, device=q.device)
    q_mask = key_padding_mask[:, Lk - Lq:]
    cu_k = torch.cat([zero, key_padding_mask.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32)])
    if Lq == Lk:
        qkv = torch.cat([q, k, v], dim=2).reshape(B, Lq, (H + 2 * Hkv) * D)
        rows, index = masked_select_rows(qkv, key_padding_mask)
        qs, ks, vs = rows.view(-1, H + 2 * Hkv, D).split([H, Hkv, Hkv], dim=1)
        cu_q = cu_k
    else:
        q_rows, index = masked_select_rows(q.reshape(B, Lq, H * D), q_mask)
        kv_rows, _ = masked_select_rows(torch.cat([k, v], dim=2).reshape(B, Lk, 2 * Hkv * D),
                                        key_padding_mask)
        qs = q_rows.view(-1, H, D)
        ks, vs = kv_rows.view(-1, 2 * Hkv, D).split([Hkv, Hkv], dim=1)
        cu_q = torch.cat([zero, q_mask.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32)])
    out = varlen_attention(qs, ks, vs, cu_q, cu_k, Lq, Lk, **varlen_kwargs)
    full = torch.ops.mmkernels._scatter_rows(out.reshape(-1, H * D), index, B * Lq)
    return full.view(B, Lq, H, D)


class FusedPaddedSelfAttention(PaddedSelfAttention):
    """:class:`PaddedSelfAttention` with :func:`mmkernels.varlen_attention`
    (:func:`padded_varlen_attention`: without a padding mask the batch is B packed
    sequences of length L, no copy; with one, only the real tokens are gathered,
    attended and scattered back, zeros at padded positions: no work on padding)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor,
                key_padding_mask: Tensor | None = None) -> Tensor:
        _check_heads(q, k, v, 4)
        return padded_varlen_attention(q, k, v, key_padding_mask,
                                       softmax_scale=self._scale(q.shape[-1]), causal=self.causal,
                                       dropout_p=self._p())


def segment_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """(total,) int64: the sequence each packed token belongs to."""
    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def packed_visibility(cu_seqlens: Tensor, total: int, causal: bool,
                      block_ids: Tensor | None = None) -> Tensor:
    """(total, total) bool: which packed key each packed query may see. Same sequence;
    with ``causal``, keys at or before the query, or in the query's image block
    (block id != 0)."""
    seg = segment_ids(cu_seqlens, total)
    visible = seg[:, None] == seg[None, :]
    if causal:
        pos = torch.arange(total, device=cu_seqlens.device)
        allowed = pos[None, :] <= pos[:, None]
        if block_ids is not None:
            allowed = allowed | ((block_ids[:, None] == block_ids[None, :]) & (block_ids[:, None] != 0))
        visible = visible & allowed
    return visible


class PackedSelfAttention(nn.Module):
    """Eager attention core over packed sequences (LLaVA-style padding-free batches).

    forward(q (T, H, D), k (T, H_kv, D), v (T, H_kv, D), cu_seqlens (S + 1,) int32,
    max_seqlen: int, block_ids: optional (T,) int32) -> (T, H, D) in q's dtype.
    Tokens attend only within their own sequence; with ``causal``, to earlier tokens
    and, both ways, to the tokens of their own image block (``block_ids`` != 0, as
    :func:`mmkernels.varlen_attention`). The eager version builds the dense (T, T)
    mask, as Hugging Face's eager attention does for packed position_ids.
    """

    def __init__(self, causal: bool = True, dropout: float = 0.0,
                 softmax_scale: float | None = None) -> None:
        super().__init__()
        self.causal, self.dropout, self.softmax_scale = bool(causal), float(dropout), softmax_scale

    _scale = PaddedSelfAttention._scale
    _p = PaddedSelfAttention._p
    extra_repr = PaddedSelfAttention.extra_repr

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                block_ids: Tensor | None = None) -> Tensor:
        _check_heads(q, k, v, 3)
        visible = packed_visibility(cu_seqlens, q.shape[0], self.causal, block_ids)
        return _eager_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), visible,
                                self._scale(q.shape[-1]), self._p()).transpose(0, 1)


class FusedPackedSelfAttention(PackedSelfAttention):
    """:class:`PackedSelfAttention` with :func:`mmkernels.varlen_attention` (no (T, T)
    mask, no work across sequence boundaries)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                block_ids: Tensor | None = None) -> Tensor:
        _check_heads(q, k, v, 3)
        return varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                softmax_scale=self._scale(q.shape[-1]), causal=self.causal,
                                block_ids=block_ids if self.causal else None,
                                dropout_p=self._p())


# ---------------------------------------------------------------------------------
# region features, token masking and gathers
# ---------------------------------------------------------------------------------


class RegionPooling(nn.Module):
    """Eager pooled region vectors: RoIAlign then the mean over the bins.

    forward(features (N, C, H, W), rois (K, 5) float [batch_index, x1, y1, x2, y2])
    -> (K, C), features' dtype. As Faster R-CNN's pooled region features that ViLBERT
    takes (``roi_align(...).mean((2, 3))``, materialising (K, C, PH, PW)), with
    torchvision's RoIAlign when torchvision is installed, else
    :func:`mmkernels.reference.region_features` (same numbers).
    """

    def __init__(self, output_size=(7, 7), spatial_scale: float = 1.0, sampling_ratio: int = 2,
                 aligned: bool = True) -> None:
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.output_size = tuple(int(s) for s in output_size)
        self.spatial_scale, self.sampling_ratio = float(spatial_scale), int(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, features: Tensor, rois: Tensor) -> Tensor:
        try:  # what a ViLBERT pipeline runs (detectron2 / torchvision RoIAlign)
            from torchvision.ops import roi_align as tv_roi_align
        except ImportError:  # plain PyTorch: the same numbers, slower
            return reference.region_features(features, rois, self.output_size,
                                             self.spatial_scale, self.sampling_ratio, self.aligned)
        return tv_roi_align(features, rois, self.output_size, self.spatial_scale,
                            self.sampling_ratio, self.aligned).mean((2, 3))

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")


class FusedRegionPooling(RegionPooling):
    """:class:`RegionPooling` with :func:`mmkernels.region_features` (no (K, C, PH, PW))."""

    def forward(self, features: Tensor, rois: Tensor) -> Tensor:
        return region_features(features, rois, self.output_size, self.spatial_scale,
                               self.sampling_ratio, self.aligned)


class RandomTokenMasking(nn.Module):
    """Eager MAE / FLIP random token masking (MAE's ``random_masking``).

    forward(x (B, N, D), noise: optional (B, N) float) -> (x_kept (B, N_keep, D),
    mask (B, N) x's dtype (1 = removed), ids_restore (B, N) int64), with
    ``N_keep = int(N * (1 - mask_ratio))``. The noise, when not given, is drawn with
    ``torch.rand`` on x's device (both versions draw it the same way, so a seeded
    eager and fused run mask the same tokens). In eval mode, or with
    ``mask_ratio == 0``, x is returned whole (mask zeros, ids_restore the identity).
    """

    def __init__(self, mask_ratio: float) -> None:
        super().__init__()
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
        self.mask_ratio = float(mask_ratio)

    def _noise(self, x: Tensor, noise: Tensor | None) -> Tensor:
        return noise if noise is not None else torch.rand(x.shape[:2], device=x.device)

    def _unmasked(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N = x.shape[:2]
        ids = torch.arange(N, device=x.device).expand(B, N)
        return x, x.new_zeros(B, N), ids

    def forward(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        if not self.training or self.mask_ratio == 0.0:
            return self._unmasked(x)
        n_keep = int(x.shape[1] * (1 - self.mask_ratio))
        return reference.random_masking(x, n_keep, self._noise(x, noise))

    def extra_repr(self) -> str:
        return f"mask_ratio={self.mask_ratio}"


class FusedRandomTokenMasking(RandomTokenMasking):
    """:class:`RandomTokenMasking` with :func:`mmkernels.random_masking`."""

    def forward(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        if not self.training or self.mask_ratio == 0.0:
            return self._unmasked(x)
        return random_masking(x, self.mask_ratio, noise=self._noise(x, noise))


class MaskedRowSelect(nn.Module):
    """Eager ``x[mask]``: the hidden states at the selected positions.

    forward(x (B, N, D), mask (B, N) bool) -> (rows (M, D), index (M,) int64 flat
    positions b * N + n), M = mask.sum(), row-major order of mask.
    """

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return reference.masked_select_rows(x, mask)


class FusedMaskedRowSelect(MaskedRowSelect):
    """:class:`MaskedRowSelect` with :func:`mmkernels.masked_select_rows`."""

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return masked_select_rows(x, mask)


class ImageFeatureMerge(nn.Module):
    """Eager LLaVA merge (Hugging Face's ``masked_scatter``).

    forward(inputs_embeds (B, L, D), image_mask (B, L) bool, image_features
    (num_image_tokens, D)) -> (B, L, D): the t-th image position takes feature row t.
    A count mismatch raises HF's ValueError.
    """

    def forward(self, inputs_embeds: Tensor, image_mask: Tensor, image_features: Tensor) -> Tensor:
        return reference.scatter_image_features(inputs_embeds, image_mask, image_features)


class FusedImageFeatureMerge(ImageFeatureMerge):
    """:class:`ImageFeatureMerge` with :func:`mmkernels.scatter_image_features`."""

    def forward(self, inputs_embeds: Tensor, image_mask: Tensor, image_features: Tensor) -> Tensor:
        return scatter_image_features(inputs_embeds, image_mask, image_features)


# ---------------------------------------------------------------------------------
# contrastive losses
# ---------------------------------------------------------------------------------


def _world(process_group) -> tuple[object, int, int]:
    """(group, world size, rank): the given group, else the initialised default group,
    else one process (the rule of :func:`mmkernels.info_nce`)."""
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None, 1, 0
        process_group = dist.group.WORLD
    return process_group, dist.get_world_size(process_group), dist.get_rank(process_group)


def _gather_with_grad(x: Tensor, group) -> Tensor:
    """All ranks' rows, concatenated; the backward sums each rank's gradient back to it
    (open_clip's ``gather_with_grad=True``)."""
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x.contiguous(), group=group))


class InfoNCELoss(nn.Module):
    """Eager CLIP loss, materialising the logits (open_clip ``ClipLoss``).

    forward(image_features (B, D), text_features (B, D), logit_scale (one element,
    already exponentiated)) -> scalar. Distributed when ``process_group`` (or an
    initialised default group) has more than one rank: open_clip's
    ``local_loss=True, gather_with_grad=True`` (local rows against every rank's
    columns; equal local batches).
    """

    def __init__(self, process_group=None) -> None:
        super().__init__()
        self.process_group = process_group

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
        group, world, rank = _world(self.process_group)
        if world == 1:
            return reference.info_nce(image_features, text_features, logit_scale)
        all_image = _gather_with_grad(image_features, group)
        all_text = _gather_with_grad(text_features, group)
        B = image_features.shape[0]
        labels = torch.arange(B, device=image_features.device) + rank * B
        return (F.cross_entropy(logit_scale * image_features @ all_text.T, labels)
                + F.cross_entropy(logit_scale * text_features @ all_image.T, labels)) / 2


class FusedInfoNCELoss(InfoNCELoss):
    """:class:`InfoNCELoss` with :func:`mmkernels.info_nce` (no B x B logits)."""

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
        return info_nce(image_features, text_features, logit_scale,
                        process_group=self.process_group)


class SigmoidContrastiveLoss(nn.Module):
    """Eager SigLIP loss, materialising the logits (open_clip ``SigLipLoss``).

    forward(image_features (B, D), text_features (B, D), logit_scale, logit_bias (one
    element each)) -> scalar. Distributed as :class:`InfoNCELoss`: the local images
    against every rank's texts (positives in this rank's block), divided by the local
    batch.
    """

    def __init__(self, process_group=None) -> None:
        super().__init__()
        self.process_group = process_group

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Tensor) -> Tensor:
        group, world, rank = _world(self.process_group)
        if world == 1:
            return reference.sigmoid_contrastive(image_features, text_features, logit_scale,
                                                 logit_bias)
        all_text = _gather_with_grad(text_features, group)
        B = image_features.shape[0]
        logits = logit_scale * image_features @ all_text.T + logit_bias
        z = -torch.ones_like(logits)
        z[:, rank * B:(rank + 1) * B] += 2 * torch.eye(B, device=logits.device, dtype=logits.dtype)
        return -F.logsigmoid(z * logits).sum() / B


class FusedSigmoidContrastiveLoss(SigmoidContrastiveLoss):
    """:class:`SigmoidContrastiveLoss` with :func:`mmkernels.sigmoid_contrastive`."""

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Tensor) -> Tensor:
        return sigmoid_contrastive(image_features, text_features, logit_scale, logit_bias,
                                   process_group=self.process_group)
