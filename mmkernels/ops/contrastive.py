"""Large-batch contrastive losses without the B x B matrix: ``info_nce`` (CLIP) and
``sigmoid_contrastive`` (SigLIP), on one process or across processes.

Only (chunk x B_global) panels of similarities exist at any time: the row and column
log-sum-exps are accumulated panel by panel in the forward (each panel serves both
directions), and the backward recomputes the panels (``lse_rows_and_cols``,
``lse_backward``, ``siglip_panels`` in mmkernels.reference), behind the custom ops
``mmkernels::info_nce_fwd/_bwd`` and ``mmkernels::sigmoid_contrastive_fwd``.

Distributed (``process_group``, or an initialised default group with world size > 1):
each rank passes its local features and the loss is that of open_clip's
``ClipLoss(local_loss=True, gather_with_grad=True)``: local image rows against every
global text, local text rows against every global image, labels offset by the rank.
Features move by a *chunked all-gather*: every rank contributes its (B_local, D) block
(uneven local batches are padded to the largest for the collective and unpadded), so
a rank holds O(B_global * D) features and (chunk x B_global) panels, never a
B_local x B_global matrix. In the backward, the gradients a rank computes for the other
ranks' features (its columns) are summed across ranks with one all-reduce of the
(B_global, D) buffers, the same sum open_clip's all_gather backward performs. An
all-gather rather than a send/recv ring because NCCL and gloo both implement it with
bandwidth-optimal algorithms, the features are small next to the panel compute, and
one collective per direction keeps the backward deterministic.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mmkernels import reference

__all__ = ["info_nce", "sigmoid_contrastive"]


# ---------------------------------------------------------------------------------
# collectives
# ---------------------------------------------------------------------------------


def _group_info(process_group):
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None, 1, 0
        process_group = dist.group.WORLD
    return process_group, dist.get_world_size(process_group), dist.get_rank(process_group)


def _gather_rows(x: Tensor, sizes: list[int], group) -> Tensor:
    """All-gather (B_r, D) blocks of possibly different B_r into (sum B_r, D)."""
    biggest = max(sizes)
    padded = x.new_zeros(biggest, x.shape[1])
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous(), group=group)
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


def _sizes(x: Tensor, group, world: int) -> list[int]:
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    out = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(out, n, group=group)
    return [int(t.item()) for t in out]


def _info_nce_value(image: Tensor, text: Tensor, scale: Tensor, lse_i: Tensor,
                    lse_t: Tensor) -> Tensor:
    """(sum lse_i + sum lse_t) / (2B) - s * sum_i I_i . T_i / B, in the LSEs' dtype."""
    B, acc = image.shape[0], lse_i.dtype
    pos = (image.to(acc) * text.to(acc)).sum()
    return (lse_i.sum() + lse_t.sum()) / (2 * B) - scale.to(acc) * pos / B


def _add_positive_grads(image: Tensor, text: Tensor, scale: Tensor, d_i: Tensor, d_t: Tensor,
                        d_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Add the gradients of -s * sum_i I_i . T_i / B to the log-sum-exp gradients."""
    B, acc = image.shape[0], d_i.dtype
    s = scale.to(acc)
    return (d_i - s * text.to(acc) / B, d_t - s * image.to(acc) / B,
            d_s - (image.to(acc) * text.to(acc)).sum() / B)


class _InfoNCEDistributed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, chunk, group, world, rank):
        sizes = _sizes(image, group, world)
        all_i = _gather_rows(image.detach(), sizes, group)
        all_t = _gather_rows(text.detach(), sizes, group)
        lse_i, _ = reference.lse_rows_and_cols(image, all_t, scale, chunk, with_cols=False)
        lse_t, _ = reference.lse_rows_and_cols(text, all_i, scale, chunk, with_cols=False)
        loss = _info_nce_value(image, text, scale, lse_i, lse_t)
        ctx.save_for_backward(image, text, scale, lse_i, lse_t, all_i, all_t)
        ctx.meta = (chunk, group, sum(sizes[:rank]))
        return loss.to(image.dtype)

    @staticmethod
    def backward(ctx, grad):
        image, text, scale, lse_i, lse_t, all_i, all_t = ctx.saved_tensors
        chunk, group, offset = ctx.meta
        B = image.shape[0]
        acc = lse_i.dtype
        w = 1.0 / (2 * B)
        g = grad.to(acc)
        d_i, d_all_t, ds1 = reference.lse_backward(image, all_t, scale, lse_i, None, w, 0.0, chunk)
        d_t, d_all_i, ds2 = reference.lse_backward(text, all_i, scale, lse_t, None, w, 0.0, chunk)
        d_i, d_t, d_s = _add_positive_grads(image, text, scale, d_i, d_t, ds1 + ds2)
        d_i, d_t, d_s = g * d_i, g * d_t, g * d_s
        # gradients for every rank's features (this rank's columns), summed over ranks
        cols = torch.cat([d_all_i, d_all_t]).mul_(g)
        dist.all_reduce(cols, group=group)
        N = all_i.shape[0]
        d_i += cols[offset:offset + B]
        d_t += cols[N + offset:N + offset + B]
        return (d_i.to(image.dtype), d_t.to(text.dtype),
                d_s.to(scale.dtype).reshape(scale.shape), None, None, None, None)


class _SigLIPDistributed(torch.autograd.Function):
    """open_clip SigLipLoss across ranks: local images against every global text, the
    positives at this rank's own block; divided by the local batch. Gradients come from
    the forward's panels (see _siglip_fwd); the text gradients of the other
    ranks' blocks are summed across ranks in the backward."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, chunk, group, world, rank):
        sizes = _sizes(image, group, world)
        all_t = _gather_rows(text.detach(), sizes, group)
        offset = sum(sizes[:rank])
        B = image.shape[0]
        total, d_i, d_all_t, d_s, d_b = reference.siglip_panels(
            image, all_t, scale, bias, chunk, offset, grad_weight=1.0 / B)
        ctx.save_for_backward(d_i, d_all_t, d_s, d_b)
        ctx.meta = (group, offset, B, image.dtype, scale.shape, bias.shape)
        return (total / B).to(image.dtype)

    @staticmethod
    def backward(ctx, grad):
        d_i, d_all_t, d_s, d_b = ctx.saved_tensors
        group, offset, B, dtype, s_shape, b_shape = ctx.meta
        g = grad.to(d_i.dtype)
        cols = (d_all_t * g).contiguous()
        dist.all_reduce(cols, group=group)
        return ((g * d_i).to(dtype), cols[offset:offset + B].to(dtype),
                (g * d_s).to(dtype).reshape(s_shape), (g * d_b).to(dtype).reshape(b_shape),
                None, None, None, None)


# ---------------------------------------------------------------------------------
# single-process ops (torch.library: fake kernels, autograd, opcheck-clean)
# ---------------------------------------------------------------------------------


@torch.library.custom_op("mmkernels::info_nce_fwd", mutates_args=())
def _info_nce_fwd(image: Tensor, text: Tensor, scale: Tensor, chunk: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """loss (scalar, image's dtype), lse_row (B,), lse_col (B,) (float32 or float64)."""
    lse_r, lse_c = reference.lse_rows_and_cols(image, text, scale, chunk, with_cols=True)
    return _info_nce_value(image, text, scale, lse_r, lse_c).to(image.dtype), lse_r, lse_c


@_info_nce_fwd.register_fake
def _(image, text, scale, chunk):
    acc = torch.float64 if image.dtype == torch.float64 else torch.float32
    B = image.shape[0]
    return image.new_empty(()), image.new_empty((B,), dtype=acc), image.new_empty((B,), dtype=acc)


@torch.library.custom_op("mmkernels::info_nce_bwd", mutates_args=())
def _info_nce_bwd(grad: Tensor, image: Tensor, text: Tensor, scale: Tensor, lse_r: Tensor,
                  lse_c: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    B = image.shape[0]
    w = 1.0 / (2 * B)
    d_i, d_t, d_s = _add_positive_grads(
        image, text, scale, *reference.lse_backward(image, text, scale, lse_r, lse_c, w, w, chunk))
    g = grad.to(lse_r.dtype)
    return (g * d_i).to(image.dtype), (g * d_t).to(text.dtype), (g * d_s).to(scale.dtype)


@_info_nce_bwd.register_fake
def _(grad, image, text, scale, lse_r, lse_c, chunk):
    return torch.empty_like(image), torch.empty_like(text), scale.new_empty(())


def _info_nce_setup(ctx, inputs, output):
    image, text, scale, chunk = inputs
    _, lse_r, lse_c = output
    ctx.save_for_backward(image, text, scale, lse_r, lse_c)
    ctx.chunk = chunk
    ctx.mark_non_differentiable(lse_r, lse_c)


def _info_nce_backward(ctx, grad, _g_r, _g_c):
    image, text, scale, lse_r, lse_c = ctx.saved_tensors
    d_i, d_t, d_s = _info_nce_bwd(grad, image, text, scale, lse_r, lse_c, ctx.chunk)
    return d_i, d_t, d_s, None


_info_nce_fwd.register_autograd(_info_nce_backward, setup_context=_info_nce_setup)


@torch.library.custom_op("mmkernels::sigmoid_contrastive_fwd", mutates_args=())
def _siglip_fwd(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, chunk: int,
                with_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """loss, and (with_grad) the gradients of the loss w.r.t. image, text, scale, bias from
    the same panels (each element's gradient depends on its own logit only); without
    with_grad the four are empty."""
    B = image.shape[0]
    if with_grad:
        total, d_i, d_t, d_s, d_b = reference.siglip_panels(image, text, scale, bias, chunk, 0,
                                                            grad_weight=1.0 / B)
        return ((total / B).to(image.dtype), d_i.to(image.dtype), d_t.to(text.dtype),
                d_s.to(scale.dtype), d_b.to(bias.dtype))
    total = reference.siglip_panels(image, text, scale, bias, chunk, 0)
    return ((total / B).to(image.dtype), image.new_empty((0, image.shape[1])),
            text.new_empty((0, text.shape[1])), scale.new_empty(()), bias.new_empty(()))


@_siglip_fwd.register_fake
def _(image, text, scale, bias, chunk, with_grad):
    if with_grad:
        return (image.new_empty(()), torch.empty_like(image), torch.empty_like(text),
                scale.new_empty(()), bias.new_empty(()))
    return (image.new_empty(()), image.new_empty((0, image.shape[1])),
            text.new_empty((0, text.shape[1])), scale.new_empty(()), bias.new_empty(()))


def _siglip_setup(ctx, inputs, output):
    _, d_i, d_t, d_s, d_b = output
    ctx.save_for_backward(d_i, d_t, d_s, d_b)
    ctx.with_grad = inputs[5]
    ctx.mark_non_differentiable(d_i, d_t, d_s, d_b)


def _siglip_backward(ctx, grad, *_):
    if not ctx.with_grad:
        raise RuntimeError("sigmoid_contrastive: the forward ran without gradients "
                           "(with_grad=False); call it with grad enabled to backpropagate")
    d_i, d_t, d_s, d_b = ctx.saved_tensors
    return grad * d_i, grad * d_t, grad * d_s, grad * d_b, None, None


_siglip_fwd.register_autograd(_siglip_backward, setup_context=_siglip_setup)


# ---------------------------------------------------------------------------------
# functional API
# ---------------------------------------------------------------------------------


def _check(image_features, text_features, logit_scale, logit_bias=None, bias_name=None):
    for t, n in ((image_features, "image_features"), (text_features, "text_features")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{n} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{n} must be (B, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{n} must be floating point, got {t.dtype}")
    if image_features.shape != text_features.shape:
        raise ValueError(f"image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must have the same (B, D)")
    if image_features.dtype != text_features.dtype:
        raise TypeError("image_features and text_features must share a dtype")
    if image_features.device != text_features.device:
        raise ValueError("image_features and text_features must be on one device")
    if image_features.shape[1] > 4096:
        raise ValueError(f"feature dim must be <= 4096, got {image_features.shape[1]}")
    for t, n in ((logit_scale, "logit_scale"), (logit_bias, bias_name)):
        if n is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{n} must be a Tensor (a scalar parameter), got {type(t).__name__}")
        if t.numel() != 1:
            raise ValueError(f"{n} must be a scalar (one element), got shape {tuple(t.shape)}")


def _chunk(chunk_size, cols):
    if chunk_size is None:
        return reference.default_chunk(cols)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def info_nce(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, *,
             chunk_size: int | None = None, process_group=None) -> Tensor:
    """CLIP's symmetric InfoNCE without the B x B logits.

    ``(CE(s I T^T, arange) + CE(s T I^T, arange)) / 2`` with ``s = logit_scale`` already
    exponentiated, as open_clip's ClipLoss. Features are used as given (normalise them
    first, as CLIP does).

    Args:
        image_features, text_features: (B, D), one float dtype, D <= 4096.
        logit_scale: a one-element tensor; it receives a gradient.
        chunk_size: rows per (chunk x B) panel (default: about 32 MiB panels).
        process_group: distributed group (default: the initialised world, if any, with
            world size > 1). Each rank passes its local features; the value and the
            gradients equal open_clip ``ClipLoss(local_loss=True, gather_with_grad=True)``.

    Returns:
        The scalar loss (features' dtype; accumulation in float32, or float64 for
        float64). Memory: O(B * D) plus one (chunk x B) panel set; never B x B.
        NaN features give a NaN loss (never a silent number).
    """
    _check(image_features, text_features, logit_scale)
    group, world, rank = _group_info(process_group)
    scale = logit_scale.reshape(())
    if world > 1:
        chunk = _chunk(chunk_size, image_features.shape[0] * world)
        return _InfoNCEDistributed.apply(image_features, text_features, scale, chunk, group,
                                         world, rank)
    chunk = _chunk(chunk_size, image_features.shape[0])
    return _info_nce_fwd(image_features, text_features, scale, chunk)[0]


def sigmoid_contrastive(image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                        logit_bias: Tensor, *, chunk_size: int | None = None,
                        process_group=None) -> Tensor:
    """SigLIP's sigmoid loss without the B x B logits.

    ``-sum_ij logsigmoid(z_ij (s I_i . T_j + b)) / B`` with z = +1 on the diagonal and -1
    elsewhere, normalised as open_clip's SigLipLoss. Distributed: each rank's local images
    against every global text (positives in its own block), divided by the local batch,
    as SigLipLoss with world_size > 1 (whose neighbour exchange passes gradients back the
    same way). Args as :func:`info_nce`, plus ``logit_bias`` (one element, gets a gradient).
    """
    _check(image_features, text_features, logit_scale, logit_bias, "logit_bias")
    group, world, rank = _group_info(process_group)
    scale, bias = logit_scale.reshape(()), logit_bias.reshape(())
    if world > 1:
        chunk = _chunk(chunk_size, image_features.shape[0] * world)
        return _SigLIPDistributed.apply(image_features, text_features, scale, bias, chunk, group,
                                        world, rank)
    chunk = _chunk(chunk_size, image_features.shape[0])
    with_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (image_features, text_features, scale, bias))
    return _siglip_fwd(image_features, text_features, scale, bias, chunk, with_grad)[0]
