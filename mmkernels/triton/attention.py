"""FlashAttention-style attention core in Triton, shared by varlen attention and
ViLBERT co-attention.

Layout: q (total_q, H, D), k/v (total_k, H_kv, D), out like q, lse (H, total_q) fp32,
sequences packed back to back and delimited by cu_seqlens (int32). Heads are
grouped (GQA/MQA): query head h reads key/value head h // (H // H_kv).

Visibility of key j to query i (0-based within their sequences):
  * causal=False: every key;
  * causal=True: j <= i + (seqlen_k - seqlen_q) (bottom-right aligned, as flash-attn),
    or, with block ids, the two tokens share a non-zero block id (an image's patches
    see each other both ways while text stays causal);
  * HAS_WINDOW (sliding window, flash-attn's window_size = (left, right)): also
    i + off - left <= j <= i + off + right, off = seqlen_k - seqlen_q; the launcher
    replaces an unbounded side by a bound that never binds (and right by 0 with
    causal). Image blocks are added on top of the windowed causal mask.
A query with no visible key outputs zeros and lse = -inf. Key tiles outside a tile's
[first, last] visible key (from the causal/window bounds and the block reach tables)
are never loaded.

Scores: S = scale * q k^T, or with HAS_SOFTCAP, S = softcap * tanh(scale * q k^T /
softcap) (Gemma-2); the backward multiplies dS by the cap's derivative 1 - (S/softcap)^2.

Forward (one program per (q tile, sequence, head)): the q tile stays in SRAM for the
whole key loop; scores are kept in the log2 domain with the online softmax (running
max m, running sum l) and exp2. Key tiles past the tile's reach (the last key any of
its queries can see) are never loaded: fully masked blocks are skipped.

Backward (FA2): delta = rowsum(dO * O) (:func:`_attn_bwd_delta_kernel`, reading O and
dO in their dtype), then
  * dK/dV: one program per (key tile, sequence, kv head); it loops over the query heads
    of its group and over the query tiles that can see it (from the tile's first to
    its last visible query), recomputing P = exp2(S - lse). With ATOMIC_DQ (the
    default, one pass: five GEMMs per tile pair, as FA2) it also adds dS K * scale to
    an fp32 dQ buffer with atomics: the order of those adds varies from run to run.
  * deterministic path (ATOMIC_DQ off): dK/dV as above, then dQ in a second kernel,
    one program per (q tile, sequence, head), looping over the key tiles like the
    forward: it recomputes S and dP (seven GEMMs per tile pair, 1.4x the one pass's
    MMA work) but no atomics, so every run is bit-identical.
Dropout keeps an element with probability 1 - p, decided by Philox4x32-10 keyed by
the call's 64-bit seed, with the counter (offset // 4 + j as 64 bits, stream,
q_global): see :func:`_dropout_keep` and :func:`mmkernels.reference.dropout_uniform`,
which computes the same bits with torch ops. The backward and the testing hooks
regenerate exactly the forward's mask. The 64-bit seed and counter base arrive as
int32 halves (seed_lo, seed_hi, ctr_lo, ctr_hi) so that a launch's argument types
never depend on their values.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.random import philox_impl, uint_to_uniform_float

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


#: Philox arguments of every kernel that draws dropout. They change on every call (the
#: offset advances), so they are never specialised: a launch with a counter that
#: happens to be a multiple of 16 (or 1) must not compile a new kernel variant.
PHILOX_ARGS = ("seed_lo", "seed_hi", "ctr_lo", "ctr_hi")


@triton.jit
def _seq_bounds(cu_ptr, b):
    """(start, length) of sequence b from cu_seqlens."""
    start = tl.load(cu_ptr + b)
    return start, tl.load(cu_ptr + b + 1) - start


@triton.jit
def _dropout_keep(seed_lo, seed_hi, ctr_lo, ctr_hi, stream, rows_global, cols, dropout_p,
                  CARRY_BY_COMPARE: tl.constexpr = False):
    """(BLOCK_M, BLOCK_N) bool: keep element (row, col) of stream `stream`.

    Philox4x32-10, key = the 64-bit seed (seed_hi:seed_lo); counter words 0-1 = the
    64-bit counter base (ctr_hi:ctr_lo, the Philox offset // 4) + col, word 2 = the
    stream (head; co-attention: direction * H + head), word 3 = the row's index in
    the packed q tensor. Every (row, col, stream) of a call has its own counter,
    and calls with disjoint reserved offsets never share one (PyTorch's convention:
    counter.xy = offset / 4 + index, counter.zw = subsequence).
    """
    k0 = tl.to_tensor(seed_lo).to(tl.uint32, bitcast=True)
    k1 = tl.to_tensor(seed_hi).to(tl.uint32, bitcast=True)
    # the 64-bit counter base + col, on a (N,) vector. Two spellings of the same words
    # (tested bit for bit against reference.dropout_uniform): the low word + col in
    # int64 with bit 32 as the carry, or a wrapping uint32 add with the carry as
    # (sum < base). They only steer ptxas: the first keeps the forward tiles spill-free
    # on sm_80, the second the dK/dV tile on sm_90 (python -m mmkernels.tools.kernel_report).
    base = tl.to_tensor(ctr_lo).to(tl.uint32, bitcast=True)
    hi = tl.to_tensor(ctr_hi).to(tl.uint32, bitcast=True)
    if CARRY_BY_COMPARE:
        lo = tl.add(base, cols.to(tl.uint32), sanitize_overflow=False)
        hi = tl.add(hi, (lo < base).to(tl.uint32), sanitize_overflow=False)
    else:
        low = base.to(tl.int64) + cols.to(tl.int64)
        lo = low.to(tl.uint32)
        hi = tl.add(hi, (low >> 32).to(tl.uint32), sanitize_overflow=False)
    r = rows_global.to(tl.uint32)  # non-negative: packed row indices are int32
    # The words stay (1, N), (1, N), scalar and (M, 1): the first round broadcasts them,
    # so no (M, N) counter tile is materialised. The row sits in word 3, which the
    # first round only XORs: nothing per row but the row index itself is kept live
    # across the key loop (word 2 is multiplied; the scalar stream costs nothing there).
    x, _, _, _ = philox_impl(lo[None, :], hi[None, :], tl.to_tensor(stream).to(tl.uint32),
                             r[:, None], k0, k1)
    return uint_to_uniform_float(x) >= dropout_p


@triton.jit
def _visible(rows, cols, seqlen_q, seqlen_k, bq, bk, win_left, win_right, CAUSAL: tl.constexpr,
             HAS_BLOCKS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: in range and visible under the causal/window/block rule."""
    ok = (rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
    if CAUSAL or HAS_WINDOW:
        diff = cols[None, :] - rows[:, None] - (seqlen_k - seqlen_q)  # j - (i + off)
        if CAUSAL:
            vis = diff <= 0
            if HAS_WINDOW:
                vis = vis & (diff >= -win_left)
            if HAS_BLOCKS:
                vis = vis | ((bq[:, None] == bk[None, :]) & (bq[:, None] != 0))
            ok = ok & vis
        else:
            ok = ok & (diff >= -win_left) & (diff <= win_right)
    return ok


@triton.jit
def _tanh(x):
    """tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits +-1 at +-inf, one exp2 and one
    fast (2-ulp) division: an IEEE division per element costs registers that the
    heaviest variants do not have (kernel report)."""
    return 1.0 - tl.math.fdiv(2.0, tl.math.exp2(x * (2.0 * LOG2E)) + 1.0, ieee_rounding=False)


@triton.jit
def _scores(qk, sm_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """(log2-domain scores S * log2(e), tanh of the capped scores (or qk when
    HAS_SOFTCAP is off; unused then)) from the raw products qk = q k^T."""
    if HAS_SOFTCAP:
        t = _tanh(qk * (sm_scale / softcap))
        return t * (softcap * LOG2E), t
    else:
        return qk * (sm_scale * LOG2E), qk


@triton.jit
def _load_tokens(base, idx, idx_ok, stride_t, offs_d, d_ok, stride_d):
    """A (tokens, BLOCK_D) tile of one head, token idx[i] at base + idx[i] * stride_t
    (int64 offsets); out-of-range tokens and padded feature lanes read zeros."""
    return tl.load(base + idx[:, None].to(tl.int64) * stride_t + offs_d[None, :] * stride_d,
                   mask=idx_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _load_tokens_t(base, idx, idx_ok, stride_t, offs_d, d_ok, stride_d):
    """The same tile loaded transposed, (BLOCK_D, tokens): the right operand of q k^T."""
    return tl.load(base + idx[None, :].to(tl.int64) * stride_t + offs_d[:, None] * stride_d,
                   mask=idx_ok[None, :] & d_ok[:, None], other=0.0)


@triton.jit
def _store_tokens(base, idx, idx_ok, stride_t, offs_d, d_ok, stride_d, value):
    """Store a (tokens, BLOCK_D) float32 tile in base's dtype (in-range lanes only)."""
    tl.store(base + idx[:, None].to(tl.int64) * stride_t + offs_d[None, :] * stride_d,
             value.to(base.dtype.element_ty), mask=idx_ok[:, None] & d_ok[None, :])


@triton.jit
def _key_range(rows, row_ok, start_m, seqlen_q, seqlen_k, bq_base, reach_base, reach_back_base,
               win_left, win_right, CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr,
               HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) a q tile can see, lo a multiple of BLOCK_N (causal: up to the last
    key any of its rows sees, from the reach table with image blocks; a window: from
    the first key of its first row's window, or of an image block of its rows), and
    the rows' block ids (zeros without)."""
    lo = 0
    hi = seqlen_k
    bq = tl.zeros([BLOCK_M], dtype=tl.int32)
    off = seqlen_k - seqlen_q
    if CAUSAL:
        if HAS_BLOCKS:
            reach = tl.load(reach_base + rows, mask=row_ok, other=-1)
            hi = tl.minimum(tl.max(reach, 0) + 1, seqlen_k)
            bq = tl.load(bq_base + rows, mask=row_ok, other=0)
        else:
            hi = tl.minimum((start_m + 1) * BLOCK_M + off, seqlen_k)
    elif HAS_WINDOW:
        hi = tl.minimum((start_m + 1) * BLOCK_M + off + win_right, seqlen_k)
    if HAS_WINDOW:
        lo = start_m * BLOCK_M + off - win_left
        if CAUSAL and HAS_BLOCKS:
            first = tl.load(reach_back_base + rows, mask=row_ok, other=2147483647)
            lo = tl.minimum(lo, tl.min(first, 0))
        lo = (tl.maximum(lo, 0) // BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, 0)
    return lo, hi, bq


@triton.jit
def _query_range(cols, col_ok, start_n, seqlen_q, seqlen_k, bk_base, reach_base,
                 reach_back_base, win_left, win_right, CAUSAL: tl.constexpr,
                 HAS_BLOCKS: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Queries [lo, hi) that can see a key tile, lo a multiple of BLOCK_M (the mirror of
    :func:`_key_range`), and the keys' block ids (zeros without)."""
    lo = 0
    hi = seqlen_q
    bk = tl.zeros([BLOCK_N], dtype=tl.int32)
    off = seqlen_k - seqlen_q
    if CAUSAL:
        if HAS_BLOCKS:
            first = tl.load(reach_back_base + cols, mask=col_ok, other=2147483647)
            lo = tl.min(first, 0)
            bk = tl.load(bk_base + cols, mask=col_ok, other=0)
        else:
            lo = start_n * BLOCK_N - off
    elif HAS_WINDOW:
        lo = start_n * BLOCK_N - off - win_right
    if HAS_WINDOW:
        hi = (start_n + 1) * BLOCK_N - off + win_left
        if CAUSAL and HAS_BLOCKS:
            reach = tl.load(reach_base + cols, mask=col_ok, other=-1)
            hi = tl.maximum(hi, tl.max(reach, 0) + 1)
        hi = tl.maximum(tl.minimum(hi, seqlen_q), 0)
    lo = (tl.maximum(lo, 0) // BLOCK_M) * BLOCK_M
    return lo, hi, bk


@triton.jit
def _attn_fwd_tile(q_base, k_base, v_base, o_base, lse_base, bq_base, bk_base, reach_base,
                   stride_qt, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd,
                   stride_ot, stride_od, seqlen_q, seqlen_k, start_m, head_dim, sm_scale,
                   dropout_p, seed_lo, seed_hi, ctr_lo, ctr_hi, stream, q_global0,
                   CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   reach_back_base=None, softcap=0.0, win_left=0, win_right=0,
                   HAS_WINDOW: tl.constexpr = False, HAS_SOFTCAP: tl.constexpr = False):
    """Output rows [start_m*BLOCK_M, +BLOCK_M) of one (sequence, head).

    The *_base pointers point at this sequence's first token and this head; the
    dropout stream of this head is `stream`. reach_back_base (blocks with a window),
    softcap, win_left/right: see the module docstring.
    """
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen_q
    d_ok = offs_d < head_dim
    q = _load_tokens(q_base, rows, row_ok, stride_qt, offs_d, d_ok, stride_qd)
    lo, hi, bq = _key_range(rows, row_ok, start_m, seqlen_q, seqlen_k, bq_base, reach_base,
                            reach_back_base, win_left, win_right, CAUSAL, HAS_BLOCKS,
                            HAS_WINDOW, BLOCK_M, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seqlen_k
        kt = _load_tokens_t(k_base, cols, col_ok, stride_kt, offs_d, d_ok, stride_kd)
        s, _t = _scores(tl.dot(q, kt, input_precision="ieee"), sm_scale, softcap, HAS_SOFTCAP)
        bk = bq
        if HAS_BLOCKS:
            bk = tl.load(bk_base + cols, mask=col_ok, other=0)
        ok = _visible(rows, cols, seqlen_q, seqlen_k, bq, bk, win_left, win_right, CAUSAL,
                      HAS_BLOCKS, HAS_WINDOW)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed_lo, seed_hi, ctr_lo, ctr_hi, stream, q_global0 + rows,
                                 cols, dropout_p)
            p = tl.where(keep, p, 0.0)  # 1 / (1 - p) is applied to the output
        v = _load_tokens(v_base, cols, col_ok, stride_vt, offs_d, d_ok, stride_vd)
        acc += tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    if HAS_DROPOUT:
        # kept probabilities scale by 1 / (1 - p): folded into the row sums, not per
        # element (p = 0, e.g. co-attention's undropped direction, divides by l exactly)
        out = acc / (l_safe * (1.0 - dropout_p))[:, None]
    else:
        out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    _store_tokens(o_base, rows, row_ok, stride_ot, offs_d, d_ok, stride_od, out)
    tl.store(lse_base + rows, lse, mask=row_ok)


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
                        ATOMIC_DQ: tl.constexpr = False):
    """dK, dV for key rows [start_n*BLOCK_N, +BLOCK_N) of one (sequence, kv head).

    q_seq/do_seq/lse_seq/delta_seq point at the sequence start (head 0); the loop
    covers the `group` query heads that share this kv head (query head h draws
    dropout stream stream0 + h). ATOMIC_DQ: also add this tile's dQ contributions
    to the float32 buffer dq_seq (sequence start, head 0) with atomics.
    """
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < seqlen_k
    d_ok = offs_d < head_dim
    drop_scale = 1.0 / (1.0 - dropout_p)  # a scalar: no per-element division
    k = _load_tokens(k_base, cols, col_ok, stride_kt, offs_d, d_ok, stride_kd)
    v = _load_tokens(v_base, cols, col_ok, stride_vt, offs_d, d_ok, stride_vd)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query range: from the first to the last query that sees any key of the tile.
    lo, hi, bk = _query_range(cols, col_ok, start_n, seqlen_q, seqlen_k, bk_base, reach_base,
                              reach_back_base, win_left, win_right, CAUSAL, HAS_BLOCKS,
                              HAS_WINDOW, BLOCK_M, BLOCK_N)
    for g in range(group):
        h = kv_head * group + g
        h64 = h.to(tl.int64)
        q_h = q_seq + h64 * stride_qh
        do_h = do_seq + h64 * stride_doh
        if ATOMIC_DQ:
            dq_h = dq_seq + h64 * stride_dqh
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < seqlen_q
            q = _load_tokens(q_h, rows, row_ok, stride_qt, offs_d, d_ok, stride_qd)
            do = _load_tokens(do_h, rows, row_ok, stride_dot, offs_d, d_ok, stride_dod)
            lse = tl.load(lse_seq + h64 * stride_lh + rows, mask=row_ok, other=0.0)
            delta = tl.load(delta_seq + h64 * stride_lh + rows, mask=row_ok, other=0.0)
            lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
            bq = bk
            if HAS_BLOCKS:
                bq = tl.load(bq_base + rows, mask=row_ok, other=0)
            s, t = _scores(tl.dot(q, tl.trans(k), input_precision="ieee"), sm_scale, softcap,
                           HAS_SOFTCAP)
            ok = _visible(rows, cols, seqlen_q, seqlen_k, bq, bk, win_left, win_right, CAUSAL,
                          HAS_BLOCKS, HAS_WINDOW)
            p = tl.where(ok, tl.math.exp2(s - lse2[:, None]), 0.0)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed_lo, seed_hi, ctr_lo, ctr_hi, stream0 + h,
                                     q_global0 + rows, cols, dropout_p,
                                     CARRY_BY_COMPARE=True)
                # dv is scaled by 1 / (1 - p) once, at the end
                dv += tl.dot(tl.trans(tl.where(keep, p, 0.0).to(do.dtype)), do,
                             input_precision="ieee")
            else:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
            if HAS_SOFTCAP:  # fold the cap's derivative into P: one tile live, not two
                p = p * (1.0 - t * t)
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            if HAS_DROPOUT:
                dp = tl.where(keep, dp * drop_scale, 0.0)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
            if ATOMIC_DQ:
                dq = tl.dot(ds.to(k.dtype), k, input_precision="ieee") * sm_scale
                tl.atomic_add(dq_h + rows[:, None].to(tl.int64) * stride_dqt
                              + offs_d[None, :] * stride_dqd, dq,
                              mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
    dk = dk * sm_scale
    if HAS_DROPOUT:
        dv = dv * drop_scale
    _store_tokens(dk_base, cols, col_ok, stride_dkt, offs_d, d_ok, stride_dkd, dk)
    _store_tokens(dv_base, cols, col_ok, stride_dvt, offs_d, d_ok, stride_dvd, dv)


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
                      HAS_WINDOW: tl.constexpr = False, HAS_SOFTCAP: tl.constexpr = False):
    """dQ for query rows [start_m*BLOCK_M, +BLOCK_M) of one (sequence, head)."""
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen_q
    d_ok = offs_d < head_dim
    drop_scale = 1.0 / (1.0 - dropout_p)  # a scalar: no per-element division
    q = _load_tokens(q_base, rows, row_ok, stride_qt, offs_d, d_ok, stride_qd)
    do = _load_tokens(do_base, rows, row_ok, stride_dot, offs_d, d_ok, stride_dod)
    lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
    lo, hi, bq = _key_range(rows, row_ok, start_m, seqlen_q, seqlen_k, bq_base, reach_base,
                            reach_back_base, win_left, win_right, CAUSAL, HAS_BLOCKS,
                            HAS_WINDOW, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seqlen_k
        kt = _load_tokens_t(k_base, cols, col_ok, stride_kt, offs_d, d_ok, stride_kd)
        vt = _load_tokens_t(v_base, cols, col_ok, stride_vt, offs_d, d_ok, stride_vd)
        bk = bq
        if HAS_BLOCKS:
            bk = tl.load(bk_base + cols, mask=col_ok, other=0)
        # dP (and its dropout mask) first: only dP - delta is live while S, its cap and P
        # are computed and folded into dS (kernel report: fewer registers)
        dp = tl.dot(do, vt, input_precision="ieee")
        if HAS_DROPOUT:
            keep = _dropout_keep(seed_lo, seed_hi, ctr_lo, ctr_hi, stream, q_global0 + rows,
                                 cols, dropout_p)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        dp = dp - delta[:, None]
        s, t = _scores(tl.dot(q, kt, input_precision="ieee"), sm_scale, softcap, HAS_SOFTCAP)
        ok = _visible(rows, cols, seqlen_q, seqlen_k, bq, bk, win_left, win_right, CAUSAL,
                      HAS_BLOCKS, HAS_WINDOW)
        ds = tl.where(ok, tl.math.exp2(s - lse2[:, None]) * dp, 0.0)
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision="ieee")
    dq = dq * sm_scale
    _store_tokens(dq_base, rows, row_ok, stride_dqt, offs_d, d_ok, stride_dqd, dq)


@triton.jit
def _attn_bwd_delta_tile(o_base, do_base, delta_base, start_t, n_tokens, head_dim, stride_ot,
                         stride_od, stride_dot, stride_dod, BLOCK_T: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """delta[t] = sum_d dO[t, d] * O[t, d] (float32) for tokens [start_t*BLOCK_T, +BLOCK_T)
    of one head (o_base/do_base/delta_base at that head): O and dO are read in their
    dtype and multiplied in float32 in registers."""
    idx = start_t * BLOCK_T + tl.arange(0, BLOCK_T)
    idx_ok = idx < n_tokens
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    o = _load_tokens(o_base, idx, idx_ok, stride_ot, offs_d, d_ok, stride_od)
    do = _load_tokens(do_base, idx, idx_ok, stride_dot, offs_d, d_ok, stride_dod)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_base + idx, delta, mask=idx_ok)


@triton.jit
def _attn_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, n_tokens, head_dim, stride_ot, stride_oh,
                           stride_od, stride_dot, stride_doh, stride_dod, stride_lh,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Backward preprocess: delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] (float32), for
    tokens [pid*BLOCK_T, +BLOCK_T) of head program_id(1). O and dO (total, H, D) are
    read in their dtype and multiplied in float32 in registers: no (total, H, D)
    float32 temporaries. Every delta element is written (no zero-fill needed)."""
    h = tl.program_id(1).to(tl.int64)
    _attn_bwd_delta_tile(o_ptr + h * stride_oh, do_ptr + h * stride_doh, delta_ptr + h * stride_lh,
                         tl.program_id(0), n_tokens, head_dim, stride_ot, stride_od, stride_dot,
                         stride_dod, BLOCK_T, BLOCK_D)


@triton.jit(do_not_specialize=PHILOX_ARGS)
def _dropout_mask_kernel(mask_ptr, rows_ptr, n_rows, n_cols, stride_mh, stride_mr, dropout_p,
                         seed_lo, seed_hi, ctr_lo, ctr_hi, stream0,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         CARRY_BY_COMPARE: tl.constexpr = False):
    """Testing hook: keep-mask (H, n_rows, n_cols) int8; mask[h, i, j] is element
    (packed query row rows[i], key j) of stream stream0 + h, as the kernels draw it."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    idx = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    idx_ok = idx < n_rows
    rows = tl.load(rows_ptr + idx, mask=idx_ok, other=0)
    for start_n in range(0, n_cols, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed_lo, seed_hi, ctr_lo, ctr_hi, stream0 + h, rows, cols,
                             dropout_p, CARRY_BY_COMPARE)
        ptrs = (mask_ptr + h.to(tl.int64) * stride_mh + idx[:, None].to(tl.int64) * stride_mr
                + cols[None, :])
        tl.store(ptrs, keep.to(tl.int8), mask=idx_ok[:, None] & (cols[None, :] < n_cols))
