"""ViLBERT co-attention: ``co_attention`` (both directions in one launch).

out_a = attention(q_a, k_b, v_b): stream A's tokens attend to stream B;
out_b = attention(q_b, k_a, v_a): stream B attends to stream A. Sample i of A pairs
with sample i of B; both streams are packed (cu_seqlens), either may be empty for a
sample (its queries then output zeros). No mask inside a pair: every query of A sees
every key of its B sample.

Layers: Triton kernels (mmkernels/triton/co_attention.py, on the attention core shared
with varlen attention), custom ops with fake kernels and autograd, the functional
API; the drop-in module is :class:`mmkernels.nn.BiAttention`. CPU tensors without the
interpreter use the varlen CPU path twice.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmkernels import _extension, reference
from mmkernels.ops import _attention_checks as _chk
from mmkernels.ops import _attention_cpu as _cpu
from mmkernels.ops import varlen_attention as va

__all__ = ["co_attention"]


@torch.library.custom_op("mmkernels::co_attention_fwd", mutates_args=())
def _co_attention_fwd(q_a: Tensor, k_a: Tensor, v_a: Tensor, q_b: Tensor, k_b: Tensor,
                      v_b: Tensor, cu_seqlens_a: Tensor, cu_seqlens_b: Tensor, max_seqlen_a: int,
                      max_seqlen_b: int, softmax_scale: float, dropout_a: float, dropout_b: float,
                      seed: int, offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_op_inputs(q_a, k_a, v_a, q_b, k_b, v_b, cu_seqlens_a, cu_seqlens_b)
    if _chk._uses_triton(q_a.device):
        from mmkernels.triton import co_attention as tco

        return tco.launch_fwd(q_a, k_a, v_a, q_b, k_b, v_b, cu_seqlens_a, cu_seqlens_b,
                           max_seqlen_a, max_seqlen_b, softmax_scale, dropout_a, dropout_b, seed,
                           offset)
    H = q_a.shape[1]
    outs = []
    for q, k, v, cq, ck, p, stream0 in ((q_a, k_b, v_b, cu_seqlens_a, cu_seqlens_b, dropout_a, 0),
                                       (q_b, k_a, v_a, cu_seqlens_b, cu_seqlens_a, dropout_b, H)):
        if _cpu._use_fused_cpu(q, k, p):
            outs.append(_cpu._cpu_fwd_fused(q, k, v, cq, ck, None, softmax_scale, False))
        else:
            o, lse = _cpu._cpu_fwd(q, k, v, cq, ck, None, softmax_scale, False, p, seed, offset,
                                 stream0)
            outs.append((o.contiguous(), lse.contiguous()))
    return outs[0][0], outs[1][0], outs[0][1], outs[1][1]


@_co_attention_fwd.register_fake
def _(q_a, k_a, v_a, q_b, k_b, v_b, cu_seqlens_a, cu_seqlens_b, max_seqlen_a, max_seqlen_b,
      softmax_scale, dropout_a, dropout_b, seed, offset):
    H = q_a.shape[1]
    # the real op returns contiguous tensors whatever the inputs' layout
    return (q_a.new_empty(q_a.shape), q_b.new_empty(q_b.shape),
            q_a.new_empty((H, q_a.shape[0]), dtype=torch.float32),
            q_b.new_empty((H, q_b.shape[0]), dtype=torch.float32))


@torch.library.custom_op("mmkernels::co_attention_bwd", mutates_args=())
def _co_attention_bwd(grad_a: Tensor, grad_b: Tensor, q_a: Tensor, k_a: Tensor, v_a: Tensor,
                      q_b: Tensor, k_b: Tensor, v_b: Tensor, out_a: Tensor, out_b: Tensor,
                      lse_a: Tensor, lse_b: Tensor, cu_seqlens_a: Tensor, cu_seqlens_b: Tensor,
                      max_seqlen_a: int, max_seqlen_b: int, softmax_scale: float,
                      dropout_a: float, dropout_b: float, seed: int, offset: int) -> tuple[
                          Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_op_inputs(q_a, k_a, v_a, q_b, k_b, v_b, cu_seqlens_a, cu_seqlens_b)
    for t, n, like in ((grad_a, "grad_a", q_a), (out_a, "out_a", q_a), (grad_b, "grad_b", q_b),
                       (out_b, "out_b", q_b)):
        if t.shape != like.shape:
            raise ValueError(f"{n} must have shape {tuple(like.shape)}, got {tuple(t.shape)}")
    for t, n, like in ((lse_a, "lse_a", q_a), (lse_b, "lse_b", q_b)):
        if t.shape != (like.shape[1], like.shape[0]):
            raise ValueError(f"{n} must have shape (H, total) = "
                             f"{(like.shape[1], like.shape[0])}, got {tuple(t.shape)}")
    if _chk._uses_triton(q_a.device):
        from mmkernels.triton import co_attention as tco

        return tco.launch_bwd(grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a,
                           lse_b, cu_seqlens_a, cu_seqlens_b, max_seqlen_a, max_seqlen_b,
                           softmax_scale, dropout_a, dropout_b, seed, offset,
                              va.deterministic_backward(False))
    H = q_a.shape[1]
    res = []
    for g, q, k, v, o, lse, cq, ck, p, stream0 in (
            (grad_a, q_a, k_b, v_b, out_a, lse_a, cu_seqlens_a, cu_seqlens_b, dropout_a, 0),
            (grad_b, q_b, k_a, v_a, out_b, lse_b, cu_seqlens_b, cu_seqlens_a, dropout_b, H)):
        if _cpu._use_fused_cpu(q, k, p, backward=True):
            res.append(_cpu._cpu_bwd_fused(g, q, k, v, o, lse, cq, ck, None, softmax_scale, False))
        else:
            res.append(_cpu._cpu_bwd(g, q, k, v, cq, ck, None, softmax_scale, False, p, seed,
                                   offset, stream0))
    (dqa, dkb, dvb), (dqb, dka, dva) = res
    return dqa, dka, dva, dqb, dkb, dvb


@_co_attention_bwd.register_fake
def _(grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a, lse_b, cu_seqlens_a,
      cu_seqlens_b, max_seqlen_a, max_seqlen_b, softmax_scale, dropout_a, dropout_b, seed,
      offset):
    return tuple(t.new_empty(t.shape) for t in (q_a, k_a, v_a, q_b, k_b, v_b))  # contiguous


def _setup_context(ctx, inputs, output):
    (q_a, k_a, v_a, q_b, k_b, v_b, cu_a, cu_b, max_a, max_b, scale, p_a, p_b, seed,
     offset) = inputs
    out_a, out_b, lse_a, lse_b = output
    ctx.save_for_backward(q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a, lse_b, cu_a, cu_b)
    ctx.args = (max_a, max_b, scale, p_a, p_b, seed, offset)
    ctx.mark_non_differentiable(lse_a, lse_b)


def _backward(ctx, grad_a, grad_b, _gla, _glb):
    q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a, lse_b, cu_a, cu_b = ctx.saved_tensors
    grad_a = torch.zeros_like(out_a) if grad_a is None else grad_a.contiguous()
    grad_b = torch.zeros_like(out_b) if grad_b is None else grad_b.contiguous()
    grads = _co_attention_bwd(grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a,
                              lse_b, cu_a, cu_b, *ctx.args)
    return (*grads, None, None, None, None, None, None, None, None, None)


_co_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def co_attention(q_a: Tensor, k_a: Tensor, v_a: Tensor, q_b: Tensor, k_b: Tensor, v_b: Tensor,
                 cu_seqlens_a: Tensor, cu_seqlens_b: Tensor, max_seqlen_a: int,
                 max_seqlen_b: int, *, softmax_scale: float | None = None,
                 dropout_p: float | tuple[float, float] = 0.0,
                 dropout_seed: int | None = None) -> tuple[Tensor, Tensor]:
    """Two-stream co-attention (ViLBERT), both directions fused.

    Args:
        q_a, k_a, v_a: (total_a, H, D) packed stream A; q_b, k_b, v_b: (total_b, H, D)
            stream B: all six with the same (H, D) (no GQA) and K/V with their Q's token
            count; one dtype (float16/bfloat16/float32; float64 on the CPU path), one
            device, D <= 256, any strides (the Triton path copies non-contiguous ones).
        cu_seqlens_a, cu_seqlens_b: (batch + 1,) int32 each, on the streams' device,
            with the same batch: 0 first, non-decreasing, total_a (total_b) last; a
            sample may be empty in either stream.
        max_seqlen_a, max_seqlen_b: ints >= the longest lengths.
        softmax_scale: default 1 / sqrt(D).
        dropout_p: on the attention probabilities; a float, or (p_a, p_b) for the two
            directions (ViLBERT uses two dropout modules), each in [0, 1). Philox streams
            d * H + h per (direction d, head h) under one (seed, offset) state (see
            :func:`mmkernels.ops.varlen_attention.philox_state`); every backend,
            ``MMKERNELS_BACKEND=reference`` included, draws the same masks, and the
            backward regenerates them.
        dropout_seed: testing hook (see :func:`mmkernels.ops.varlen_attention.dropout_keep_mask`
            with stream0 = 0 for A->B and H for B->A).

    Raises:
        TypeError / ValueError naming the offending argument (e.g. ``k_b`` with the
        wrong head count, ``cu_seqlens_a`` not ending at k_a's token count).

    Returns:
        out_a (total_a, H, D) = attention(q_a, k_b, v_b) and out_b (total_b, H, D) =
        attention(q_b, k_a, v_a). One kernel launch computes both; gradients flow to
        all six inputs.

    Determinism: the forward is deterministic. The default backward (Triton) is FA2's
    one pass, as :func:`mmkernels.varlen_attention`'s: one launch of the delta
    pre-kernel and one of the dK/dV kernel, which also adds dQ of both streams into
    float32 buffers with atomics, so dq_a and dq_b may differ in their last bits from
    run to run. Under ``torch.use_deterministic_algorithms(True)`` (read when the
    backward runs) it computes dQ in a second kernel without atomics, recomputing S
    and dP: 7 GEMMs per tile pair instead of 5 (1.4x the backward's MMA work), and no
    float32 dQ buffers; each kernel still covers both directions in one launch. The
    CPU path is deterministic either way.
    """
    _check_streams(q_a, k_a, v_a, q_b, k_b, v_b)
    _chk.check_cu_seqlens(cu_seqlens_a, q_a.shape[0], max_seqlen_a, "cu_seqlens_a", "max_seqlen_a",
                        "q_a, k_a and v_a", q_a.device)
    _chk.check_cu_seqlens(cu_seqlens_b, q_b.shape[0], max_seqlen_b, "cu_seqlens_b", "max_seqlen_b",
                        "q_b, k_b and v_b", q_a.device)
    if cu_seqlens_a.numel() != cu_seqlens_b.numel():
        raise ValueError(f"cu_seqlens_a and cu_seqlens_b must have the same batch, got "
                         f"{cu_seqlens_a.numel() - 1} and {cu_seqlens_b.numel() - 1} samples")
    if isinstance(dropout_p, (tuple, list)):
        if len(dropout_p) != 2:
            raise ValueError(f"dropout_p must be a float or a pair (p_a, p_b), got {dropout_p}")
        p_a, p_b = (_chk.check_dropout_p(p, "dropout_p") for p in dropout_p)
    else:
        p_a = p_b = _chk.check_dropout_p(dropout_p, "dropout_p")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q_a.shape[2])
    max_a, max_b = min(max_seqlen_a, q_a.shape[0]), min(max_seqlen_b, q_b.shape[0])
    seed = offset = 0
    if p_a > 0 or p_b > 0:
        # per (stream, row) subsequence: one counter per key column of the other stream
        seed, offset = va.philox_state(q_a.device, va.dropout_increment(max(max_a, max_b)),
                                       dropout_seed)
    if _extension.backend_override() == "reference":
        H = q_a.shape[1]
        keep_a = keep_b = None
        if p_a > 0:
            keep_a = _cpu._lazy_keep_masks(seed, offset, cu_seqlens_a, cu_seqlens_b, H, p_a, 0,
                                         q_a.device)
        if p_b > 0:
            keep_b = _cpu._lazy_keep_masks(seed, offset, cu_seqlens_b, cu_seqlens_a, H, p_b, H,
                                         q_a.device)
        return reference.co_attention(q_a, k_a, v_a, q_b, k_b, v_b, cu_seqlens_a, cu_seqlens_b,
                                      scale, keep_a, keep_b, (p_a, p_b))
    out_a, out_b, _, _ = _co_attention_fwd(q_a, k_a, v_a, q_b, k_b, v_b, cu_seqlens_a,
                                           cu_seqlens_b, int(max_a), int(max_b), scale, p_a, p_b,
                                           seed, offset)
    return out_a, out_b


def _check_streams(q_a, k_a, v_a, q_b, k_b, v_b) -> None:
    """Every tensor of both streams: dense 3-D floating point, one dtype, one device;
    all six share q_a's (heads, head dim) (co-attention has no GQA: the CPU path must
    not silently compute it, and the kernels index K/V heads like Q's); K/V have their
    stream's token count (they share its cu_seqlens)."""
    names = ("q_a", "k_a", "v_a", "q_b", "k_b", "v_b")
    ts = (q_a, k_a, v_a, q_b, k_b, v_b)
    _chk.check_like(q_a, "q_a", ts[1:], names[1:])
    H, D = q_a.shape[1:]
    if H < 1:
        raise ValueError(f"q_a must have at least one head, got shape {tuple(q_a.shape)}")
    if not 1 <= D <= 256:
        raise ValueError(f"head_dim of q_a must be in [1, 256], got {D}")
    for q, q_name, trio in ((q_a, "q_a", zip(ts[:3], names[:3])),
                            (q_b, "q_b", zip(ts[3:], names[3:]))):
        for t, n in trio:
            if t.shape[1:] != (H, D):
                raise ValueError(f"{n} must have (heads, head dim) = ({H}, {D}) as q_a "
                                 f"(co-attention: one head count and head dim, no GQA), got "
                                 f"shape {tuple(t.shape)}")
            if t.shape[0] != q.shape[0]:
                raise ValueError(f"{n} must have {q_name}'s {q.shape[0]} tokens (its stream's "
                                 f"cu_seqlens delimit both), got shape {tuple(t.shape)}")
    if q_a.dtype == torch.float64 and _chk._runs_triton(q_a.device):
        raise TypeError("q_a: float64 is supported on the CPU path only (the Triton kernels "
                        "run float16, bfloat16 and float32)")


def _check_op_inputs(q_a, k_a, v_a, q_b, k_b, v_b, cu_a, cu_b) -> None:
    """The custom ops' own checks (reachable as torch.ops.mmkernels.co_attention_*):
    shapes, and on CPU the offsets against the token counts (host data, free)."""
    _check_streams(q_a, k_a, v_a, q_b, k_b, v_b)
    _chk._check_op_inputs(q_a, k_b, v_b, cu_a, cu_b, None, ("q_a", "k_b", "v_b"),
                        ("cu_seqlens_a", "cu_seqlens_b"))


