"""Input validation and the backend choice shared by varlen attention and
co-attention. Every error names the argument."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from mmkernels import _extension
from mmkernels.triton import interpreting


def _uses_triton(device: torch.device) -> bool:
    return device.type == "cuda" or interpreting()


def _runs_triton(device: torch.device) -> bool:
    """The Triton kernels will run (MMKERNELS_BACKEND=reference runs eager instead)."""
    return _uses_triton(device) and _extension.backend_override() != "reference"



_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_TOKENS = 2**31 - 1  # cu_seqlens are int32


def check_tensor(t, name: str) -> None:
    """A dense (total, heads, head_dim) floating-point Tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) Tensor, got layout {t.layout}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be (total, heads, head_dim), got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} dtype must be float16, bfloat16 or float32 (float64 on the "
                        f"CPU path), got {t.dtype}")
    # guard_or_false: under torch.compile the token count may be data-dependent (rows
    # packed by masked_select_rows); such a size is not checked rather than a graph break.
    if guard_or_false(t.shape[0] > MAX_TOKENS):
        raise ValueError(f"{name} has {t.shape[0]} tokens; int32 cu_seqlens address at most "
                         f"{MAX_TOKENS}")


def check_cu_seqlens(cu: Tensor, total: int, max_seqlen: int, name: str, max_name: str,
                     tensor_name: str = "the packed tensor",
                     device: torch.device | None = None) -> None:
    """cu_seqlens: (batch + 1,) int32 on `device`, 0 first, non-decreasing, `total`
    (the token count of `tensor_name`) last, every length <= max_seqlen. On CUDA the
    data checks are device-side assertions (no sync; they run before any kernel reads
    the offsets)."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (as flash_attn_varlen_func), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be a 1-D (batch + 1,) tensor, got shape {tuple(cu.shape)}")
    if device is not None and cu.device != device:
        raise ValueError(f"{name} must be on {tensor_name}'s device ({device}), got {cu.device}")
    if isinstance(max_seqlen, Tensor):
        if max_seqlen.dim() != 0 or max_seqlen.dtype.is_floating_point or max_seqlen.is_complex() \
                or max_seqlen.dtype == torch.bool:
            raise TypeError(f"{max_name} must be an int or a 0-dim integer Tensor, got a "
                            f"{max_seqlen.dtype} Tensor of shape {tuple(max_seqlen.shape)}")
        # compared on cu's device (no host sync on CUDA); clamped as below
        bound = max_seqlen.to(device=cu.device, dtype=torch.int64).clamp(max=MAX_TOKENS)
        if bound.device.type == "cpu" and not torch.compiler.is_compiling() and int(bound) < 0:
            raise TypeError(f"{max_name} must be non-negative, got {int(bound)}")
    elif isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")
    else:
        bound = min(max_seqlen, MAX_TOKENS)
    lengths = cu.diff()
    # (under torch.compile the total may be a data-dependent SymInt, which a message
    # passed to _assert_async cannot hold)
    count = "" if torch.compiler.is_compiling() else f" ({total})"
    conds = [
        (cu[0] == 0, f"{name}[0] must be 0"),
        (cu[-1] == total,
         f"{name}[-1] must equal the number of packed tokens of {tensor_name}{count}"),
        ((lengths >= 0).all(), f"{name} must be non-decreasing"),
        # (clamped: an int32 tensor compared with 2^40 would wrap the bound)
        ((lengths <= bound).all(),
         f"{max_name} = {max_seqlen} is smaller than a sequence length in {name}"),
    ]
    if cu.device.type in ("cuda", "meta") or torch.compiler.is_compiling():
        for cond, msg in conds:  # (meta: shape-only runs, nothing to check)
            torch._assert_async(cond, msg)
        return
    for cond, msg in conds:
        if not bool(cond):
            detail = f"; got {cu.tolist()}" if cu.numel() <= 16 else ""
            raise ValueError(msg + detail)


def check_like(first: Tensor, first_name: str, others, other_names) -> None:
    """Every tensor passes :func:`check_tensor`, and the others have first's dtype and
    device (the errors name the tensor that differs)."""
    check_tensor(first, first_name)
    for t, n in zip(others, other_names):
        check_tensor(t, n)
    for t, n in zip(others, other_names):
        if t.dtype != first.dtype:
            raise TypeError(f"{n} dtype {t.dtype} differs from {first_name}'s dtype "
                            f"{first.dtype} (one dtype for all)")
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_name} on {first.device}: all "
                             f"tensors must be on one device")


def _check_qkv(q, k, v, names=("q", "k", "v")):
    """Shapes, dtypes and devices of q (total_q, H, D), k and v (total_k, H_kv, D)."""
    check_like(q, names[0], (k, v), names[1:])
    if v.shape != k.shape:
        raise ValueError(f"{names[2]} must have {names[1]}'s shape {tuple(k.shape)}, got "
                         f"{tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"head dims differ: {names[0]} has {q.shape[2]}, {names[1]} has "
                         f"{k.shape[2]}")
    if not 1 <= q.shape[2] <= 256:
        raise ValueError(f"head_dim of {names[0]} must be in [1, 256], got {q.shape[2]}")
    if q.shape[1] < 1:
        raise ValueError(f"{names[0]} must have at least one head, got shape {tuple(q.shape)}")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{names[1]} has {k.shape[1]} heads: the number of query heads of "
                         f"{names[0]} ({q.shape[1]}) must be a multiple of it (GQA/MQA)")
    if q.dtype == torch.float64 and _runs_triton(q.device):
        raise TypeError(f"{names[0]}: float64 is supported on the CPU path only (the Triton "
                        f"kernels run float16, bfloat16 and float32)")


def _check_op_inputs(q, k, v, cu_q, cu_k, block_ids=None, names=("q", "k", "v"),
                     cu_names=("cu_seqlens_q", "cu_seqlens_k")) -> None:
    """What the custom ops check themselves (they are reachable as torch.ops.mmkernels.*):
    shapes always; on CPU tensors also the offsets against the token counts (host
    data, free), so no direct call reads out of bounds. The functional API checks the
    rest, on CUDA with device-side asserts."""
    _check_qkv(q, k, v, names)
    for cu, n, total, t in ((cu_q, cu_names[0], q.shape[0], names[0]),
                            (cu_k, cu_names[1], k.shape[0], names[1])):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{n} must be a 1-D (batch + 1,) int32 tensor, got "
                             f"{cu.dtype} {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{n} must be on {names[0]}'s device")
        if cu.device.type == "cpu":
            c = cu.tolist()
            if c[0] != 0 or c[-1] != total or any(b < a for a, b in zip(c, c[1:])):
                raise ValueError(f"{n} must start at 0, be non-decreasing and end at the "
                                 f"number of tokens of {t} ({total})")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"{cu_names[0]} and {cu_names[1]} must describe the same batch")
    if block_ids is not None and (block_ids.shape != (q.shape[0],) or q.shape[0] != k.shape[0]
                                  or block_ids.device != q.device):
        raise ValueError("block_ids must be (total_q,) on q's device, with total_q == total_k")


def check_dropout_p(dropout_p, name: str = "dropout_p") -> float:
    try:
        p = float(dropout_p)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float, got {type(dropout_p).__name__}") from None
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {dropout_p}")
    return p


def check_window_size(window_size, causal: bool) -> tuple[int, int]:
    """window_size: a (left, right) pair of ints >= -1 (-1: unbounded). Returned as ints,
    normalised: with causal the right side is the causal bound, returned as -1 (flash-attn
    forces it to 0, the same mask)."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) for w in window_size)):
        raise TypeError(f"window_size must be a (left, right) pair of ints, got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1: unbounded), got {window_size!r}")
    return (left, -1) if causal else (left, right)


def check_softcap(softcap) -> float:
    try:
        c = float(softcap)
    except (TypeError, ValueError):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}") from None
    if not (c >= 0.0 and math.isfinite(c)):
        raise ValueError(f"softcap must be a finite float >= 0 (0: no capping), got {softcap}")
    return c
