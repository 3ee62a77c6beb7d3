"""The backward tiles of the attention core (:mod:`mmkernels.triton.attention` has the
layout, the visibility rule, the forward and the delta pre-kernel): dK/dV per key tile
(with ATOMIC_DQ also dQ, the one-pass FA2 backward) and the deterministic path's dQ
tile. The head dim runs in two chunks, BLOCK_D + BLOCK_D1 lanes (BLOCK_D1 = 0: one):
every product that contracts or produces the head dim is done per chunk."""

from __future__ import annotations

import triton
import triton.language as tl

from mmkernels.triton.attention import (
    LOG2E,
    _atomic_add_chunks,
    _dot2,
    _dropout_keep,
    _interior_keys,
    _key_range,
    _load_chunks,
    _query_range,
    _scores,
    _split3,
    _store_chunks,
    _visible,
)


@triton.jit
def _attn_bwd_dkdv_step(dk0, dk1, dv0, dv1, k0, k1, v0, v1, bk, cols, col0, start_m, q_h, do_h,
                        lse_h, delta_h, dq_h, bq_base, stride_qt, stride_qd, stride_dot,
                        stride_dod, stride_dqt, stride_dqd, seqlen_q, seqlen_k, head_dim,
                        sm_scale, softcap, win_left, win_right, dropout_p, drop_scale, seed_lo,
                        seed_hi, ctr_lo, ctr_hi, stream, q_global0, CAUSAL: tl.constexpr,
                        HAS_BLOCKS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                        ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
                        EVEN_D: tl.constexpr, MASKED: tl.constexpr):
    """One query tile [start_m, +BLOCK_M) of one query head against the key tile: adds
    to dK, dV (and dQ with ATOMIC_DQ). MASKED: the tile may hold rows past seqlen_q or
    (row, key) pairs that are not visible; without, neither test runs."""
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q
    q0, q1 = _load_chunks(q_h, rows, row_ok, stride_qt, stride_qd, head_dim, BLOCK_D, BLOCK_D1,
                          EVEN_D, MASKED)
    do0, do1 = _load_chunks(do_h, rows, row_ok, stride_dot, stride_dod, head_dim, BLOCK_D,
                            BLOCK_D1, EVEN_D, MASKED)
    if MASKED:
        lse = tl.load(lse_h + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_h + rows, mask=row_ok, other=0.0)
    else:
        lse = tl.load(lse_h + rows)
        delta = tl.load(delta_h + rows)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
    s, t = _scores(_dot2(q0, q1, k0, k1, BLOCK_D1, TRANS_B=True), sm_scale, softcap,
                   HAS_SOFTCAP)
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        bq = bk
        if HAS_BLOCKS:
            bq = tl.load(bq_base + rows, mask=row_ok, other=0)
        ok = _visible(rows, cols, seqlen_q, seqlen_k, bq, bk, win_left, win_right, CAUSAL,
                      HAS_BLOCKS, HAS_WINDOW)
        p = tl.where(ok, p, 0.0)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed_lo, seed_hi, ctr_lo, ctr_hi, stream, q_global0 + rows, col0,
                             dropout_p, BLOCK_N, CARRY_BY_COMPARE=True)
        # dv is scaled by 1 / (1 - p) once, at the end
        pt = tl.trans(tl.where(keep, p, 0.0).to(do0.dtype))
    else:
        pt = tl.trans(p.to(do0.dtype))
    dv0 += tl.dot(pt, do0, input_precision="ieee")
    if BLOCK_D1 > 0:
        dv1 += tl.dot(pt, do1, input_precision="ieee")
    if HAS_SOFTCAP:  # fold the cap's derivative into P: one tile live, not two
        p = p * (1.0 - t * t)
    dp = _dot2(do0, do1, v0, v1, BLOCK_D1, TRANS_B=True)
    if HAS_DROPOUT:
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    dst = tl.trans(ds.to(q0.dtype))
    dk0 += tl.dot(dst, q0, input_precision="ieee")
    if BLOCK_D1 > 0:
        dk1 += tl.dot(dst, q1, input_precision="ieee")
    if ATOMIC_DQ:
        dsk = ds.to(k0.dtype)
        dq0 = tl.dot(dsk, k0, input_precision="ieee") * sm_scale
        dq1 = 0.0
        if BLOCK_D1 > 0:
            dq1 = tl.dot(dsk, k1, input_precision="ieee") * sm_scale
        _atomic_add_chunks(dq_h, rows, row_ok, stride_dqt, stride_dqd, head_dim, dq0, dq1,
                           BLOCK_D, BLOCK_D1, EVEN_D, MASKED)
    return dk0, dk1, dv0, dv1


@triton.jit
def _interior_queries(lo, hi, col0, seqlen_q, seqlen_k, win_left, win_right,
                      CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """(a, b): the query tiles [a, b) of a key tile's loop range(lo, hi, BLOCK_M) whose
    rows are all in range and see every key of the tile (none when the key tile is
    ragged): the mirror of :func:`mmkernels.triton.attention._interior_keys`."""
    off = seqlen_k - seqlen_q
    first = lo
    end = seqlen_q
    if CAUSAL:
        first = col0 + BLOCK_N - 1 - off
    elif HAS_WINDOW:
        first = col0 + BLOCK_N - 1 - off - win_right
    if HAS_WINDOW:
        end = tl.minimum(end, col0 + win_left - off + 1)
    end = tl.where(col0 + BLOCK_N > seqlen_k, 0, end)
    return _split3(lo, hi, first, end, BLOCK_M)


@triton.jit
def _attn_bwd_dkdv_tile(q_seq, k_base, v_base, do_seq, lse_seq, delta_seq, dk_base, dv_base,
                        bq_base, bk_base, reach_back_base,
                        stride_qt, stride_qh, stride_qd, stride_kt, stride_kd,
                        stride_vt, stride_vd, stride_dot, stride_doh, stride_dod, stride_lh,
                        stride_dkt, stride_dkd, stride_dvt, stride_dvd,
                        seqlen_q, seqlen_k, start_n, head_dim, sm_scale, dropout_p,
                        seed_lo, seed_hi, ctr_lo, ctr_hi, stream0, q_global0, kv_head, group,
                        CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr,
                        HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        reach_base=None, softcap=0.0, win_left=0, win_right=0,
                        HAS_WINDOW: tl.constexpr = False, HAS_SOFTCAP: tl.constexpr = False,
                        dq_seq=None, stride_dqt=0, stride_dqh=0, stride_dqd=0,
                        ATOMIC_DQ: tl.constexpr = False, BLOCK_D1: tl.constexpr = 0,
                        EVEN_D: tl.constexpr = False):
    """dK, dV for key rows [start_n*BLOCK_N, +BLOCK_N) of one (sequence, kv head).

    q_seq/do_seq/lse_seq/delta_seq point at the sequence start (head 0); the loop
    covers the `group` query heads that share this kv head (query head h draws
    dropout stream stream0 + h). ATOMIC_DQ: also add this tile's dQ contributions
    to the float32 buffer dq_seq (sequence start, head 0) with atomics.
    """
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < seqlen_k
    drop_scale = 1.0 / (1.0 - dropout_p)  # a scalar: no per-element division
    k0, k1 = _load_chunks(k_base, cols, col_ok, stride_kt, stride_kd, head_dim, BLOCK_D,
                          BLOCK_D1, EVEN_D)
    v0, v1 = _load_chunks(v_base, cols, col_ok, stride_vt, stride_vd, head_dim, BLOCK_D,
                          BLOCK_D1, EVEN_D)
    dk0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk1 = 0.0
    dv1 = 0.0
    if BLOCK_D1 > 0:
        dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    # Query range: from the first to the last query that sees any key of the tile.
    lo, hi, bk = _query_range(cols, col_ok, start_n, seqlen_q, seqlen_k, bk_base, reach_base,
                              reach_back_base, win_left, win_right, CAUSAL, HAS_BLOCKS,
                              HAS_WINDOW, BLOCK_M, BLOCK_N)
    # query tiles that see the whole key tile (interior: no mask, no visibility test):
    # [a, b); before, the causal diagonal or the window's right edge; after, the window's
    # left edge, the image-block reach and the ragged tail
    col0 = start_n * BLOCK_N
    a, b = _interior_queries(lo, hi, col0, seqlen_q, seqlen_k, win_left, win_right, CAUSAL,
                             HAS_WINDOW, BLOCK_M, BLOCK_N)
    for g in range(group):
        h = kv_head * group + g
        h64 = h.to(tl.int64)
        q_h = q_seq + h64 * stride_qh
        do_h = do_seq + h64 * stride_doh
        dq_h = dq_seq
        if ATOMIC_DQ:
            dq_h = dq_seq + h64 * stride_dqh
        lse_h = lse_seq + h64 * stride_lh
        delta_h = delta_seq + h64 * stride_lh
        # the boundary tiles in one loop ([lo, a) then [b, hi)), then the interior: a
        # third loop body (the window edge, the interior, the far edge as three loops)
        # kept its own operand copies live across the group loop and spilled 100-700
        # bytes on sm_80 (kernel report)
        if BLOCK_D >= 256:
            # D = 256: every query tile masked, in the interior loop alone. The MMAs
            # dominate a tile there, and the edge loop's second body cost the heaviest
            # one-pass variant 8-16 bytes of spills on sm_80 at every tile that fits
            # (kernel report; running [lo, hi) in the edge loop spilled 8-24 bytes)
            a = lo
            b = hi
        else:
            n_before = (a - lo + BLOCK_M - 1) // BLOCK_M  # a may be hi, off the tile grid
            n_edge = n_before + (hi - b + BLOCK_M - 1) // BLOCK_M
            for i in range(0, n_edge):
                start_m = tl.where(i < n_before, lo + i * BLOCK_M, b + (i - n_before) * BLOCK_M)
                dk0, dk1, dv0, dv1 = _attn_bwd_dkdv_step(
                    dk0, dk1, dv0, dv1, k0, k1, v0, v1, bk, cols, col0, start_m, q_h, do_h, lse_h,
                    delta_h, dq_h, bq_base, stride_qt, stride_qd, stride_dot, stride_dod,
                    stride_dqt, stride_dqd, seqlen_q, seqlen_k, head_dim, sm_scale, softcap,
                    win_left, win_right, dropout_p, drop_scale, seed_lo, seed_hi, ctr_lo, ctr_hi,
                    stream0 + h, q_global0, CAUSAL, HAS_BLOCKS, HAS_DROPOUT, HAS_WINDOW,
                    HAS_SOFTCAP, ATOMIC_DQ, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_D1, EVEN_D, True)
        for start_m in range(a, b, BLOCK_M):
            dk0, dk1, dv0, dv1 = _attn_bwd_dkdv_step(
                dk0, dk1, dv0, dv1, k0, k1, v0, v1, bk, cols, col0, start_m, q_h, do_h, lse_h,
                delta_h, dq_h, bq_base, stride_qt, stride_qd, stride_dot, stride_dod,
                stride_dqt, stride_dqd, seqlen_q, seqlen_k, head_dim, sm_scale, softcap,
                win_left, win_right, dropout_p, drop_scale, seed_lo, seed_hi, ctr_lo, ctr_hi,
                stream0 + h, q_global0, CAUSAL, HAS_BLOCKS, HAS_DROPOUT, HAS_WINDOW,
                HAS_SOFTCAP, ATOMIC_DQ, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_D1, EVEN_D, BLOCK_D >= 256)
    if HAS_DROPOUT:
        dv0 = dv0 * drop_scale
        if BLOCK_D1 > 0:
            dv1 = dv1 * drop_scale
    dk1s = dk1
    if BLOCK_D1 > 0:
        dk1s = dk1 * sm_scale
    _store_chunks(dk_base, cols, col_ok, stride_dkt, stride_dkd, head_dim, dk0 * sm_scale, dk1s,
                  BLOCK_D, BLOCK_D1, EVEN_D)
    _store_chunks(dv_base, cols, col_ok, stride_dvt, stride_dvd, head_dim, dv0, dv1, BLOCK_D,
                  BLOCK_D1, EVEN_D)


@triton.jit
def _attn_bwd_dq_step(dq0, dq1, q0, q1, do0, do1, lse2, delta, bq, rows, start_n, k_base,
                      v_base, bk_base, stride_kt, stride_kd, stride_vt, stride_vd, seqlen_q,
                      seqlen_k, head_dim, sm_scale, softcap, win_left, win_right, dropout_p,
                      drop_scale, seed_lo, seed_hi, ctr_lo, ctr_hi, stream, q_global0,
                      CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                      HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
                      EVEN_D: tl.constexpr, MASKED: tl.constexpr):
    """One key tile [start_n, +BLOCK_N) of the deterministic dQ (MASKED: as the forward's
    :func:`mmkernels.triton.attention._attn_fwd_step`)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < seqlen_k
    kt0, kt1 = _load_chunks(k_base, cols, col_ok, stride_kt, stride_kd, head_dim, BLOCK_D,
                            BLOCK_D1, EVEN_D, MASKED, TRANS=True)
    vt0, vt1 = _load_chunks(v_base, cols, col_ok, stride_vt, stride_vd, head_dim, BLOCK_D,
                            BLOCK_D1, EVEN_D, MASKED, TRANS=True)
    # dP (and its dropout mask) first: only dP - delta is live while S, its cap and P
    # are computed and folded into dS (kernel report: fewer registers)
    dp = _dot2(do0, do1, vt0, vt1, BLOCK_D1)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed_lo, seed_hi, ctr_lo, ctr_hi, stream, q_global0 + rows,
                             start_n, dropout_p, BLOCK_N)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    dp = dp - delta[:, None]
    s, t = _scores(_dot2(q0, q1, kt0, kt1, BLOCK_D1), sm_scale, softcap, HAS_SOFTCAP)
    if MASKED:
        bk = bq
        if HAS_BLOCKS:
            bk = tl.load(bk_base + cols, mask=col_ok, other=0)
        ok = _visible(rows, cols, seqlen_q, seqlen_k, bq, bk, win_left, win_right, CAUSAL,
                      HAS_BLOCKS, HAS_WINDOW)
        ds = tl.where(ok, tl.math.exp2(s - lse2[:, None]) * dp, 0.0)
    else:
        ds = tl.math.exp2(s - lse2[:, None]) * dp
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    dsk = ds.to(kt0.dtype)
    dq0 += tl.dot(dsk, tl.trans(kt0), input_precision="ieee")
    if BLOCK_D1 > 0:
        dq1 += tl.dot(dsk, tl.trans(kt1), input_precision="ieee")
    return dq0, dq1


@triton.jit
def _attn_bwd_dq_tile(q_base, k_base, v_base, do_base, dq_base, lse_base, delta_base,
                      bq_base, bk_base, reach_base,
                      stride_qt, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd,
                      stride_dot, stride_dod, stride_dqt, stride_dqd,
                      seqlen_q, seqlen_k, start_m, head_dim, sm_scale, dropout_p,
                      seed_lo, seed_hi, ctr_lo, ctr_hi, stream, q_global0,
                      CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      reach_back_base=None, softcap=0.0, win_left=0, win_right=0,
                      HAS_WINDOW: tl.constexpr = False, HAS_SOFTCAP: tl.constexpr = False,
                      BLOCK_D1: tl.constexpr = 0, EVEN_D: tl.constexpr = False):
    """dQ for query rows [start_m*BLOCK_M, +BLOCK_M) of one (sequence, head)."""
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q
    drop_scale = 1.0 / (1.0 - dropout_p)  # a scalar: no per-element division
    q0, q1 = _load_chunks(q_base, rows, row_ok, stride_qt, stride_qd, head_dim, BLOCK_D,
                          BLOCK_D1, EVEN_D)
    do0, do1 = _load_chunks(do_base, rows, row_ok, stride_dot, stride_dod, head_dim, BLOCK_D,
                            BLOCK_D1, EVEN_D)
    lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
    lo, hi, bq = _key_range(rows, row_ok, start_m, seqlen_q, seqlen_k, bq_base, reach_base,
                            reach_back_base, win_left, win_right, CAUSAL, HAS_BLOCKS,
                            HAS_WINDOW, BLOCK_M, BLOCK_N)
    dq0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq1 = 0.0
    if BLOCK_D1 > 0:
        dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    # as the forward: masked tiles before the window's full range, the interior, the rest
    a, b = _interior_keys(lo, hi, start_m, seqlen_q, seqlen_k, win_left, win_right, CAUSAL,
                          HAS_WINDOW, BLOCK_M, BLOCK_N)
    if HAS_WINDOW:  # without a window, a == lo
        for start_n in range(lo, a, BLOCK_N):
            dq0, dq1 = _attn_bwd_dq_step(
                dq0, dq1, q0, q1, do0, do1, lse2, delta, bq, rows, start_n, k_base, v_base,
                bk_base, stride_kt, stride_kd, stride_vt, stride_vd, seqlen_q, seqlen_k, head_dim,
                sm_scale, softcap, win_left, win_right, dropout_p, drop_scale, seed_lo, seed_hi,
                ctr_lo, ctr_hi, stream, q_global0, CAUSAL, HAS_BLOCKS, HAS_DROPOUT, HAS_WINDOW,
                HAS_SOFTCAP, BLOCK_N, BLOCK_D, BLOCK_D1, EVEN_D, True)
    for start_n in range(a, b, BLOCK_N):
        dq0, dq1 = _attn_bwd_dq_step(
            dq0, dq1, q0, q1, do0, do1, lse2, delta, bq, rows, start_n, k_base, v_base,
            bk_base, stride_kt, stride_kd, stride_vt, stride_vd, seqlen_q, seqlen_k, head_dim,
            sm_scale, softcap, win_left, win_right, dropout_p, drop_scale, seed_lo, seed_hi,
            ctr_lo, ctr_hi, stream, q_global0, CAUSAL, HAS_BLOCKS, HAS_DROPOUT, HAS_WINDOW,
            HAS_SOFTCAP, BLOCK_N, BLOCK_D, BLOCK_D1, EVEN_D, False)
    for start_n in range(b, hi, BLOCK_N):
        dq0, dq1 = _attn_bwd_dq_step(
            dq0, dq1, q0, q1, do0, do1, lse2, delta, bq, rows, start_n, k_base, v_base,
            bk_base, stride_kt, stride_kd, stride_vt, stride_vd, seqlen_q, seqlen_k, head_dim,
            sm_scale, softcap, win_left, win_right, dropout_p, drop_scale, seed_lo, seed_hi,
            ctr_lo, ctr_hi, stream, q_global0, CAUSAL, HAS_BLOCKS, HAS_DROPOUT, HAS_WINDOW,
            HAS_SOFTCAP, BLOCK_N, BLOCK_D, BLOCK_D1, EVEN_D, True)
    dq1s = dq1
    if BLOCK_D1 > 0:
        dq1s = dq1 * sm_scale
    _store_chunks(dq_base, rows, row_ok, stride_dqt, stride_dqd, head_dim, dq0 * sm_scale, dq1s,
                  BLOCK_D, BLOCK_D1, EVEN_D)
