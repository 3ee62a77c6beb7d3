"""Large-batch contrastive losses without the B x B matrix: ``info_nce`` (CLIP) and
``sigmoid_contrastive`` (SigLIP), on one process or across processes.

Only tiles of similarities exist at any time, behind the custom ops
``mmkernels::info_nce_fwd/_bwd`` and ``mmkernels::sigmoid_contrastive_fwd``:

* InfoNCE, four GEMM passes over B^2 D: the forward computes every tile once for the
  row and the column log-sum-exps (and the positives' dot products); the backward
  recomputes each tile once, forms both directions' weights from it and runs the two
  gradient GEMMs (dI = W T, dT = W^T I) on them.
* SigLIP, three: with gradients, the forward forms each tile's loss and weights once
  and runs the two gradient GEMMs; without, one pass for the loss.

Three implementations share one interface (``lse_rows_and_cols``, ``lse_grads``,
``siglip_panels``; chosen by :func:`_path`):
  * Triton (mmkernels/triton/contrastive.py, launched by contrastive_launch.py): CUDA
    fp16/bf16/fp32, and CPU tensors under TRITON_INTERPRET=1. The weights are written
    once per tile in the features' dtype and the gradient GEMMs run on cuBLAS;
  * the tiled path of mmkernels.reference with the fused C++ panel passes
    (csrc/contrastive/): CPU tensors;
  * the same tiled path with eager passes: float64 on a GPU, builds without the
    extension, MMKERNELS_BACKEND=reference.

Precision (fp16/bf16): similarities accumulate in fp32 and every statistic is fp32;
the weights dLoss/dS are formed in fp32 with the positive pairs' term already
subtracted (P_ii - 1 cancels near convergence: rounding P first costs 2x the error),
then rounded once, scaled by a power of two so that weights of order 1/B are never
subnormal fp16 (WEIGHT_TARGET in contrastive_launch.py). Under ``torch.autocast`` the
ops take the features in the autocast dtype (as open_clip's logit matmul) and return
a float32 loss (as open_clip's cross-entropy): the tensor-core kernels, never the fp32
FMA ones.

Distributed (``process_group``, or an initialised default group with world size > 1):
see mmkernels/ops/_contrastive_dist.py for the two modes, ``all_gather`` and ``ring``,
their memory per rank and when each wins. The local batches are equal, as in
open_clip, or given on the host as ``local_batch_sizes``: sizes are never read back
from a device, so no call syncs with the host.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import Tensor
from torch.amp.autocast_mode import is_autocast_available

from mmkernels import _extension, reference
from mmkernels.ops import _contrastive_dist as cdist
from mmkernels.ops._contrastive_dist import LOCAL, Dist, group_info, local_sizes
from mmkernels.triton import contrastive_launch as launch
from mmkernels.triton.contrastive_launch import CONFIGS, INTERPRET_CONFIGS  # noqa: F401

__all__ = ["info_nce", "sigmoid_contrastive"]

# names the tests and tools use
_config = launch.config
_precision = launch.precision
_tf32_enabled = launch.tf32_enabled
_group_info = group_info
_local_sizes = local_sizes
MODES = ("all_gather", "ring")


def _uses_triton(t: Tensor) -> bool:
    return launch.uses_triton(t)


_TRITON_PATH = types.SimpleNamespace(lse_rows_and_cols=launch.lse_rows_and_cols,
                                     lse_grads=launch.lse_grads,
                                     siglip_panels=launch.siglip_panels)


class FusedCpuPasses:
    """The chunked path's panel passes as the fused C++ CPU kernels
    (csrc/contrastive/contrastive_cpu.cpp); same contract as
    reference.EagerPanelPasses."""

    @staticmethod
    def lse_panel(S, row_max, row_sum, col_max, col_sum):
        torch.ops.mmkernels.contrastive_lse_panel_(S, row_max, row_sum, col_max, col_sum)

    @staticmethod
    def grad_panel(S, row_shift, col_shift):
        torch.ops.mmkernels.contrastive_grad_panel_(S, row_shift.contiguous(), col_shift)

    @staticmethod
    def siglip_panel(L, bias, grad_weight, with_grad):
        return torch.ops.mmkernels.siglip_panel_(L, bias, grad_weight, with_grad)


# fake kernels of the C++ panel passes (they mutate their arguments in place)
if _extension.is_available():
    @torch.library.register_fake("mmkernels::contrastive_lse_panel_")
    def _(S, row_max, row_sum, col_max, col_sum):
        return None

    @torch.library.register_fake("mmkernels::contrastive_grad_panel_")
    def _(S, row_shift, col_shift):
        return None

    @torch.library.register_fake("mmkernels::siglip_panel_")
    def _(L, bias, grad_weight, with_grad):
        return L.new_empty(())


def _chunked_path(passes) -> types.SimpleNamespace:
    def lse_rows_and_cols(rows, cols, scale, chunk, with_cols, pos_offset=None):
        lse_r, lse_c = reference.lse_rows_and_cols(rows, cols, scale, chunk, with_cols,
                                                   passes=passes)
        if pos_offset is None:
            return lse_r, lse_c, None, None, None
        pos = reference.positive_dots(rows, cols, pos_offset)
        neg_r = reference.negatives_lse(scale, lse_r, pos)
        neg_c = None
        if with_cols:
            i = torch.arange(rows.shape[0], device=rows.device)
            j = i + pos_offset
            ok = (j >= 0) & (j < cols.shape[0])
            neg_c = lse_c.clone()
            neg_c[j[ok]] = reference.negatives_lse(scale, lse_c[j[ok]], pos[ok])
        return lse_r, lse_c, pos, neg_r, neg_c

    return types.SimpleNamespace(
        lse_rows_and_cols=lse_rows_and_cols,
        lse_grads=functools.partial(reference.lse_grads, passes=passes),
        siglip_panels=functools.partial(reference.siglip_panels, passes=passes))


_CPU_PATH = _chunked_path(FusedCpuPasses())
_EAGER_PATH = _chunked_path(reference.EAGER_PASSES)


def _path(t: Tensor):
    """The implementation for these features, all with the same three functions: the
    Triton kernels (CUDA fp16/bf16/fp32, or the interpreter), the chunked path with the
    fused C++ panel passes (CPU), or the chunked path with eager passes (float64 on a GPU,
    a build without the extension, or MMKERNELS_BACKEND=reference)."""
    if _extension.backend_override() == "reference":
        return _EAGER_PATH
    if _uses_triton(t):
        return _TRITON_PATH
    if t.device.type == "cpu" and _extension.has_kernel("contrastive_lse_panel_", "cpu"):
        return _CPU_PATH
    return _EAGER_PATH


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _grad_dtype(t: Tensor) -> torch.dtype:
    """The dtype of the SigLIP forward's gradient factors: the features' on the Triton
    path (the GEMM outputs), the accumulation dtype on the chunked path."""
    return t.dtype if _path(t) is _TRITON_PATH else _acc(t)


# ---------------------------------------------------------------------------------
# single-process ops (torch.library: fake kernels, autograd, autocast, opcheck-clean)
# ---------------------------------------------------------------------------------


@torch.library.custom_op("mmkernels::info_nce_fwd", mutates_args=())
def _info_nce_fwd(image: Tensor, text: Tensor, scale: Tensor, chunk: int
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """loss (scalar), lse_row (B,), lse_col (B,), pos_w (B,), all float32 (float64 for
    float64): pos_w is the positive pairs' weight in dLoss/dS, -((1 - P_ii) + (1 -
    Q_ii)) / (2B), from the negatives' log-sum-exps (no cancellation near convergence)."""
    lse_r, lse_c, pos, neg_r, neg_c = _path(image).lse_rows_and_cols(image, text, scale, chunk,
                                                                      True, 0)
    B = image.shape[0]
    pos_w = -(torch.exp(neg_r - lse_r) + torch.exp(neg_c - lse_c)) / (2 * B)
    return cdist.info_nce_value(scale, neg_r, neg_c, pos), lse_r, lse_c, pos_w


@_info_nce_fwd.register_fake
def _(image, text, scale, chunk):
    acc, B = _acc(image), image.shape[0]
    return (image.new_empty((), dtype=acc), image.new_empty((B,), dtype=acc),
            image.new_empty((B,), dtype=acc), image.new_empty((B,), dtype=acc))


@torch.library.custom_op("mmkernels::info_nce_bwd", mutates_args=())
def _info_nce_bwd(grad: Tensor, image: Tensor, text: Tensor, scale: Tensor, lse_r: Tensor,
                  lse_c: Tensor, pos_w: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    B = image.shape[0]
    c = 1.0 / (2 * B)  # the loss weight of every log-sum-exp
    d_i, d_t, d_s, _ = _path(image).lse_grads(image, text, scale, grad, lse_r, lse_c, c, c,
                                              pos_w, 0, chunk, bound=1.0 / B)
    return d_i.to(image.dtype), d_t.to(text.dtype), d_s.to(scale.dtype)


@_info_nce_bwd.register_fake
def _(grad, image, text, scale, lse_r, lse_c, pos_w, chunk):
    # the real op returns contiguous gradients whatever the features' layout
    return image.new_empty(image.shape), text.new_empty(text.shape), scale.new_empty(())


def _info_nce_setup(ctx, inputs, output):
    image, text, scale, chunk = inputs
    _, lse_r, lse_c, pos_w = output
    ctx.save_for_backward(image, text, scale, lse_r, lse_c, pos_w)
    ctx.chunk = chunk
    ctx.mark_non_differentiable(lse_r, lse_c, pos_w)


def _info_nce_backward(ctx, grad, _g_r, _g_c, _g_p):
    image, text, scale, lse_r, lse_c, pos_w = ctx.saved_tensors
    d_i, d_t, d_s = _info_nce_bwd(grad, image, text, scale, lse_r, lse_c, pos_w, ctx.chunk)
    return d_i, d_t, d_s, None


_info_nce_fwd.register_autograd(_info_nce_backward, setup_context=_info_nce_setup)


@torch.library.custom_op("mmkernels::sigmoid_contrastive_fwd", mutates_args=())
def _siglip_fwd(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, chunk: int,
                with_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """loss (float32 scalar, float64 for float64) and, with_grad, the gradients of the
    loss from the same panels (each element's gradient depends on its own logit only):
    G_image, G_text, post, d_scale, d_bias, the features' gradients being G * post;
    without with_grad the five are empty."""
    B = image.shape[0]
    path = _path(image)
    if with_grad:
        total, g_i, g_t, post, d_s, d_b = path.siglip_panels(image, text, scale, bias, chunk, 0,
                                                             grad_weight=1.0 / B)
        acc = _acc(image)
        return (total / B, g_i.to(_grad_dtype(image)), g_t.to(_grad_dtype(image)),
                post.to(acc, copy=True), d_s.to(acc), d_b.to(acc))
    total = path.siglip_panels(image, text, scale, bias, chunk, 0)
    acc = _acc(image)
    return (total / B, image.new_empty((0, image.shape[1])), text.new_empty((0, text.shape[1])),
            *(image.new_zeros((), dtype=acc) for _ in range(3)))


@_siglip_fwd.register_fake
def _(image, text, scale, bias, chunk, with_grad):
    acc, g = _acc(image), _grad_dtype(image)
    if with_grad:
        return (image.new_empty((), dtype=acc), image.new_empty(image.shape, dtype=g),
                text.new_empty(text.shape, dtype=g), image.new_empty((), dtype=acc),
                image.new_empty((), dtype=acc), image.new_empty((), dtype=acc))
    return (image.new_empty((), dtype=acc), image.new_empty((0, image.shape[1])),
            text.new_empty((0, text.shape[1])), *(image.new_empty((), dtype=acc) for _ in range(3)))


def _siglip_setup(ctx, inputs, output):
    _, g_i, g_t, post, d_s, d_b = output
    ctx.save_for_backward(g_i, g_t, post, d_s, d_b)
    ctx.with_grad = inputs[5]
    ctx.dtypes = tuple(t.dtype for t in inputs[:4])
    ctx.mark_non_differentiable(g_i, g_t, post, d_s, d_b)
    ctx.set_materialize_grads(False)  # no (B, D) zero gradients for the factor outputs


def _siglip_backward(ctx, grad, *_):
    if not ctx.with_grad:
        raise RuntimeError("sigmoid_contrastive: the forward ran without gradients "
                           "(with_grad=False); call it with grad enabled to backpropagate")
    if grad is None:  # only the (non-differentiable) factor outputs were used
        return None, None, None, None, None, None
    g_i, g_t, post, d_s, d_b = ctx.saved_tensors
    f = grad * post
    di, dt, ds, db = ctx.dtypes
    return ((g_i * f).to(di), (g_t * f).to(dt), (grad * d_s).to(ds), (grad * d_b).to(db),
            None, None)


_siglip_fwd.register_autograd(_siglip_backward, setup_context=_siglip_setup)


def _register_autocast(op, features: int) -> None:
    """Under torch.autocast (cuda or cpu), cast the first `features` arguments (the
    features, when floating point and not float64) to the autocast dtype and leave the
    scale / bias in their dtype: the GEMMs run in the autocast dtype, every statistic in
    float32, as open_clip's training (its logit matmul autocast, its loss float32)."""
    name = op._qualname if hasattr(op, "_qualname") else op
    for device in ("cuda", "cpu"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device)
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, device=device, keyset=keyset):
            dtype = torch.get_autocast_dtype(device)
            args = [a.to(dtype) if i < features and a.is_floating_point()
                    and a.dtype != torch.float64 and a.device.type == device else a
                    for i, a in enumerate(args)]
            with torch._C._ExcludeDispatchKeyGuard(keyset):
                return op(*args)

        _AUTOCAST_LIB.impl(name.split("::")[1], kernel, key, with_keyset=True)


_AUTOCAST_LIB = torch.library.Library("mmkernels", "IMPL")
_register_autocast(_info_nce_fwd, 2)
_register_autocast(_siglip_fwd, 2)


# ---------------------------------------------------------------------------------
# functional API
# ---------------------------------------------------------------------------------


#: the largest feature dim the ops accept (the kernel report checks the kernels to it)
MAX_FEATURE_DIM = 4096


def _check(image_features, text_features, logit_scale, logit_bias=None, check_bias=False):
    """Validate the inputs; every error names the argument at fault."""
    for t, n in ((image_features, "image_features"), (text_features, "text_features")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{n} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{n} must be (B, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{n} must be floating point, got {t.dtype}")
    (B, D), (B_t, D_t) = image_features.shape, text_features.shape
    if B_t != B:
        raise ValueError(f"text_features has {B_t} rows but image_features has {B}: the same "
                         "(B, D) is needed, text i being image i's pair")
    if D_t != D:
        raise ValueError(f"text_features has feature dim {D_t} but image_features has {D}: "
                         "the same (B, D) is needed")
    if text_features.dtype != image_features.dtype:
        raise TypeError(f"text_features is {text_features.dtype} but image_features is "
                        f"{image_features.dtype}: they must share a dtype")
    if text_features.device != image_features.device:
        raise ValueError(f"text_features is on {text_features.device} but image_features on "
                         f"{image_features.device}: they must be on one device")
    if B == 0:
        raise ValueError("image_features and text_features must hold at least one pair "
                         "(B >= 1); the mean over an empty batch is undefined")
    if D > MAX_FEATURE_DIM:
        raise ValueError(f"image_features: the feature dim must be <= {MAX_FEATURE_DIM}, got {D}")
    scalars = [(logit_scale, "logit_scale")] + ([(logit_bias, "logit_bias")] if check_bias else [])
    for t, n in scalars:
        if not isinstance(t, Tensor):
            raise TypeError(f"{n} must be a Tensor (a scalar parameter), got {type(t).__name__}")
        if t.numel() != 1:
            raise ValueError(f"{n} must be a scalar (one element), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{n} must be floating point, got {t.dtype}")
        if t.device != image_features.device and t.device.type != "cpu":
            raise ValueError(f"{n} is on {t.device}: it must be on the features' device "
                             f"({image_features.device}) or the CPU")


def _chunk(chunk_size, cols):
    if chunk_size is None:
        return reference.default_chunk(cols)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def check_mode(mode) -> str:
    """The distributed mode, validated: one of :data:`MODES` (ValueError naming
    ``mode`` otherwise)."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _distribution(x: Tensor, group, world: int, rank: int, local_batch_sizes, mode) -> Dist:
    check_mode(mode)
    if world <= 1:
        if local_batch_sizes is not None and tuple(local_batch_sizes) != (x.shape[0],):
            raise ValueError(f"local_batch_sizes {local_batch_sizes!r} does not match one "
                             f"process with {x.shape[0]} rows")
        return LOCAL
    return Dist(group, world, rank, local_sizes(x, group, world, rank, local_batch_sizes))


def _autocast_on(device: str) -> bool:
    """Whether autocast is enabled for this device type; False for the device types
    autocast does not know (meta, the fake tensors of tracing), where
    torch.is_autocast_enabled would raise."""
    return is_autocast_available(device) and torch.is_autocast_enabled(device)


def _loss_dtype(x: Tensor) -> torch.dtype:
    """The features' dtype, or float32 where autocast casts them (open_clip's loss is
    float32 under autocast)."""
    if x.dtype != torch.float64 and _autocast_on(x.device.type):
        return torch.promote_types(x.dtype, torch.float32)
    return x.dtype


def _info_nce_on(image_features, text_features, logit_scale, chunk_size, group, world, rank,
                 local_batch_sizes=None, mode="all_gather") -> Tensor:
    """info_nce on an explicit (group, world, rank); world 1: local, no collective."""
    _check(image_features, text_features, logit_scale)
    where = _distribution(image_features, group, world, rank, local_batch_sizes, mode)
    scale = logit_scale.reshape(())
    out = _loss_dtype(image_features)
    if where.world > 1:
        image, text = _autocast_features(image_features, text_features)
        chunk = _chunk(chunk_size, sum(where.sizes))
        fn = cdist.InfoNCERing if mode == "ring" else cdist.InfoNCEAllGather
        return fn.apply(image, text, scale, chunk, where, _path(image)).to(out)
    chunk = _chunk(chunk_size, image_features.shape[0])
    return _info_nce_fwd(image_features, text_features, scale, chunk)[0].to(out)


def _autocast_features(image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
    """The features as the autocast kernels of the ops cast them (the distributed
    losses are autograd Functions, not custom ops)."""
    device = image.device.type
    if image.dtype == torch.float64 or not _autocast_on(device):
        return image, text
    dtype = torch.get_autocast_dtype(device)
    return image.to(dtype), text.to(dtype)


def _sigmoid_contrastive_on(image_features, text_features, logit_scale, logit_bias, chunk_size,
                            group, world, rank, local_batch_sizes=None,
                            mode="all_gather") -> Tensor:
    """sigmoid_contrastive on an explicit (group, world, rank); world 1: local."""
    _check(image_features, text_features, logit_scale, logit_bias, check_bias=logit_bias is not None)
    where = _distribution(image_features, group, world, rank, local_batch_sizes, mode)
    scale = logit_scale.reshape(())
    if logit_bias is None:  # open_clip adds no bias: the same as a constant 0
        bias = torch.zeros((), dtype=logit_scale.dtype, device=logit_scale.device)
    else:
        bias = logit_bias.reshape(())
    out = _loss_dtype(image_features)
    with_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (image_features, text_features, scale, bias))
    if where.world > 1:
        image, text = _autocast_features(image_features, text_features)
        chunk = _chunk(chunk_size, sum(where.sizes))
        path = _path(image)
        if not with_grad:
            return cdist.siglip_loss_only(image, text, scale, bias, chunk, where, path,
                                          mode).to(out)
        fn = cdist.SigLIPRing if mode == "ring" else cdist.SigLIPAllGather
        return fn.apply(image, text, scale, bias, chunk, where, path).to(out)
    chunk = _chunk(chunk_size, image_features.shape[0])
    return _siglip_fwd(image_features, text_features, scale, bias, chunk, with_grad)[0].to(out)


def info_nce(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, *,
             chunk_size: int | None = None, process_group=None,
             local_batch_sizes=None, mode: str = "all_gather") -> Tensor:
    """CLIP's symmetric InfoNCE without the B x B logits.

    ``(CE(s I T^T, arange) + CE(s T I^T, arange)) / 2`` with ``s = logit_scale`` already
    exponentiated, as open_clip's ClipLoss. Features are used as given (normalise them
    first, as CLIP does).

    Args:
        image_features, text_features: (B, D), one float dtype, any strides, B >= 1,
            D <= 4096.
        logit_scale: a one-element floating-point tensor (shape () or (1,) ...), on the
            features' device or the CPU; it receives a gradient.
        chunk_size: rows per similarity tile on the chunked (CPU / float64) path; tiles
            are (chunk_size x 1024), default chunk_size 1024 (4 MiB float32 tiles). The
            Triton kernels tile by their launch configuration instead.
        process_group: distributed group (default: the initialised world, if any, with
            world size > 1). Each rank passes its local features; the value and the
            gradients equal open_clip ``ClipLoss(local_loss=True, gather_with_grad=True)``.
            (``mmkernels.nn.ClipLoss`` goes distributed only when given world_size > 1.)
        local_batch_sizes: distributed only: every rank's local batch, the same list on
            every rank, for uneven batches. Default: the local batches are equal (as
            open_clip requires); CPU features check that with one tiny host-side
            collective, GPU features are not checked (a check would cost a host sync per
            call; TORCH_DISTRIBUTED_DEBUG=DETAIL makes torch check every collective).
        mode: distributed only: ``"all_gather"`` (default) or ``"ring"``; the same
            loss and gradients, 1 + 3 GEMM passes per rank in both. Memory per rank
            in bytes (e the features' itemsize, N the sum of the local batches, B_max
            the largest, plus one weight panel of at most PANEL_BYTES): all_gather
            ``N D e`` kept from forward to backward, about ``3 N D e`` at its peak;
            ring ``O(B_max D)``, about ``(2 e + 24) B_max D`` at its peak,
            independent of the world size. all_gather is faster while ``3 N D e``
            fits; ring when it does not (itemised, and when the ring's transfers hide
            behind its compute: mmkernels/ops/_contrastive_dist.py).

    Returns:
        The scalar loss (features' dtype, float32 under autocast; accumulation in
        float32, or float64 for float64). Memory on one process: O(B * D) plus one
        similarity tile per step (on a GPU the forward's (2 x SMs, B) column partials
        and the backward's weight panel, at most PANEL_BYTES); never B x B.
        NaN features give a NaN loss (never a silent number); an all -inf row or
        column of logits has log-sum-exp -inf, as torch.logsumexp.
    """
    group, world, rank = group_info(process_group)
    return _info_nce_on(image_features, text_features, logit_scale, chunk_size, group, world,
                        rank, local_batch_sizes, mode)


def sigmoid_contrastive(image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                        logit_bias: Tensor | None, *, chunk_size: int | None = None,
                        process_group=None, local_batch_sizes=None,
                        mode: str = "all_gather") -> Tensor:
    """SigLIP's sigmoid loss without the B x B logits.

    ``-sum_ij logsigmoid(z_ij (s I_i . T_j + b)) / B`` with z = +1 on the diagonal and -1
    elsewhere, normalised as open_clip's SigLipLoss. Distributed: each rank's local images
    against every global text (positives in its own block), divided by the local batch,
    as SigLipLoss with world_size > 1 (whose neighbour exchange passes gradients back the
    same way). Args as :func:`info_nce`, plus ``logit_bias`` (one element, gets a gradient;
    None adds no bias, as open_clip). GEMM passes per rank: all_gather 3 (the forward
    forms the gradients), ring 1 + 3 (see mmkernels/ops/_contrastive_dist.py for why).
    Memory per rank in bytes, as :func:`info_nce`: all_gather ``(N + B) D e`` kept for
    the backward (the gradient factors), about ``2 N D e`` at its peak; ring nothing
    kept but the inputs, about ``(4 e + 16) B_max D`` at its peak.
    """
    group, world, rank = group_info(process_group)
    return _sigmoid_contrastive_on(image_features, text_features, logit_scale, logit_bias,
                                   chunk_size, group, world, rank, local_batch_sizes, mode)
