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
from mmkernels.triton import KernelSpec, interpreting

__all__ = ["co_attention"]

# (kind, padded D) -> configs: the varlen tables, except where the two-direction
# kernel spills with them (checked by the kernel report).
CONFIGS = {kind: dict(table) for kind, table in va.CONFIGS.items()}
CONFIGS["dq"][128] = [va.AttnConfig(32, 64, 8, 1)]
# D=128 forward: M128-N64 spills on sm_80 in the dropout variant once the sizes are
# multiples of 16 (64 B of stack, 3 or 2 stages); M128-N32 keeps the q tile and the
# pipelining without spills (216 registers at most)
CONFIGS["fwd"][128] = [va.AttnConfig(128, 32, 8, 2)]


def _pick(kind: str, block_d: int) -> va.AttnConfig:
    return va.INTERPRET_CONFIG if interpreting() else CONFIGS[kind][max(block_d, 64)][0]


def _triton_fwd(qa, ka, va_, qb, kb, vb, cu_a, cu_b, max_a, max_b, scale, p_a, p_b, seed):
    from mmkernels.triton.co_attention import _co_attn_fwd_kernel

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
            lse_b.stride(0), scale, p_a, p_b, seed, max_a, max_b, D, H,
            HAS_DROPOUT=(p_a > 0 or p_b > 0), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_D=block_d, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return oa, ob, lse_a, lse_b


def _triton_bwd(doa, dob, qa, ka, va_, qb, kb, vb, oa, ob, lse_a, lse_b, cu_a, cu_b, max_a,
                max_b, scale, p_a, p_b, seed):
    from mmkernels.triton.co_attention import _co_attn_bwd_dkdv_kernel, _co_attn_bwd_dq_kernel

    total_a, H, D = qa.shape
    batch = cu_a.numel() - 1
    grads = [torch.zeros_like(t) for t in (qa, ka, va_, qb, kb, vb)]
    if batch == 0 or max(max_a, max_b) == 0:
        return tuple(grads)
    dqa, dka, dva, dqb, dkb, dvb = grads
    delta_a = (doa.float() * oa.float()).sum(-1).transpose(0, 1).contiguous()
    delta_b = (dob.float() * ob.float()).sum(-1).transpose(0, 1).contiguous()
    block_d = va.block_d_for(D)
    common = (cu_a, cu_b, *qa.stride(), *qb.stride(), lse_a.stride(0), lse_b.stride(0), scale,
              p_a, p_b, seed, max_a, max_b, D, H)
    with va._guard(qa.device):
        cfg = _pick("dkdv", block_d)
        _co_attn_bwd_dkdv_kernel[(va.triton_cdiv(max(max_a, max_b), cfg.block_n), batch, 2 * H)](
            qa, ka, va_, qb, kb, vb, doa, dob, lse_a, lse_b, delta_a, delta_b, dka, dva, dkb, dvb,
            *common, HAS_DROPOUT=(p_a > 0 or p_b > 0), BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, BLOCK_D=block_d, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
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
                      seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if va._uses_triton(q_a.device):
        return _triton_fwd(q_a, k_a, v_a, q_b, k_b, v_b, cu_seqlens_a, cu_seqlens_b,
                           max_seqlen_a, max_seqlen_b, softmax_scale, dropout_a, dropout_b, seed)
    H = q_a.shape[1]
    outs = []
    for q, k, v, cq, ck, p, stream0 in ((q_a, k_b, v_b, cu_seqlens_a, cu_seqlens_b, dropout_a, 0),
                                       (q_b, k_a, v_a, cu_seqlens_b, cu_seqlens_a, dropout_b, H)):
        if p == 0 and q.dtype in va._FUSED_CPU_DTYPES:
            outs.append(va._cpu_fwd_fused(q, k, v, cq, ck, None, softmax_scale, False))
        else:
            o, lse = va._cpu_fwd(q, k, v, cq, ck, None, softmax_scale, False, p, seed, stream0)
            outs.append((o.contiguous(), lse.contiguous()))
    return outs[0][0], outs[1][0], outs[0][1], outs[1][1]


@_co_attention_fwd.register_fake
def _(q_a, k_a, v_a, q_b, k_b, v_b, cu_seqlens_a, cu_seqlens_b, max_seqlen_a, max_seqlen_b,
      softmax_scale, dropout_a, dropout_b, seed):
    H = q_a.shape[1]
    return (torch.empty_like(q_a), torch.empty_like(q_b),
            q_a.new_empty((H, q_a.shape[0]), dtype=torch.float32),
            q_b.new_empty((H, q_b.shape[0]), dtype=torch.float32))


@torch.library.custom_op("mmkernels::co_attention_bwd", mutates_args=())
def _co_attention_bwd(grad_a: Tensor, grad_b: Tensor, q_a: Tensor, k_a: Tensor, v_a: Tensor,
                      q_b: Tensor, k_b: Tensor, v_b: Tensor, out_a: Tensor, out_b: Tensor,
                      lse_a: Tensor, lse_b: Tensor, cu_seqlens_a: Tensor, cu_seqlens_b: Tensor,
                      max_seqlen_a: int, max_seqlen_b: int, softmax_scale: float,
                      dropout_a: float, dropout_b: float, seed: int) -> tuple[
                          Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if va._uses_triton(q_a.device):
        return _triton_bwd(grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a,
                           lse_b, cu_seqlens_a, cu_seqlens_b, max_seqlen_a, max_seqlen_b,
                           softmax_scale, dropout_a, dropout_b, seed)
    H = q_a.shape[1]
    res = []
    for g, q, k, v, o, lse, cq, ck, p, stream0 in (
            (grad_a, q_a, k_b, v_b, out_a, lse_a, cu_seqlens_a, cu_seqlens_b, dropout_a, 0),
            (grad_b, q_b, k_a, v_a, out_b, lse_b, cu_seqlens_b, cu_seqlens_a, dropout_b, H)):
        if p == 0 and q.dtype in va._FUSED_CPU_DTYPES:
            res.append(va._cpu_bwd_fused(g, q, k, v, o, lse, cq, ck, None, softmax_scale, False))
        else:
            res.append(va._cpu_bwd(g, q, k, v, cq, ck, None, softmax_scale, False, p, seed,
                                   stream0))
    (dqa, dkb, dvb), (dqb, dka, dva) = res
    return dqa, dka, dva, dqb, dkb, dvb


@_co_attention_bwd.register_fake
def _(grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a, lse_b, cu_seqlens_a,
      cu_seqlens_b, max_seqlen_a, max_seqlen_b, softmax_scale, dropout_a, dropout_b, seed):
    return tuple(torch.empty_like(t) for t in (q_a, k_a, v_a, q_b, k_b, v_b))


def _setup_context(ctx, inputs, output):
    (q_a, k_a, v_a, q_b, k_b, v_b, cu_a, cu_b, max_a, max_b, scale, p_a, p_b, seed) = inputs
    out_a, out_b, lse_a, lse_b = output
    ctx.save_for_backward(q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a, lse_b, cu_a, cu_b)
    ctx.args = (max_a, max_b, scale, p_a, p_b, seed)
    ctx.mark_non_differentiable(lse_a, lse_b)


def _backward(ctx, grad_a, grad_b, _gla, _glb):
    q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a, lse_b, cu_a, cu_b = ctx.saved_tensors
    grad_a = torch.zeros_like(out_a) if grad_a is None else grad_a.contiguous()
    grad_b = torch.zeros_like(out_b) if grad_b is None else grad_b.contiguous()
    grads = _co_attention_bwd(grad_a, grad_b, q_a, k_a, v_a, q_b, k_b, v_b, out_a, out_b, lse_a,
                              lse_b, cu_a, cu_b, *ctx.args)
    return (*grads, None, None, None, None, None, None, None, None)


_co_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def co_attention(q_a: Tensor, k_a: Tensor, v_a: Tensor, q_b: Tensor, k_b: Tensor, v_b: Tensor,
                 cu_seqlens_a: Tensor, cu_seqlens_b: Tensor, max_seqlen_a: int,
                 max_seqlen_b: int, *, softmax_scale: float | None = None,
                 dropout_p: float | tuple[float, float] = 0.0,
                 dropout_seed: int | None = None) -> tuple[Tensor, Tensor]:
    """Two-stream co-attention (ViLBERT), both directions fused.

    Args:
        q_a, k_a, v_a: (total_a, H, D) packed stream A; q_b, k_b, v_b: (total_b, H, D)
            stream B; one dtype (float16/bfloat16/float32; float64 on the CPU path),
            D <= 256.
        cu_seqlens_a, cu_seqlens_b: (batch + 1,) int32 each, with the same batch; a
            sample may be empty in either stream.
        max_seqlen_a, max_seqlen_b: longest lengths.
        softmax_scale: default 1 / sqrt(D).
        dropout_p: on the attention probabilities; a float, or (p_a, p_b) for the two
            directions (ViLBERT uses two dropout modules). Different Philox streams per
            direction; the backward regenerates them.
        dropout_seed: testing hook (see :func:`mmkernels.ops.varlen_attention.dropout_keep_mask`
            with stream0 = 0 for A->B and H for B->A).

    Returns:
        out_a (total_a, H, D) = attention(q_a, k_b, v_b) and out_b (total_b, H, D) =
        attention(q_b, k_a, v_a). One kernel launch computes both (and one launch per
        backward pass computes each of dK/dV and dQ for both); gradients flow to all six
        inputs, deterministically.
    """
    va._check_qkv(q_a, k_a, v_a, ("q_a", "k_a", "v_a"))
    va._check_qkv(q_b, k_b, v_b, ("q_b", "k_b", "v_b"))
    if q_a.dtype != q_b.dtype:
        raise TypeError(f"both streams must share a dtype, got {q_a.dtype} and {q_b.dtype}")
    if q_a.device != q_b.device:
        raise ValueError("both streams must be on one device")
    if q_a.shape[1:] != q_b.shape[1:] or k_a.shape[1] != q_a.shape[1]:
        raise ValueError(f"both streams need the same heads and head dim (no GQA), got "
                         f"{tuple(q_a.shape[1:])} and {tuple(q_b.shape[1:])}")
    va.check_cu_seqlens(cu_seqlens_a, q_a.shape[0], max_seqlen_a, "cu_seqlens_a", "max_seqlen_a")
    va.check_cu_seqlens(cu_seqlens_b, q_b.shape[0], max_seqlen_b, "cu_seqlens_b", "max_seqlen_b")
    if cu_seqlens_a.numel() != cu_seqlens_b.numel():
        raise ValueError(f"cu_seqlens_a and cu_seqlens_b must have the same batch, got "
                         f"{cu_seqlens_a.numel() - 1} and {cu_seqlens_b.numel() - 1} samples")
    if cu_seqlens_a.device != q_a.device or cu_seqlens_b.device != q_a.device:
        raise ValueError("cu_seqlens must be on the streams' device")
    p_a, p_b = (dropout_p, dropout_p) if isinstance(dropout_p, (int, float)) else dropout_p
    for p in (p_a, p_b):
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q_a.shape[2])
    seed = 0 if p_a == 0 and p_b == 0 else (
        dropout_seed if dropout_seed is not None else va._draw_seed())
    if _extension.backend_override() == "reference":
        return reference.co_attention(q_a, k_a, v_a, q_b, k_b, v_b, cu_seqlens_a, cu_seqlens_b,
                                      scale)
    tensors = [q_a, k_a, v_a, q_b, k_b, v_b]
    if va._uses_triton(q_a.device):
        # the kernels take one set of strides per stream (and for its gradients)
        tensors = [t.contiguous() for t in tensors]
    out_a, out_b, _, _ = _co_attention_fwd(*tensors, cu_seqlens_a, cu_seqlens_b,
                                           int(max_seqlen_a), int(max_seqlen_b), scale,
                                           float(p_a), float(p_b), int(seed))
    return out_a, out_b


def kernel_specs() -> list[KernelSpec]:
    from mmkernels.triton.co_attention import (
        _co_attn_bwd_dkdv_kernel,
        _co_attn_bwd_dq_kernel,
        _co_attn_fwd_kernel,
    )

    specs = []
    for kernel, kind in ((_co_attn_fwd_kernel, "fwd"), (_co_attn_bwd_dkdv_kernel, "dkdv"),
                         (_co_attn_bwd_dq_kernel, "dq")):
        for block_d in (64, 128):
            cfg = CONFIGS[kind][block_d][0]
            for dropout in (False, True):
                for ints16 in (False, True):
                    specs.append(va.attention_spec(kernel, block_d, cfg, False, False, "bf16",
                                                   dropout=dropout, ints16=ints16))
    return specs
