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
from mmkernels.ops import varlen_attention as va
from mmkernels.triton import KernelSpec, interpreter_tiles

__all__ = ["co_attention"]

# (kind, padded D) -> configs: the varlen tables, except where the two-direction
# kernel spills with them (checked by the kernel report).
CONFIGS = {kind: dict(table) for kind, table in va.CONFIGS.items()}
CONFIGS["dq"][128] = [va.AttnConfig(32, 64, 8, 1)]
# D=128 forward: M128-N64 spills on sm_80 in the dropout variant once the sizes are
# multiples of 16 (64 B of stack, 3 or 2 stages); M128-N32 keeps the q tile and the
# pipelining without spills (216 registers at most)
CONFIGS["fwd"][128] = [va.AttnConfig(128, 32, 8, 2)]
# one-pass backward D64: varlen's M32-N64-w8 spills 16 bytes on sm_80 with dropout
# (ints%16), M64-N32-w8 16-24 and M64-N64-w8 24-64. M32-N64-w4 fits (249-255
# registers on sm_80, little headroom) and, against M32-N32-w4 (168 at most), halves
# the dQ atomics: the audit's backward requests 7.7 MB instead of 13.2
CONFIGS["bwd"][64] = [va.AttnConfig(32, 64, 4, 1)]
# the delta pre-kernel (varlen's tiles, both directions inlined): 4 warps spill 8
# bytes at D64 on sm_80 (255 registers); 8 warps need 80
DELTA_WARPS = 8


def _pick(kind: str, block_d: int) -> va.AttnConfig:
    return va.INTERPRET_CONFIG if interpreter_tiles() else CONFIGS[kind][max(block_d, 64)][0]


def _stream_layout(*tensors: Tensor) -> list[Tensor]:
    """The kernels read a stream's K and V (and dO, and write its gradients) with its
    Q's strides: give them contiguous tensors. Their shapes are equal (_check_streams),
    so they address alike (a contiguous tensor's strides can differ only on size-1
    dims, where the index is always 0)."""
    return [t.contiguous() for t in tensors]


def _triton_fwd(qa, ka, va_, qb, kb, vb, cu_a, cu_b, max_a, max_b, scale, p_a, p_b, seed,
                offset):
    from mmkernels.triton.co_attention import _co_attn_fwd_kernel

    qa, ka, va_, qb, kb, vb = _stream_layout(qa, ka, va_, qb, kb, vb)
    cu_a, cu_b = cu_a.contiguous(), cu_b.contiguous()
    total_a, H, D = qa.shape
    total_b = qb.shape[0]
    batch = cu_a.numel() - 1
    oa = torch.zeros_like(qa)
    ob = torch.zeros_like(qb)
    lse_a = torch.full((H, total_a), float("-inf"), dtype=torch.float32, device=qa.device)
    lse_b = torch.full((H, total_b), float("-inf"), dtype=torch.float32, device=qa.device)
    if batch == 0 or max(max_a, max_b) == 0:
        return oa, ob, lse_a, lse_b
    block_d = va.block_d_for(D)
    cfg = _pick("fwd", block_d)
    grid = (va.triton_cdiv(max(max_a, max_b), cfg.block_m), batch, 2 * H)
    with va._guard(qa.device):
        _co_attn_fwd_kernel[grid](
            qa, ka, va_, qb, kb, vb, oa, ob, lse_a, lse_b, cu_a, cu_b,
            *qa.stride(), *qb.stride(), *oa.stride(), *ob.stride(), lse_a.stride(0),
            lse_b.stride(0), scale, p_a, p_b, *va._philox_args(seed, offset), D, H,
            HAS_DROPOUT=(p_a > 0 or p_b > 0), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_D=block_d, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return oa, ob, lse_a, lse_b


def _triton_bwd(doa, dob, qa, ka, va_, qb, kb, vb, oa, ob, lse_a, lse_b, cu_a, cu_b, max_a,
                max_b, scale, p_a, p_b, seed, offset):
    """One pass (default): one launch of the delta pre-kernel, then one of the dK/dV
    kernel with ATOMIC_DQ (dQ of both streams into float32 buffers with atomics).
    Deterministic (``torch.use_deterministic_algorithms(True)``): dK/dV without atomics,
    then the dQ kernel (it recomputes S and dP: 7 GEMMs per tile pair instead of 5).
    Each kernel covers both directions in one launch."""
    from mmkernels.triton.co_attention import (
        _co_attn_bwd_delta_kernel,
        _co_attn_bwd_dkdv_kernel,
        _co_attn_bwd_dq_kernel,
    )

    # dO_a (O_a) is read with stream A's strides, dO_b (O_b) with B's (as the gradients written)
    qa, ka, va_, doa, oa, qb, kb, vb, dob, ob = _stream_layout(qa, ka, va_, doa, oa, qb, kb, vb,
                                                               dob, ob)
    cu_a, cu_b = cu_a.contiguous(), cu_b.contiguous()
    lse_a, lse_b = lse_a.contiguous(), lse_b.contiguous()
    total_a, H, D = qa.shape
    total_b = qb.shape[0]
    batch = cu_a.numel() - 1
    if batch == 0 or max(max_a, max_b) == 0:
        return tuple(torch.zeros_like(t) for t in (qa, ka, va_, qb, kb, vb))
    # every key row of either stream belongs to a launched key tile, which stores its
    # dK/dV rows (zeros where no query sees it): no zero-fill
    dka, dva, dkb, dvb = (torch.empty_like(t) for t in (ka, va_, kb, vb))
    one_pass = not va.deterministic_backward(False)
    if one_pass:  # accumulated with atomics: start at zero
        dq_acc_a = torch.zeros(qa.shape, dtype=torch.float32, device=qa.device)
        dq_acc_b = torch.zeros(qb.shape, dtype=torch.float32, device=qa.device)
    else:
        dqa, dqb = torch.empty_like(qa), torch.empty_like(qb)
        dq_acc_a, dq_acc_b = lse_a, lse_b  # unused placeholders (float32)
    block_d = va.block_d_for(D)
    delta_a = torch.empty(H, total_a, dtype=torch.float32, device=qa.device)
    delta_b = torch.empty(H, total_b, dtype=torch.float32, device=qa.device)
    block_t = va.delta_block_t(block_d)
    common = (cu_a, cu_b, *qa.stride(), *qb.stride(), lse_a.stride(0), lse_b.stride(0), scale,
              p_a, p_b, *va._philox_args(seed, offset), D, H)
    with va._guard(qa.device):
        _co_attn_bwd_delta_kernel[(va.triton_cdiv(max(total_a, total_b), block_t), 2 * H)](
            oa, doa, ob, dob, delta_a, delta_b, total_a, total_b, *qa.stride(), *qb.stride(),
            delta_a.stride(0), delta_b.stride(0), D, H, BLOCK_T=block_t, BLOCK_D=block_d,
            num_warps=DELTA_WARPS)
        cfg = _pick("bwd" if one_pass else "dkdv", block_d)
        _co_attn_bwd_dkdv_kernel[(va.triton_cdiv(max(max_a, max_b), cfg.block_n), batch, 2 * H)](
            qa, ka, va_, qb, kb, vb, doa, dob, lse_a, lse_b, delta_a, delta_b, dka, dva, dkb, dvb,
            dq_acc_a, dq_acc_b, *common, HAS_DROPOUT=(p_a > 0 or p_b > 0), ATOMIC_DQ=one_pass,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if one_pass:
            dqa, dqb = (t if qa.dtype == torch.float32 else t.to(qa.dtype)
                        for t in (dq_acc_a, dq_acc_b))
            return dqa, dka, dva, dqb, dkb, dvb
        cfg = _pick("dq", block_d)
        _co_attn_bwd_dq_kernel[(va.triton_cdiv(max(max_a, max_b), cfg.block_m), batch, 2 * H)](
            qa, ka, va_, qb, kb, vb, doa, dob, lse_a, lse_b, delta_a, delta_b, dqa, dqb,
            *common, HAS_DROPOUT=(p_a > 0 or p_b > 0), BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, BLOCK_D=block_d, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
    return dqa, dka, dva, dqb, dkb, dvb


@torch.library.custom_op("mmkernels::co_attention_fwd", mutates_args=())
def _co_attention_fwd(q_a: Tensor, k_a: Tensor, v_a: Tensor, q_b: Tensor, k_b: Tensor,
                      v_b: Tensor, cu_seqlens_a: Tensor, cu_seqlens_b: Tensor, max_seqlen_a: int,
                      max_seqlen_b: int, softmax_scale: float, dropout_a: float, dropout_b: float,
                      seed: int, offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_op_inputs(q_a, k_a, v_a, q_b, k_b, v_b, cu_seqlens_a, cu_seqlens_b)
    if va._uses_triton(q_a.device):
        return _triton_fwd(q_a, k_a, v_a, q_b, k_b, v_b, cu_seqlens_a, cu_seqlens_b,
                           max_seqlen_a, max_seqlen_b, softmax_scale, dropout_a, dropout_b, seed,
                           offset)
    H = q_a.shape[1]
    outs = []
    for q, k, v, cq, ck, p, stream0 in ((q_a, k_b, v_b, cu_seqlens_a, cu_seqlens_b, dropout_a, 0),
                                       (q_b, k_a, v_a, cu_seqlens_b, cu_seqlens_a, dropout_b, H)):
        if va._use_fused_cpu(q, k, p):
            outs.append(va._cpu_fwd_fused(q, k, v, cq, ck, None, softmax_scale, False))
        else:
            o, lse = va._cpu_fwd(q, k, v, cq, ck, None, softmax_scale, False, p, seed, offset,
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
    if va._uses_triton(q_a.device):
        return _triton_bwd(grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a,
                           lse_b, cu_seqlens_a, cu_seqlens_b, max_seqlen_a, max_seqlen_b,
                           softmax_scale, dropout_a, dropout_b, seed, offset)
    H = q_a.shape[1]
    res = []
    for g, q, k, v, o, lse, cq, ck, p, stream0 in (
            (grad_a, q_a, k_b, v_b, out_a, lse_a, cu_seqlens_a, cu_seqlens_b, dropout_a, 0),
            (grad_b, q_b, k_a, v_a, out_b, lse_b, cu_seqlens_b, cu_seqlens_a, dropout_b, H)):
        if va._use_fused_cpu(q, k, p, backward=True):
            res.append(va._cpu_bwd_fused(g, q, k, v, o, lse, cq, ck, None, softmax_scale, False))
        else:
            res.append(va._cpu_bwd(g, q, k, v, cq, ck, None, softmax_scale, False, p, seed,
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
    va.check_cu_seqlens(cu_seqlens_a, q_a.shape[0], max_seqlen_a, "cu_seqlens_a", "max_seqlen_a",
                        "q_a, k_a and v_a", q_a.device)
    va.check_cu_seqlens(cu_seqlens_b, q_b.shape[0], max_seqlen_b, "cu_seqlens_b", "max_seqlen_b",
                        "q_b, k_b and v_b", q_a.device)
    if cu_seqlens_a.numel() != cu_seqlens_b.numel():
        raise ValueError(f"cu_seqlens_a and cu_seqlens_b must have the same batch, got "
                         f"{cu_seqlens_a.numel() - 1} and {cu_seqlens_b.numel() - 1} samples")
    if isinstance(dropout_p, (tuple, list)):
        if len(dropout_p) != 2:
            raise ValueError(f"dropout_p must be a float or a pair (p_a, p_b), got {dropout_p}")
        p_a, p_b = (va.check_dropout_p(p, "dropout_p") for p in dropout_p)
    else:
        p_a = p_b = va.check_dropout_p(dropout_p, "dropout_p")
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
            keep_a = va._lazy_keep_masks(seed, offset, cu_seqlens_a, cu_seqlens_b, H, p_a, 0,
                                         q_a.device)
        if p_b > 0:
            keep_b = va._lazy_keep_masks(seed, offset, cu_seqlens_b, cu_seqlens_a, H, p_b, H,
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
    va.check_like(q_a, "q_a", ts[1:], names[1:])
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
    if q_a.dtype == torch.float64 and va._runs_triton(q_a.device):
        raise TypeError("q_a: float64 is supported on the CPU path only (the Triton kernels "
                        "run float16, bfloat16 and float32)")


def _check_op_inputs(q_a, k_a, v_a, q_b, k_b, v_b, cu_a, cu_b) -> None:
    """The custom ops' own checks (reachable as torch.ops.mmkernels.co_attention_*):
    shapes, and on CPU the offsets against the token counts (host data, free)."""
    _check_streams(q_a, k_a, v_a, q_b, k_b, v_b)
    va._check_op_inputs(q_a, k_b, v_b, cu_a, cu_b, None, ("q_a", "k_b", "v_b"),
                        ("cu_seqlens_a", "cu_seqlens_b"))


def kernel_specs() -> list[KernelSpec]:
    from mmkernels.triton.co_attention import (
        _co_attn_bwd_delta_kernel,
        _co_attn_bwd_dkdv_kernel,
        _co_attn_bwd_dq_kernel,
        _co_attn_fwd_kernel,
    )

    specs = []
    for kernel, kind in ((_co_attn_fwd_kernel, "fwd"), (_co_attn_bwd_dkdv_kernel, "bwd"),
                         (_co_attn_bwd_dkdv_kernel, "dkdv"), (_co_attn_bwd_dq_kernel, "dq")):
        for block_d in (64, 128):
            cfg = CONFIGS[kind][block_d][0]
            for dropout in (False, True):
                for ints16 in (False, True):
                    specs.append(va.attention_spec(kernel, block_d, cfg, False, False, "bf16",
                                                   dropout=dropout, ints16=ints16,
                                                   atomic_dq=kind == "bwd"))
    for block_d in (64, 128):
        names = ("oa_ptr", "doa_ptr", "ob_ptr", "dob_ptr", "deltaa_ptr", "deltab_ptr")
        sig = {n: "*fp32" if n.startswith("delta") else "*bf16" for n in names}
        sig.update({n: "i32" for n in ("total_a", "total_b", "stride_at", "stride_ah")})
        sig.update({"stride_ad": "constexpr", "stride_bt": "i32", "stride_bh": "i32",
                    "stride_bd": "constexpr", "stride_lah": "i32", "stride_lbh": "i32",
                    "head_dim": "i32", "num_heads": "i32", "BLOCK_T": "constexpr",
                    "BLOCK_D": "constexpr"})
        consts = {"stride_ad": 1, "stride_bd": 1, "BLOCK_T": va.delta_block_t(block_d),
                  "BLOCK_D": block_d}
        specs.append(KernelSpec("_co_attn_bwd_delta_kernel", _co_attn_bwd_delta_kernel, sig,
                                consts, {"num_warps": DELTA_WARPS, "num_stages": 1},
                                f"D{block_d}",
                                needs_mma=False,
                                attrs={(i,): [["tt.divisibility", 16]] for i in range(6)}))
    return specs
