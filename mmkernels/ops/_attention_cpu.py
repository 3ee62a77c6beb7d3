"""The CPU path of varlen attention (and of co-attention, which runs it once per
direction): per sequence and row chunk, never padded. torch's fused CPU
flash-attention kernel (aten._scaled_dot_product_flash_attention_for_cpu, forward and
backward) for float32/bfloat16/float16 without dropout or softcap; otherwise the
explicit path of :mod:`mmkernels.reference` (float64, dropout with a regenerable mask,
softcap)."""

from __future__ import annotations

import torch
from torch import Tensor

from mmkernels import _extension, reference

CPU_CHUNK_ROWS = 1024  # query rows per step on the CPU path

_FUSED_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _use_fused_cpu(q: Tensor, k: Tensor, dropout_p: float, backward: bool = False,
                   softcap: float = 0.0) -> bool:
    """torch's fused CPU flash-attention kernel serves the CPU path without dropout and
    without softcap (it cannot cap the scores; a window is an additive mask there),
    except:

    * for the backward under torch.use_deterministic_algorithms(True): its gradients
      change with the thread count (measured: 2e-6 on dK, 1100 rows, 1 vs 2 threads),
      so the explicit per-chunk backward runs instead (bit-identical for any thread
      count). The fused forward computes each row in one thread: unaffected.
    * when q or k holds a NaN or an Inf: the fused kernel returns 0 (and lse 0) for a
      row whose scores are all NaN or all -inf, where softmax gives NaN (found by the
      fuzz suite). The explicit path propagates them as the reference does. The check
      is one sum of q and one of k (O(total * H * D), small next to the attention).
    """
    if dropout_p != 0 or softcap > 0 or q.dtype not in _FUSED_CPU_DTYPES:
        return False
    if backward and torch.are_deterministic_algorithms_enabled():
        return False
    # one reduction per tensor: a NaN or an Inf anywhere makes the sum non-finite (an
    # overflow of finite values does too, which only takes the explicit path)
    return bool(torch.isfinite(q.sum() + k.sum()))


def _cpu_segments(q, k, v, cu_q, cu_k, block_ids, causal, window=(-1, -1)):
    """Yield (n, first query row, end query row, first key row, end key row, is_causal,
    additive mask or None, rows without a visible key) for the fused CPU
    flash-attention kernel, never padding. n > 1: n consecutive sequences of the same
    lengths with no mask (a batch of equal-length images, ViT-style), attended in one
    call as a batch of n; otherwise one sequence (n = 1), or a row chunk of one (a
    window or image blocks: an additive mask per row chunk)."""
    windowed = tuple(window) != (-1, -1)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    run = None  # [n, q0, k0, lq, lk, is_causal]: pending equal-length unmasked sequences
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0:
            continue
        plain = lk > 0 and lq <= CPU_CHUNK_ROWS and not windowed and (
            not causal or (block_ids is None and lq == lk))
        if run is not None and not (plain and run[3:] == [lq, lk, causal]
                                    and q0 == run[1] + run[0] * lq
                                    and k0 == run[2] + run[0] * lk):
            n, r0, c0, rl, cl, is_causal = run
            yield n, r0, r0 + n * rl, c0, c0 + n * cl, is_causal, None, None
            run = None
        if plain:
            if run is None:
                run = [0, q0, k0, lq, lk, causal]
            run[0] += 1
            continue
        if lk == 0:
            yield 1, q0, q1, k0, k1, None, None, None
            continue
        bq = block_ids[q0:q1] if block_ids is not None else None
        bk = block_ids[k0:k1] if block_ids is not None else None
        for r in range(0, lq, CPU_CHUNK_ROWS):
            r1 = min(r + CPU_CHUNK_ROWS, lq)
            if causal or windowed:
                vis = reference.attention_visibility(lq, lk, causal, bq, bk,
                                                     window_size=window)[r:r1]
                mask = torch.zeros(vis.shape, dtype=q.dtype).masked_fill_(~vis, float("-inf"))
                empty = ~vis.any(1)
            else:
                mask, empty = None, None
            yield 1, q0 + r, q0 + r1, k0, k1, False, mask, empty
    if run is not None:
        n, r0, c0, rl, cl, is_causal = run
        yield n, r0, r0 + n * rl, c0, c0 + n * cl, is_causal, None, None


def _heads_first(t: Tensor, group: int = 1) -> Tensor:
    """(total, heads, D) -> (heads * group, total, D): one layout change for the whole
    packed tensor, so each sequence is a strided slice (no per-sequence copies)."""
    t = t.transpose(0, 1)
    return t.repeat_interleave(group, dim=0) if group > 1 else t


def _batched(t: Tensor, r0: int, r1: int, n: int) -> Tensor:
    """Rows [r0, r1) of a heads-first (H, total, D) tensor as a batch of n equal
    sequences (n, H, (r1 - r0) / n, D) (a view)."""
    H, _, D = t.shape
    return t[:, r0:r1].view(H, n, (r1 - r0) // n, D).transpose(0, 1)


def _unbatched(t: Tensor) -> Tensor:
    """(n, H, L, ...) -> (H, n * L, ...): the inverse of :func:`_batched`."""
    return t.transpose(0, 1).reshape(t.shape[1], t.shape[0] * t.shape[2], *t.shape[3:])


def _cpu_fwd_fused(q, k, v, cu_q, cu_k, block_ids, scale, causal, window=(-1, -1)):
    """CPU forward on torch's fused flash-attention CPU kernel: one call per run of
    equal-length unmasked sequences, or per (sequence, row chunk) with a mask."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    total_q, H, D = q.shape
    group = H // k.shape[1]
    qh, kh, vh = _heads_first(q), _heads_first(k, group), _heads_first(v, group)
    out = torch.zeros(H, total_q, D, dtype=q.dtype)
    lse = torch.full((H, total_q), float("-inf"), dtype=torch.float32)
    for n, r0, r1, k0, k1, is_causal, mask, empty in _cpu_segments(q, k, v, cu_q, cu_k,
                                                                  block_ids, causal, window):
        if is_causal is None:
            continue
        o, l = flash(_batched(qh, r0, r1, n), _batched(kh, k0, k1, n), _batched(vh, k0, k1, n),
                     is_causal=is_causal, attn_mask=None if mask is None else mask[None, None],
                     scale=scale)
        out[:, r0:r1] = _unbatched(o)
        l = _unbatched(l)
        lse[:, r0:r1] = l if empty is None else l.masked_fill(empty[None], float("-inf"))
    return out.transpose(0, 1).contiguous(), lse


def _cpu_bwd_fused(do, q, k, v, out, lse, cu_q, cu_k, block_ids, scale, causal, window=(-1, -1)):
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    total_q, H, D = q.shape
    total_k, H_kv = k.shape[0], k.shape[1]
    group = H // H_kv
    qh, kh, vh = _heads_first(q), _heads_first(k, group), _heads_first(v, group)
    doh, oh = _heads_first(do), _heads_first(out)
    lse0 = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None]
    dq = torch.zeros(H, total_q, D, dtype=q.dtype)
    acc = torch.float32 if q.dtype != torch.float32 else q.dtype
    dk = torch.zeros(H, total_k, D, dtype=acc)
    dv = torch.zeros(H, total_k, D, dtype=acc)
    for n, r0, r1, k0, k1, is_causal, mask, _empty in _cpu_segments(q, k, v, cu_q, cu_k,
                                                                   block_ids, causal, window):
        if is_causal is None:
            continue
        gq, gk, gv = flash_bwd(_batched(doh, r0, r1, n), _batched(qh, r0, r1, n),
                               _batched(kh, k0, k1, n), _batched(vh, k0, k1, n),
                               _batched(oh, r0, r1, n), _batched(lse0, r0, r1, n)[..., 0],
                               0.0, is_causal,
                               attn_mask=None if mask is None else mask[None, None], scale=scale)
        dq[:, r0:r1] = _unbatched(gq)
        dk[:, k0:k1] += _unbatched(gk)
        dv[:, k0:k1] += _unbatched(gv)
    dk = dk.view(H_kv, group, total_k, D).sum(1).transpose(0, 1)
    dv = dv.view(H_kv, group, total_k, D).sum(1).transpose(0, 1)
    return (dq.transpose(0, 1).contiguous(), dk.to(k.dtype).contiguous(),
            dv.to(v.dtype).contiguous())


def _as_int64(x: int) -> int:
    """A 64-bit word (Python int, taken modulo 2^64) as the int64 with its bits."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def _keep_heads(seed: int, offset: int, stream0: int, num_heads: int, rows: Tensor, cols: Tensor,
                dropout_p: float) -> Tensor:
    """:func:`mmkernels.reference.dropout_keep_heads` (bit for bit), on the C++ CPU op
    mmkernels::dropout_keep for CPU tensors when the extension has it (~300x faster than
    the int64 torch ops), else the pure-torch definition (CUDA tensors included)."""
    if rows.device.type == "cpu" and _extension.has_kernel("dropout_keep", "cpu"):
        return torch.ops.mmkernels.dropout_keep(_as_int64(seed), _as_int64(offset),
                                                _as_int64(stream0), num_heads, rows, cols,
                                                float(dropout_p))
    return reference.dropout_keep_heads(seed, offset, stream0, num_heads, rows, cols, dropout_p)


def _lazy_keep_masks(seed, offset, cu_q, cu_k, num_heads, dropout_p, stream0=0, device=None):
    """The call's keep-masks, generated per (sequence, row chunk) when asked for."""
    return reference.DropoutMasks(seed, offset, cu_q, cu_k, num_heads, dropout_p, stream0,
                                  device=device, generate=_keep_heads)


if _extension.is_available():
    @torch.library.register_fake("mmkernels::dropout_uniform")
    def _dropout_uniform_fake(seed, offset, stream0, num_streams, rows, cols):
        return rows.new_empty((num_streams, rows.shape[0], cols.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("mmkernels::dropout_keep")
    def _dropout_keep_fake(seed, offset, stream0, num_streams, rows, cols, dropout_p):
        return rows.new_empty((num_streams, rows.shape[0], cols.shape[0]), dtype=torch.bool)


def _cpu_fwd(q, k, v, cu_q, cu_k, block_ids, scale, causal, dropout_p, seed, offset, stream0=0,
             window=(-1, -1), softcap=0.0):
    keep = None
    if dropout_p > 0:  # masks per (sequence, row chunk): memory O(H * CPU_CHUNK_ROWS * Lk)
        keep = _lazy_keep_masks(seed, offset, cu_q, cu_k, q.shape[1], dropout_p, stream0)
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else None
    return reference.varlen_attention(q, k, v, cu_q, cu_k, scale, causal, block_ids, dropout_p,
                                      keep, CPU_CHUNK_ROWS, compute, window, softcap)


def _cpu_bwd(do, q, k, v, cu_q, cu_k, block_ids, scale, causal, dropout_p, seed, offset,
             stream0=0, window=(-1, -1), softcap=0.0):
    """Per sequence and row chunk, recompute P and apply the explicit backward."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    keep = (_lazy_keep_masks(seed, offset, cu_q, cu_k, q.shape[1], dropout_p, stream0)
            if dropout_p > 0 else None)
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    dq = torch.zeros(q.shape, dtype=compute)
    dk = torch.zeros(k.shape, dtype=compute)
    dv = torch.zeros(v.shape, dtype=compute)
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        ks, vs = k[k0:k1].to(compute), v[k0:k1].to(compute)
        bq = block_ids[q0:q1] if block_ids is not None else None
        bk = block_ids[k0:k1] if block_ids is not None else None
        vis = reference.attention_visibility(q1 - q0, k1 - k0, causal, bq, bk, window_size=window)
        for r in range(0, q1 - q0, CPU_CHUNK_ROWS):
            rr = slice(q0 + r, min(q0 + r + CPU_CHUNK_ROWS, q1))
            kp = None if keep is None else keep.block(b, r, r + CPU_CHUNK_ROWS)
            gq, gk, gv = reference.attention_backward(
                q[rr].to(compute), ks, vs, scale, vis[r:r + CPU_CHUNK_ROWS], do[rr].to(compute),
                kp, dropout_p, softcap)
            dq[rr] += gq
            dk[k0:k1] += gk
            dv[k0:k1] += gv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
