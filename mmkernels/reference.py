"""Eager PyTorch versions of every mmkernels op.

Tests compare the kernels against these (run in float64), benchmarks time them
as the eager baseline, and ``MMKERNELS_BACKEND=reference`` routes every op here.
They favour clarity over speed, but are vectorised enough to run the test sizes
in seconds, and they are differentiable with ordinary autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------
# RoIAlign (torchvision semantics; see csrc/roi_align/roi_align_math.h)
# ---------------------------------------------------------------------------------


#: The grid cap of csrc/roi_align/roi_align_math.h (kMaxSamplingRatio).
ROI_MAX_SAMPLING_RATIO = 8192


def _axis_interp_matrix(start: Tensor, bin_size: Tensor, pooled: int, grid: int, size: int,
                        dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Interpolation weights along one axis of one region.

    ``start`` and ``bin_size`` are 0-d tensors in the accumulation dtype: the sample
    coordinates are computed in it with the kernels' (and torchvision's) operations,
    so that every discrete decision (inside or outside, which taps) agrees exactly;
    the weights are then computed in float64.

    Returns ``weights`` (pooled, size): ``weights[p, s]`` is the total bilinear weight
    that the samples of bin ``p`` lying within [-1, size] put on pixel ``s``; and
    ``touched`` (pooled, size) bool: whether pixel ``s`` is a tap (lo or hi) of one
    of those samples, whatever its weight (the pixels that the kernels read).
    """
    acc = start.dtype
    p = torch.arange(pooled, dtype=acc)[:, None]
    i = torch.arange(grid, dtype=acc)[None, :]
    coord = ((start + p * bin_size) + ((i + 0.5) * bin_size) / grid).double().to(device)
    inside = (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0.0)
    lo = coord.floor().clamp(max=size).long()
    at_end = lo >= size - 1
    lo = torch.where(at_end, torch.full_like(lo, size - 1), lo)
    hi = torch.where(at_end, lo, lo + 1)
    coord = torch.where(at_end, lo.double(), coord)
    frac = coord - lo.double()
    w = torch.zeros(pooled, grid, size, dtype=torch.float64, device=device)
    w.scatter_add_(2, lo[..., None].clamp(0, size - 1), (1.0 - frac)[..., None])
    w.scatter_add_(2, hi[..., None].clamp(0, size - 1), frac[..., None])
    w = w * inside[..., None]
    t = torch.zeros(pooled, grid, size, dtype=torch.float64, device=device)
    t.scatter_(2, lo[..., None].clamp(0, size - 1), 1.0)
    t.scatter_(2, hi[..., None].clamp(0, size - 1), 1.0)
    touched = (t * inside[..., None]).sum(1) > 0
    return w.sum(1).to(dtype), touched


def _bilinear_form(sy: Tensor, plane: Tensor, sx: Tensor, ty: Tensor, tx: Tensor) -> Tensor:
    """``einsum("ph,chw,qw->cpq", sy, plane, sx)`` with the kernels' rule for
    non-finite values: only touched pixels (``ty[p, y] & tx[q, x]``) are read; a NaN
    read gives NaN, +-Inf read gives +-Inf (NaN when both signs are read)."""
    finite = torch.isfinite(plane)
    out = torch.einsum("ph,chw,qw->cpq", sy, torch.where(finite, plane, 0), sx)
    if bool(finite.all()):
        return out
    fy, fx = ty.to(plane.dtype), tx.to(plane.dtype)

    def reads(mask: Tensor) -> Tensor:
        return torch.einsum("ph,chw,qw->cpq", fy, mask.to(plane.dtype), fx) > 0

    pos, neg = reads(plane == math.inf), reads(plane == -math.inf)
    nan = reads(torch.isnan(plane)) | (pos & neg)
    out = torch.where(pos, math.inf, out)
    out = torch.where(neg, -math.inf, out)
    return torch.where(nan, math.nan, out)


def roi_align(input: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False, *,
              geometry_dtype: torch.dtype | None = None) -> Tensor:
    """Eager RoIAlign with torchvision's semantics and the kernels' contract.

    Args:
        input: (N, C, H, W), any float dtype.
        rois: (K, 5) = (batch_index, x1, y1, x2, y2), any float dtype.
        geometry_dtype: the dtype of the box geometry and sample coordinates, as the
            kernels (and torchvision) compute them: their accumulation dtype, float64
            for float64 inputs and float32 otherwise. Default: that of ``rois``. A
            float64 reference for a float32 kernel passes ``torch.float32`` here, so
            that the discrete decisions (grid sizes, which taps, inside or outside)
            are the kernel's; the interpolation and the sums stay in float64.
    Returns:
        (K, C, PH, PW) in input's dtype. Each sample is the separable product
        ``Wy @ input[n] @ Wx^T``, so autograd gives the exact backward. As the
        kernels: a box that is not finite
        after scaling gives a NaN row; the adaptive grid is capped at
        ``ROI_MAX_SAMPLING_RATIO``; a non-finite feature value read by a sample's
        taps gives a non-finite output (see ``_bilinear_form``).
    Raises:
        RuntimeError for a batch index outside [0, N) (as the CPU kernels).
    """
    ph_, pw_ = output_size
    K, C = rois.shape[0], input.shape[1]
    N, H, W = input.shape[0], input.shape[-2], input.shape[-1]
    out = input.new_zeros((K, C, ph_, pw_))
    boxes = rois.detach().double().cpu().tolist()
    outs: list[Tensor] = []
    # Geometry in the kernels' accumulation dtype (float32 below float64), with their
    # operations in their order: the grid sizes, a box's finiteness and every sample
    # coordinate are then exactly the kernels' (and torchvision's).
    acc = geometry_dtype or (torch.float64 if rois.dtype == torch.float64 else torch.float32)
    scale = torch.tensor(spatial_scale, dtype=acc)
    offset = torch.tensor(0.5 if aligned else 0.0, dtype=acc)
    for k in range(K):
        n = boxes[k][0]
        if not (0 <= n < N):
            raise RuntimeError(f"roi_align: boxes[{k}, 0] (the batch index) must lie in "
                               f"[0, {N}); got {n}")
        xy = rois[k, 1:].detach().cpu().to(acc)
        start, end = xy[:2] * scale - offset, xy[2:] * scale - offset  # (x, y)
        extent = end - start
        if not aligned:  # legacy: force malformed boxes to 1x1 (NaN -> 1, as the kernels)
            extent = torch.where(extent > 1, extent, torch.ones_like(extent))
        bins = extent / torch.tensor([pw_, ph_], dtype=acc)
        if not bool(torch.isfinite(torch.cat([start, end, bins])).all()):
            outs.append(torch.full((C, ph_, pw_), float("nan"), dtype=input.dtype,
                                   device=input.device))
            continue
        cap = ROI_MAX_SAMPLING_RATIO
        gw, gh = (sampling_ratio, sampling_ratio) if sampling_ratio > 0 else (
            min(max(math.ceil(float(b)), 0), cap) for b in bins)
        count = max(gh * gw, 1)
        if gh == 0 or gw == 0:
            outs.append(input.new_zeros((C, ph_, pw_)))
            continue
        sy, ty = _axis_interp_matrix(start[1], bins[1], ph_, gh, H, input.dtype, input.device)
        sx, tx = _axis_interp_matrix(start[0], bins[0], pw_, gw, W, input.dtype, input.device)
        outs.append(_bilinear_form(sy, input[int(n)], sx, ty, tx) / count)
    if outs:
        out = torch.stack(outs)
    return out


def region_features(input: Tensor, rois: Tensor, output_size: tuple[int, int],
                    spatial_scale: float = 1.0, sampling_ratio: int = -1,
                    aligned: bool = False, *, geometry_dtype: torch.dtype | None = None
                    ) -> Tensor:
    """(K, C): ``roi_align(...).mean((2, 3))``, materialising the pooled tensor."""
    return roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned,
                     geometry_dtype=geometry_dtype).mean((2, 3))


def multiscale_roi_align(features: list[Tensor], rois: Tensor, levels: Tensor,
                         scales: list[float], output_size: tuple[int, int],
                         sampling_ratio: int = -1, aligned: bool = False, *,
                         geometry_dtype: torch.dtype | None = None) -> Tensor:
    """(K, C, PH, PW): region k pooled from ``features[levels[k]]`` at ``scales[levels[k]]``
    (torchvision's per-level loop)."""
    K, C = rois.shape[0], features[0].shape[1]
    out = features[0].new_zeros((K, C, *output_size))
    for lvl, (feat, scale) in enumerate(zip(features, scales)):
        idx = torch.nonzero(levels == lvl).squeeze(1)
        if idx.numel():
            out = out.index_put((idx,), roi_align(feat, rois[idx], output_size, scale,
                                                  sampling_ratio, aligned,
                                                  geometry_dtype=geometry_dtype))
    return out


# ---------------------------------------------------------------------------------
# Token gathers (MAE / FLIP masking, masked-region selection, LLaVA merge)
# ---------------------------------------------------------------------------------


def random_masking(x: Tensor, n_keep: int, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's random_masking (facebookresearch/mae, models_mae.py), given the noise.

    x (B, N, D), noise (B, N) → x_kept (B, n_keep, D), mask (B, N) in x's dtype
    (1 = removed), ids_restore (B, N) int64. The argsort is stable (ties go to the
    lower index).
    """
    B, N, D = x.shape
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :n_keep]
    x_kept = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones(B, N, dtype=x.dtype, device=x.device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_kept, mask, ids_restore


def restore_tokens(x_kept: Tensor, ids_restore: Tensor, mask_token: Tensor) -> Tensor:
    """MAE decoder unshuffle: ``gather(cat([x_kept, mask_tokens]), 1, ids_restore)``."""
    B, K, D = x_kept.shape
    N = ids_restore.shape[1]
    mask_tokens = mask_token.reshape(1, 1, D).expand(B, N - K, D)
    full = torch.cat([x_kept, mask_tokens], dim=1)
    return torch.gather(full, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, D))


def masked_select_rows(x: Tensor, mask: Tensor, max_rows: int | None = None
                       ) -> tuple[Tensor, Tensor]:
    """``x[mask]`` and the flat positions; padded to ``max_rows`` (index -1) when given."""
    B, N, D = x.shape
    rows = x[mask]
    index = torch.nonzero(mask.reshape(-1)).squeeze(1)
    if max_rows is not None:
        if rows.shape[0] > max_rows:
            raise ValueError(f"{rows.shape[0]} positions are selected, more than max_rows = "
                             f"{max_rows}")
        pad = max_rows - rows.shape[0]
        rows = torch.cat([rows, rows.new_zeros(pad, D)])
        index = torch.cat([index, index.new_full((pad,), -1)])
    return rows, index


def scatter_image_features(inputs_embeds: Tensor, image_mask: Tensor,
                           image_features: Tensor, *, check_count: bool = True) -> Tensor:
    """Hugging Face LLaVA's merge: ``masked_scatter`` of the features at the image tokens.

    ``check_count``: raise HF's ValueError when the counts differ. Without it, the first
    ``min(tokens, features)`` image positions take feature rows and the rest keep
    their embeddings (mmkernels' unchecked rule)."""
    n_tokens, n_features = int(image_mask.sum()), image_features.shape[0]
    if check_count and n_tokens != n_features:
        raise ValueError(f"Image features and image tokens do not match: tokens: {n_tokens}, "
                         f"features {n_features}")
    rank = image_mask.reshape(-1).cumsum(0).view(image_mask.shape)
    received = image_mask & (rank <= n_features)
    used = image_features[: min(n_tokens, n_features)]
    mask = received[..., None].expand_as(inputs_embeds)
    return inputs_embeds.masked_scatter(mask, used.to(inputs_embeds.dtype))


# ---------------------------------------------------------------------------------
# Attention over packed sequences (varlen), ViLBERT co-attention
# ---------------------------------------------------------------------------------


# Dropout masks: one definition for every backend (Triton on GPU and in the
# interpreter, the CPU path, MMKERNELS_BACKEND=reference). Element (stream s, packed
# query row r, key column j) of a call with Philox state (seed, offset) keeps the
# probability when U >= p, where U is output word j % 4 of Philox4x32-10 keyed by
# the 64-bit seed, with the counter
#     words 0-1 = offset // 4 + j // 4   (64-bit, low word first)
#     word 2    = s                      (head h; co-attention: direction * H + h)
#     word 3    = r                      (the row's index in the packed q tensor)
# mapped to [0, 1) as Triton's tl.rand does: one Philox call gives four consecutive
# columns. This follows PyTorch's Philox convention (counter.xy = offset / 4 +
# per-thread index, counter.zw = the subsequence), so a call that reserved
# max_seqlen_k values (rounded up to a multiple of 4) with Generator.philox_state owns
# its stream outright: no two rows, heads, directions or calls share a counter word,
# whatever the sequence lengths. (j // 4 and j % 4 are floor division and remainder:
# only the two's complement bits of a column count.)

_U32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_TO_UNIT = 4.6566127342e-10  # tl.random.uint_to_uniform_float's scale (uint32)


def _mul32(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of a * b for uint32 values held in int64, computed
    in 16-bit halves so that no int64 product overflows."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    low = (a_hi * b_lo + a_lo * b_hi) * 65536 + a_lo * b_lo   # < 2**50
    return a_hi * b_hi + (low >> 32), low & _U32


def philox4x32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, seed: int,
               rounds: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32 (Random123; triton.language.random.philox_impl, bit for bit) on
    int64 tensors holding uint32 counter words; ``seed`` is the 64-bit key."""
    seed &= (1 << 64) - 1
    k0, k1 = seed & _U32, seed >> 32
    for _ in range(rounds):
        hi_a, lo_a = _mul32(c0, _PHILOX_ROUND_A)
        hi_b, lo_b = _mul32(c2, _PHILOX_ROUND_B)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _U32, (k1 + _PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


def dropout_uniform(seed: int, offset: int, stream: int, rows: Tensor, cols: Tensor) -> Tensor:
    """(len(rows), len(cols)) float32 uniforms of the dropout stream (see above):
    rows are packed query indices, cols key indices within the sequence (int64)."""
    rows, cols = rows.to(torch.int64), cols.to(torch.int64)
    base = (offset & ((1 << 64) - 1)) >> 2
    lo = ((cols >> 2) + (base & _U32))               # group j // 4; carry into word 1
    c0 = (lo & _U32)[None, :]
    c1 = (((base >> 32) + (lo >> 32)) & _U32)[None, :]
    c2 = torch.full((), stream & _U32, dtype=torch.int64, device=rows.device)
    c3 = (rows & _U32)[:, None]
    shape = (rows.numel(), cols.numel())
    words = philox4x32(*(c.expand(shape).contiguous() for c in (c0, c1, c2, c3)), seed)
    x = torch.stack(words).gather(0, (cols & 3).expand(shape)[None]).squeeze(0)  # word j % 4
    x = torch.where(x >= 2**31, _U32 - x, x)         # int32 bitcast, negatives to ~x
    return x.to(torch.float32) * torch.tensor(_PHILOX_TO_UNIT, dtype=torch.float32)


def dropout_keep(seed: int, offset: int, stream: int, rows: Tensor, cols: Tensor,
                 dropout_p: float) -> Tensor:
    """(len(rows), len(cols)) bool: keep where the uniform >= p (p rounded to float32,
    as the kernels receive it)."""
    u = dropout_uniform(seed, offset, stream, rows, cols)
    return u >= torch.tensor(dropout_p, dtype=torch.float32)


def dropout_keep_heads(seed: int, offset: int, stream0: int, num_heads: int, rows: Tensor,
                       cols: Tensor, dropout_p: float) -> Tensor:
    """(num_heads, len(rows), len(cols)) bool keep-mask of streams stream0 .. stream0 + H - 1
    (:func:`dropout_keep` per head), on rows' device."""
    if num_heads == 0:
        return torch.zeros(0, rows.numel(), cols.numel(), dtype=torch.bool, device=rows.device)
    return torch.stack([dropout_keep(seed, offset, stream0 + h, rows, cols, dropout_p)
                        for h in range(num_heads)])


#: generate(seed, offset, stream0, num_heads, rows, cols, dropout_p) -> (H, R, C) bool
KeepGenerator = Callable[[int, int, int, int, Tensor, Tensor, float], Tensor]


class DropoutMasks:
    """The keep-masks of one call, generated lazily: ``block(b, r0, r1)`` is the
    (H, r1 - r0, Lk_b) bool mask of query rows r0 .. r1 of sequence b (relative to the
    sequence, clipped to it), built on `device` when asked for, so that a caller walking
    row chunks holds O(H * chunk * Lk) of mask at a time, never the whole batch.
    ``masks[b]`` is sequence b's whole (H, Lq_b, Lk_b) mask, as in the list form of
    :func:`dropout_keep_masks`. ``generate`` computes a block (default: the pure-torch
    :func:`dropout_keep_heads`; the CPU path passes the C++ op, bit-identical)."""

    def __init__(self, seed: int, offset: int, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                 num_heads: int, dropout_p: float, stream0: int = 0, device=None,
                 generate: KeepGenerator | None = None):
        self.seed, self.offset, self.stream0 = seed, offset, stream0
        self.num_heads, self.dropout_p = num_heads, dropout_p
        self.cq, self.ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.generate = generate if generate is not None else dropout_keep_heads

    def __len__(self) -> int:
        return len(self.cq) - 1

    def block(self, b: int, r0: int, r1: int) -> Tensor:
        q0, lq = self.cq[b], self.cq[b + 1] - self.cq[b]
        r1 = max(0, min(r1, lq))
        r0 = max(0, min(r0, r1))
        rows = torch.arange(q0 + r0, q0 + r1, device=self.device)
        cols = torch.arange(self.ck[b + 1] - self.ck[b], device=self.device)
        return self.generate(self.seed, self.offset, self.stream0, self.num_heads, rows, cols,
                             self.dropout_p)

    def __getitem__(self, b: int) -> Tensor:
        return self.block(b, 0, self.cq[b + 1] - self.cq[b])


def keep_block(keep_masks: DropoutMasks | Sequence[Tensor], b: int, r0: int, r1: int) -> Tensor:
    """Rows r0 .. r1 of sequence b's keep-mask, from a :class:`DropoutMasks` (generated
    now) or a list of (H, Lq_b, Lk_b) masks (sliced)."""
    if isinstance(keep_masks, DropoutMasks):
        return keep_masks.block(b, r0, r1)
    return keep_masks[b][:, r0:r1]


def dropout_keep_masks(seed: int, offset: int, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                       num_heads: int, dropout_p: float, stream0: int = 0,
                       generate: KeepGenerator | None = None) -> list[Tensor]:
    """One (H, Lq_b, Lk_b) bool keep-mask per sequence, for heads (streams)
    stream0 .. stream0 + H - 1 (co-attention: stream0 = 0 for A->B, H for B->A), all
    built now (:class:`DropoutMasks` builds them lazily)."""
    masks = DropoutMasks(seed, offset, cu_seqlens_q, cu_seqlens_k, num_heads, dropout_p, stream0,
                         generate=generate)
    return [masks[b] for b in range(len(masks))]


def attention_visibility(seqlen_q: int, seqlen_k: int, causal: bool, bid_q: Tensor | None = None,
                         bid_k: Tensor | None = None, device=None,
                         window_size: tuple[int, int] = (-1, -1)) -> Tensor:
    """(Lq, Lk) bool: key j visible to query i.

    With off = Lk - Lq (bottom-right alignment, as flash-attn):
      * causal: j <= i + off;
      * window_size = (left, right), -1 = unbounded (flash-attn's sliding window):
        i + off - left <= j <= i + off + right (with causal, right is 0: callers pass
        it so);
      * block ids (causal only): tokens sharing a non-zero id see each other both
        ways, on top of the windowed causal mask (an image's patches always see their
        whole image, also where it reaches outside the window).
    """
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    left, right = window_size
    vis = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    off = seqlen_k - seqlen_q
    if causal:
        vis = vis & (j <= i + off)
    if left >= 0:
        vis = vis & (j >= i + off - left)
    if right >= 0:
        vis = vis & (j <= i + off + right)
    if causal and bid_q is not None:
        vis = vis | ((bid_q[:, None] == bid_k[None, :]) & (bid_q[:, None] != 0))
    return vis


def capped_scores(s: Tensor, softcap: float) -> Tensor:
    """Tanh soft-capping (Gemma-2): softcap * tanh(s / softcap) of the scaled scores
    s = scale * q k^T; s unchanged for softcap == 0."""
    return softcap * torch.tanh(s / softcap) if softcap > 0 else s


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, visible: Tensor,
              keep: Tensor | None = None, dropout_p: float = 0.0,
              softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """Softmax attention of one sequence, computed in q's dtype.

    q (Lq, H, D), k/v (Lk, H_kv, D), visible (Lq, Lk) bool, keep (H, Lq, Lk) bool or
    None. Scores S = :func:`capped_scores` (scale * q k^T, softcap). Returns out
    (Lq, H, D) and lse (H, Lq) float32; rows without a visible key give zeros and
    lse = -inf.
    """
    H, H_kv = q.shape[1], k.shape[1]
    kh = k.repeat_interleave(H // H_kv, dim=1).transpose(0, 1)   # (H, Lk, D)
    vh = v.repeat_interleave(H // H_kv, dim=1).transpose(0, 1)
    s = torch.matmul(q.transpose(0, 1), kh.transpose(1, 2)) * scale  # (H, Lq, Lk)
    s = capped_scores(s, softcap).masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse))[..., None])
    p = p.masked_fill(~visible, 0.0)
    if keep is not None and dropout_p > 0:
        p = p * keep.to(p.device) / (1.0 - dropout_p)
    out = torch.matmul(p, vh).transpose(0, 1)
    return out, lse.float()


def attention_backward(q: Tensor, k: Tensor, v: Tensor, scale: float, visible: Tensor,
                       grad_out: Tensor, keep: Tensor | None = None, dropout_p: float = 0.0,
                       softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Explicit backward of :func:`attention` (recomputes P; used where autograd is
    unavailable, e.g. inside a custom op's kernel).

    With P = softmax(S), P_d = P * keep / (1 - p), O = P_d V:
    dV = P_d^T dO, dP = (dO V^T) * keep / (1 - p), dS = P * (dP - rowsum(dO * O)),
    dQ = dS K * scale, dK = dS^T Q * scale; K/V gradients are summed over each head group.
    With softcap > 0, S = softcap * tanh(scale * q k^T / softcap), and dS is multiplied
    by the derivative of the cap, 1 - (S / softcap)^2, before the dQ/dK products.
    """
    H, H_kv = q.shape[1], k.shape[1]
    group = H // H_kv
    kh = k.repeat_interleave(group, dim=1).transpose(0, 1)   # (H, Lk, D)
    vh = v.repeat_interleave(group, dim=1).transpose(0, 1)
    qh = q.transpose(0, 1)                                    # (H, Lq, D)
    doh = grad_out.transpose(0, 1)
    s = capped_scores(torch.matmul(qh, kh.transpose(1, 2)) * scale, softcap)
    dcap = 1.0 - (s / softcap).square() if softcap > 0 else None
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - lse[..., None]).masked_fill(~visible, 0.0)
    if keep is not None:
        keep = keep.to(p.device)
    pd = p * keep / (1.0 - dropout_p) if keep is not None and dropout_p > 0 else p
    out = torch.matmul(pd, vh)
    dv = torch.matmul(pd.transpose(1, 2), doh)
    dp = torch.matmul(doh, vh.transpose(1, 2))
    if keep is not None and dropout_p > 0:
        dp = dp * keep / (1.0 - dropout_p)
    delta = (doh * out).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    if dcap is not None:
        ds = ds * dcap
    dq = torch.matmul(ds, kh) * scale
    dk = torch.matmul(ds.transpose(1, 2), qh) * scale
    Lk, D = k.shape[0], k.shape[2]
    dk = dk.view(H_kv, group, Lk, D).sum(1).transpose(0, 1)
    dv = dv.view(H_kv, group, Lk, D).sum(1).transpose(0, 1)
    return dq.transpose(0, 1), dk, dv


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     softmax_scale: float | None = None, causal: bool = False,
                     block_ids: Tensor | None = None, dropout_p: float = 0.0,
                     keep_masks: DropoutMasks | Sequence[Tensor] | None = None,
                     chunk_size: int | None = None,
                     compute_dtype: torch.dtype | None = None,
                     window_size: tuple[int, int] = (-1, -1),
                     softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-sequence reference for packed attention (never pads to the batch max).

    q (total_q, H, D); k, v (total_k, H_kv, D); cu_seqlens (batch + 1,) int. keep_masks:
    when dropout_p > 0, one (H, Lq_b, Lk_b) bool mask per sequence, or a lazy
    :class:`DropoutMasks` (generated one row chunk at a time). chunk_size bounds the
    query rows processed at once (memory O(chunk * Lk * H), masks included). compute_dtype: upcast for
    the math (the CPU path uses float32 for half inputs). Returns out (total_q, H, D) in
    q's dtype and lse (H, total_q) float32. window_size, softcap: see
    :func:`attention_visibility` and :func:`capped_scores` (with causal, pass right = 0).
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        qs, ks, vs = q[q0:q1], k[k0:k1], v[k0:k1]
        if compute_dtype is not None:
            qs, ks, vs = qs.to(compute_dtype), ks.to(compute_dtype), vs.to(compute_dtype)
        bq = block_ids[q0:q1] if block_ids is not None else None
        bk = block_ids[k0:k1] if block_ids is not None else None
        vis = attention_visibility(q1 - q0, k1 - k0, causal, bq, bk, device=q.device,
                                   window_size=window_size)
        step = chunk_size or max(q1 - q0, 1)
        for r in range(0, q1 - q0, step):
            keep = (keep_block(keep_masks, b, r, r + step)
                    if keep_masks is not None and dropout_p > 0 else None)
            o, l = attention(qs[r:r + step], ks, vs, scale, vis[r:r + step], keep, dropout_p,
                             softcap)
            outs.append(o.to(q.dtype))
            lses.append(l)
    H = q.shape[1]
    out = torch.cat(outs) if outs else q * 0  # no rows (q is empty): still differentiable
    lse = torch.cat(lses, dim=1) if lses else torch.zeros(H, 0, device=q.device)
    return out, lse


def co_attention(q_a: Tensor, k_a: Tensor, v_a: Tensor, q_b: Tensor, k_b: Tensor, v_b: Tensor,
                 cu_seqlens_a: Tensor, cu_seqlens_b: Tensor, softmax_scale: float | None = None,
                 keep_a: DropoutMasks | Sequence[Tensor] | None = None,
                 keep_b: DropoutMasks | Sequence[Tensor] | None = None,
                 dropout_p: tuple[float, float] = (0.0, 0.0)) -> tuple[Tensor, Tensor]:
    """The two directions of co-attention computed separately, per sample:
    out_a = attention(q_a, k_b, v_b), out_b = attention(q_b, k_a, v_a)."""
    out_a, _ = varlen_attention(q_a, k_b, v_b, cu_seqlens_a, cu_seqlens_b, softmax_scale, False,
                                None, dropout_p[0], keep_a)
    out_b, _ = varlen_attention(q_b, k_a, v_a, cu_seqlens_b, cu_seqlens_a, softmax_scale, False,
                                None, dropout_p[1], keep_b)
    return out_a, out_b


class BertBiAttention(torch.nn.Module):
    """Eager ViLBERT co-attention (facebookresearch/vilbert-multi-task, BertBiAttention),
    rewritten from its description: stream 1 is vision (v_hidden_size), stream 2 is text
    (hidden_size). context_layer1 = softmax(q2 k1^T / sqrt(d) + mask1) v1 (text queries
    over regions, dropout1 = v_attention_probs_dropout_prob); context_layer2 =
    softmax(q1 k2^T / sqrt(d) + mask2) v2 (region queries over text, dropout2 =
    attention_probs_dropout_prob). Masks are additive (B, 1, 1, L). The co_attention_mask
    is accepted and unused, as in the original."""

    def __init__(self, config) -> None:
        super().__init__()
        if config.bi_hidden_size % config.bi_num_attention_heads != 0:
            raise ValueError("bi_hidden_size must be a multiple of bi_num_attention_heads")
        self.visualization = config.visualization
        self.num_attention_heads = config.bi_num_attention_heads
        self.attention_head_size = config.bi_hidden_size // config.bi_num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query1 = torch.nn.Linear(config.v_hidden_size, self.all_head_size)
        self.key1 = torch.nn.Linear(config.v_hidden_size, self.all_head_size)
        self.value1 = torch.nn.Linear(config.v_hidden_size, self.all_head_size)
        self.dropout1 = torch.nn.Dropout(config.v_attention_probs_dropout_prob)
        self.query2 = torch.nn.Linear(config.hidden_size, self.all_head_size)
        self.key2 = torch.nn.Linear(config.hidden_size, self.all_head_size)
        self.value2 = torch.nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout2 = torch.nn.Dropout(config.attention_probs_dropout_prob)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:-1], self.num_attention_heads,
                      self.attention_head_size).permute(0, 2, 1, 3)

    def _merge(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 1, 3).contiguous()
        return x.view(*x.shape[:-2], self.all_head_size)

    def forward(self, input_tensor1, attention_mask1, input_tensor2, attention_mask2,
                co_attention_mask=None, use_co_attention_mask=False):
        q1, k1, v1 = (self._heads(f(input_tensor1)) for f in (self.query1, self.key1, self.value1))
        q2, k2, v2 = (self._heads(f(input_tensor2)) for f in (self.query2, self.key2, self.value2))
        scale = math.sqrt(self.attention_head_size)
        probs1 = torch.softmax(q2 @ k1.transpose(-1, -2) / scale + attention_mask1, dim=-1)
        probs1 = self.dropout1(probs1)
        context1 = self._merge(probs1 @ v1)
        probs2 = torch.softmax(q1 @ k2.transpose(-1, -2) / scale + attention_mask2, dim=-1)
        probs2 = self.dropout2(probs2)
        context2 = self._merge(probs2 @ v2)
        attn_data = None
        if self.visualization:
            attn_data = {"attn1": probs1, "queries1": q2, "keys1": k1, "attn2": probs2,
                         "querues2": q1, "keys2": k2}
        return context1, context2, attn_data


# ---------------------------------------------------------------------------------
# Contrastive losses: eager (materialised) references and the chunked CPU path
# ---------------------------------------------------------------------------------


def info_nce(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """CLIP's loss, materialising both B x B logit matrices (open_clip ClipLoss):
    (CE(s I T^T, arange) + CE(s T I^T, arange)) / 2."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (torch.nn.functional.cross_entropy(logits, labels)
            + torch.nn.functional.cross_entropy(logits.T, labels)) / 2


def sigmoid_contrastive(image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                        logit_bias: Tensor) -> Tensor:
    """SigLIP's loss, materialised (open_clip SigLipLoss, world size 1):
    -sum_ij logsigmoid(z_ij (s I_i . T_j + b)) / B, z = +1 on the diagonal, -1 elsewhere."""
    logits = logit_scale * image_features @ text_features.T + logit_bias
    B = logits.shape[0]
    z = 2 * torch.eye(B, device=logits.device, dtype=logits.dtype) - 1
    return -torch.nn.functional.logsigmoid(z * logits).sum() / B


#: exp() arguments are clamped here: exp(-80) < 2e-35 contributes nothing an fp32 sum can
#: hold, and the clamp keeps the CPU out of (very slow) denormal arithmetic, which
#: CLIP-sized logits (s = 100) otherwise hit on most of each panel.
EXP_FLOOR = -80.0


def floored_exp_(E: Tensor) -> Tensor:
    """exp(E) in place with the arguments clamped at EXP_FLOOR, except that -inf gives
    exactly 0 (the fused CPU passes' exp_lanes does the same)."""
    neg_inf = E == float("-inf")
    return E.clamp_(min=EXP_FLOOR).exp_().masked_fill_(neg_inf, 0.0)


def exp_shift(mx: Tensor) -> Tensor:
    """The shift of an online log-sum-exp: the running max, or 0 where it is -inf (so
    exp(-inf - shift) is 0, not exp(NaN))."""
    return mx.masked_fill(mx == float("-inf"), 0.0)


#: row length of ordered_sum's fixed-order reduction (below torch's 32768-element
#: grain, so each row is summed by one thread)
ORDERED_SUM_ROW = 8192


def ordered_sum(x: Tensor) -> Tensor:
    """``x.sum()``, rounded the same way for any CPU thread count.

    torch splits a reduction to a single value between its threads past 32768 elements
    (each thread sums a share, then the shares are added), so the rounding depends on
    torch.get_num_threads(); a reduction to several values gives each one to a single
    thread and does not. Here the sum is taken as the sums of fixed ORDERED_SUM_ROW-
    element rows, then of those, recursively. On a GPU torch's own reduction is already
    fixed for a given shape."""
    if x.device.type != "cpu":
        return x.sum()
    x = x.reshape(-1)
    while x.numel() > ORDERED_SUM_ROW:
        pad = -x.numel() % ORDERED_SUM_ROW
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        x = x.view(-1, ORDERED_SUM_ROW).sum(1)
    return x.sum()


class cpu_threads_pinned:  # noqa: N801 (a context manager, used as a function)
    """Context: under torch.use_deterministic_algorithms(True), the torch CPU kernels it
    wraps run on one thread. BLAS partitions a GEMM's reduction by the thread count
    (measured with MKL: (16 x 1024) @ (1024 x 4096) and (300 x 256) @ (256 x 1) round
    differently on 1 and 2 threads), and torch's elementwise exp/sigmoid/softplus give
    the elements at each thread's range boundary to a scalar tail loop whose rounding
    differs from the vector loop; the chunked path wraps its GEMMs and eager panel
    passes in this, which makes its result independent of the thread count. The fused
    C++ panel passes keep every thread (their reductions are fixed by construction).
    Otherwise (and on a GPU) a no-op."""

    def __init__(self, like: Tensor) -> None:
        self.pin = (like.device.type == "cpu" and torch.are_deterministic_algorithms_enabled()
                    and torch.get_num_threads() > 1)
        self.threads = torch.get_num_threads()

    def __enter__(self) -> None:
        if self.pin:
            torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        if self.pin:
            torch.set_num_threads(self.threads)


class EagerPanelPasses:
    """The elementwise passes over one (k x t) similarity tile, in eager PyTorch.

    The chunked losses below take an object with these three methods; the fused CPU
    kernels (``torch.ops.mmkernels.contrastive_lse_panel_`` and friends, used by
    mmkernels.ops.contrastive) implement the same contract in one or two trips through
    the (cache-resident) tile and are tested against these.
    """

    @staticmethod
    def lse_panel(S: Tensor, row_max: Tensor, row_sum: Tensor, col_max: Tensor | None,
                  col_sum: Tensor | None) -> None:
        """The running row statistics (row_max (k,), row_sum (k,) of exp(S - row_max))
        absorb the tile's columns, and the running column statistics (col_max,
        col_sum (t,)) its rows, in place. An all -inf row or column keeps max -inf and
        sum 0 (log-sum-exp -inf, as torch.logsumexp), never NaN."""
        with cpu_threads_pinned(S):
            EagerPanelPasses._lse_panel(S, row_max, row_sum, col_max, col_sum)

    @staticmethod
    def _lse_panel(S, row_max, row_sum, col_max, col_sum) -> None:
        for dim, mx, sm in ((1, row_max, row_sum), (0, col_max, col_sum)):
            if mx is None:
                continue
            tmax = S.amax(dim)
            sh = exp_shift(tmax)
            E = S - (sh[:, None] if dim == 1 else sh[None, :])
            tsum = floored_exp_(E).sum(dim)
            new = torch.maximum(mx, tmax)
            nsh = exp_shift(new)
            sm.mul_(torch.exp(mx - nsh)).add_(tsum * torch.exp(tmax - nsh))
            mx.copy_(new)

    @staticmethod
    def grad_panel(S: Tensor, row_shift: Tensor, col_shift: Tensor | None) -> None:
        """S <- exp(S - row_shift[:, None]) (+ exp(S - col_shift[None, :])), in place."""
        with cpu_threads_pinned(S):
            W = floored_exp_(S - row_shift[:, None])
            if col_shift is not None:
                W.add_(floored_exp_(S.sub_(col_shift[None, :])))
            S.copy_(W)

    @staticmethod
    def siglip_panel(L: Tensor, bias: float, grad_weight: float, with_grad: bool) -> Tensor:
        """Returns sum softplus(L + bias) (every pair a negative); with_grad:
        L <- grad_weight * sigmoid(L + bias), in place."""
        with cpu_threads_pinned(L):
            X = L + bias
            # log(1 + e^x) exactly: torch's softplus returns x itself past x = 20,
            # dropping e^-x (up to 2e-9: visible in float64)
            total = ordered_sum(X.clamp(min=0) + torch.log1p(torch.exp(-X.abs())))
            if with_grad:
                torch.sigmoid(X, out=L).mul_(grad_weight)
        return total


EAGER_PASSES = EagerPanelPasses()


#: columns per tile of the chunked losses; with the default 1024 rows per tile
#: (``chunk_size``), a float32 tile is 4 MiB: it stays in the CPU's caches between the
#: GEMM that writes it, the elementwise pass and the GEMMs that read it, and the GEMMs
#: still run at full speed (measured: bench/results, contrastive).
TILE_COLS = 1024
TILE_ROWS = 1024


def default_chunk(num_cols: int) -> int:
    """Rows per tile (``chunk_size`` when the caller gives none)."""
    return TILE_ROWS


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _similarity_tiles(r: Tensor, c: Tensor, s: Tensor, chunk: int, col_chunk: int,
                      fold_scale: bool = True):
    """Every (chunk x col_chunk) tile of s * r @ c^T (of r @ c^T without fold_scale),
    row panel by row panel, as (row slice, column slice, r[rows], tile). The tile lives
    in one reused buffer: it is valid until the next step (callers may overwrite it)."""
    n, m = r.shape[0], c.shape[0]
    buf = torch.empty(min(chunk, n) * min(col_chunk, m), dtype=r.dtype, device=r.device)
    c_t = c.T.contiguous()  # (D, m): a row-major right operand is the fast GEMM
    for a in range(0, n, chunk):
        ri = slice(a, min(a + chunk, n))
        ra = r[ri]
        ra_s = ra * s if fold_scale else ra  # the scale folded into the operand
        for b in range(0, m, col_chunk):
            ci = slice(b, min(b + col_chunk, m))
            S = buf[:(ri.stop - a) * (ci.stop - b)].view(ri.stop - a, ci.stop - b)
            with cpu_threads_pinned(S):
                torch.mm(ra_s, c_t[:, ci], out=S)
            yield ri, ci, ra, S


def lse_rows_and_cols(rows: Tensor, cols: Tensor, scale: Tensor, chunk: int, with_cols: bool,
                      passes=EAGER_PASSES, col_chunk: int = TILE_COLS
                      ) -> tuple[Tensor, Tensor | None]:
    """Row (and column) log-sum-exp of S = scale * rows @ cols^T, one (chunk x col_chunk)
    tile at a time; each tile serves both directions, both accumulated online. Never
    holds the n x m matrix."""
    n, m = rows.shape[0], cols.shape[0]
    acc = _acc_dtype(rows)
    opts = dict(dtype=acc, device=rows.device)
    row_max, row_sum = torch.full((n,), float("-inf"), **opts), torch.zeros(n, **opts)
    col_max = torch.full((m,), float("-inf"), **opts) if with_cols else None
    col_sum = torch.zeros(m, **opts) if with_cols else None
    for ri, ci, _, S in _similarity_tiles(rows.to(acc), cols.to(acc), scale.to(acc), chunk,
                                          col_chunk):
        passes.lse_panel(S, row_max[ri], row_sum[ri], col_max[ci] if with_cols else None,
                         col_sum[ci] if with_cols else None)
    lse_c = col_max + col_sum.log() if with_cols else None
    return row_max + row_sum.log(), lse_c


def positive_dots(rows: Tensor, cols: Tensor, pos_offset: int) -> Tensor:
    """rows_i . cols_(i + pos_offset) in the accumulation dtype (0 where that column does
    not exist)."""
    acc = _acc_dtype(rows)
    i = torch.arange(rows.shape[0], device=rows.device)
    j = i + pos_offset
    ok = (j >= 0) & (j < cols.shape[0])
    out = torch.zeros(rows.shape[0], dtype=acc, device=rows.device)
    out[ok] = (rows[i[ok]].to(acc) * cols[j[ok]].to(acc)).sum(1)
    return out


def add_positives(scale: Tensor, neg_r: Tensor, neg_c: Tensor | None, pos: Tensor,
                  pos_offset: int, m: int) -> tuple[Tensor, Tensor | None]:
    """(lse_r, lse_c) from the negatives' log-sum-exps and the positives' dot products
    pos (n,) (rows_i . cols_(i + pos_offset)): the positive logit s * pos added back
    where the pair exists (m columns)."""
    n = neg_r.shape[0]
    i = torch.arange(n, device=neg_r.device)
    j = i + pos_offset
    sp = scale.to(neg_r.dtype) * pos.to(neg_r.dtype)
    lse_r = neg_r.clone()
    ok = (j >= 0) & (j < m)
    lse_r[ok] = torch.logaddexp(neg_r[ok], sp[ok])
    if neg_c is None:
        return lse_r, None
    lse_c = neg_c.clone()
    lse_c[j[ok]] = torch.logaddexp(neg_c[j[ok]], sp[ok])
    return lse_r, lse_c


def negatives_lse(scale: Tensor, lse: Tensor, pos: Tensor) -> Tensor:
    """The negatives' log-sum-exp from the full one and the positives' dot products:
    lse + log(1 - exp(s * pos - lse)) (it cancels near convergence: the chunked paths'
    float32/float64 use it; the Triton kernels sum the negatives directly)."""
    miss = -torch.expm1(scale.to(lse.dtype) * pos.to(lse.dtype) - lse)
    return lse + torch.log(miss.clamp(min=0.0))


def lse_grads(rows: Tensor, cols: Tensor, scale: Tensor, grad: Tensor, lse_r: Tensor | None,
              lse_c: Tensor | None, coef_r, coef_c, pos_w: Tensor | None,
              pos_offset: int | None, chunk: int, bound: float = 1.0, passes=EAGER_PASSES,
              col_chunk: int = TILE_COLS, col_stats: bool = False):
    """grad times the gradients w.r.t. rows, cols and scale of a loss whose derivative
    by S = scale * rows @ cols^T is W_ij = coef_r_i exp(S_ij - lse_r_i) + coef_c_j
    exp(S_ij - lse_c_j), except at the positives (i, i + pos_offset), where it is pos_w_i
    (the forward's statistics give it without cancellation). coef_*: a float (positive)
    or a vector; None drops that term. d rows = s W cols, d cols = s W^T rows, d scale =
    sum_ij W_ij <r_i, c_j>. Each tile is recomputed once and W overwrites it.
    Returns (d_rows, d_cols, d_scale, None); with col_stats, d_scale leaves out the
    column term, whose column sums of W_col_ij <r_i, c_j> come fourth ((m,), times
    grad). (``bound`` is for the Triton path's interface.)"""
    n, m = rows.shape[0], cols.shape[0]
    acc = _acc_dtype(rows)
    opts = dict(dtype=acc, device=rows.device)
    r, c = rows.to(acc), cols.to(acc)
    s = scale.to(acc)
    d_rows = torch.zeros(n, rows.shape[1], **opts)
    d_cols = torch.zeros(m, cols.shape[1], **opts)
    c_stat = torch.zeros(m, **opts) if col_stats else None

    def vec(coef, k):
        return coef.to(acc) if isinstance(coef, Tensor) else torch.full((k,), float(coef), **opts)

    # scalar positive coefficients fold into the shifts (the fused panel pass); vectors
    # (the distributed losses' per-rank weights, any sign) take eager tile passes
    fused = not col_stats and not isinstance(coef_r, Tensor) and not isinstance(coef_c, Tensor)
    huge = torch.full((n,), float("inf"), **opts)
    if fused:
        row_shift = (lse_r.to(acc) - math.log(coef_r) if coef_r is not None else huge).contiguous()
        col_shift = (lse_c.to(acc) - math.log(coef_c)).contiguous() if coef_c is not None else None
    ca = vec(coef_r, n) if coef_r is not None else None
    cb = vec(coef_c, m) if coef_c is not None else None
    for ri, ci, ra, W in _similarity_tiles(r, c, s, chunk, col_chunk, fold_scale=fused):
        if fused:
            passes.grad_panel(W, row_shift[ri], None if col_shift is None else col_shift[ci])
        else:  # W holds the dot products
            S = W * s
            dots = W.clone() if col_stats else None
            W.zero_()
            if ca is not None:
                W += ca[ri, None] * torch.exp(S - lse_r.to(acc)[ri, None])
            if cb is not None:
                E = cb[None, ci] * torch.exp(S - lse_c.to(acc)[None, ci])
                if col_stats:
                    c_stat[ci] += (E * dots).sum(0)
                W += E
        with cpu_threads_pinned(W):
            d_rows[ri].addmm_(W, c[ci])
            d_cols[ci].addmm_(W.T, ra)
    if pos_offset is not None:
        # the tiles gave the positives the formula's weight; make it pos_w
        i = torch.arange(n, device=rows.device)
        j = i + pos_offset
        ok = (j >= 0) & (j < m)
        i, j = i[ok], j[ok]
        dot = (r[i] * c[j]).sum(1)
        sp = s * dot
        f_row = ca[i] * torch.exp(sp - lse_r.to(acc)[i]) if ca is not None else 0.0
        f_col = cb[j] * torch.exp(sp - lse_c.to(acc)[j]) if cb is not None else 0.0
        delta = pos_w.to(acc)[i] - f_row - f_col
        d_rows.index_add_(0, i, c[j] * delta[:, None])
        d_cols.index_add_(0, j, r[i] * delta[:, None])
        if col_stats and cb is not None:
            c_stat.index_add_(0, j, -f_col * dot)
    g = grad.to(acc)
    d_s = ordered_sum(r * d_rows)
    if col_stats:
        d_s = d_s - ordered_sum(c_stat)
    return d_rows * (s * g), d_cols * (s * g), d_s * g, None if c_stat is None else c_stat * g


def siglip_positives(rows: Tensor, cols: Tensor, scale: Tensor, bias: Tensor,
                     diag_offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The positive pairs (i, i + diag_offset) that exist: (i, j, logits d (acc dtype),
    rows[i], cols[j] in the acc dtype). The tiles take every pair as a negative; the
    callers swap in these pairs' positive loss softplus(-d) - softplus(d) = -d and subtract
    one from their gradient weight, from these O(n * D) terms."""
    acc = _acc_dtype(rows)
    i = torch.arange(rows.shape[0], device=rows.device)
    j = i + diag_offset
    ok = (j >= 0) & (j < cols.shape[0])
    i, j = i[ok], j[ok]
    a_i, b_j = rows[i].to(acc), cols[j].to(acc)
    d = scale.to(acc) * (a_i * b_j).sum(1) + bias.to(acc)
    return i, j, d, a_i, b_j


def siglip_panels(rows: Tensor, cols: Tensor, scale: Tensor, bias: Tensor, chunk: int,
                  diag_offset: int | None, grad_weight: float | None = None,
                  passes=EAGER_PASSES, col_chunk: int = TILE_COLS):
    """Sum over tiles of -logsigmoid(z * (s R C^T + b)) with z = +1 at (i, i + diag_offset)
    and -1 elsewhere (diag_offset None: all negatives). With grad_weight, the gradients of
    grad_weight * that sum w.r.t. rows, cols, scale and bias come from the same tiles
    (each element's gradient depends on its logit alone, so no second pass is needed):
    (total, G_rows, G_cols, post, d_scale, d_bias), the gradients being G * post."""
    n, m = rows.shape[0], cols.shape[0]
    acc = _acc_dtype(rows)
    opts = dict(dtype=acc, device=rows.device)
    r, c = rows.to(acc), cols.to(acc)
    s = scale.to(acc)
    b = float(bias)
    total = torch.zeros((), **opts)
    want = grad_weight is not None
    d_rows = torch.zeros(n, rows.shape[1], **opts) if want else None
    d_cols = torch.zeros(m, cols.shape[1], **opts) if want else None
    d_b = torch.zeros((), **opts)
    for ri, ci, ra, L in _similarity_tiles(r, c, s, chunk, col_chunk):
        total += passes.siglip_panel(L, b, grad_weight if want else 0.0, want)
        if want:  # L now holds grad_weight * sigmoid(logits)
            d_b += ordered_sum(L)
            with cpu_threads_pinned(L):
                d_rows[ri].addmm_(L, c[ci])
                d_cols[ci].addmm_(L.T, ra)
    if diag_offset is not None:
        i, j, d, a_i, b_j = siglip_positives(rows, cols, scale, bias, diag_offset)
        # softplus(-d) - softplus(d) = -d exactly (no softplus of a large logit to
        # cancel against the tile's)
        total -= ordered_sum(d)
        if want:
            d_rows.index_add_(0, i, b_j, alpha=-grad_weight)
            d_cols.index_add_(0, j, a_i, alpha=-grad_weight)
            d_b -= grad_weight * i.numel()
    if not want:
        return total
    d_s = ordered_sum(r * d_rows)  # sum_ij G_ij <r_i, c_j>
    return total, d_rows, d_cols, s, d_s, d_b
