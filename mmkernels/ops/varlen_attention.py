"""Packed multimodal attention: ``varlen_attention`` (flash_attn_varlen_func semantics,
plus image blocks that see each other inside a causal sequence).

Layers: Triton kernels (mmkernels/triton/varlen_attention.py on the shared core in
mmkernels/triton/attention.py); then two opaque ``torch.library.custom_op``s (forward,
backward) with fake kernels and autograd; then the functional API with validation
and the backend choice; the module is :class:`mmkernels.nn.VarlenSelfAttention`.

Backends (chosen in :func:`_uses_triton`): CUDA tensors, or any tensors under
``TRITON_INTERPRET=1``: Triton. CPU tensors: per sequence and row chunk, never padded:
torch's fused CPU flash-attention kernel (aten._scaled_dot_product_flash_attention_for_cpu,
forward and backward) for float32/bfloat16/float16 without dropout; otherwise the
explicit path of :mod:`mmkernels.reference` (float64, or dropout with a regenerable
mask). ``MMKERNELS_BACKEND=reference``: eager autograd.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from mmkernels import _extension, reference
from mmkernels.triton import KernelSpec, interpreter_tiles, interpreting

__all__ = ["varlen_attention", "dropout_keep_mask"]

CPU_CHUNK_ROWS = 1024  # query rows per step on the CPU path


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"M{self.block_m}-N{self.block_n}-w{self.num_warps}-s{self.num_stages}"


# Launch configurations per kernel and padded head dim, best first. Every entry was
# compiled for sm_80 and sm_90 in its lightest (full) and heaviest (causal + image
# blocks + window + softcap + dropout; non-causal window + softcap + dropout) variants
# and kept only without spills; `python -m mmkernels.tools.kernel_report` re-checks all
# of them in CI. ptxas spills a few bytes of cold values to reach a register count it
# prefers (128 or 168 at 4 warps, 80 at 8) even in light variants: a configuration can
# spill where a heavier one does not, so only the report decides.
_C = AttnConfig
CONFIGS: dict[str, dict[int, list[AttnConfig]]] = {
    # D128: M128-N64 spilled 8-24 bytes on sm_80 with image blocks + window + softcap
    # (with or without dropout); M128-N32, as co-attention's D128 forward and FA2's
    # hdim-128 forward with dropout, fits every variant.
    "fwd": {64: [_C(128, 64, 8, 3), _C(64, 64, 4, 3)],
            128: [_C(128, 32, 8, 3), _C(128, 32, 8, 2)],
            256: [_C(32, 32, 4, 2)]},
    # one-pass backward (dK/dV + atomic dQ). D64: N64 halves the dQ atomics of
    # M32-N32-w4 (which spilled 8-40 bytes: cold values at 128/168 registers);
    # M64-N32-w8 and M32-N64-w4 spilled. D256: M32-N32-w8 spilled 16 bytes on sm_80 in
    # the heavy variants, M16-N32-w8 fits (252 registers at most).
    "bwd": {64: [_C(32, 64, 8, 1)],
            128: [_C(32, 64, 8, 1)],
            256: [_C(16, 32, 8, 1)]},
    # D64: M32-N32 (4 or 8 warps), M32-N64-w8 and M16-N32-w4 spilled 8-40 bytes in
    # some variant; M64-N32-w8 fits (197 registers at most).
    "dkdv": {64: [_C(64, 32, 8, 1)],
             # (16, 32, 4, 1) left D128: 8 bytes of stack on sm_90 with dropout once
             # the Philox arguments stopped being specialised
             128: [_C(32, 64, 8, 1)],
             256: [_C(32, 32, 8, 1), _C(16, 32, 4, 1)]},
    "dq": {64: [_C(64, 32, 8, 2), _C(64, 32, 4, 2)],
           128: [_C(64, 32, 8, 2)],
           256: [_C(32, 32, 8, 1), _C(16, 32, 4, 1)]},
}
# CPU interpreter: small tiles, ragged tails (mmkernels.triton.production_tiles() overrides)
INTERPRET_CONFIG = AttnConfig(16, 16, 4, 1)


def block_d_for(head_dim: int) -> int:
    """Head dim padded to a power of two (>= 16): D = 80 runs as 128 with masked lanes."""
    return max(16, 1 << (head_dim - 1).bit_length())


def prune_configs(kind: str, block_d: int) -> list[AttnConfig]:
    """The configurations of kernel `kind` ("fwd", "dkdv", "dq") that fit a padded head
    dim without spills (head dims below 64 use the 64 entries, which need fewer
    registers)."""
    return CONFIGS[kind][max(block_d, 64)]


def pick_config(kind: str, block_d: int) -> AttnConfig:
    """The launch configuration of kernel `kind` for a padded head dim: the first
    pruned entry, or INTERPRET_CONFIG under the interpreter (outside
    :func:`mmkernels.triton.production_tiles`)."""
    if interpreter_tiles():
        return INTERPRET_CONFIG
    return prune_configs(kind, block_d)[0]


# ---------------------------------------------------------------------------------
# helpers shared with co-attention
# ---------------------------------------------------------------------------------


def block_tables(block_ids: Tensor, cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """Per-token reach tables for causal attention with image blocks (no host sync).

    reach[i]: last key (local index) query i sees = max(i, last position of i's block);
    reach_back[j]: first query that sees key j = min(j, first position of j's block).
    Both (total,) int32; block id 0 means "no block". Tiles outside these ranges are
    skipped by the kernels.
    """
    device = block_ids.device
    batch = cu_seqlens.numel() - 1
    cu = cu_seqlens.long()
    seq = torch.repeat_interleave(torch.arange(batch, device=device), cu.diff(),
                                  output_size=total)
    pos = torch.arange(total, device=device) - cu[seq]
    ids = block_ids.long()
    key = (seq << 32) | (ids & 0xFFFFFFFF)
    order = torch.argsort(key, stable=True)
    sk = key[order]
    new = torch.ones_like(sk, dtype=torch.long)
    new[1:] = (sk[1:] != sk[:-1]).long()
    gid = torch.empty_like(order)
    gid[order] = torch.cumsum(new, 0) - 1
    last = torch.full((total,), -1, dtype=torch.long, device=device).scatter_reduce(
        0, gid, pos, "amax")
    first = torch.full((total,), total, dtype=torch.long, device=device).scatter_reduce(
        0, gid, pos, "amin")
    in_block = ids != 0
    reach = torch.where(in_block, torch.maximum(pos, last[gid]), pos)
    reach_back = torch.where(in_block, torch.minimum(pos, first[gid]), pos)
    return reach.to(torch.int32), reach_back.to(torch.int32)


def _guard(device: torch.device):
    """Launch under the tensors' device (CUDA); nothing to guard on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------------------------
# dropout: Philox state (seed, offset), one mask definition for every backend
# ---------------------------------------------------------------------------------


def _int64_bits(x: int) -> int:
    """A 64-bit unsigned value as the int64 with the same bits (schema ints are int64)."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def philox_state(device: torch.device, increment: int,
                 dropout_seed: int | None = None) -> tuple[int, int]:
    """The (seed, offset) of one dropout call, as int64 bit patterns.

    CUDA tensors: reserved from the device's default CUDA generator with
    ``Generator.philox_state(increment)``, PyTorch's own protocol: reproducible
    under ``torch.manual_seed``, and the offset advances per call, so no two calls
    (nor PyTorch's own random kernels) share a Philox counter. CPU tensors (the
    interpreter and the CPU path; torch's CPU generator is not Philox), and any device
    under ``torch.compile``: a fresh 64-bit seed drawn from the CPU default generator,
    offset 0 (reproducible under ``torch.manual_seed``; two calls collide only if two
    64-bit draws do).
    ``dropout_seed`` (testing hook): that seed, offset 0.
    """
    if dropout_seed is not None:
        return _int64_bits(int(dropout_seed)), 0
    # Dynamo cannot trace Generator.philox_state: under torch.compile the seed is a
    # fresh 64-bit draw (offset 0), as on CPU, which traces without a graph break.
    if device.type == "cuda" and not torch.compiler.is_compiling():
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("dropout_p > 0 is not supported under CUDA graph capture (the "
                               "Philox seed and offset would be baked into the graph); "
                               "capture with dropout_p=0")
        index = device.index if device.index is not None else torch.cuda.current_device()
        seed, offset, _ = torch.cuda.default_generators[index].philox_state(increment)
        return int(seed.item()), int(offset.item())
    return int(torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64).item()), 0


def _philox_args(seed: int, offset: int) -> tuple[int, int, int, int]:
    """Kernel arguments (seed_lo, seed_hi, ctr_lo, ctr_hi): the 64-bit key and the
    64-bit counter base offset // 4, as signed int32 halves (Triton launches ints
    below 2^31 as int32: the argument types never depend on the values)."""
    def s32(x):
        x &= 0xFFFFFFFF
        return x - (1 << 32) if x >= 1 << 31 else x
    seed &= (1 << 64) - 1
    ctr = (offset & ((1 << 64) - 1)) >> 2
    return s32(seed), s32(seed >> 32), s32(ctr), s32(ctr >> 32)


def dropout_increment(max_seqlen_k: int) -> int:
    """Philox values one call reserves: each (stream, row) subsequence uses one
    counter (4 values) per key column."""
    return 4 * max(int(max_seqlen_k), 1)


# ---------------------------------------------------------------------------------
# Triton launches
# ---------------------------------------------------------------------------------


def _window_args(window: tuple[int, int], causal: bool, total_q: int, total_k: int
                 ) -> tuple[bool, int, int]:
    """(HAS_WINDOW, left, right) for the kernels: an unbounded side (-1) becomes a bound
    that never binds (left >= seqlen_k - 1, right >= seqlen_q - 1; the packed token
    counts bound both), so the kernels test both sides with int32 arithmetic; with
    causal only the left side counts (right is 0)."""
    left, right = window
    has = left >= 0 or (right >= 0 and not causal)
    left = total_k if left < 0 else min(left, total_k)
    right = 0 if causal else (total_q if right < 0 else min(right, total_q))
    return has, left, right


def _triton_fwd(q, k, v, cu_q, cu_k, block_ids, max_q, max_k, scale, causal, dropout_p, seed,
                offset, window=(-1, -1), softcap=0.0):
    from mmkernels.triton.varlen_attention import _varlen_attn_fwd_kernel

    total_q, H, D = q.shape
    H_kv = k.shape[1]
    batch = cu_q.numel() - 1
    cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()  # the kernels read cu_ptr + b
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.full((H, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    if total_q == 0 or batch == 0 or max_q == 0:
        out.zero_()
        return out, lse
    has_blocks = causal and block_ids is not None
    has_window, left, right = _window_args(window, causal, total_q, k.shape[0])
    if has_blocks:
        bid = block_ids.to(torch.int32).contiguous()
        reach, reach_back = block_tables(bid, cu_q, total_q)
    else:
        bid = reach = reach_back = cu_q  # unused placeholders
    block_d = block_d_for(D)
    cfg = pick_config("fwd", block_d)
    grid = (triton_cdiv(max_q, cfg.block_m), batch, H)
    with _guard(q.device):
        _varlen_attn_fwd_kernel[grid](
            q, k, v, out, lse, cu_q, cu_k, bid, reach, reach_back,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), lse.stride(0),
            scale, dropout_p, *_philox_args(seed, offset), D, H // H_kv, float(softcap), left,
            right, CAUSAL=causal, HAS_BLOCKS=has_blocks, HAS_DROPOUT=dropout_p > 0,
            HAS_WINDOW=has_window, HAS_SOFTCAP=softcap > 0, BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, BLOCK_D=block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def delta_block_t(block_d: int) -> int:
    """Tokens per program of the delta pre-kernel: 8192 elements per operand tile."""
    return max(16, 8192 // block_d)


def attention_delta(out: Tensor, do: Tensor) -> Tensor:
    """delta = rowsum(dO * O): (H, total) float32 from out, do (total, H, D) in their own
    dtype and strides, by :func:`mmkernels.triton.attention._attn_bwd_delta_kernel`
    (no float32 copies of O or dO)."""
    from mmkernels.triton.attention import _attn_bwd_delta_kernel

    total, H, D = out.shape
    delta = torch.empty(H, total, dtype=torch.float32, device=out.device)
    if delta.numel():
        block_d = block_d_for(D)
        block_t = delta_block_t(block_d)
        with _guard(out.device):
            _attn_bwd_delta_kernel[(triton_cdiv(total, block_t), H)](
                out, do, delta, total, D, *out.stride(), *do.stride(), delta.stride(0),
                BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return delta


def deterministic_backward(deterministic: bool) -> bool:
    """The deterministic backward runs when asked for (``deterministic=True``) or under
    ``torch.use_deterministic_algorithms(True)`` (read when the backward runs)."""
    return bool(deterministic) or torch.are_deterministic_algorithms_enabled()


def _triton_bwd(do, q, k, v, out, lse, cu_q, cu_k, block_ids, max_q, max_k, scale, causal,
                dropout_p, seed, offset, window=(-1, -1), softcap=0.0, deterministic=False):
    """One pass (default): dK, dV and, with atomics into a float32 buffer, dQ in one
    kernel. Deterministic: dK/dV, then dQ in a second kernel (no atomics; it
    recomputes S and dP: 7 GEMMs per tile pair instead of 5)."""
    from mmkernels.triton.varlen_attention import (
        _varlen_attn_bwd_dkdv_kernel,
        _varlen_attn_bwd_dq_kernel,
    )

    total_q, H, D = q.shape
    total_k, H_kv, _ = k.shape
    batch = cu_q.numel() - 1
    cu_q, cu_k, lse = cu_q.contiguous(), cu_k.contiguous(), lse.contiguous()
    if batch == 0 or total_q == 0 or total_k == 0:
        return (torch.zeros_like(q, memory_format=torch.contiguous_format),
                torch.zeros_like(k, memory_format=torch.contiguous_format),
                torch.zeros_like(v, memory_format=torch.contiguous_format))
    # every key row belongs to a launched key tile, which stores its dK/dV rows (zeros
    # where no query sees it): no zero-fill
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    one_pass = not deterministic_backward(deterministic)
    if one_pass:  # accumulated with atomics: starts at zero
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    else:
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dq_acc = lse  # unused placeholder (float32)
    delta = attention_delta(out, do)
    has_blocks = causal and block_ids is not None
    has_window, left, right = _window_args(window, causal, total_q, total_k)
    if has_blocks:
        bid = block_ids.to(torch.int32).contiguous()
        reach, reach_back = block_tables(bid, cu_q, total_q)
    else:
        bid = reach = reach_back = cu_q
    block_d = block_d_for(D)
    flags = dict(CAUSAL=causal, HAS_BLOCKS=has_blocks, HAS_DROPOUT=dropout_p > 0,
                 HAS_WINDOW=has_window, HAS_SOFTCAP=softcap > 0, BLOCK_D=block_d)
    dqa_strides = dq_acc.stride() if one_pass else (0, 0, 1)
    with _guard(q.device):
        cfg = pick_config("bwd" if one_pass else "dkdv", block_d)
        _varlen_attn_bwd_dkdv_kernel[(triton_cdiv(max_k, cfg.block_n), batch, H_kv)](
            q, k, v, do, lse, delta, dk, dv, dq_acc, cu_q, cu_k, bid, reach, reach_back,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), lse.stride(0),
            *dk.stride(), *dv.stride(), *dqa_strides, scale, dropout_p,
            *_philox_args(seed, offset), D, H // H_kv, float(softcap), left, right,
            ATOMIC_DQ=one_pass, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags)
        if one_pass:
            return (dq_acc if q.dtype == torch.float32 else dq_acc.to(q.dtype)), dk, dv
        cfg = pick_config("dq", block_d)
        _varlen_attn_bwd_dq_kernel[(triton_cdiv(max_q, cfg.block_m), batch, H)](
            q, k, v, do, dq, lse, delta, cu_q, cu_k, bid, reach, reach_back,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            lse.stride(0), scale, dropout_p, *_philox_args(seed, offset), D, H // H_kv,
            float(softcap), left, right,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **flags)
    return dq, dk, dv


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ---------------------------------------------------------------------------------
# CPU path (row-chunked, per sequence)
# ---------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------
# torch.library ops: forward, backward, fake kernels, autograd
# ---------------------------------------------------------------------------------


def _uses_triton(device: torch.device) -> bool:
    return device.type == "cuda" or interpreting()


def _runs_triton(device: torch.device) -> bool:
    """The Triton kernels will run (MMKERNELS_BACKEND=reference runs eager instead)."""
    return _uses_triton(device) and _extension.backend_override() != "reference"


@torch.library.custom_op("mmkernels::varlen_attention_fwd", mutates_args=())
def _varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                          cu_seqlens_k: Tensor, block_ids: Tensor | None, max_seqlen_q: int,
                          max_seqlen_k: int, softmax_scale: float, causal: bool,
                          dropout_p: float, seed: int, offset: int, window_left: int = -1,
                          window_right: int = -1, softcap: float = 0.0,
                          deterministic: bool = False) -> tuple[Tensor, Tensor]:
    _check_op_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, block_ids)
    window = (window_left, window_right)
    if _uses_triton(q.device):
        return _triton_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, block_ids, max_seqlen_q,
                           max_seqlen_k, softmax_scale, causal, dropout_p, seed, offset, window,
                           softcap)
    if _use_fused_cpu(q, k, dropout_p, softcap=softcap):
        return _cpu_fwd_fused(q, k, v, cu_seqlens_q, cu_seqlens_k, block_ids, softmax_scale,
                              causal, window)
    out, lse = _cpu_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, block_ids, softmax_scale, causal,
                        dropout_p, seed, offset, window=window, softcap=softcap)
    return out.contiguous(), lse.contiguous()


@_varlen_attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, block_ids, max_seqlen_q, max_seqlen_k, softmax_scale,
      causal, dropout_p, seed, offset, window_left=-1, window_right=-1, softcap=0.0,
      deterministic=False):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))


@torch.library.custom_op("mmkernels::varlen_attention_bwd", mutates_args=())
def _varlen_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                          lse: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                          block_ids: Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
                          softmax_scale: float, causal: bool, dropout_p: float,
                          seed: int, offset: int, window_left: int = -1, window_right: int = -1,
                          softcap: float = 0.0, deterministic: bool = False
                          ) -> tuple[Tensor, Tensor, Tensor]:
    _check_op_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, block_ids)
    for t, n in ((grad_out, "grad_out"), (out, "out")):
        if t.shape != q.shape:
            raise ValueError(f"{n} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    if lse.shape != (q.shape[1], q.shape[0]):
        raise ValueError(f"lse must have shape (H, total_q) = {(q.shape[1], q.shape[0])}, got "
                         f"{tuple(lse.shape)}")
    window = (window_left, window_right)
    if _uses_triton(q.device):
        return _triton_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, block_ids,
                           max_seqlen_q, max_seqlen_k, softmax_scale, causal, dropout_p, seed,
                           offset, window, softcap, deterministic)
    if _use_fused_cpu(q, k, dropout_p, backward=True, softcap=softcap):
        return _cpu_bwd_fused(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, block_ids,
                              softmax_scale, causal, window)
    return _cpu_bwd(grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, block_ids, softmax_scale,
                    causal, dropout_p, seed, offset, window=window, softcap=softcap)


@_varlen_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, block_ids, max_seqlen_q,
      max_seqlen_k, softmax_scale, causal, dropout_p, seed, offset, window_left=-1,
      window_right=-1, softcap=0.0, deterministic=False):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, block_ids, max_q, max_k, scale, causal, dropout_p, seed,
     offset, *rest) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, block_ids)
    ctx.args = (max_q, max_k, scale, causal, dropout_p, seed, offset, *rest)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_q, cu_k, block_ids = ctx.saved_tensors
    dq, dk, dv = _varlen_attention_bwd(grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k,
                                       block_ids, *ctx.args)
    return (dq, dk, dv) + (None,) * 14


_varlen_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------
# functional API
# ---------------------------------------------------------------------------------


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


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int | Tensor, max_seqlen_k: int | Tensor,
                     dropout_p: float = 0.0, softmax_scale: float | None = None,
                     causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                     softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                     deterministic: bool = False, return_attn_probs: bool = False, *,
                     block_ids: Tensor | None = None, return_lse: bool = False,
                     dropout_seed: int | None = None):
    """Attention over packed variable-length sequences, ``flash_attn_varlen_func``'s
    signature and positional order (existing callers switch by changing the import).

    Args:
        q: (total_q, H, D); k, v: (total_k, H_kv, D) with H % H_kv == 0 (GQA/MQA).
            float16/bfloat16/float32 (float64 on the CPU path); any D <= 256 (padded
            internally to a power of two); any strides.
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32 offsets of the sequences, on q's
            device: 0 first, non-decreasing, total_q (total_k) last; zero lengths are
            allowed.
        max_seqlen_q, max_seqlen_k: >= the longest sequence lengths: Python ints, or
            0-dim integer Tensors. A Tensor is never read on the host (no sync, so
            ``torch.compile`` and CUDA-graph capture need no ``.item()``): the grid is
            sized from the packed token count instead (extra programs exit at once) and
            the bound is checked by a device-side assert.
        dropout_p: dropout on the attention probabilities, in [0, 1). Philox4x32-10 with
            a (seed, offset) state as PyTorch's (see :func:`philox_state`); every
            backend (Triton, the CPU path, ``MMKERNELS_BACKEND=reference``) draws the
            same mask for the same state (:func:`mmkernels.reference.dropout_keep`),
            and the backward regenerates it. Use 0 in evaluation.
        softmax_scale: default 1 / sqrt(D).
        causal: bottom-right aligned causal mask when seqlen_q != seqlen_k, as flash-attn.
        window_size: (left, right) sliding-window (local) attention as flash-attn: query i
            sees keys j with i + off - left <= j <= i + off + right, off = seqlen_k -
            seqlen_q; -1 leaves a side unbounded. With causal the right side is 0 (as
            flash-attn). Key tiles outside the window are skipped by the kernels.
        softcap: > 0 caps the scaled scores, S = softcap * tanh(S / softcap) (Gemma-2,
            PaliGemma-2), in the forward and the backward; 0 disables it.
        alibi_slopes: not supported (must be None).
        deterministic: selects the deterministic backward (also taken under
            ``torch.use_deterministic_algorithms(True)``). The default backward (Triton)
            is FA2's one pass: dK/dV per key tile and dQ added with float32 atomics, so
            dQ may differ in its last bits from run to run. The deterministic one
            computes dQ in a second kernel without atomics, recomputing S and dP: 7
            GEMMs per tile pair instead of 5 (1.4x the MMA work of the backward), and
            no float32 dQ buffer. The CPU path is deterministic either way.
        return_attn_probs: not supported (must be False): the kernels never form the
            probabilities. Use ``return_lse=True`` for the log-sum-exp.
        block_ids: optional (total_q,) int32; requires cu_seqlens_q == cu_seqlens_k. With
            causal=True, two tokens of one sequence with the same non-zero id see each
            other both ways (an image's patches attend bidirectionally, text stays
            causal). With a window, block visibility is added on top of the windowed
            causal mask: a patch always sees its whole image, also outside the window.
            Ignored without causal.
        return_lse: also return the log-sum-exp (H, total_q) float32 (not differentiable).
        dropout_seed: testing hook; the Philox seed, with offset 0 (default: the
            state reserved from torch's default generator). :func:`dropout_keep_mask`
            returns the same mask.

    Returns:
        out (total_q, H, D) in q's dtype; with return_lse, (out, lse). A query row with
        no visible key (causal with seqlen_q > seqlen_k, a window, an empty key
        sequence) outputs zeros and lse = -inf (flash-attn also writes zeros; its lse
        there is +inf).
        Gradients flow to q, k and v (see ``deterministic``).

    Raises:
        TypeError / ValueError naming the offending argument (shapes, dtypes, devices,
        offsets, window_size, softcap; on CUDA the offset checks are device-side
        asserts, without a sync); NotImplementedError for alibi_slopes and
        return_attn_probs.
    """
    _check_qkv(q, k, v)
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes is not supported by mmkernels.varlen_attention "
                                  "(pass None)")
    if return_attn_probs:
        raise NotImplementedError("return_attn_probs=True is not supported: the kernels never "
                                  "form the attention probabilities (return_lse=True returns "
                                  "the log-sum-exp)")
    check_cu_seqlens(cu_seqlens_q, q.shape[0], max_seqlen_q, "cu_seqlens_q", "max_seqlen_q",
                     "q", q.device)
    check_cu_seqlens(cu_seqlens_k, k.shape[0], max_seqlen_k, "cu_seqlens_k", "max_seqlen_k",
                     "k", q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same batch, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1} sequences")
    if block_ids is not None:
        if not isinstance(block_ids, Tensor) or block_ids.dtype != torch.int32:
            raise TypeError("block_ids must be an int32 Tensor")
        if block_ids.shape != (q.shape[0],):
            raise ValueError(f"block_ids must have shape (total_q,) = ({q.shape[0]},), got "
                             f"{tuple(block_ids.shape)}")
        if block_ids.device != q.device:
            raise ValueError(f"block_ids must be on q's device ({q.device}), got "
                             f"{block_ids.device}")
        if q.shape[0] != k.shape[0]:
            raise ValueError("block_ids requires seqlen_q == seqlen_k for every sequence "
                             "(cu_seqlens_q == cu_seqlens_k)")
        if q.device.type in ("cuda", "meta") or torch.compiler.is_compiling():
            torch._assert_async((cu_seqlens_q == cu_seqlens_k).all(),
                                "block_ids requires cu_seqlens_q == cu_seqlens_k")
        elif not torch.equal(cu_seqlens_q, cu_seqlens_k):
            raise ValueError("block_ids requires seqlen_q == seqlen_k for every sequence "
                             "(cu_seqlens_q == cu_seqlens_k)")
    dropout_p = check_dropout_p(dropout_p)
    causal = bool(causal)
    window = check_window_size(window_size, causal)
    softcap = check_softcap(softcap)
    deterministic = bool(deterministic)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    # a sequence is never longer than its packed tensor: bounds the grid however large
    # the caller's max_seqlen is (a Tensor max_seqlen is never read: the count bounds it)
    max_q = q.shape[0] if isinstance(max_seqlen_q, Tensor) else min(max_seqlen_q, q.shape[0])
    max_k = k.shape[0] if isinstance(max_seqlen_k, Tensor) else min(max_seqlen_k, k.shape[0])
    seed = offset = 0
    if dropout_p > 0:
        seed, offset = philox_state(q.device, dropout_increment(max_k), dropout_seed)
    if _extension.backend_override() == "reference":
        keep = None
        if dropout_p > 0:
            keep = _lazy_keep_masks(seed, offset, cu_seqlens_q, cu_seqlens_k, q.shape[1],
                                    dropout_p, device=q.device)
        out, lse = reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal,
                                              block_ids, dropout_p, keep, window_size=window,
                                              softcap=softcap)
    else:
        out, lse = _varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, block_ids,
                                         int(max_q), int(max_k), scale, causal, dropout_p,
                                         seed, offset, window[0], window[1], softcap,
                                         deterministic)
    return (out, lse) if return_lse else out


def dropout_keep_rows(seed: int, offset: int, stream: int, rows: Tensor, num_cols: int,
                      dropout_p: float, device: torch.device | str | None = None) -> Tensor:
    """Testing hook: (len(rows), num_cols) bool, element (packed query row rows[i], key
    column j) of dropout stream `stream` under Philox state (seed, offset), drawn by the
    kernels' own :func:`mmkernels.triton.attention._dropout_keep` when `device` runs
    Triton (CUDA, or the interpreter), else by :func:`mmkernels.reference.dropout_keep`
    (on the C++ op mmkernels::dropout_keep when built; all agree bit for bit)."""
    device = torch.device(device) if device is not None else rows.device
    if not _uses_triton(device):
        return _keep_heads(seed, offset, stream, 1, rows.cpu(), torch.arange(num_cols),
                           dropout_p)[0]
    return _triton_keep(seed, offset, stream, rows, num_cols, dropout_p, 1, device)[0]


def _triton_keep(seed, offset, stream0, rows, num_cols, dropout_p, num_heads, device,
                 carry_by_compare=False):
    from mmkernels.triton.attention import _dropout_mask_kernel

    rows = rows.to(device=device, dtype=torch.int32).contiguous()
    mask = torch.zeros(num_heads, rows.numel(), num_cols, dtype=torch.int8, device=device)
    if mask.numel():
        with _guard(device):
            _dropout_mask_kernel[(triton_cdiv(rows.numel(), 16), num_heads)](
                mask, rows, rows.numel(), num_cols, mask.stride(0), mask.stride(1),
                float(dropout_p), *_philox_args(seed, offset), stream0, BLOCK_M=16, BLOCK_N=16,
                CARRY_BY_COMPARE=carry_by_compare)
    return mask.bool()


def dropout_keep_mask(seed: int, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, num_heads: int,
                      dropout_p: float, *, offset: int = 0, stream0: int = 0,
                      device: torch.device | str = "cpu") -> list[Tensor]:
    """Testing hook: the keep-masks that ``varlen_attention(..., dropout_seed=seed)``
    used (offset 0), one (H, seqlen_q, seqlen_k) bool tensor per sequence, on the CPU
    (for a per-sequence reference). ``stream0`` selects the direction in co-attention
    (0 for A->B, H for B->A). On a Triton device the kernels' mask function computes
    it, elsewhere :func:`mmkernels.reference.dropout_keep_masks` (on the C++ op when
    built)."""
    device = torch.device(device)
    if not _uses_triton(device):
        return reference.dropout_keep_masks(seed, offset, cu_seqlens_q.cpu(),
                                            cu_seqlens_k.cpu(), num_heads, dropout_p, stream0,
                                            generate=_keep_heads)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    batch = len(cq) - 1
    num_cols = max((ck[b + 1] - ck[b] for b in range(batch)), default=0)
    mask = _triton_keep(seed, offset, stream0, torch.arange(cq[-1]), num_cols, dropout_p,
                        num_heads, device).cpu()
    return [mask[:, cq[b]:cq[b + 1], : ck[b + 1] - ck[b]] for b in range(batch)]


# ---------------------------------------------------------------------------------
# static report specs
# ---------------------------------------------------------------------------------


def kernel_specs() -> list[KernelSpec]:
    """Every (kernel, head-dim bucket, config) the package can launch, in bf16."""
    from mmkernels.triton.attention import _attn_bwd_delta_kernel
    from mmkernels.triton.varlen_attention import (
        _varlen_attn_bwd_dkdv_kernel,
        _varlen_attn_bwd_dq_kernel,
        _varlen_attn_fwd_kernel,
    )

    specs = []
    for kernel, kind in ((_varlen_attn_fwd_kernel, "fwd"), (_varlen_attn_bwd_dkdv_kernel, "bwd"),
                         (_varlen_attn_bwd_dkdv_kernel, "dkdv"),
                         (_varlen_attn_bwd_dq_kernel, "dq")):
        for block_d in (64, 128, 256):
            for cfg in prune_configs(kind, block_d):
                one = functools.partial(attention_spec, atomic_dq=kind == "bwd")
                # the lightest and the heaviest variants of each configuration (causal:
                # blocks + window + softcap + dropout; non-causal: both window sides +
                # softcap + dropout), with generic sizes and with sizes that are
                # multiples of 16
                for ints16 in (False, True):
                    specs.append(one(kernel, block_d, cfg, False, False, "bf16", ints16=ints16))
                    specs.append(one(kernel, block_d, cfg, True, True, "bf16", dropout=True,
                                     ints16=ints16, window=True, softcap=True))
                    specs.append(one(kernel, block_d, cfg, False, False, "bf16", dropout=True,
                                     ints16=ints16, window=True, softcap=True))
    for block_d in (64, 128, 256):
        sig = {"o_ptr": "*bf16", "do_ptr": "*bf16", "delta_ptr": "*fp32", "n_tokens": "i32",
               "head_dim": "i32", "stride_ot": "i32", "stride_oh": "i32", "stride_od": "constexpr",
               "stride_dot": "i32", "stride_doh": "i32", "stride_dod": "constexpr",
               "stride_lh": "i32", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
        consts = {"stride_od": 1, "stride_dod": 1, "BLOCK_T": delta_block_t(block_d),
                  "BLOCK_D": block_d}
        specs.append(KernelSpec("_attn_bwd_delta_kernel", _attn_bwd_delta_kernel, sig, consts,
                                {"num_warps": 4, "num_stages": 1}, f"D{block_d}",
                                needs_mma=False,
                                attrs={(i,): [["tt.divisibility", 16]] for i in range(3)}))
    return specs


def attention_spec(kernel, block_d: int, cfg: AttnConfig, causal: bool, blocks: bool,
                   dtype: str, dropout: bool = False, ints16: bool = False, window: bool = False,
                   softcap: bool = False, atomic_dq: bool = False) -> KernelSpec:
    """A KernelSpec for an attention kernel, specialised as a real launch on contiguous
    (total, heads, D) tensors is: the head-dim strides (stride_*d) are 1, the other
    strides and the pointers are multiples of 16. Pointers: lse/delta float32,
    cu/bid/reach int32, the rest `dtype`; sizes and window bounds int32;
    scale/p/softcap float32, dq_acc float32. window / softcap / atomic_dq: the
    HAS_WINDOW / HAS_SOFTCAP / ATOMIC_DQ variants (kernels without those constexprs
    ignore them). ints16: the
    integer arguments (head dim, max_seqlen_k, seed, group) are multiples of 16 too, as
    Triton specialises such launches separately (head dims 64/80/128 always are), except
    the Philox arguments, which the kernels never specialise (PHILOX_ARGS)."""
    import inspect

    from mmkernels.triton.attention import PHILOX_ARGS

    names = list(inspect.signature(kernel.fn).parameters)
    consts = {"CAUSAL": causal, "HAS_BLOCKS": blocks, "HAS_DROPOUT": dropout,
              "HAS_WINDOW": window, "HAS_SOFTCAP": softcap, "ATOMIC_DQ": atomic_dq,
              "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_D": block_d}
    consts = {k: v for k, v in consts.items() if k in names}
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"
        elif n.startswith("stride_") and n.endswith("d") and n != "stride_dkh":
            sig[n] = "constexpr"
            consts[n] = 1
        elif n.endswith("_ptr"):
            if n.startswith(("lse", "delta", "dq_acc")):
                sig[n] = "*fp32"
            elif n.startswith(("cu", "bid", "reach")):
                sig[n] = "*i32"
            else:
                sig[n] = f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in ("sm_scale", "dropout_p", "softcap"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if n.startswith("stride_") or (ints16 and n not in PHILOX_ARGS):
                attrs[(i,)] = [["tt.divisibility", 16]]
    tag = ("causal+blocks" if blocks else "causal" if causal else "full")
    tag += "+window" if window and "HAS_WINDOW" in consts else ""
    tag += "+softcap" if softcap and "HAS_SOFTCAP" in consts else ""
    tag += "+dropout" if dropout else ""
    tag += " one-pass" if atomic_dq and "ATOMIC_DQ" in consts else ""
    tag += f" D{block_d} {cfg}" + (" ints%16" if ints16 else "")
    return KernelSpec(kernel.fn.__name__, kernel, sig, consts,
                      {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, tag,
                      attrs=attrs)
