"""ViLBERT co-attention kernels: both directions in one launch.

Grid axis 2 runs over (direction, head): direction 0 is stream A's queries over stream
B's keys/values (out_a), direction 1 is B over A (out_b). Each program calls the same
tile functions as varlen attention (mmkernels.triton.attention), with the pointers of
its direction; the two branches are the same code, inlined twice. Dropout stream of
(direction d, head h) is d * H + h (Philox counter word 2, see
mmkernels.triton.attention._dropout_keep).

Backward: delta = rowsum(dO * O) of both directions in one launch
(:func:`_co_attn_bwd_delta_kernel`), then by default the one-pass dK/dV kernel with
ATOMIC_DQ (dQ of both streams added to float32 buffers with atomics, as varlen
attention's); the deterministic path runs the dK/dV kernel without atomics and then
the dQ kernel.

Every stream's K and V are read with its Q's strides (stride_a* / stride_b*), and
gradients and dO are written/read with them too: the launcher
(mmkernels.ops.co_attention) passes contiguous tensors whose shapes it checked.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mmkernels.triton.attention import (
    PHILOX_ARGS,
    _attn_bwd_delta_tile,
    _attn_bwd_dkdv_tile,
    _attn_bwd_dq_tile,
    _attn_fwd_tile,
    _seq_bounds,
)


@triton.jit
def _pair(cu_a_ptr, cu_b_ptr, b, dh, num_heads):
    """Direction, head (int64) and the two streams' (start, length) of sample b."""
    a0, len_a = _seq_bounds(cu_a_ptr, b)
    b0, len_b = _seq_bounds(cu_b_ptr, b)
    return dh // num_heads, (dh % num_heads).to(tl.int64), a0, len_a, b0, len_b


@triton.jit(do_not_specialize=PHILOX_ARGS)
def _co_attn_fwd_kernel(qa_ptr, ka_ptr, va_ptr, qb_ptr, kb_ptr, vb_ptr, oa_ptr, ob_ptr,
                        lsea_ptr, lseb_ptr, cu_a_ptr, cu_b_ptr,
                        stride_at, stride_ah, stride_ad, stride_bt, stride_bh, stride_bd,
                        stride_oat, stride_oah, stride_oad, stride_obt, stride_obh, stride_obd,
                        stride_lah, stride_lbh, sm_scale, dropout_a, dropout_b, seed_lo,
                        seed_hi, ctr_lo, ctr_hi, head_dim, num_heads,
                        HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0)
    b = tl.program_id(1)
    dh = tl.program_id(2)
    d, h, a0, len_a, b0, len_b = _pair(cu_a_ptr, cu_b_ptr, b, dh, num_heads)
    a64 = a0.to(tl.int64)
    b64 = b0.to(tl.int64)
    stream = dh  # = d * num_heads + h
    if d == 0:
        if start_m * BLOCK_M < len_a:
            _attn_fwd_tile(qa_ptr + a64 * stride_at + h * stride_ah,
                           kb_ptr + b64 * stride_bt + h * stride_bh,
                           vb_ptr + b64 * stride_bt + h * stride_bh,
                           oa_ptr + a64 * stride_oat + h * stride_oah,
                           lsea_ptr + h.to(tl.int64) * stride_lah + a64,
                           cu_a_ptr, cu_a_ptr, cu_a_ptr,
                           stride_at, stride_ad, stride_bt, stride_bd, stride_bt, stride_bd,
                           stride_oat, stride_oad, len_a, len_b, start_m, head_dim, sm_scale,
                           dropout_a, seed_lo, seed_hi, ctr_lo, ctr_hi, stream, a0,
                           False, False, HAS_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        if start_m * BLOCK_M < len_b:
            _attn_fwd_tile(qb_ptr + b64 * stride_bt + h * stride_bh,
                           ka_ptr + a64 * stride_at + h * stride_ah,
                           va_ptr + a64 * stride_at + h * stride_ah,
                           ob_ptr + b64 * stride_obt + h * stride_obh,
                           lseb_ptr + h.to(tl.int64) * stride_lbh + b64,
                           cu_b_ptr, cu_b_ptr, cu_b_ptr,
                           stride_bt, stride_bd, stride_at, stride_ad, stride_at, stride_ad,
                           stride_obt, stride_obd, len_b, len_a, start_m, head_dim, sm_scale,
                           dropout_b, seed_lo, seed_hi, ctr_lo, ctr_hi, stream, b0,
                           False, False, HAS_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def _co_attn_bwd_delta_kernel(oa_ptr, doa_ptr, ob_ptr, dob_ptr, deltaa_ptr, deltab_ptr, total_a,
                              total_b, stride_at, stride_ah, stride_ad, stride_bt, stride_bh,
                              stride_bd, stride_lah, stride_lbh, head_dim, num_heads,
                              BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O) of both directions in one launch: program (t, d * H + h)
    covers tokens [t*BLOCK_T, +BLOCK_T) of head h of stream A (d = 0) or B (d = 1).
    O and dO of a stream are contiguous, laid out like it (stride_a*/stride_b*)."""
    start_t = tl.program_id(0)
    dh = tl.program_id(1)
    d = dh // num_heads
    h = (dh % num_heads).to(tl.int64)
    if d == 0:
        if start_t * BLOCK_T < total_a:
            _attn_bwd_delta_tile(oa_ptr + h * stride_ah, doa_ptr + h * stride_ah,
                                 deltaa_ptr + h * stride_lah, start_t, total_a, head_dim,
                                 stride_at, stride_ad, stride_at, stride_ad, BLOCK_T, BLOCK_D)
    else:
        if start_t * BLOCK_T < total_b:
            _attn_bwd_delta_tile(ob_ptr + h * stride_bh, dob_ptr + h * stride_bh,
                                 deltab_ptr + h * stride_lbh, start_t, total_b, head_dim,
                                 stride_bt, stride_bd, stride_bt, stride_bd, BLOCK_T, BLOCK_D)


@triton.jit(do_not_specialize=PHILOX_ARGS)
def _co_attn_bwd_dkdv_kernel(qa_ptr, ka_ptr, va_ptr, qb_ptr, kb_ptr, vb_ptr, doa_ptr, dob_ptr,
                             lsea_ptr, lseb_ptr, deltaa_ptr, deltab_ptr, dka_ptr, dva_ptr,
                             dkb_ptr, dvb_ptr, dq_acc_a_ptr, dq_acc_b_ptr, cu_a_ptr, cu_b_ptr,
                             stride_at, stride_ah, stride_ad, stride_bt, stride_bh, stride_bd,
                             stride_lah, stride_lbh, sm_scale, dropout_a, dropout_b, seed_lo,
                             seed_hi, ctr_lo, ctr_hi, head_dim, num_heads,
                             HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    """Direction 0 (A queries over B keys) produces dK_b, dV_b; direction 1 dK_a, dV_a.
    All gradient tensors are contiguous, laid out like their stream (stride_a*/stride_b*).
    ATOMIC_DQ (the one-pass backward): direction 0 also adds dQ_a into the float32
    dq_acc_a, direction 1 dQ_b into dq_acc_b (contiguous, their stream's layout), with
    atomics."""
    start_n = tl.program_id(0)
    b = tl.program_id(1)
    dh = tl.program_id(2)
    d, h, a0, len_a, b0, len_b = _pair(cu_a_ptr, cu_b_ptr, b, dh, num_heads)
    a64 = a0.to(tl.int64)
    b64 = b0.to(tl.int64)
    # the tile loops over `group` query heads starting at kv_head * group: group = 1,
    # kv_head = h; query head h draws stream stream0 + h
    stream0 = d * num_heads
    if d == 0:
        if start_n * BLOCK_N < len_b:
            _attn_bwd_dkdv_tile(qa_ptr + a64 * stride_at, kb_ptr + b64 * stride_bt + h * stride_bh,
                                vb_ptr + b64 * stride_bt + h * stride_bh, doa_ptr + a64 * stride_at,
                                lsea_ptr + a64, deltaa_ptr + a64,
                                dkb_ptr + b64 * stride_bt + h * stride_bh,
                                dvb_ptr + b64 * stride_bt + h * stride_bh,
                                cu_a_ptr, cu_a_ptr, cu_a_ptr,
                                stride_at, stride_ah, stride_ad, stride_bt, stride_bd,
                                stride_bt, stride_bd, stride_at, stride_ah, stride_ad, stride_lah,
                                stride_bt, stride_bd, stride_bt, stride_bd,
                                len_a, len_b, start_n, head_dim, sm_scale, dropout_a,
                                seed_lo, seed_hi, ctr_lo, ctr_hi, stream0, a0, h, 1,
                                False, False, HAS_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_D,
                                dq_seq=dq_acc_a_ptr + a64 * stride_at, stride_dqt=stride_at,
                                stride_dqh=stride_ah, stride_dqd=stride_ad, ATOMIC_DQ=ATOMIC_DQ)
    else:
        if start_n * BLOCK_N < len_a:
            _attn_bwd_dkdv_tile(qb_ptr + b64 * stride_bt, ka_ptr + a64 * stride_at + h * stride_ah,
                                va_ptr + a64 * stride_at + h * stride_ah, dob_ptr + b64 * stride_bt,
                                lseb_ptr + b64, deltab_ptr + b64,
                                dka_ptr + a64 * stride_at + h * stride_ah,
                                dva_ptr + a64 * stride_at + h * stride_ah,
                                cu_b_ptr, cu_b_ptr, cu_b_ptr,
                                stride_bt, stride_bh, stride_bd, stride_at, stride_ad,
                                stride_at, stride_ad, stride_bt, stride_bh, stride_bd, stride_lbh,
                                stride_at, stride_ad, stride_at, stride_ad,
                                len_b, len_a, start_n, head_dim, sm_scale, dropout_b,
                                seed_lo, seed_hi, ctr_lo, ctr_hi, stream0, b0, h, 1,
                                False, False, HAS_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_D,
                                dq_seq=dq_acc_b_ptr + b64 * stride_bt, stride_dqt=stride_bt,
                                stride_dqh=stride_bh, stride_dqd=stride_bd, ATOMIC_DQ=ATOMIC_DQ)


@triton.jit(do_not_specialize=PHILOX_ARGS)
def _co_attn_bwd_dq_kernel(qa_ptr, ka_ptr, va_ptr, qb_ptr, kb_ptr, vb_ptr, doa_ptr, dob_ptr,
                           lsea_ptr, lseb_ptr, deltaa_ptr, deltab_ptr, dqa_ptr, dqb_ptr,
                           cu_a_ptr, cu_b_ptr,
                           stride_at, stride_ah, stride_ad, stride_bt, stride_bh, stride_bd,
                           stride_lah, stride_lbh, sm_scale, dropout_a, dropout_b, seed_lo,
                           seed_hi, ctr_lo, ctr_hi, head_dim, num_heads,
                           HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0)
    b = tl.program_id(1)
    dh = tl.program_id(2)
    d, h, a0, len_a, b0, len_b = _pair(cu_a_ptr, cu_b_ptr, b, dh, num_heads)
    a64 = a0.to(tl.int64)
    b64 = b0.to(tl.int64)
    stream = dh  # = d * num_heads + h
    if d == 0:
        if start_m * BLOCK_M < len_a:
            _attn_bwd_dq_tile(qa_ptr + a64 * stride_at + h * stride_ah,
                              kb_ptr + b64 * stride_bt + h * stride_bh,
                              vb_ptr + b64 * stride_bt + h * stride_bh,
                              doa_ptr + a64 * stride_at + h * stride_ah,
                              dqa_ptr + a64 * stride_at + h * stride_ah,
                              lsea_ptr + h.to(tl.int64) * stride_lah + a64,
                              deltaa_ptr + h.to(tl.int64) * stride_lah + a64,
                              cu_a_ptr, cu_a_ptr, cu_a_ptr,
                              stride_at, stride_ad, stride_bt, stride_bd, stride_bt, stride_bd,
                              stride_at, stride_ad, stride_at, stride_ad,
                              len_a, len_b, start_m, head_dim, sm_scale, dropout_a, seed_lo,
                              seed_hi, ctr_lo, ctr_hi, stream, a0, False, False, HAS_DROPOUT,
                              BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        if start_m * BLOCK_M < len_b:
            _attn_bwd_dq_tile(qb_ptr + b64 * stride_bt + h * stride_bh,
                              ka_ptr + a64 * stride_at + h * stride_ah,
                              va_ptr + a64 * stride_at + h * stride_ah,
                              dob_ptr + b64 * stride_bt + h * stride_bh,
                              dqb_ptr + b64 * stride_bt + h * stride_bh,
                              lseb_ptr + h.to(tl.int64) * stride_lbh + b64,
                              deltab_ptr + h.to(tl.int64) * stride_lbh + b64,
                              cu_b_ptr, cu_b_ptr, cu_b_ptr,
                              stride_bt, stride_bd, stride_at, stride_ad, stride_at, stride_ad,
                              stride_bt, stride_bd, stride_bt, stride_bd,
                              len_b, len_a, start_m, head_dim, sm_scale, dropout_b, seed_lo,
                              seed_hi, ctr_lo, ctr_hi, stream, b0, False, False, HAS_DROPOUT,
                              BLOCK_M, BLOCK_N, BLOCK_D)
