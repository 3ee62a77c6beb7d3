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
  * SIGLIP: per-row sums of softplus(S + b), every element taken as a negative (the
    host corrects the positives, O(n * D)).

Backward, ``_contrastive_bwd_kernel`` (one program per row block): recomputes each S
tile, forms dLoss/dS for it and accumulates G_A = (dLoss/dS) @ B for its rows, over the
feature dim in BLOCK_D slices held in an fp32 buffer only this program touches. The
column gradient G_B = (dLoss/dS)^T @ A is the same kernel with A and B swapped (the
weights below are symmetric in that swap), so no atomics anywhere.
  * INFONCE: dLoss/dS_ij = c_a exp(S_ij - lse_a_i) + c_b exp(S_ij - lse_b_j), each term
    optional (USE_LSE_A / USE_LSE_B); the host passes coefficients of order one and
    rescales, so fp16/bf16 tiles never hold subnormal weights.
  * SIGLIP: dLoss/dS_ij = sigmoid(S_ij + b) (negatives; the host corrects positives),
    with WITH_LOSS also the per-row sums of softplus(S + b) and of sigmoid(S + b), so a
    forward that wants gradients costs two passes over the tiles, not three.
The gradient GEMM multiplies the weight tile in the operands' dtype (fp16/bf16 tensor
cores, as FlashAttention does with P) and accumulates in fp32.
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
                            part_l_ptr, n_rows, n_cols, D, stride_a, stride_b, stride_part,
                            MODE: tl.constexpr, WITH_COLS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """row_out (n,) fp32: INFONCE the row log-sum-exp of S, SIGLIP sum_j softplus(S_ij + b).
    INFONCE with WITH_COLS: part_m/part_l (P, m) fp32, initialised to -inf / 0, receive
    this program's column max (base 2) and sum of exp2(S * log2 e - max)."""
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
        for c0 in range(0, n_cols, BLOCK_N):
            cols, col_ok, ok, dots = _column_tile(a_ptr, b_ptr, rows, row_ok, c0, n_cols,
                                                  stride_a, stride_b, D, BLOCK_M, BLOCK_N,
                                                  BLOCK_K, PRECISION)
            if MODE == INFONCE:
                s2 = tl.where(ok, dots * s_log2, float("-inf"))
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
                sp = _softplus(dots * scale + bias)
                l_i += tl.sum(tl.where(ok, sp, 0.0), 1)
        if MODE == INFONCE:
            out = (m_i + tl.math.log2(tl.where(row_ok, l_i, 1.0))) * LN2
        else:
            out = l_i
        tl.store(row_out_ptr + rows, out, mask=row_ok)


@triton.jit
def _contrastive_bwd_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, lse_a_ptr, lse_b_ptr, g_ptr,
                            loss_ptr, wsum_ptr, n_rows, n_cols, D, stride_a, stride_b, stride_g,
                            c_a, c_b,
                            MODE: tl.constexpr, USE_LSE_A: tl.constexpr,
                            USE_LSE_B: tl.constexpr, WITH_LOSS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                            PRECISION: tl.constexpr):
    """g (n, D) fp32, zero-initialised: g_i += sum_j W_ij B_j for this program's rows,
    W as in the module docstring. SIGLIP with WITH_LOSS: loss/wsum (n,) fp32 get the
    row sums of softplus(S + b) and of W."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    scale, bias = _scale_and_bias(scale_ptr, bias_ptr, MODE)
    s_log2 = scale * LOG2E
    lse_a = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_LSE_A:
        lse_a = tl.load(lse_a_ptr + rows, mask=row_ok, other=0.0) * LOG2E
    loss_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    wsum_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    g_rows = g_ptr + rows[:, None].to(tl.int64) * stride_g
    for c0 in range(0, n_cols, BLOCK_N):
        cols, col_ok, ok, dots = _column_tile(a_ptr, b_ptr, rows, row_ok, c0, n_cols, stride_a,
                                              stride_b, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        if MODE == INFONCE:
            s2 = dots * s_log2
            w = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if USE_LSE_A:
                w += c_a * tl.math.exp2(s2 - lse_a[:, None])
            if USE_LSE_B:
                lse_b = tl.load(lse_b_ptr + cols, mask=col_ok, other=0.0) * LOG2E
                w += c_b * tl.math.exp2(s2 - lse_b[None, :])
        else:
            logit = dots * scale + bias
            w = tl.sigmoid(logit)
            if WITH_LOSS:
                loss_i += tl.sum(tl.where(ok, _softplus(logit), 0.0), 1)
        w = tl.where(ok, w, 0.0)
        if WITH_LOSS:
            wsum_i += tl.sum(w, 1)
        w_op = w.to(b_ptr.dtype.element_ty)
        b_cols = b_ptr + cols[:, None].to(tl.int64) * stride_b
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_ok = d < D
            b = tl.load(b_cols + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            g_mask = row_ok[:, None] & d_ok[None, :]
            g = tl.load(g_rows + d[None, :], mask=g_mask, other=0.0)
            g = tl.dot(w_op, b, g, input_precision=PRECISION)
            tl.store(g_rows + d[None, :], g, mask=g_mask)
    if WITH_LOSS:
        tl.store(loss_ptr + rows, loss_i, mask=row_ok)
        tl.store(wsum_ptr + rows, wsum_i, mask=row_ok)
