"""Token gather family: ``random_masking``, ``restore_tokens``, ``masked_select_rows``,
``scatter_image_features``.

Layers: kernels (csrc/token_gather/), then torch.library registration (fake
kernels, autograd), then the functional API (validation, backend choice).

Every op is a permutation or a selection of whole rows, and both backends move
them with index maps built by the same code (csrc/token_gather/token_gather_maps.h).
Determinism, by default and under ``torch.use_deterministic_algorithms(True)`` alike
(no op here raises in that mode): every output and gradient is bitwise run to run,
on the CPU also for any thread count. Forwards and ``x``/``x_kept``/feature
gradients are exact row moves (gathers, each output row written once, no atomics),
so CPU and CUDA agree bitwise. The one reduction, ``restore_tokens``'s mask-token
gradient, sums in a fixed order (CPU: row order per element, in float32 or wider;
CUDA: row order within fixed blocks of rows, straight from the gradient in its own
dtype, then torch's fixed-order ``sum`` over the blocks), so the two backends may
differ in the last bits there. The CUDA index checks use integer ``scatter_add_``
(exact).

CUDA row moves: a group of lanes (up to a warp) per row, 16-byte vector loads and
stores with a scalar head and tail, so any D and storage offset keeps its rows
whole (checked in the SASS by ``python -m mmkernels.tools.kernel_report``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmkernels import _extension, reference

__all__ = ["random_masking", "restore_tokens", "masked_select_rows", "scatter_image_features"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------
# registration: fake kernels and autograd
# ---------------------------------------------------------------------------------


def _register() -> None:
    lib = "mmkernels::"
    ops = torch.ops.mmkernels

    @torch.library.register_fake(lib + "random_masking")
    def _random_masking_fake(x, noise, n_keep):
        B, N, D = x.shape
        return (x.new_empty((B, n_keep, D)), x.new_empty((B, N)),
                x.new_empty((B, N), dtype=torch.int64), x.new_empty((B, n_keep), dtype=torch.int64))

    @torch.library.register_fake(lib + "restore_tokens")
    def _restore_tokens_fake(x_kept, ids_restore, mask_token):
        return x_kept.new_empty((x_kept.shape[0], ids_restore.shape[1], x_kept.shape[2]))

    @torch.library.register_fake(lib + "_restore_tokens_backward")
    def _restore_tokens_backward_fake(grad, ids_restore, n_keep):
        B, N, D = grad.shape
        return grad.new_empty((B, n_keep, D)), grad.new_empty((D,))

    @torch.library.register_fake(lib + "masked_select_rows")
    def _masked_select_rows_fake(x, mask, max_rows):
        if max_rows >= 0:
            m = max_rows
        else:
            m = torch.library.get_ctx().new_dynamic_size()
        return x.new_empty((m, x.shape[2])), x.new_empty((m,), dtype=torch.int64)

    @torch.library.register_fake(lib + "_scatter_rows")
    def _scatter_rows_fake(src, index, num_rows):
        return src.new_empty((num_rows, src.shape[1]))

    @torch.library.register_fake(lib + "scatter_image_features")
    def _scatter_image_features_fake(inputs_embeds, image_mask, image_features, check_count=True):
        return torch.empty_like(inputs_embeds, memory_format=torch.contiguous_format)

    # random_masking: d x = restore the kept gradient rows, zeros elsewhere.
    def _rm_setup(ctx, inputs, output):
        ctx.save_for_backward(output[2])
        ctx.mark_non_differentiable(output[1], output[2], output[3])

    def _rm_backward(ctx, grad_kept, _gm, _gr, _gk):
        (ids_restore,) = ctx.saved_tensors
        return ops.restore_tokens(grad_kept.contiguous(), ids_restore, None), None, None

    torch.library.register_autograd(lib + "random_masking", _rm_backward, setup_context=_rm_setup)

    def _rt_setup(ctx, inputs, output):
        x_kept, ids_restore, mask_token = inputs
        ctx.save_for_backward(ids_restore)
        ctx.n_keep = x_kept.shape[1]
        ctx.has_token = mask_token is not None

    def _rt_backward(ctx, grad):
        (ids_restore,) = ctx.saved_tensors
        grad_kept, grad_token = ops._restore_tokens_backward(grad, ids_restore, ctx.n_keep)
        return grad_kept, None, grad_token if ctx.has_token else None

    torch.library.register_autograd(lib + "restore_tokens", _rt_backward, setup_context=_rt_setup)

    def _msr_setup(ctx, inputs, output):
        x, mask, max_rows = inputs
        ctx.save_for_backward(output[1])
        ctx.x_shape = tuple(x.shape)
        ctx.mark_non_differentiable(output[1])

    def _msr_backward(ctx, grad_rows, _gi):
        (index,) = ctx.saved_tensors
        B, N, D = ctx.x_shape
        gx = ops._scatter_rows(grad_rows.contiguous(), index, B * N)
        return gx.view(B, N, D), None, None

    torch.library.register_autograd(lib + "masked_select_rows", _msr_backward,
                                    setup_context=_msr_setup)

    # _scatter_rows (used to unpack packed results): its backward gathers the rows back.
    def _sr_setup(ctx, inputs, output):
        src, index, num_rows = inputs
        ctx.save_for_backward(index)

    def _sr_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        if grad.shape[0] == 0:  # nothing to gather from: every row was padding
            return grad.new_zeros(index.shape[0], grad.shape[1]), None, None
        rows = grad.index_select(0, index.clamp(min=0))
        return torch.where((index >= 0)[:, None], rows, torch.zeros_like(rows)), None, None

    torch.library.register_autograd(lib + "_scatter_rows", _sr_backward, setup_context=_sr_setup)

    def _sif_setup(ctx, inputs, output):
        inputs_embeds, image_mask, image_features = inputs[:3]
        ctx.save_for_backward(image_mask)
        ctx.num_tokens = image_features.shape[0]
        ctx.check_count = inputs[3] if len(inputs) > 3 else True

    def _sif_backward(ctx, grad):
        (image_mask,) = ctx.saved_tensors
        if not ctx.check_count:
            # Unchecked counts: only the first num_tokens image positions took a
            # feature row (the forward's rule); the others kept their embeddings.
            image_mask = _received_features(image_mask, ctx.num_tokens)
        grad_embeds = grad_feats = None
        if ctx.needs_input_grad[0]:
            grad_embeds = grad.masked_fill(image_mask[..., None], 0)
        if ctx.needs_input_grad[2]:
            grad_feats, _ = ops.masked_select_rows(grad, image_mask, ctx.num_tokens)
        return grad_embeds, None, grad_feats, None

    torch.library.register_autograd(lib + "scatter_image_features", _sif_backward,
                                    setup_context=_sif_setup)


def _received_features(image_mask: Tensor, num_features: int) -> Tensor:
    """The image positions that receive a feature row: the first ``num_features``
    (row-major) of ``image_mask``; all of them when the counts match."""
    rank = image_mask.reshape(-1).cumsum(0).view(image_mask.shape)
    return image_mask & (rank <= num_features)


if _extension.is_available():
    _register()


# ---------------------------------------------------------------------------------
# functional API
# ---------------------------------------------------------------------------------


def _check_rows(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be a 3-D (B, N, D) tensor, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} dtype must be float32, float64, float16 or bfloat16, got {t.dtype}")


def _check_mask(mask, name: str, x: Tensor, dims: str) -> None:
    """A bool mask over the first two dims of x, on x's device."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool Tensor")
    if mask.shape != x.shape[:2]:
        raise ValueError(f"{name} must have shape {dims} = {tuple(x.shape[:2])}, got "
                         f"{tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"{name} is on {mask.device} but the rows are on {x.device}")


def _use_reference() -> bool:
    return _extension.backend_override() == "reference"


def random_masking(x: Tensor, mask_ratio: float, *, noise: Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """MAE / FLIP random token masking, fused.

    Keeps the ``N_keep = int(N * (1 - mask_ratio))`` tokens with the lowest noise,
    in increasing noise order, exactly as MAE's ``random_masking``:
    ``ids_shuffle = argsort(noise, dim=1)`` (ties go to the lower index, NaN last),
    ``x_kept = x[ids_shuffle[:, :N_keep]]``, ``ids_restore = argsort(ids_shuffle)``.
    The kept/removed split is an O(N) selection per row (each side then sorted on
    its own, which ``ids_restore`` needs), and the rows move in one pass.

    Args:
        x: (B, N, D), float32/float64/float16/bfloat16, any strides.
        mask_ratio: fraction of tokens removed, in [0, 1).
        noise: optional (B, N) float tensor on x's device; when None, uniform noise
            is drawn with ``torch.rand(B, N, generator=generator)``.
        generator: torch.Generator for the noise.

    Returns:
        x_kept: (B, N_keep, D), x's dtype; differentiable (the removed rows get zero
            gradient; the backward is a gather, deterministic).
        mask: (B, N), x's dtype, 0 = kept, 1 = removed.
        ids_restore: (B, N) int64, the rank of each token.
    """
    _check_rows(x, "x")
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"mask_ratio must be a float, got {type(mask_ratio).__name__}")
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    B, N, _ = x.shape
    n_keep = int(N * (1 - float(mask_ratio)))
    if noise is None:
        noise = torch.rand(B, N, generator=generator, device=x.device)
    else:
        if not isinstance(noise, Tensor):
            raise TypeError(f"noise must be a Tensor, got {type(noise).__name__}")
        if noise.shape != (B, N):
            raise ValueError(f"noise must have shape (B, N) = {(B, N)}, got {tuple(noise.shape)}")
        if not noise.is_floating_point():
            raise TypeError(f"noise must be floating point, got {noise.dtype}")
        if noise.device != x.device:
            raise ValueError(f"noise is on {noise.device} but x is on {x.device}")
    if _use_reference():
        return reference.random_masking(x, n_keep, noise)
    _extension.require("random_masking", x.device.type)
    x_kept, mask, ids_restore, _ = torch.ops.mmkernels.random_masking(x, noise, n_keep)
    return x_kept, mask, ids_restore


def restore_tokens(x_kept: Tensor, ids_restore: Tensor, mask_token: Tensor) -> Tensor:
    """MAE decoder unshuffle: put the kept tokens back and fill the rest with ``mask_token``.

    ``out[b, j] = x_kept[b, ids_restore[b, j]]`` if ``ids_restore[b, j] < N_keep``,
    else ``mask_token``. Equals MAE's
    ``gather(cat([x_kept, mask_tokens], 1), 1, ids_restore)``.

    Args:
        x_kept: (B, N_keep, D), float dtype.
        ids_restore: (B, N) int64, any layout (transposed, sliced, expanded), each row
            a permutation of [0, N) (as returned by :func:`random_masking`). A value
            outside [0, N) raises ``ValueError`` naming ids_restore in the forward; a
            row that is not a permutation raises it in the backward, whose gather
            through the inverse permutation needs one. On CUDA both are device-side
            assertions (no host sync; a failure surfaces at the next synchronisation
            and ends the CUDA context), and meanwhile nothing is read out of bounds:
            out-of-range values take the mask token, unreached gradient rows are zero.
        mask_token: D elements (e.g. MAE's (1, 1, D) parameter), x_kept's dtype.

    Returns:
        (B, N, D). Gradients flow to ``x_kept`` (a gather through the inverse
        permutation) and to ``mask_token`` (the sum over the filled positions only,
        accumulated in float32 or wider; Inf/NaN in kept rows never reach it).
    """
    _check_rows(x_kept, "x_kept")
    if not isinstance(ids_restore, Tensor) or ids_restore.dtype != torch.int64:
        raise TypeError("ids_restore must be an int64 Tensor")
    if ids_restore.dim() != 2 or ids_restore.shape[0] != x_kept.shape[0]:
        raise ValueError(f"ids_restore must have shape (B, N) with B = {x_kept.shape[0]}, got "
                         f"{tuple(ids_restore.shape)}")
    if ids_restore.shape[1] < x_kept.shape[1]:
        raise ValueError(f"ids_restore has N = {ids_restore.shape[1]} < N_keep = {x_kept.shape[1]}")
    if not isinstance(mask_token, Tensor):
        raise TypeError(f"mask_token must be a Tensor, got {type(mask_token).__name__}")
    D = x_kept.shape[2]
    if mask_token.numel() != D:
        raise ValueError(f"mask_token must have D = {D} elements, got shape "
                         f"{tuple(mask_token.shape)}")
    if mask_token.dtype != x_kept.dtype:
        raise TypeError(f"mask_token dtype {mask_token.dtype} must match x_kept dtype {x_kept.dtype}")
    if ids_restore.device != x_kept.device or mask_token.device != x_kept.device:
        raise ValueError("x_kept, ids_restore and mask_token must be on one device")
    token = mask_token.reshape(D)
    if _use_reference():
        return reference.restore_tokens(x_kept, ids_restore, token)
    _extension.require("restore_tokens", x_kept.device.type)
    return torch.ops.mmkernels.restore_tokens(x_kept, ids_restore, token)


def masked_select_rows(x: Tensor, mask: Tensor, max_rows: int | None = None
                       ) -> tuple[Tensor, Tensor]:
    """Rows of ``x`` at the selected positions: ``x[mask]`` and their flat positions.

    Used for masked region / masked language modelling losses, which need the
    hidden states of the masked positions only.

    Args:
        x: (B, N, D), float dtype, any strides.
        mask: (B, N) bool.
        max_rows: when given, the output has exactly ``max_rows`` rows, zero-padded,
            and no host synchronisation happens (CUDA graphs, torch.compile with
            static shapes). More selected positions than ``max_rows`` raise
            ``ValueError`` on the CPU; on CUDA that is a device-side assertion (no
            sync; it surfaces at the next synchronisation and ends the CUDA context),
            and the first ``max_rows`` selected rows are returned meanwhile, never
            reading out of bounds. Size ``max_rows`` for the worst case.

    Returns:
        rows: (M, D) in row-major order of ``mask`` (M = mask.sum(), or max_rows).
        index: (M,) int64 flat positions ``b * N + n``; -1 in padded rows.
        The backward scatters into x (distinct rows: deterministic).
    """
    _check_rows(x, "x")
    _check_mask(mask, "mask", x, "(B, N)")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int)
                                 or max_rows < 0):
        raise ValueError(f"max_rows must be None or a non-negative int, got {max_rows!r}")
    m = -1 if max_rows is None else max_rows
    if _use_reference():
        return reference.masked_select_rows(x, mask, max_rows)
    _extension.require("masked_select_rows", x.device.type)
    return torch.ops.mmkernels.masked_select_rows(x, mask, m)


def scatter_image_features(inputs_embeds: Tensor, image_mask: Tensor,
                           image_features: Tensor, *, check_count: bool = True) -> Tensor:
    """LLaVA's merge of projected image features into the text embeddings.

    Equals ``inputs_embeds.masked_scatter(image_mask[..., None].expand_as(inputs_embeds),
    image_features)`` as in Hugging Face LLaVA: the t-th ``<image>`` position (row-major)
    receives feature row t.

    Args:
        inputs_embeds: (B, L, D), float dtype, any strides.
        image_mask: (B, L) bool, True at the image-token positions.
        image_features: (num_image_tokens, D) or (num_images, tokens_per_image, D); cast
            to inputs_embeds' dtype as HF does.
        check_count: True (default): count the image positions and raise ``ValueError``
            unless they equal the feature rows, as HF does. On CUDA that is one
            device-to-host synchronisation per call (it cannot be captured in a CUDA
            graph). False: no check and no sync (CUDA graphs, fully asynchronous
            serving). A mismatch is then **not reported**; the result is defined and
            never reads or writes out of bounds: the first ``min(tokens, features)``
            image positions receive feature rows in order, image positions beyond the
            feature count keep their ``inputs_embeds`` rows, and surplus feature rows
            are unused (the gradients follow the same rule). Validate the counts
            elsewhere (e.g. in the tokenizer) before choosing it.

    Returns:
        (B, L, D), contiguous. Gradients flow to ``inputs_embeds`` (zero at the positions
        that received a feature) and to ``image_features``.

    Raises:
        ValueError: "Image features and image tokens do not match: tokens: X, features Y"
            (HF's message) when ``check_count`` and the counts differ, on every backend.
    """
    _check_rows(inputs_embeds, "inputs_embeds")
    _check_mask(image_mask, "image_mask", inputs_embeds, "(B, L)")
    if not isinstance(image_features, Tensor):
        raise TypeError(f"image_features must be a Tensor, got {type(image_features).__name__}")
    if not isinstance(check_count, bool):
        raise TypeError(f"check_count must be a bool, got {type(check_count).__name__}")
    D = inputs_embeds.shape[2]
    if image_features.dim() == 3:
        image_features = image_features.flatten(0, 1)  # (0, T, 0) too: no -1 to infer
    if image_features.dim() != 2 or image_features.shape[1] != D:
        raise ValueError("image_features must be (num_image_tokens, D) or (num_images, "
                         f"tokens_per_image, D) with D = {D}, got {tuple(image_features.shape)}")
    if image_features.device != inputs_embeds.device:
        raise ValueError(f"image_features is on {image_features.device} but inputs_embeds is on "
                         f"{inputs_embeds.device}")
    image_features = image_features.to(inputs_embeds.dtype)
    if _use_reference():
        return reference.scatter_image_features(inputs_embeds, image_mask, image_features,
                                                check_count=check_count)
    _extension.require("scatter_image_features", inputs_embeds.device.type)
    return torch.ops.mmkernels.scatter_image_features(inputs_embeds, image_mask, image_features,
                                                      check_count)
