"""Varlen (packed) attention kernels: thin launch wrappers over the shared core in
:mod:`mmkernels.triton.attention`. One program per (tile, sequence, head). Head h
draws dropout stream h. Head offsets are int64 (h * stride_h passes 2^31 for a
heads-first layout of more than 2^31 elements)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mmkernels.triton import KernelSpec, interpreter_tiles
from mmkernels.triton.attention import (
    PHILOX_ARGS,
    _attn_bwd_delta_kernel,
    _attn_fwd_tile,
    _seq_bounds,
)
from mmkernels.triton.attention_bwd import _attn_bwd_dkdv_tile, _attn_bwd_dq_tile
from mmkernels.triton.attention_launch import (
    INTERPRET_CONFIG,
    SPLIT_ARGS,
    AttnConfig,
    attention_delta,
    attention_spec,
    autotuning,
    block_tables,
    cdiv,
    delta_spec,
    device_guard,
    head_chunks,
    head_splits,
    launch_attention,
    philox_args,
    sm_count,
    sum_head_splits,
    window_args,
)


@triton.jit(do_not_specialize=PHILOX_ARGS)
def _varlen_attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, bid_ptr,
                            reach_ptr, reach_back_ptr, stride_qt, stride_qh, stride_qd, stride_kt, stride_kh,
                            stride_kd, stride_vt, stride_vh, stride_vd, stride_ot, stride_oh,
                            stride_od, stride_lh, sm_scale, dropout_p, seed_lo, seed_hi,
                            ctr_lo, ctr_hi, head_dim, group, softcap, win_left, win_right,
                            CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr,
                            HAS_DROPOUT: tl.constexpr, HAS_WINDOW: tl.constexpr,
                            HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_D1: tl.constexpr = 0, EVEN_D: tl.constexpr = False):
    start_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start, seqlen_q = _seq_bounds(cu_q_ptr, b)
    if start_m * BLOCK_M < seqlen_q:
        k_start, seqlen_k = _seq_bounds(cu_k_ptr, b)
        h64 = h.to(tl.int64)
        kvh = (h // group).to(tl.int64)
        q64 = q_start.to(tl.int64)
        k64 = k_start.to(tl.int64)
        _attn_fwd_tile(q_ptr + q64 * stride_qt + h64 * stride_qh,
                       k_ptr + k64 * stride_kt + kvh * stride_kh,
                       v_ptr + k64 * stride_vt + kvh * stride_vh,
                       o_ptr + q64 * stride_ot + h64 * stride_oh,
                       lse_ptr + h64 * stride_lh + q64,
                       bid_ptr + q64, bid_ptr + k64, reach_ptr + q64,
                       stride_qt, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd,
                       stride_ot, stride_od, seqlen_q, seqlen_k, start_m, head_dim, sm_scale,
                       dropout_p, seed_lo, seed_hi, ctr_lo, ctr_hi, h, q_start,
                       CAUSAL, HAS_BLOCKS, HAS_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_D,
                       reach_back_ptr + q64, softcap, win_left, win_right, HAS_WINDOW,
                       HAS_SOFTCAP, BLOCK_D1, EVEN_D)


@triton.jit(do_not_specialize=PHILOX_ARGS + SPLIT_ARGS)
def _varlen_attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                                 dq_acc_ptr, cu_q_ptr, cu_k_ptr, bid_ptr, reach_ptr, reach_back_ptr,
                                 stride_qt, stride_qh, stride_qd, stride_kt, stride_kh,
                                 stride_kd, stride_vt, stride_vh, stride_vd, stride_dot,
                                 stride_doh, stride_dod, stride_lh, stride_dkt, stride_dkh,
                                 stride_dkd, stride_dvt, stride_dvh, stride_dvd, stride_dqat,
                                 stride_dqah, stride_dqad, sm_scale, dropout_p, seed_lo, seed_hi,
                                 ctr_lo, ctr_hi,
                                 head_dim, softcap, win_left, win_right,
                                 head_splits, heads_per_split,
                                 CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr,
                                 HAS_DROPOUT: tl.constexpr, HAS_WINDOW: tl.constexpr,
                                 HAS_SOFTCAP: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr = 0,
                                 EVEN_D: tl.constexpr = False):
    """dK, dV per key tile; with ATOMIC_DQ also dQ (atomics into the float32 dq_acc):
    the one-pass backward. Without, the deterministic path's first kernel.

    Program (n, b, p = kvh * head_splits + s) covers the query heads [s * G, +G) of
    kv head kvh's group, G = heads_per_split = (H / H_kv) / head_splits (GQA/MQA:
    :func:`head_splits` spreads a group over several programs when the grid is small;
    the splits divide the group). Those are the heads p * G + [0, G): the tile's own
    loop over a group of G heads with kv_head = p. It writes dK/dV "head" p of dk/dv:
    with one split the gradients themselves, with more float32 partials
    (total_k, H_kv * head_splits, D) that the launcher sums in a fixed order. (G comes
    from the host: dividing in the kernel cost the light D64 variant 8 bytes of
    spill on sm_80.)"""
    start_n = tl.program_id(0)
    b = tl.program_id(1)
    pid_h = tl.program_id(2)
    k_start, seqlen_k = _seq_bounds(cu_k_ptr, b)
    if start_n * BLOCK_N < seqlen_k:
        q_start, seqlen_q = _seq_bounds(cu_q_ptr, b)
        q64 = q_start.to(tl.int64)
        k64 = k_start.to(tl.int64)
        kvh64 = (pid_h // head_splits).to(tl.int64)
        out_h64 = pid_h.to(tl.int64)
        _attn_bwd_dkdv_tile(q_ptr + q64 * stride_qt, k_ptr + k64 * stride_kt + kvh64 * stride_kh,
                            v_ptr + k64 * stride_vt + kvh64 * stride_vh,
                            do_ptr + q64 * stride_dot, lse_ptr + q64, delta_ptr + q64,
                            dk_ptr + k64 * stride_dkt + out_h64 * stride_dkh,
                            dv_ptr + k64 * stride_dvt + out_h64 * stride_dvh,
                            bid_ptr + q64, bid_ptr + k64, reach_back_ptr + k64,
                            stride_qt, stride_qh, stride_qd, stride_kt, stride_kd,
                            stride_vt, stride_vd, stride_dot, stride_doh, stride_dod, stride_lh,
                            stride_dkt, stride_dkd, stride_dvt, stride_dvd,
                            seqlen_q, seqlen_k, start_n, head_dim, sm_scale, dropout_p,
                            seed_lo, seed_hi, ctr_lo, ctr_hi, 0, q_start, pid_h,
                            heads_per_split,
                            CAUSAL, HAS_BLOCKS, HAS_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_D,
                            reach_ptr + k64, softcap, win_left, win_right, HAS_WINDOW,
                            HAS_SOFTCAP, dq_acc_ptr + q64 * stride_dqat, stride_dqat,
                            stride_dqah, stride_dqad, ATOMIC_DQ, BLOCK_D1, EVEN_D)


@triton.jit(do_not_specialize=PHILOX_ARGS)
def _varlen_attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr,
                               cu_q_ptr, cu_k_ptr, bid_ptr, reach_ptr, reach_back_ptr,
                               stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
                               stride_vt, stride_vh, stride_vd, stride_dot, stride_doh,
                               stride_dod, stride_dqt, stride_dqh, stride_dqd, stride_lh,
                               sm_scale, dropout_p, seed_lo, seed_hi, ctr_lo, ctr_hi, head_dim,
                               group, softcap, win_left, win_right,
                               CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr,
                               HAS_DROPOUT: tl.constexpr, HAS_WINDOW: tl.constexpr,
                               HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_D1: tl.constexpr = 0, EVEN_D: tl.constexpr = False):
    start_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start, seqlen_q = _seq_bounds(cu_q_ptr, b)
    if start_m * BLOCK_M < seqlen_q:
        k_start, seqlen_k = _seq_bounds(cu_k_ptr, b)
        h64 = h.to(tl.int64)
        kvh = (h // group).to(tl.int64)
        q64 = q_start.to(tl.int64)
        k64 = k_start.to(tl.int64)
        _attn_bwd_dq_tile(q_ptr + q64 * stride_qt + h64 * stride_qh,
                          k_ptr + k64 * stride_kt + kvh * stride_kh,
                          v_ptr + k64 * stride_vt + kvh * stride_vh,
                          do_ptr + q64 * stride_dot + h64 * stride_doh,
                          dq_ptr + q64 * stride_dqt + h64 * stride_dqh,
                          lse_ptr + h64 * stride_lh + q64,
                          delta_ptr + h64 * stride_lh + q64,
                          bid_ptr + q64, bid_ptr + k64, reach_ptr + q64,
                          stride_qt, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd,
                          stride_dot, stride_dod, stride_dqt, stride_dqd,
                          seqlen_q, seqlen_k, start_m, head_dim, sm_scale, dropout_p,
                          seed_lo, seed_hi, ctr_lo, ctr_hi, h, q_start,
                          CAUSAL, HAS_BLOCKS, HAS_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_D,
                          reach_back_ptr + q64, softcap, win_left, win_right, HAS_WINDOW,
                          HAS_SOFTCAP, BLOCK_D1, EVEN_D)


# ---------------------------------------------------------------------------------
# launch configurations
# ---------------------------------------------------------------------------------


# Launch configurations per kernel and padded head dim, best first. Every entry was
# compiled for sm_80 and sm_90 in its lightest (full) and heaviest (causal + image
# blocks + window + softcap + dropout; non-causal window + softcap + dropout) variants,
# the dK/dV kernel also with the float32 partials of a head split, and kept only
# without spills; `python -m mmkernels.tools.kernel_report` re-checks all of them in
# CI. ptxas spills a few bytes of cold values to reach a register count it prefers
# (128 or 168 at 4 warps, 80 at 8) even in light variants: a configuration can spill
# where a heavier one does not, so only the report decides.
#
# The autotune space (mmkernels.triton.attention_launch.launch_attention): on a GPU
# the forward and the one-pass backward ("fwd", "bwd") autotune over their whole
# list, keyed by (architecture, padded D, causal, image blocks, max_seqlen bucket);
# the deterministic path ("dkdv", "dq"), deterministic algorithms, MMKERNELS_AUTOTUNE=0,
# the interpreter and production_tiles() (the audit) take the first entry.
# Candidates tried and dropped (spills on sm_80 in the heaviest variant, kernel report
# of the candidate; the masks-only-at-boundaries rewrite may let them in): fwd D64
# M128-N128-w8-s2, M64-N128-w4-s2; fwd D128 M64-N64 (w4 or w8, s2 or s3),
# M128-N64-w8-s2; fwd D256 M32-N64-w4-s2; bwd D64 M64-N64-w8-s1, M32-N64-w4-s1; bwd
# D128 M32-N64-w8-s2, M64-N64-w8-s1, M32-N64-w4-s1; bwd D256 M16-N64-w8-s1,
# M16-N32-w8-s2; dkdv D64 M64-N32-w8-s2, M32-N64-w8-s2, M64-N64-w8-s2, M32-N64-w4-s2.
_C = AttnConfig
CONFIGS: dict[str, dict[int, list[AttnConfig]]] = {
    # D128: M128-N64 spilled 8-24 bytes on sm_80 with image blocks + window + softcap
    # (with or without dropout); M128-N32, as co-attention's D128 forward and FA2's
    # hdim-128 forward with dropout, fits every variant.
    # D64: the two-stage and three-stage versions of each tile fit too.
    # D80 (64 + 16 lanes, also D72) and D96 (64 + 32): head_chunks(); the D128 tiles.
    # D256: M32-N32-w4 (two or three stages) spilled 16-24 bytes on sm_80 in the
    # heaviest variant once interior tiles ran unmasked; 8 warps or M16 fit there, but
    # in the light variants ptxas aimed at 128 (8 warps) or 168 registers (4 warps) and
    # spilled 8-16 bytes: register cap 255 (AttnConfig.maxnreg), as the backward's.
    "fwd": {64: [_C(128, 64, 8, 3), _C(64, 64, 4, 3), _C(128, 64, 8, 2), _C(64, 64, 4, 2)],
            80: [_C(128, 32, 8, 3)],
            96: [_C(128, 32, 8, 3)],
            128: [_C(128, 32, 8, 3), _C(128, 32, 8, 2)],
            256: [_C(32, 32, 8, 2, 255), _C(16, 32, 4, 2, 255)]},
    # one-pass backward (dK/dV + atomic dQ). D64: N64 halves the dQ atomics of
    # M32-N32-w4 (which spilled 8-40 bytes: cold values at 128/168 registers);
    # M64-N32-w8 and M32-N64-w4 spilled; M32-N64-w8-s2 is the pipelined candidate.
    # D96 (every head dim in (64, 96]: head_chunks(backward=True)): M32-N64-w8 spilled
    # 150-490 bytes on sm_80 (M32-N32-w8 and M64-N32-w8 too); M16-N64-w8 keeps the
    # 64-key tiles and fits. D128: M32-N64-w8 spilled 24-136 bytes on sm_80 in the
    # heaviest variants with the unmasked interior loop (two stages 24-136, M64-N64-w8
    # 104-152); M16-N64-w8 fits. D256: M16-N32-w8 with one masked loop (attention_bwd);
    # M16-N64-w8, M32-N32-w8, M16-N32-w4 and 16 warps spilled 8-208 bytes.
    "bwd": {64: [_C(32, 64, 8, 1), _C(32, 64, 8, 2)],
            96: [_C(16, 64, 8, 1)],
            128: [_C(16, 64, 8, 1)],
            256: [_C(16, 32, 8, 1)]},
    # the deterministic path (head dims in (64, 96] pad to 128 there, see head_chunks).
    # D64: M32-N32 (4 or 8 warps), M32-N64-w8 and M16-N32-w4 spilled 8-40 bytes in
    # some variant; M64-N32-w8 fits (197 registers at most). D256: M32-N32-w8 and
    # M16-N32-w4 spilled 24-104 bytes on sm_80; M16-N32-w8 fits with register cap 255
    # (ptxas's own choice of 128 spilled 8-24 bytes in the lightest and heaviest variants).
    "dkdv": {64: [_C(64, 32, 8, 1)],
             # (16, 32, 4, 1) left D128: 8 bytes of stack on sm_90 with dropout once
             # the Philox arguments stopped being specialised
             128: [_C(32, 64, 8, 1)],
             256: [_C(16, 32, 8, 1, 255)]},
    # D128: M64-N32-w8-s2 spilled 16 bytes on sm_80 (heaviest variant); M32-N64-w8-s2
    # (64-key tiles, two stages) fits, varlen and co-attention
    "dq": {64: [_C(64, 32, 8, 2), _C(64, 32, 4, 2)],
           128: [_C(32, 64, 8, 2)],
           256: [_C(32, 32, 8, 1), _C(16, 32, 4, 1)]},
}
# CPU interpreter: small tiles, ragged tails (mmkernels.triton.production_tiles() overrides)


def prune_configs(kind: str, block_d: int) -> list[AttnConfig]:
    """The configurations of kernel `kind` ("fwd", "bwd", "dkdv", "dq") that fit a head-dim
    bucket (:func:`head_chunks`: the sum of the chunks) without spills (head dims below
    64 use the 64 entries, which need fewer registers)."""
    return CONFIGS[kind][max(block_d, 64)]


def pick_config(kind: str, block_d: int) -> AttnConfig:
    """The launch configuration of kernel `kind` for a padded head dim when it is not
    autotuned: the first pruned entry, or INTERPRET_CONFIG under the interpreter
    (outside :func:`mmkernels.triton.production_tiles`)."""
    if interpreter_tiles():
        return INTERPRET_CONFIG
    return prune_configs(kind, block_d)[0]


def launch_configs(kind: str, block_d: int, tune: bool) -> list[AttnConfig]:
    """The configurations a launch of kernel `kind` chooses from: the whole pruned list
    when it autotunes (`tune`, :func:`mmkernels.triton.attention_launch.autotuning`),
    else :func:`pick_config`'s one."""
    return list(prune_configs(kind, block_d)) if tune else [pick_config(kind, block_d)]


def dkdv_splits(block_n: int, max_k: int, batch: int, H: int, H_kv: int,
                device: torch.device) -> int:
    """Head splits of the dK/dV kernel's query-head loop
    (:func:`mmkernels.triton.attention_launch.head_splits`) for key tiles of `block_n`."""
    return head_splits(cdiv(max_k, block_n) * batch * H_kv, H // H_kv, sm_count(device))


def dkdv_grid(max_k: int, batch: int, H: int, H_kv: int, head_dim: int,
              deterministic: bool = False, device: torch.device | None = None
              ) -> tuple[int, int, int]:
    """The grid of the backward's dK/dV kernel (the one-pass kernel, or the
    deterministic path's first), computed on the host as :func:`launch_bwd` does:
    (key tiles, sequences, kv heads x head splits). The audit checks that an MQA
    backward fills an H100 with it."""
    device = torch.device("cpu") if device is None else device
    kind = "dkdv" if deterministic else "bwd"
    block_d = sum(head_chunks(head_dim, backward=True, deterministic=deterministic))
    # the autotune space's largest key tile (the launcher's smallest grid); one config
    # under the interpreter's small tiles
    configs = launch_configs(kind, block_d, not interpreter_tiles())
    block_n = max(c.block_n for c in configs)
    splits = dkdv_splits(block_n, max_k, batch, H, H_kv, device)
    return cdiv(max_k, block_n), batch, H_kv * splits


# ---------------------------------------------------------------------------------
# launches
# ---------------------------------------------------------------------------------


def launch_fwd(q, k, v, cu_q, cu_k, block_ids, max_q, max_k, scale, causal, dropout_p, seed,
                offset, window=(-1, -1), softcap=0.0):
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
    has_window, left, right = window_args(window, causal, total_q, k.shape[0])
    if has_blocks:
        bid = block_ids.to(torch.int32).contiguous()
        reach, reach_back = block_tables(bid, cu_q, total_q)
    else:
        bid = reach = reach_back = cu_q  # unused placeholders
    block_d, block_d1 = head_chunks(D)
    bucket = block_d + block_d1  # the config bucket
    with device_guard(q.device):
        launch_attention(
            _varlen_attn_fwd_kernel, "fwd", bucket, launch_configs("fwd", bucket, autotuning()),
            lambda m, n: (cdiv(max_q, m), batch, H),
            (q, k, v, out, lse, cu_q, cu_k, bid, reach, reach_back,
             *q.stride(), *k.stride(), *v.stride(), *out.stride(), lse.stride(0),
             scale, dropout_p, *philox_args(seed, offset), D, H // H_kv, float(softcap), left,
             right),
            dict(CAUSAL=causal, HAS_BLOCKS=has_blocks, HAS_DROPOUT=dropout_p > 0,
                 HAS_WINDOW=has_window, HAS_SOFTCAP=softcap > 0, BLOCK_D=block_d,
                 BLOCK_D1=block_d1, EVEN_D=D == block_d + block_d1),
            q.device, max(max_q, max_k))
    return out, lse


def launch_bwd(do, q, k, v, out, lse, cu_q, cu_k, block_ids, max_q, max_k, scale, causal,
                dropout_p, seed, offset, window=(-1, -1), softcap=0.0, deterministic=False):
    """One pass (default): dK, dV and, with atomics into a float32 buffer, dQ in one
    kernel. Deterministic: dK/dV, then dQ in a second kernel (no atomics; it
    recomputes S and dP: 7 GEMMs per tile pair instead of 5)."""
    total_q, H, D = q.shape
    total_k, H_kv, _ = k.shape
    batch = cu_q.numel() - 1
    cu_q, cu_k, lse = cu_q.contiguous(), cu_k.contiguous(), lse.contiguous()
    if batch == 0 or total_q == 0 or total_k == 0:
        return (torch.zeros_like(q, memory_format=torch.contiguous_format),
                torch.zeros_like(k, memory_format=torch.contiguous_format),
                torch.zeros_like(v, memory_format=torch.contiguous_format))
    one_pass = not deterministic
    block_d, block_d1 = head_chunks(D, backward=True, deterministic=deterministic)
    bucket = block_d + block_d1  # the config bucket
    kind = "bwd" if one_pass else "dkdv"
    configs = launch_configs(kind, bucket, one_pass and autotuning())
    # sized for the largest key tile of the autotune space (its smallest grid)
    splits = dkdv_splits(max(c.block_n for c in configs), max_k, batch, H, H_kv, q.device)
    # every key row belongs to a launched key tile, which stores its dK/dV rows (zeros
    # where no query sees it): no zero-fill. With a head split, float32 partials.
    if splits == 1:
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    else:
        dk, dv = (torch.empty(total_k, H_kv * splits, D, dtype=torch.float32, device=q.device)
                  for _ in range(2))
    if one_pass:  # accumulated with atomics: starts at zero
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    else:
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dq_acc = lse  # unused placeholder (float32)
    delta = attention_delta(out, do)
    has_blocks = causal and block_ids is not None
    has_window, left, right = window_args(window, causal, total_q, total_k)
    if has_blocks:
        bid = block_ids.to(torch.int32).contiguous()
        reach, reach_back = block_tables(bid, cu_q, total_q)
    else:
        bid = reach = reach_back = cu_q
    flags = dict(CAUSAL=causal, HAS_BLOCKS=has_blocks, HAS_DROPOUT=dropout_p > 0,
                 HAS_WINDOW=has_window, HAS_SOFTCAP=softcap > 0, BLOCK_D=block_d,
                 BLOCK_D1=block_d1, EVEN_D=D == bucket)
    dqa_strides = dq_acc.stride() if one_pass else (0, 0, 1)
    with device_guard(q.device):
        launch_attention(
            _varlen_attn_bwd_dkdv_kernel, kind, bucket, configs,
            lambda m, n: (cdiv(max_k, n), batch, H_kv * splits),
            (q, k, v, do, lse, delta, dk, dv, dq_acc, cu_q, cu_k, bid, reach, reach_back,
             *q.stride(), *k.stride(), *v.stride(), *do.stride(), lse.stride(0),
             *dk.stride(), *dv.stride(), *dqa_strides, scale, dropout_p,
             *philox_args(seed, offset), D, float(softcap), left, right,
             splits, H // H_kv // splits),
            dict(ATOMIC_DQ=one_pass, **flags), q.device, max(max_q, max_k),
            reset_to_zero=("dq_acc_ptr",) if one_pass else ())
        if splits > 1:
            dk, dv = sum_head_splits(dk, splits, k.dtype), sum_head_splits(dv, splits, v.dtype)
        if one_pass:
            return (dq_acc if q.dtype == torch.float32 else dq_acc.to(q.dtype)), dk, dv
        cfg = pick_config("dq", bucket)
        _varlen_attn_bwd_dq_kernel[(cdiv(max_q, cfg.block_m), batch, H)](
            q, k, v, do, dq, lse, delta, cu_q, cu_k, bid, reach, reach_back,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            lse.stride(0), scale, dropout_p, *philox_args(seed, offset), D, H // H_kv,
            float(softcap), left, right,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **cfg.options, **flags)
    return dq, dk, dv


# ---------------------------------------------------------------------------------
# static report specs
# ---------------------------------------------------------------------------------


def kernel_specs() -> list[KernelSpec]:
    """Every (kernel, head-dim bucket, config) the package can launch, in bf16."""
    specs = []
    for kernel, kind in ((_varlen_attn_fwd_kernel, "fwd"), (_varlen_attn_bwd_dkdv_kernel, "bwd"),
                         (_varlen_attn_bwd_dkdv_kernel, "dkdv"),
                         (_varlen_attn_bwd_dq_kernel, "dq")):
        for block_d in CONFIGS[kind]:  # the backward has no 80 bucket (head_chunks)
            for cfg in prune_configs(kind, block_d):
                # the lightest and the heaviest variants of each configuration (causal:
                # blocks + window + softcap + dropout; non-causal: both window sides +
                # softcap + dropout), with generic sizes and with sizes that are
                # multiples of 16; the dK/dV kernel also with the float32 partials of
                # a head split (GQA/MQA)
                for split in (False, True) if kind in ("bwd", "dkdv") else (False,):
                    one = functools.partial(attention_spec, atomic_dq=kind == "bwd",
                                            split=split)
                    for ints16 in (False, True):
                        specs.append(one(kernel, block_d, cfg, False, False, "bf16",
                                         ints16=ints16))
                        specs.append(one(kernel, block_d, cfg, True, True, "bf16",
                                         dropout=True, ints16=ints16, window=True,
                                         softcap=True))
                        specs.append(one(kernel, block_d, cfg, False, False, "bf16",
                                         dropout=True, ints16=ints16, window=True,
                                         softcap=True))
    for block_d in (64, 80, 96, 128, 256):
        sig = {"o_ptr": "*bf16", "do_ptr": "*bf16", "delta_ptr": "*fp32", "n_tokens": "i32",
               "head_dim": "i32", "stride_ot": "i32", "stride_oh": "i32", "stride_od": "constexpr",
               "stride_dot": "i32", "stride_doh": "i32", "stride_dod": "constexpr",
               "stride_lh": "i32", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
        specs.append(delta_spec(_attn_bwd_delta_kernel, "_attn_bwd_delta_kernel", sig, 3,
                                block_d, num_warps=4))
    return specs
