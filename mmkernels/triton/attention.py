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

Head dims run in two chunks of lanes, BLOCK_D (a power of two) + BLOCK_D1 (0, 16 or
32; D = 72/80 as 64 + 16, D = 96 as 64 + 32, see attention_launch.head_chunks): every
load, store and product along the head dim is done per chunk. EVEN_D: the head dim
fills the chunks, so no lane is masked.

Masks only where needed: each key loop (forward, dQ) and query loop (dK/dV) runs in
three parts: tiles before the window's full range, the interior (MASKED off: no
bounds mask, no visibility test), then the boundary tiles (causal diagonal, window
edge, image-block reach, ragged tail). The set of tiles is the same.

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
the call's 64-bit seed, with the counter (offset // 4 + j // 4 as 64 bits, stream,
q_global) and output word j % 4 (one Philox call per four elements): see
:func:`_dropout_keep` and :func:`mmkernels.reference.dropout_uniform`, which computes
the same bits with torch ops. The 1 / (1 - p) scaling is a scalar folded into the
forward's row sums and the backward's final dV scale: no division in the loops. The
backward and the testing hooks regenerate exactly the forward's mask. The 64-bit seed
and counter base arrive as int32 halves (seed_lo, seed_hi, ctr_lo, ctr_hi) so that a launch's argument types
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
def _dropout_keep(seed_lo, seed_hi, ctr_lo, ctr_hi, stream, rows_global, col0, dropout_p,
                  BLOCK_N: tl.constexpr, CARRY_BY_COMPARE: tl.constexpr = False):
    """(BLOCK_M, BLOCK_N) bool: keep element (row, col) of stream `stream`, for the key
    columns col0 .. col0 + BLOCK_N - 1 (col0 a multiple of 4).

    Philox4x32-10, key = the 64-bit seed (seed_hi:seed_lo); counter words 0-1 = the
    64-bit counter base (ctr_hi:ctr_lo, the Philox offset // 4) + col // 4, word 2 =
    the stream (head; co-attention: direction * H + head), word 3 = the row's index in
    the packed q tensor; element (row, col) is output word col % 4. One Philox call
    covers four columns. Every (row, col, stream) of a call has its own counter and
    word, and calls with disjoint reserved offsets never share one (PyTorch's
    convention: counter.xy = offset / 4 + index, counter.zw = subsequence).
    """
    k0 = tl.to_tensor(seed_lo).to(tl.uint32, bitcast=True)
    k1 = tl.to_tensor(seed_hi).to(tl.uint32, bitcast=True)
    groups = col0 // 4 + tl.arange(0, BLOCK_N // 4)
    # the 64-bit counter base + col // 4, on a (N / 4,) vector. Two spellings of the same
    # words (tested bit for bit against reference.dropout_uniform): the low word + group
    # in int64 with bit 32 as the carry, or a wrapping uint32 add with the carry as
    # (sum < base). They only steer ptxas (python -m mmkernels.tools.kernel_report).
    base = tl.to_tensor(ctr_lo).to(tl.uint32, bitcast=True)
    hi = tl.to_tensor(ctr_hi).to(tl.uint32, bitcast=True)
    if CARRY_BY_COMPARE:
        lo = tl.add(base, groups.to(tl.uint32), sanitize_overflow=False)
        hi = tl.add(hi, (lo < base).to(tl.uint32), sanitize_overflow=False)
    else:
        low = base.to(tl.int64) + groups.to(tl.int64)
        lo = low.to(tl.uint32)
        hi = tl.add(hi, (low >> 32).to(tl.uint32), sanitize_overflow=False)
    r = rows_global.to(tl.uint32)  # non-negative: packed row indices are int32
    # The words stay (1, N/4), (1, N/4), scalar and (M, 1): the first round broadcasts
    # them, so no counter tile is materialised; the row sits in word 3, which the first
    # round only XORs.
    x0, x1, x2, x3 = philox_impl(lo[None, :], hi[None, :], tl.to_tensor(stream).to(tl.uint32),
                                 r[:, None], k0, k1)
    # columns 4g .. 4g + 3 take words 0 .. 3 of group g: interleave (M, N/4) x 4 -> (M, N)
    x = tl.interleave(tl.interleave(x0, x2), tl.interleave(x1, x3))
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
def _load_chunk(base, idx, idx_ok, stride_t, stride_d, head_dim, D_START: tl.constexpr,
                BLOCK: tl.constexpr, MASK_T: tl.constexpr, MASK_D: tl.constexpr,
                TRANS: tl.constexpr):
    """Feature lanes [D_START, D_START + BLOCK) of a (tokens, BLOCK) tile of one head,
    token idx[i] at base + idx[i] * stride_t (int64 offsets), or its transpose
    (BLOCK, tokens) with TRANS (the right operand of q k^T). MASK_T: out-of-range
    tokens read zeros; MASK_D: lanes past head_dim read zeros. Without either, the
    load carries no mask at all (interior tiles, head dims that fill the chunks)."""
    offs_d = D_START + tl.arange(0, BLOCK)
    if TRANS:
        ptrs = base + idx[None, :].to(tl.int64) * stride_t + offs_d[:, None] * stride_d
        t_ok = idx_ok[None, :]
        d_ok = offs_d[:, None] < head_dim
    else:
        ptrs = base + idx[:, None].to(tl.int64) * stride_t + offs_d[None, :] * stride_d
        t_ok = idx_ok[:, None]
        d_ok = offs_d[None, :] < head_dim
    if MASK_T:
        if MASK_D:
            x = tl.load(ptrs, mask=t_ok & d_ok, other=0.0)
        else:
            x = tl.load(ptrs, mask=t_ok, other=0.0)
    else:
        if MASK_D:
            x = tl.load(ptrs, mask=d_ok, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _load_chunks(base, idx, idx_ok, stride_t, stride_d, head_dim, BLOCK_D: tl.constexpr,
                 BLOCK_D1: tl.constexpr, EVEN_D: tl.constexpr, MASK_T: tl.constexpr = True,
                 TRANS: tl.constexpr = False):
    """The two head-dim chunks (lanes [0, BLOCK_D) and [BLOCK_D, BLOCK_D + BLOCK_D1)) of
    a token tile (see :func:`_load_chunk`); the second is 0 (unused) when BLOCK_D1 == 0.
    With a second chunk the first is full (head_dim > BLOCK_D); EVEN_D (head_dim ==
    BLOCK_D + BLOCK_D1): no lane is masked."""
    x0 = _load_chunk(base, idx, idx_ok, stride_t, stride_d, head_dim, 0, BLOCK_D, MASK_T,
                     (not EVEN_D) and (BLOCK_D1 == 0), TRANS)
    x1 = 0
    if BLOCK_D1 > 0:
        x1 = _load_chunk(base, idx, idx_ok, stride_t, stride_d, head_dim, BLOCK_D, BLOCK_D1,
                         MASK_T, not EVEN_D, TRANS)
    return x0, x1


@triton.jit
def _chunk_ptrs(base, idx, idx_ok, stride_t, stride_d, head_dim, D_START: tl.constexpr,
                BLOCK: tl.constexpr, MASK_T: tl.constexpr, MASK_D: tl.constexpr):
    """Pointers and mask (or None) of lanes [D_START, +BLOCK) of a (tokens, BLOCK) tile."""
    offs_d = D_START + tl.arange(0, BLOCK)
    ptrs = base + idx[:, None].to(tl.int64) * stride_t + offs_d[None, :] * stride_d
    mask = None
    if MASK_T:
        if MASK_D:
            mask = idx_ok[:, None] & (offs_d[None, :] < head_dim)
        else:
            mask = idx_ok[:, None]  # broadcast over the lanes
    else:
        if MASK_D:
            mask = offs_d[None, :] < head_dim
    return ptrs, mask


@triton.jit
def _store_chunks(base, idx, idx_ok, stride_t, stride_d, head_dim, x0, x1,
                  BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr, EVEN_D: tl.constexpr):
    """Store the float32 chunks of a (tokens, BLOCK_D [+ BLOCK_D1]) tile in base's dtype
    (in-range tokens and lanes only)."""
    p0, m0 = _chunk_ptrs(base, idx, idx_ok, stride_t, stride_d, head_dim, 0, BLOCK_D, True,
                         (not EVEN_D) and (BLOCK_D1 == 0))
    tl.store(p0, x0.to(base.dtype.element_ty), mask=m0)
    if BLOCK_D1 > 0:
        p1, m1 = _chunk_ptrs(base, idx, idx_ok, stride_t, stride_d, head_dim, BLOCK_D, BLOCK_D1,
                             True, not EVEN_D)
        tl.store(p1, x1.to(base.dtype.element_ty), mask=m1)


@triton.jit
def _atomic_add_chunk(base, idx, idx_ok, stride_t, stride_d, head_dim, x, D_START: tl.constexpr,
                      BLOCK: tl.constexpr, MASK_T: tl.constexpr, MASK_D: tl.constexpr):
    """Add a float32 (tokens, BLOCK) chunk with relaxed atomics; without MASK_T and
    MASK_D (an interior tile of a full head dim) the atomics carry no mask (Triton
    cannot return the None mask of :func:`_chunk_ptrs` from a compiled function)."""
    offs_d = D_START + tl.arange(0, BLOCK)
    ptrs = base + idx[:, None].to(tl.int64) * stride_t + offs_d[None, :] * stride_d
    if MASK_T or MASK_D:
        _p, mask = _chunk_ptrs(base, idx, idx_ok, stride_t, stride_d, head_dim, D_START, BLOCK,
                               MASK_T, MASK_D)
        tl.atomic_add(ptrs, x, mask=mask, sem="relaxed")
    else:
        tl.atomic_add(ptrs, x, sem="relaxed")


@triton.jit
def _atomic_add_chunks(base, idx, idx_ok, stride_t, stride_d, head_dim, x0, x1,
                       BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr, EVEN_D: tl.constexpr,
                       MASK_T: tl.constexpr):
    """Add float32 chunks to a float32 (tokens, head_dim) buffer with relaxed atomics."""
    _atomic_add_chunk(base, idx, idx_ok, stride_t, stride_d, head_dim, x0, 0, BLOCK_D, MASK_T,
                      (not EVEN_D) and (BLOCK_D1 == 0))
    if BLOCK_D1 > 0:
        _atomic_add_chunk(base, idx, idx_ok, stride_t, stride_d, head_dim, x1, BLOCK_D,
                          BLOCK_D1, MASK_T, not EVEN_D)


@triton.jit
def _dot2(a0, a1, b0, b1, BLOCK_D1: tl.constexpr, TRANS_B: tl.constexpr = False):
    """a0 b0 (+ a1 b1 with a second head-dim chunk): a product contracting the head dim,
    in float32; TRANS_B: with b0, b1 transposed (they are (tokens, lanes) tiles)."""
    if TRANS_B:
        acc = tl.dot(a0, tl.trans(b0), input_precision="ieee")
        if BLOCK_D1 > 0:
            acc = tl.dot(a1, tl.trans(b1), acc, input_precision="ieee")
    else:
        acc = tl.dot(a0, b0, input_precision="ieee")
        if BLOCK_D1 > 0:
            acc = tl.dot(a1, b1, acc, input_precision="ieee")
    return acc


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
def _split3(lo, hi, first, end, BLOCK: tl.constexpr):
    """Split the tile loop range(lo, hi, BLOCK) (lo a multiple of BLOCK) into [lo, a),
    [a, b), [b, hi): the middle holds exactly the tiles that start at or after `first`
    and end at or before `end` (the interior tiles, which need no mask); the same tiles
    as before, so the executed work does not change."""
    a = ((tl.maximum(first, lo) + BLOCK - 1) // BLOCK) * BLOCK
    a = tl.minimum(a, hi)
    b = (tl.maximum(end, 0) // BLOCK) * BLOCK
    b = tl.maximum(tl.minimum(b, (hi // BLOCK) * BLOCK), a)
    return a, b


@triton.jit
def _interior_keys(lo, hi, start_m, seqlen_q, seqlen_k, win_left, win_right,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """(a, b): the key tiles [a, b) of a q tile's loop range(lo, hi, BLOCK_N) that every
    row of the tile sees whole (in range, causally below the first row's diagonal,
    inside the last row's left and the first row's right window edge). Image blocks
    only add visible keys, so they do not shrink it. Rows past seqlen_q read zeros and
    are never stored: they need no mask."""
    m0 = start_m * BLOCK_M
    off = seqlen_k - seqlen_q
    end = seqlen_k
    first = lo
    if CAUSAL:
        end = tl.minimum(end, m0 + off + 1)
    elif HAS_WINDOW:
        end = tl.minimum(end, m0 + off + win_right + 1)
    if HAS_WINDOW:
        first = m0 + BLOCK_M - 1 + off - win_left
    return _split3(lo, hi, first, end, BLOCK_N)


@triton.jit
def _attn_fwd_step(acc0, acc1, m_i, l_i, q0, q1, bq, rows, start_n, k_base, v_base, bk_base,
                   stride_kt, stride_kd, stride_vt, stride_vd, seqlen_q, seqlen_k, head_dim,
                   sm_scale, softcap, win_left, win_right, dropout_p, seed_lo, seed_hi, ctr_lo,
                   ctr_hi, stream, q_global0, CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr,
                   HAS_DROPOUT: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_D1: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr):
    """One key tile [start_n, +BLOCK_N) of the forward's online softmax. MASKED: the
    tile may hold keys past seqlen_k or keys some row must not see (bounds masks and
    the visibility test); without, every key of the tile is in range and visible to
    every row, and neither runs."""
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < seqlen_k
    kt0, kt1 = _load_chunks(k_base, cols, col_ok, stride_kt, stride_kd, head_dim, BLOCK_D,
                            BLOCK_D1, EVEN_D, MASKED, TRANS=True)
    s, _t = _scores(_dot2(q0, q1, kt0, kt1, BLOCK_D1), sm_scale, softcap, HAS_SOFTCAP)
    if MASKED:
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
    if HAS_DROPOUT:
        keep = _dropout_keep(seed_lo, seed_hi, ctr_lo, ctr_hi, stream, q_global0 + rows,
                             start_n, dropout_p, BLOCK_N)
        p = tl.where(keep, p, 0.0)  # 1 / (1 - p) is applied to the output
    v0, v1 = _load_chunks(v_base, cols, col_ok, stride_vt, stride_vd, head_dim, BLOCK_D,
                          BLOCK_D1, EVEN_D, MASKED)
    acc0 = acc0 * alpha[:, None]
    acc0 += tl.dot(p.to(v0.dtype), v0, input_precision="ieee")
    if BLOCK_D1 > 0:
        acc1 = acc1 * alpha[:, None]
        acc1 += tl.dot(p.to(v1.dtype), v1, input_precision="ieee")
    return acc0, acc1, m_new, l_i


@triton.jit
def _attn_fwd_tile(q_base, k_base, v_base, o_base, lse_base, bq_base, bk_base, reach_base,
                   stride_qt, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd,
                   stride_ot, stride_od, seqlen_q, seqlen_k, start_m, head_dim, sm_scale,
                   dropout_p, seed_lo, seed_hi, ctr_lo, ctr_hi, stream, q_global0,
                   CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   reach_back_base=None, softcap=0.0, win_left=0, win_right=0,
                   HAS_WINDOW: tl.constexpr = False, HAS_SOFTCAP: tl.constexpr = False,
                   BLOCK_D1: tl.constexpr = 0, EVEN_D: tl.constexpr = False):
    """Output rows [start_m*BLOCK_M, +BLOCK_M) of one (sequence, head).

    The *_base pointers point at this sequence's first token and this head; the
    dropout stream of this head is `stream`. reach_back_base (blocks with a window),
    softcap, win_left/right: see the module docstring. The head dim runs in two
    chunks, BLOCK_D + BLOCK_D1 lanes (BLOCK_D1 = 0: one).
    """
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q
    q0, q1 = _load_chunks(q_base, rows, row_ok, stride_qt, stride_qd, head_dim, BLOCK_D,
                          BLOCK_D1, EVEN_D)
    lo, hi, bq = _key_range(rows, row_ok, start_m, seqlen_q, seqlen_k, bq_base, reach_base,
                            reach_back_base, win_left, win_right, CAUSAL, HAS_BLOCKS,
                            HAS_WINDOW, BLOCK_M, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc1 = 0.0
    if BLOCK_D1 > 0:
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    # key tiles before the window's full range, the interior (no mask, no visibility
    # test), then the diagonal / window edge / image-block reach / ragged tail
    a, b = _interior_keys(lo, hi, start_m, seqlen_q, seqlen_k, win_left, win_right, CAUSAL,
                          HAS_WINDOW, BLOCK_M, BLOCK_N)
    if HAS_WINDOW:  # without a window, a == lo
        for start_n in range(lo, a, BLOCK_N):
            acc0, acc1, m_i, l_i = _attn_fwd_step(
                acc0, acc1, m_i, l_i, q0, q1, bq, rows, start_n, k_base, v_base, bk_base,
                stride_kt, stride_kd, stride_vt, stride_vd, seqlen_q, seqlen_k, head_dim,
                sm_scale, softcap, win_left, win_right, dropout_p, seed_lo, seed_hi, ctr_lo,
                ctr_hi, stream, q_global0, CAUSAL, HAS_BLOCKS, HAS_DROPOUT, HAS_WINDOW,
                HAS_SOFTCAP, BLOCK_N, BLOCK_D, BLOCK_D1, EVEN_D, True)
    for start_n in range(a, b, BLOCK_N):
        acc0, acc1, m_i, l_i = _attn_fwd_step(
            acc0, acc1, m_i, l_i, q0, q1, bq, rows, start_n, k_base, v_base, bk_base,
            stride_kt, stride_kd, stride_vt, stride_vd, seqlen_q, seqlen_k, head_dim, sm_scale,
            softcap, win_left, win_right, dropout_p, seed_lo, seed_hi, ctr_lo, ctr_hi, stream,
            q_global0, CAUSAL, HAS_BLOCKS, HAS_DROPOUT, HAS_WINDOW, HAS_SOFTCAP, BLOCK_N,
            BLOCK_D, BLOCK_D1, EVEN_D, False)
    for start_n in range(b, hi, BLOCK_N):
        acc0, acc1, m_i, l_i = _attn_fwd_step(
            acc0, acc1, m_i, l_i, q0, q1, bq, rows, start_n, k_base, v_base, bk_base,
            stride_kt, stride_kd, stride_vt, stride_vd, seqlen_q, seqlen_k, head_dim, sm_scale,
            softcap, win_left, win_right, dropout_p, seed_lo, seed_hi, ctr_lo, ctr_hi, stream,
            q_global0, CAUSAL, HAS_BLOCKS, HAS_DROPOUT, HAS_WINDOW, HAS_SOFTCAP, BLOCK_N,
            BLOCK_D, BLOCK_D1, EVEN_D, True)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    if HAS_DROPOUT:
        # kept probabilities scale by 1 / (1 - p): folded into the row sums, not per
        # element (p = 0, e.g. co-attention's undropped direction, divides by l exactly)
        inv = 1.0 / (l_safe * (1.0 - dropout_p))
    else:
        inv = 1.0 / l_safe
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    out1 = acc1
    if BLOCK_D1 > 0:
        out1 = acc1 * inv[:, None]
    _store_chunks(o_base, rows, row_ok, stride_ot, stride_od, head_dim, acc0 * inv[:, None],
                  out1, BLOCK_D, BLOCK_D1, EVEN_D)
    tl.store(lse_base + rows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta_tile(o_base, do_base, delta_base, start_t, n_tokens, head_dim, stride_ot,
                         stride_od, stride_dot, stride_dod, BLOCK_T: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr = 0,
                         EVEN_D: tl.constexpr = False):
    """delta[t] = sum_d dO[t, d] * O[t, d] (float32) for tokens [start_t*BLOCK_T, +BLOCK_T)
    of one head (o_base/do_base/delta_base at that head): O and dO are read in their
    dtype and multiplied in float32 in registers (head dim in BLOCK_D + BLOCK_D1 lanes)."""
    idx = start_t * BLOCK_T + tl.arange(0, BLOCK_T)
    idx_ok = idx < n_tokens
    o0, o1 = _load_chunks(o_base, idx, idx_ok, stride_ot, stride_od, head_dim, BLOCK_D,
                          BLOCK_D1, EVEN_D)
    do0, do1 = _load_chunks(do_base, idx, idx_ok, stride_dot, stride_dod, head_dim, BLOCK_D,
                            BLOCK_D1, EVEN_D)
    delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), 1)
    if BLOCK_D1 > 0:
        delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
    tl.store(delta_base + idx, delta, mask=idx_ok)


@triton.jit
def _attn_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, n_tokens, head_dim, stride_ot, stride_oh,
                           stride_od, stride_dot, stride_doh, stride_dod, stride_lh,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_D1: tl.constexpr = 0, EVEN_D: tl.constexpr = False):
    """Backward preprocess: delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] (float32), for
    tokens [pid*BLOCK_T, +BLOCK_T) of head program_id(1). O and dO (total, H, D) are
    read in their dtype and multiplied in float32 in registers: no (total, H, D)
    float32 temporaries. Every delta element is written (no zero-fill needed)."""
    h = tl.program_id(1).to(tl.int64)
    _attn_bwd_delta_tile(o_ptr + h * stride_oh, do_ptr + h * stride_doh, delta_ptr + h * stride_lh,
                         tl.program_id(0), n_tokens, head_dim, stride_ot, stride_od, stride_dot,
                         stride_dod, BLOCK_T, BLOCK_D, BLOCK_D1, EVEN_D)


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
        keep = _dropout_keep(seed_lo, seed_hi, ctr_lo, ctr_hi, stream0 + h, rows, start_n,
                             dropout_p, BLOCK_N, CARRY_BY_COMPARE)
        ptrs = (mask_ptr + h.to(tl.int64) * stride_mh + idx[:, None].to(tl.int64) * stride_mr
                + cols[None, :])
        tl.store(ptrs, keep.to(tl.int8), mask=idx_ok[:, None] & (cols[None, :] < n_cols))
