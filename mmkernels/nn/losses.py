"""Drop-in contrastive loss modules with open_clip's constructors and forward signatures."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn

from mmkernels.ops import contrastive as _ops


def _where(world_size: int, rank: int) -> tuple[object, int, int]:
    """(group, world, rank) as open_clip decides it: one process (no collective at all,
    even under an initialised process group) unless world_size > 1; then the default
    group, which must have world_size ranks, this process being rank ``rank``."""
    if world_size <= 1:
        return None, 1, 0
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"world_size={world_size} needs torch.distributed initialised")
    actual, me = dist.get_world_size(), dist.get_rank()
    if world_size != actual:
        raise ValueError(f"world_size={world_size} but torch.distributed's default group has "
                         f"{actual} ranks")
    if rank != me:
        raise ValueError(f"rank={rank} but this process is rank {me} of torch.distributed's "
                         "default group")
    return dist.group.WORLD, world_size, rank


class ClipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.ClipLoss``, without the B x B logits.

    ``forward(image_features (B, D), text_features (B, D), logit_scale, logit_bias=None,
    output_dict=False)``. With ``world_size > 1`` the loss is open_clip's
    ``local_loss=True, gather_with_grad=True`` configuration (the memory-scalable one);
    ``local_loss=False`` or ``gather_with_grad=False`` raise, since their gradients
    differ and they hold the global B x B logits. ``cache_labels`` is accepted (there are
    no labels to cache). ``logit_bias`` is added to every logit, as open_clip does.
    With the default ``world_size=1`` the loss is local and issues no collective, even
    under an initialised process group (open_clip's semantics: rank-0-only evaluation
    works); ``world_size``/``rank`` must match the default group when > 1.
    ``mode`` (``"all_gather"`` or ``"ring"``) chooses how the ranks exchange features,
    as in :func:`mmkernels.info_nce`: the same loss and gradients, ring holding
    O(B_local D) per rank instead of O(B_global D); it matters only when
    ``world_size > 1``.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, chunk_size: int | None = None,
                 mode: str = "all_gather") -> None:
        super().__init__()
        self.mode = _ops.check_mode(mode)
        if world_size > 1 and not (local_loss and gather_with_grad):
            raise ValueError("mmkernels ClipLoss with world_size > 1 implements "
                             "local_loss=True, gather_with_grad=True (see its docstring)")
        if use_horovod:
            raise ValueError("use_horovod is not supported; use torch.distributed")
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.chunk_size = chunk_size

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Tensor | None = None, output_dict: bool = False):
        if logit_bias is not None:
            # a constant added to every logit cancels in each softmax
            logit_scale = logit_scale + 0 * logit_bias
        loss = _ops._info_nce_on(image_features, text_features, logit_scale, self.chunk_size,
                                 *_where(self.world_size, self.rank), mode=self.mode)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, world_size={self.world_size}, chunk_size={self.chunk_size}, "
                f"mode={self.mode!r}")


class SigLipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.SigLipLoss``, without the B x B logits.

    ``forward(image_features, text_features, logit_scale, logit_bias, output_dict=False)``;
    ``logit_bias=None`` adds no bias, as open_clip. ``dist_impl`` is accepted for
    compatibility: every exchange pattern gives the same loss and gradients, which the
    all-gather implementation computes. Local (no collective) unless ``world_size > 1``,
    as :class:`ClipLoss`. ``mode`` (``"all_gather"`` or ``"ring"``), as
    :class:`ClipLoss` and :func:`mmkernels.sigmoid_contrastive`.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: str | None = None, chunk_size: int | None = None,
                 mode: str = "all_gather") -> None:
        super().__init__()
        self.mode = _ops.check_mode(mode)
        if dist_impl not in (None, "bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl must be bidir, shift, reduce or gather, got {dist_impl}")
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl = dist_impl or "bidir"
        self.chunk_size = chunk_size

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Tensor | None, output_dict: bool = False):
        loss = _ops._sigmoid_contrastive_on(image_features, text_features, logit_scale,
                                            logit_bias, self.chunk_size,
                                            *_where(self.world_size, self.rank),
                                            mode=self.mode)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, world_size={self.world_size}, chunk_size={self.chunk_size}, "
                f"mode={self.mode!r}")
