"""Varlen (packed) attention kernels: thin launch wrappers over the shared core in
:mod:`mmkernels.triton.attention`. One program per (tile, sequence, head). Head h
draws dropout stream h. Head offsets are int64 (h * stride_h passes 2^31 for a
heads-first layout of more than 2^31 elements)."""

from __future__ import annotations

import triton
import triton.language as tl

from mmkernels.triton.attention import (
    PHILOX_ARGS,
    _attn_bwd_dkdv_tile,
    _attn_bwd_dq_tile,
    _attn_fwd_tile,
    _seq_bounds,
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
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
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
                       HAS_SOFTCAP)


@triton.jit(do_not_specialize=PHILOX_ARGS)
def _varlen_attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                                 dq_acc_ptr, cu_q_ptr, cu_k_ptr, bid_ptr, reach_ptr, reach_back_ptr,
                                 stride_qt, stride_qh, stride_qd, stride_kt, stride_kh,
                                 stride_kd, stride_vt, stride_vh, stride_vd, stride_dot,
                                 stride_doh, stride_dod, stride_lh, stride_dkt, stride_dkh,
                                 stride_dkd, stride_dvt, stride_dvh, stride_dvd, stride_dqat,
                                 stride_dqah, stride_dqad, sm_scale, dropout_p, seed_lo, seed_hi,
                                 ctr_lo, ctr_hi,
                                 head_dim, group, softcap, win_left, win_right,
                                 CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr,
                                 HAS_DROPOUT: tl.constexpr, HAS_WINDOW: tl.constexpr,
                                 HAS_SOFTCAP: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_D: tl.constexpr):
    """dK, dV per key tile; with ATOMIC_DQ also dQ (atomics into the float32 dq_acc):
    the one-pass backward. Without, the deterministic path's first kernel."""
    start_n = tl.program_id(0)
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    k_start, seqlen_k = _seq_bounds(cu_k_ptr, b)
    if start_n * BLOCK_N < seqlen_k:
        q_start, seqlen_q = _seq_bounds(cu_q_ptr, b)
        q64 = q_start.to(tl.int64)
        k64 = k_start.to(tl.int64)
        kvh64 = kvh.to(tl.int64)
        _attn_bwd_dkdv_tile(q_ptr + q64 * stride_qt, k_ptr + k64 * stride_kt + kvh64 * stride_kh,
                            v_ptr + k64 * stride_vt + kvh64 * stride_vh,
                            do_ptr + q64 * stride_dot, lse_ptr + q64, delta_ptr + q64,
                            dk_ptr + k64 * stride_dkt + kvh64 * stride_dkh,
                            dv_ptr + k64 * stride_dvt + kvh64 * stride_dvh,
                            bid_ptr + q64, bid_ptr + k64, reach_back_ptr + k64,
                            stride_qt, stride_qh, stride_qd, stride_kt, stride_kd,
                            stride_vt, stride_vd, stride_dot, stride_doh, stride_dod, stride_lh,
                            stride_dkt, stride_dkd, stride_dvt, stride_dvd,
                            seqlen_q, seqlen_k, start_n, head_dim, sm_scale, dropout_p,
                            seed_lo, seed_hi, ctr_lo, ctr_hi, 0, q_start, kvh, group,
                            CAUSAL, HAS_BLOCKS, HAS_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_D,
                            reach_ptr + k64, softcap, win_left, win_right, HAS_WINDOW,
                            HAS_SOFTCAP, dq_acc_ptr + q64 * stride_dqat, stride_dqat,
                            stride_dqah, stride_dqad, ATOMIC_DQ)


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
                               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
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
                          HAS_SOFTCAP)
