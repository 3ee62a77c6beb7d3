"""Contrastive-loss kernels (InfoNCE / SigLIP) that never store the similarity matrix.

Notation: A (n, D) are the "row" features, B (m, D) the "column" features, both with a
unit feature stride; S = s * A @ B^T with s = logit_scale (read from device memory, so
the launch never syncs on it). S only ever exists as (BLOCK_M, BLOCK_N) register tiles;
each tile's dot product runs over the feature dim in BLOCK_K slices, so any D works
(the ops cap it at 4096).

Forward, ``_contrastive_fwd_kernel`` (persistent: program p takes row blocks p, p + P,
p + 2P, ...; each row block sweeps every column block):
  * INFONCE: the row log-sum-exp is accumulated online in registers (running max and
    sum, base 2, exp2), and the same tile also feeds the column statistics: program p
    merges the tile's column max/sum into its own row of a (P, m) partials buffer (only
    p touches that row: no atomics, deterministic). The host merges the P partials into
    the column log-sum-exp. Every tile is computed once for both directions; memory is
    O(P * m) with P = a few programs per SM, never O(n * m).
  * SIGLIP: per-row sums of the loss, softplus(S + b) for the negatives and
    softplus(-(S + b)) for the positives (j = i + pos_offset).
  * INFONCE also returns the positives' dot products A_i . B_(i + pos_offset), taken
    from the tiles (no separate O(n * D) pass on the host).

Gradients, ``_contrastive_weights_kernel`` (one program per (BLOCK_M, BLOCK_N) tile of a
row panel): recomputes the tile once, forms dLoss/dS for it in fp32, subtracts the
positive pairs' term there (before any rounding: near convergence P_ii - 1 cancels), and
writes the weights once, in the operands' dtype, times a power of two chosen on the host
(so fp16 weights of order 1/B are never subnormal). The host then runs the two gradient
GEMMs on the weight panel with cuBLAS, G_A = W @ B and G_B = W^T @ A: three GEMM passes
for the gradients, none of them with an accumulator round trip (mmkernels/triton/
contrastive_launch.py).
  * INFONCE: W_ij = exp(S_ij - shift_a_i) + exp(S_ij - shift_b_j) - coef [j = i + pos],
    the shifts being the log-sum-exps minus the logs of the loss weights (each term
    optional: USE_LSE_A / USE_LSE_B).
  * SIGLIP: W_ij = coef (sigmoid(S_ij + b) - [j = i + pos]), the positive written
    -sigmoid(-x) (no cancellation), with the per-tile row sums of the loss
    (softplus(+-(S + b))) and of W.
Both write the per-tile row sums of W_ij * (A_i . B_j) (the logit scale's gradient:
dS/ds = A . B) in fp32, from the unrounded weights.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
INFONCE: tl.constexpr = tl.constexpr(0)
SIGLIP: tl.constexpr = tl.constexpr(1)


@triton.jit
def _sim_tile(a_ptr, b_ptr, rows, cols, row_ok, col_ok, stride_a, stride_b, D,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32: A[rows] . B[cols], the feature dim in BLOCK_K slices;
    out-of-range rows and columns read zeros."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rows[:, None].to(tl.int64) * stride_a
    b_cols = b_ptr + cols[None, :].to(tl.int64) * stride_b
    for k0 in range(0, D, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < D
        a = tl.load(a_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(b_cols + k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _column_tile(a_ptr, b_ptr, rows, row_ok, c0, n_cols, stride_a, stride_b, D,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Columns [c0, c0 + BLOCK_N) against this program's rows: the column indices, their
    in-range mask, the (BLOCK_M, BLOCK_N) in-range mask and the dot products."""
    cols = c0 + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    dots = _sim_tile(a_ptr, b_ptr, rows, cols, row_ok, col_ok, stride_a, stride_b, D,
                     BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    return cols, col_ok, ok, dots


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) without overflow: max(x, 0) + log(1 + exp(-|x|))."""
    return tl.maximum(x, 0.0) + LN2 * tl.math.log2(1.0 + tl.math.exp2(-tl.abs(x) * LOG2E))


@triton.jit
def _scale_and_bias(scale_ptr, bias_ptr, MODE: tl.constexpr):
    """logit_scale and (SIGLIP) logit_bias as float32 scalars, read on the device."""
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = 0.0
    if MODE == SIGLIP:
        bias = tl.load(bias_ptr).to(tl.float32)
    return scale, bias


@triton.jit
def _contrastive_fwd_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, row_out_ptr, part_m_ptr,
                            part_l_ptr, pos_ptr, n_rows, n_cols, D, stride_a, stride_b,
                            stride_part, pos_offset,
                            MODE: tl.constexpr, WITH_COLS: tl.constexpr,
                            POSITIVES: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            PRECISION: tl.constexpr):
    """row_out (n,) fp32: INFONCE the row log-sum-exp of S, SIGLIP sum_j of the loss
    softplus(S_ij + b), or softplus(-(S_ij + b)) at the positive j = i + pos_offset
    (POSITIVES). INFONCE with POSITIVES: pos (n,) fp32 gets A_i . B_(i + pos_offset) (0
    where that column does not exist), from the same tiles. INFONCE with WITH_COLS:
    part_m/part_l (P, m) fp32, initialised to -inf / 0, receive this program's column
    max (base 2) and sum of exp2(S * log2 e - max)."""
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    scale, bias = _scale_and_bias(scale_ptr, bias_ptr, MODE)
    s_log2 = scale * LOG2E
    offs_m = tl.arange(0, BLOCK_M)
    part_m_row = part_m_ptr + pid.to(tl.int64) * stride_part
    part_l_row = part_l_ptr + pid.to(tl.int64) * stride_part
    for blk in range(pid, tl.cdiv(n_rows, BLOCK_M), num_progs):
        rows = blk * BLOCK_M + offs_m
        row_ok = rows < n_rows
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        p_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, n_cols, BLOCK_N):
            cols, col_ok, ok, dots = _column_tile(a_ptr, b_ptr, rows, row_ok, c0, n_cols,
                                                  stride_a, stride_b, D, BLOCK_M, BLOCK_N,
                                                  BLOCK_K, PRECISION)
            pos = cols[None, :] == (rows[:, None] + pos_offset)
            if MODE == INFONCE:
                s2 = tl.where(ok, dots * s_log2, float("-inf"))
                if POSITIVES:
                    # the positives stay out of both directions' sums: the statistics
                    # are the negatives' (the host adds the positives back, and 1 - P_ii
                    # = exp(neg - lse) keeps its relative accuracy near convergence)
                    p_i += tl.sum(tl.where(pos & ok, dots, 0.0), 1)
                    s2 = tl.where(pos, float("-inf"), s2)
                m_new = tl.maximum(m_i, tl.max(s2, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(s2 - m_safe[:, None]), 1)
                m_i = m_new
                if WITH_COLS:
                    # this tile's column statistics, merged into the program's partials
                    c_max = tl.max(s2, 0)
                    c_safe = tl.where(c_max == float("-inf"), 0.0, c_max)
                    c_sum = tl.sum(tl.math.exp2(s2 - c_safe[None, :]), 0)
                    p_m = tl.load(part_m_row + cols, mask=col_ok, other=float("-inf"))
                    p_l = tl.load(part_l_row + cols, mask=col_ok, other=0.0)
                    new = tl.maximum(p_m, c_max)
                    new_safe = tl.where(new == float("-inf"), 0.0, new)
                    p_l = p_l * tl.math.exp2(p_m - new_safe) + c_sum * tl.math.exp2(c_max - new_safe)
                    tl.store(part_m_row + cols, new, mask=col_ok)
                    tl.store(part_l_row + cols, p_l, mask=col_ok)
            else:
                logit = dots * scale + bias
                sp = _softplus(logit)
                if POSITIVES:
                    sp = tl.where(pos, _softplus(-logit), sp)
                l_i += tl.sum(tl.where(ok, sp, 0.0), 1)
        if MODE == INFONCE:
            out = (m_i + tl.math.log2(tl.where(row_ok, l_i, 1.0))) * LN2
        else:
            out = l_i
        tl.store(row_out_ptr + rows, out, mask=row_ok)
        if MODE == INFONCE and POSITIVES:
            tl.store(pos_ptr + rows, p_i, mask=row_ok)


@triton.jit
def _contrastive_weights_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, lse_a_ptr, lse_b_ptr,
                                coef_a_ptr, coef_b_ptr, pos_w_ptr, w_ptr, stat_ptr,
                                col_stat_ptr, n_rows, n_cols, D, stride_a, stride_b, stride_w,
                                stride_stat, stride_col_stat, coef, w_mult, pos_offset,
                                MODE: tl.constexpr, USE_LSE_A: tl.constexpr,
                                USE_LSE_B: tl.constexpr, POSITIVES: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """w (n, m), the operands' dtype: w_mult * W for this program's tile (W in the module
    docstring; INFONCE: coef_a/coef_b (n,)/(m,) fp32 multiply the two directions' terms,
    pos_w (n,) fp32 is the positive pairs' whole weight). stat (3, cdiv(m, BLOCK_N), n)
    fp32, row sums over this tile of [W_row * (A . B), loss (SIGLIP), W (SIGLIP)] at [k,
    pid_n, rows] (stride_stat between the column blocks, n * cdiv(m, BLOCK_N) between the
    three), W_row being W without the column term (INFONCE with USE_LSE_B: that term's
    column sums of W_col * (A . B) go to col_stat (cdiv(n, BLOCK_M), m) at [pid_m,
    cols]; so a distributed caller can attribute the logit scale's gradient to the loss
    each term belongs to)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    scale, bias = _scale_and_bias(scale_ptr, bias_ptr, MODE)
    cols, col_ok, ok, dots = _column_tile(a_ptr, b_ptr, rows, row_ok, pid_n * BLOCK_N, n_cols,
                                          stride_a, stride_b, D, BLOCK_M, BLOCK_N, BLOCK_K,
                                          PRECISION)
    pos = cols[None, :] == (rows[:, None] + pos_offset)
    if MODE == INFONCE:
        s2 = dots * (scale * LOG2E)
        w_row = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # the row term
        w_col = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # the column term
        if USE_LSE_A:
            sh_a = tl.load(lse_a_ptr + rows, mask=row_ok, other=0.0) * LOG2E
            c_a = tl.load(coef_a_ptr + rows, mask=row_ok, other=0.0)
            w_row = c_a[:, None] * tl.math.exp2(s2 - sh_a[:, None])
        if USE_LSE_B:
            sh_b = tl.load(lse_b_ptr + cols, mask=col_ok, other=0.0) * LOG2E
            c_b = tl.load(coef_b_ptr + cols, mask=col_ok, other=0.0)
            w_col = c_b[None, :] * tl.math.exp2(s2 - sh_b[None, :])
        if POSITIVES:
            # the positive's whole weight from the forward's statistics, -(c_a (1 - P_ii)
            # + c_b (1 - Q_ii)): no cancellation of P_ii - 1 near convergence. It counts
            # as the row term (a positive pair belongs to its row's loss).
            p_w = tl.load(pos_w_ptr + rows, mask=row_ok, other=0.0)
            w_row = tl.where(pos, p_w[:, None], w_row)
            w_col = tl.where(pos, 0.0, w_col)
        w_row = tl.where(ok, w_row, 0.0)
        w_col = tl.where(ok, w_col, 0.0)
        if USE_LSE_B:
            tl.store(col_stat_ptr + pid_m.to(tl.int64) * stride_col_stat + cols,
                     tl.sum(w_col * dots, 0), mask=col_ok)
        w = w_row + w_col
    else:
        logit = dots * scale + bias
        w = tl.sigmoid(logit)
        loss = _softplus(logit)
        if POSITIVES:
            w = tl.where(pos, -tl.sigmoid(-logit), w)
            loss = tl.where(pos, _softplus(-logit), loss)
        w = w * coef
    w = tl.where(ok, w, 0.0)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    tl.store(w_rows + cols[None, :], (w * w_mult).to(w_ptr.dtype.element_ty), mask=ok)
    stat = stat_ptr + pid_n.to(tl.int64) * stride_stat + rows
    plane = tl.num_programs(1).to(tl.int64) * stride_stat
    if MODE == INFONCE:
        tl.store(stat, tl.sum(w_row * dots, 1), mask=row_ok)
    else:
        tl.store(stat, tl.sum(w * dots, 1), mask=row_ok)
    if MODE == SIGLIP:
        tl.store(stat + plane, tl.sum(tl.where(ok, loss, 0.0), 1), mask=row_ok)
        tl.store(stat + 2 * plane, tl.sum(w, 1), mask=row_ok)
