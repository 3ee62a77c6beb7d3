"""The distributed contrastive losses (mmkernels.ops.contrastive): each rank passes its
local (B_r, D) features; N = sum_r B_r, B_max = max_r B_r, W the world size. The loss
of rank r is open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)`` (InfoNCE:
local images against every global text and local texts against every global image,
labels offset by the rank) or ``SigLipLoss`` across ranks (local images against every
global text), and each rank's features receive the gradients of every rank's loss, as
open_clip's all_gather / neighbour exchange pass them back.

GEMM passes per rank, over B_r x N x D (counted by the audit's counters in
tests/test_contrastive_dist_costs.py; one process does the same over B x B x D):

==========  ==========================  ==========================
loss        all_gather                  ring
==========  ==========================  ==========================
InfoNCE     1 forward + 3 backward      1 forward + 3 backward
SigLIP      3 forward + 0 backward      1 forward + 3 backward
==========  ==========================  ==========================

InfoNCE computes this rank's row block only (local images against every text), once
in the forward and once in the backward: the texts' column log-sum-exps over every
rank's images come from all-reducing the 2 N column statistics (all_gather mode) or
travel with their block around the ring (ring mode), and the backward's weights carry
every rank's loss (each rank's incoming gradient is all-gathered, one scalar per
rank), so no rank recomputes the other direction's tiles. SigLIP in ring mode takes
one pass more than in all_gather mode: the gradient of rank q's texts sums every
rank's contribution scaled by that rank's incoming gradient, unknown in the forward;
forming them in the forward would mean keeping each block's unscaled (B_q, D)
gradient, (N, D) per rank, which the ring exists to avoid. So the ring forward
computes the loss alone (one pass) and the backward recomputes the gradients (three).

Modes and memory per rank (bytes; e = the features' itemsize, statistics float32;
P = W B_max, the collectives' blocks padded to the largest batch, P = N for equal
batches; "panel": the gradient GEMMs' weight panel, R rows x the block's columns in the
features' dtype, at most PANEL_BYTES, with on a GPU the forward's (2 SMs, columns)
float32 column partials):

* ``all_gather``: one all_gather_into_tensor of the texts per forward, the losses
  computed on the gathered block, the gradients of the other ranks' features returned
  with one reduce_scatter in the features' dtype.

  - InfoNCE: kept from forward to backward ``N D e`` (the gathered texts) +
    ``4 (N + 3 B_r)`` (statistics); the collectives' buffers ``P D e`` (forward) and
    ``P D e`` (backward); in the backward the texts' gradient ``N D e`` (``N D 4``
    with several panels) + the panel. Peak about ``3 N D e`` + panel.
  - SigLIP: kept ``(N + B_r) D e`` (the gradient factors of the texts and the images,
    formed in the forward) + three scalars; the gathered texts ``P D e`` (forward
    only) and the reduce-scattered gradient ``P D e`` (backward). Peak about
    ``2 N D e`` + panel.

* ``ring``: blocks travel around the ring by isend/irecv; the transfer of the next block
  is posted before the current block's tiles are computed, so it overlaps them, and
  each block's gradient accumulator travels with it in the backward (one hop per step,
  after that step's GEMMs). Nothing of size N D ever exists: every term is
  ``O(B_max D)``, independent of W.

  - InfoNCE: kept ``16 B_r`` (four statistics); forward: two blocks in flight
    ``2 B_max D e``; backward: two blocks with their column log-sum-exps
    ``2 B_max (D e + 4)``, the carried float32 accumulator and the arriving one
    ``2 B_max (D + 1) 4``, the image gradient and one step's gradients
    ``(2 B_r + 2 B_max) D 4``, + a panel of B_max columns. Peak about
    ``(2 e + 24) B_max D``.
  - SigLIP: nothing kept but the inputs; backward: two blocks ``2 B_max D e``, the
    step's gradient factors ``2 B_max D e``, the carried and arriving accumulators and
    the step's part ``3 B_max D 4``, the image gradient ``B_r D 4``. Peak about
    ``(4 e + 16) B_max D``.

  tests/test_contrastive_dist_costs.py measures, per rank at 2 and 3 gloo ranks, the
  bytes saved for the backward, the collectives' buffers, the largest p2p exchange
  and the largest tensor any op creates, against these formulas.

When each mode wins: **all_gather** while its ``~3 N D e`` fits next to the model: the
bytes each rank moves are the same in both modes (``(W - 1) B D e`` per direction),
but NCCL's all-gather and reduce-scatter move them in one bandwidth-optimal collective
each, the panels are few and wide, and the ring adds the backward's float32
accumulator hops and W sequential steps. So all_gather for small and moderate world
sizes (one node, a few nodes). **ring** when ``N D`` no longer fits (thousands of GPUs,
B_global in the millions): its memory does not grow with W, and it needs less than
all_gather once W exceeds about ``(2 e + 24) / (3 e)`` (5 ranks in bf16). Its transfers
hide behind the compute when each step's tiles take longer than one block's transfer,
``2 B_r B_q D / F >= B_q D e / L`` (F the FLOP rate, L the link's bytes/s), i.e.
``B_r >= F e / (2 L)``: about 2,000 rows on NVLink (450 GB/s, bf16, H100) and 20,000
on 50 GB/s InfiniBand in the forward (the backward moves a block and its float32
accumulator, ``B_q D (e + 4)`` bytes, behind three passes: about the same threshold);
below that the ring is bound by its links.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from mmkernels import reference


@dataclasses.dataclass(frozen=True)
class Dist:
    """Where a loss is computed: ``world == 1`` is one process (no collective at all);
    otherwise ``rank`` of ``world`` in ``group``, with every rank's local batch size."""
    group: object = None
    world: int = 1
    rank: int = 0
    sizes: tuple[int, ...] = ()


LOCAL = Dist()


def group_info(process_group) -> tuple[object, int, int]:
    """(group, world size, rank): the given group, else the initialised default group,
    else one process."""
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None, 1, 0
        process_group = dist.group.WORLD
    return process_group, dist.get_world_size(process_group), dist.get_rank(process_group)


def local_sizes(x: Tensor, group, world: int, rank: int,
                 local_batch_sizes) -> tuple[int, ...]:
    """Every rank's local batch, known on the host without a device sync.

    Given ``local_batch_sizes``: checked against this rank's batch (the caller promises
    the same list on every rank). Otherwise the local batches must be equal, as
    open_clip's all_gather requires. Features on the CPU (gloo) check it with one
    8-byte host-side all-gather and raise ValueError on every rank alike (gloo aborts
    the process on a mismatched all-gather). On a GPU nothing is checked, because a
    check would need a host sync per call; a mismatch then fails inside the
    collective as it does in open_clip. ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` makes torch
    check every collective's shapes across ranks."""
    B = x.shape[0]
    if local_batch_sizes is not None:
        sizes = tuple(local_batch_sizes)
        if (len(sizes) != world or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                       for n in sizes)):
            raise ValueError(f"local_batch_sizes must hold {world} positive ints (one per "
                             f"rank), got {local_batch_sizes!r}")
        if sizes[rank] != B:
            raise ValueError(f"local_batch_sizes[{rank}] = {sizes[rank]} but this rank's "
                             f"image_features hold {B} rows")
        return sizes
    if x.device.type == "cpu":
        mine = torch.tensor([B], dtype=torch.int64)
        every = torch.empty(world, dtype=torch.int64)
        dist.all_gather_into_tensor(every, mine, group=group)
        got = every.tolist()
        if any(n != B for n in got):
            raise ValueError(f"image_features: the local batches differ across ranks ({got}); "
                             "pass local_batch_sizes=[...] (the same list on every rank) for "
                             "uneven batches")
    return (B,) * world


def _gather_rows(x: Tensor, sizes: tuple[int, ...], group) -> Tensor:
    """All-gather every rank's (B_r, D) block into (sum B_r, D), in rank order: one
    all_gather_into_tensor of blocks padded to the largest B_r (no padding when the
    batches are equal, the common case), then unpadded."""
    biggest = max(sizes)
    send = x.contiguous()
    if x.shape[0] != biggest:
        send = x.new_zeros(biggest, x.shape[1])
        send[: x.shape[0]] = x
    out = x.new_empty(len(sizes) * biggest, x.shape[1])
    dist.all_gather_into_tensor(out, send, group=group)
    if all(n == biggest for n in sizes):
        return out
    return torch.cat([out[r * biggest:r * biggest + n] for r, n in enumerate(sizes)])



def _reduce_scatter_rows(x: Tensor, sizes: tuple[int, ...], rank: int, group) -> Tensor:
    """Sum (N, C) over the ranks and return this rank's (B_rank, C) rows: one
    reduce_scatter_tensor, in x's dtype, of blocks padded to the largest B_r."""
    biggest, world = max(sizes), len(sizes)
    if all(n == biggest for n in sizes):
        send = x.contiguous()
    else:
        send = x.new_zeros(world * biggest, x.shape[1])
        start = 0
        for r, n in enumerate(sizes):
            send[r * biggest:r * biggest + n] = x[start:start + n]
            start += n
    out = x.new_empty(biggest, x.shape[1])
    dist.reduce_scatter_tensor(out, send, group=group)
    return out[:sizes[rank]]


def info_nce_value(scale: Tensor, neg_i: Tensor, neg_t: Tensor, pos: Tensor) -> Tensor:
    """sum_i (softplus(neg_i - s pos_i) + softplus(neg_t - s pos_i)) / (2B): each row's
    -log P_ii = lse_i - s pos_i from its negatives' log-sum-exp (exact near convergence,
    where lse - s pos cancels), in the statistics' dtype (pos: the positives' dot
    products)."""
    B = neg_i.shape[0]
    sp = scale.to(neg_i.dtype) * pos.to(neg_i.dtype)
    sp_fn = torch.nn.functional.softplus
    return (reference.ordered_sum(sp_fn(neg_i - sp)) + reference.ordered_sum(sp_fn(neg_t - sp))
            ) / (2 * B)


def _merge_lse(a: Tensor | None, b: Tensor) -> Tensor:
    return b if a is None else torch.logaddexp(a, b)


def _all_reduce_lse(neg: Tensor, pos_full: Tensor, group) -> tuple[Tensor, Tensor]:
    """Every rank's column statistics merged: (the negatives' log-sum-exp over all ranks'
    rows, the positives' dot products summed over the ranks, each given by its owner):
    one MAX all_reduce of N floats and one SUM all_reduce of 2 N."""
    top = neg.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = top.masked_fill(torch.isinf(top), 0.0)
    both = torch.cat([torch.exp(neg - top), pos_full])
    dist.all_reduce(both, group=group)
    N = neg.shape[0]
    return torch.log(both[:N]) + top, both[N:]


def _coefs(grad: Tensor, where: Dist, device, acc) -> tuple[Tensor, Tensor]:
    """(gmax, per-column coefficients (N,)): rank q's loss weights its log-sum-exps by
    g_q / (2 B_q), g_q its incoming gradient (one all_gather of a scalar per rank);
    divided by gmax = max |g_q| so that the stored weights stay within the bound (the
    gradients are multiplied by gmax after the GEMMs)."""
    g = grad.to(acc).reshape(1).contiguous()
    g_all = g.new_empty(where.world)
    dist.all_gather_into_tensor(g_all, g, group=where.group)
    gmax = g_all.abs().amax()
    gmax = torch.where(gmax == 0, torch.ones_like(gmax), gmax)
    sizes = torch.tensor(where.sizes, dtype=acc, device=device)
    per_rank = g_all / (2 * sizes) / gmax
    return gmax, per_rank.repeat_interleave(torch.tensor(where.sizes, device=device))


class InfoNCEAllGather(torch.autograd.Function):
    """Rank r computes its row block only (local images against every text), once in the
    forward and once in the backward: the texts' column log-sum-exps over every rank's
    images come from an all_reduce of the column statistics, and the backward's weights
    carry every rank's loss (its incoming gradient gathered), so the tiles of the other
    direction are never recomputed: 1 + 3 GEMM passes over B_r x N x D per rank."""

    @staticmethod
    def forward(ctx, image, text, scale, chunk, where: Dist, path):
        all_t = _gather_rows(text.detach(), where.sizes, where.group)
        offset, B, N = sum(where.sizes[:where.rank]), image.shape[0], all_t.shape[0]
        lse_i, _, pos, neg_i, neg_c = path.lse_rows_and_cols(image, all_t, scale, chunk, True,
                                                             offset)
        pos_full = torch.zeros(N, dtype=neg_c.dtype, device=neg_c.device)
        pos_full[offset:offset + B] = pos
        neg_c, pos_all = _all_reduce_lse(neg_c, pos_full, where.group)
        lse_c = torch.logaddexp(neg_c, scale.to(neg_c.dtype) * pos_all)
        own = slice(offset, offset + B)
        ctx.save_for_backward(image, scale, all_t, lse_i, lse_c, torch.exp(neg_i - lse_i),
                              torch.exp(neg_c[own] - lse_c[own]))
        ctx.meta = (chunk, where, offset, path)
        return info_nce_value(scale, neg_i, neg_c[own], pos)

    @staticmethod
    def backward(ctx, grad):
        image, scale, all_t, lse_i, lse_c, miss_r, miss_c = ctx.saved_tensors
        chunk, where, offset, path = ctx.meta
        B = image.shape[0]
        gmax, coef_c = _coefs(grad, where, image.device, lse_i.dtype)
        coef_r = coef_c[offset:offset + B]
        pos_w = -coef_r * (miss_r + miss_c)
        d_i, d_all_t, d_s, c_stat = path.lse_grads(
            image, all_t, scale, gmax, lse_i, lse_c, coef_r, coef_c, pos_w, offset, chunk,
            bound=1.0 / min(where.sizes), col_stats=True)
        mine = _reduce_scatter_rows(d_all_t.to(image.dtype), where.sizes, where.rank,
                                    where.group)
        d_s = d_s + _own_column_stats(c_stat, where)
        return (d_i.to(image.dtype), mine, d_s.to(scale.dtype).reshape(scale.shape), None,
                None, None)


def _own_column_stats(c_stat: Tensor, where: Dist) -> Tensor:
    """The logit scale's gradient from the column terms of this rank's loss, computed
    by every rank: per-rank sums of the column statistics, all-reduced (world floats)."""
    per_rank = torch.stack([reference.ordered_sum(part)
                            for part in torch.split(c_stat, list(where.sizes))])
    dist.all_reduce(per_rank, group=where.group)
    return per_rank[where.rank]


class SigLIPAllGather(torch.autograd.Function):
    """open_clip SigLipLoss across ranks: local images against every global text, the
    positives at this rank's own block; divided by the local batch. The gradients come
    from the forward's panels; the texts' (N, D) gradient is kept in the features'
    dtype and scaled by the incoming gradient in the backward, then reduce-scattered."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, chunk, where: Dist, path):
        all_t = _gather_rows(text.detach(), where.sizes, where.group)
        offset = sum(where.sizes[:where.rank])
        B = image.shape[0]
        total, g_i, g_all_t, post, d_s, d_b = path.siglip_panels(
            image, all_t, scale, bias, chunk, offset, grad_weight=1.0 / B)
        ctx.save_for_backward(g_i, g_all_t.to(image.dtype), post, d_s, d_b)
        ctx.meta = (where, image.dtype, scale.shape, bias.shape)
        return total / B

    @staticmethod
    def backward(ctx, grad):
        g_i, g_all_t, post, d_s, d_b = ctx.saved_tensors
        where, dtype, s_shape, b_shape = ctx.meta
        f = grad * post
        mine = _reduce_scatter_rows((g_all_t * f).to(dtype), where.sizes, where.rank,
                                    where.group)
        return ((g_i * f).to(dtype), mine, (grad * d_s).to(dtype).reshape(s_shape),
                (grad * d_b).to(dtype).reshape(b_shape), None, None, None)


def siglip_loss_only(image, text, scale, bias, chunk, where: Dist, path, mode: str) -> Tensor:
    """The distributed SigLIP loss without gradients (no_grad, or nothing requires one):
    one pass, no gradient computed or kept."""
    offset = sum(where.sizes[:where.rank])
    if mode == "all_gather":
        all_t = _gather_rows(text.detach(), where.sizes, where.group)
        return path.siglip_panels(image, all_t, scale, bias, chunk, offset) / image.shape[0]
    total = None
    for q, block in _Ring(where, text.detach()).blocks():
        part = path.siglip_panels(image, block, scale, bias, chunk,
                                  0 if q == where.rank else None)
        total = part if total is None else total + part
    return total / image.shape[0]


# ---------------------------------------------------------------------------------
# ring mode
# ---------------------------------------------------------------------------------


class _Ring:
    """Blocks passed around the ring: at step k this rank holds rank (rank - k)'s block
    (each rank's block is [its features], B_q rows). The transfer of the next block is
    posted before the caller computes on the current one."""

    def __init__(self, where: Dist, block: Tensor) -> None:
        self.where, self.block = where, block.contiguous()
        self.next = (where.rank + 1) % where.world
        self.prev = (where.rank - 1) % where.world

    def _exchange(self, send: Tensor, rows: int):
        recv = send.new_empty(rows, send.shape[1])
        ops = [dist.P2POp(dist.isend, send, self.next, self.where.group),
               dist.P2POp(dist.irecv, recv, self.prev, self.where.group)]
        return recv, dist.batch_isend_irecv(ops)

    def blocks(self):
        """Yields (owner q, q's block) for every rank q, this rank's own block first."""
        world, rank, sizes = self.where.world, self.where.rank, self.where.sizes
        cur = self.block
        for k in range(world):
            q = (rank - k) % world
            pending = None
            if k < world - 1:  # posted now: overlaps the caller's work on cur
                pending = self._exchange(cur, sizes[(q - 1) % world])
            yield q, cur
            if pending is not None:
                for req in pending[1]:
                    req.wait()
                cur = pending[0]

    def pass_on(self, acc: Tensor, q: int) -> Tensor:
        """Send the accumulator of block q to the next rank and receive the one of the
        block arriving from the previous rank (rank q - 1's)."""
        sizes, world = self.where.sizes, self.where.world
        recv, reqs = self._exchange(acc.contiguous(), sizes[(q - 1) % world])
        for req in reqs:
            req.wait()
        return recv


def _as_columns(v: Tensor, dtype: torch.dtype) -> Tensor:
    """A (B,) statistic as (B, k) columns of the features' dtype (its bytes), to travel
    with a block; :func:`_from_columns` undoes it."""
    return v.contiguous().view(dtype).view(v.shape[0], -1)


def _from_columns(cols: Tensor, acc: torch.dtype) -> Tensor:
    return cols.contiguous().view(-1).view(acc)


class InfoNCERing(torch.autograd.Function):
    """The all_gather mode's algorithm with the text blocks passed around the ring: in the
    forward each block's column statistics travel with it and come home complete; in the
    backward each block travels with its column log-sum-exps and its gradient
    accumulator. 1 + 3 GEMM passes over B_r x N x D per rank, as all_gather."""

    @staticmethod
    def forward(ctx, image, text, scale, chunk, where: Dist, path):
        ring = _Ring(where, text.detach())
        neg_i = lse_i = pos = None
        carried = None  # the column statistics of the block in hand (negatives' lse)
        for q, block in ring.blocks():
            own = q == where.rank
            li, lc, p, ni, nc = path.lse_rows_and_cols(image, block, scale, chunk, True,
                                                       0 if own else None)
            if own:
                pos, nc_block = p, nc
            else:  # no positive in this block: its statistics are the negatives'
                nc_block, ni = lc, li
            lse_i, neg_i = _merge_lse(lse_i, li), _merge_lse(neg_i, ni)
            carried = nc_block if carried is None else torch.logaddexp(carried, nc_block)
            carried = ring.pass_on(carried[:, None], q)[:, 0]
        neg_t = carried  # this rank's texts against every image, negatives only
        lse_t = torch.logaddexp(neg_t, scale.to(neg_t.dtype) * pos)
        ctx.save_for_backward(image, text, scale, lse_i, lse_t, torch.exp(neg_i - lse_i),
                              torch.exp(neg_t - lse_t))
        ctx.meta = (chunk, where, path)
        return info_nce_value(scale, neg_i, neg_t, pos)

    @staticmethod
    def backward(ctx, grad):
        image, text, scale, lse_i, lse_t, miss_r, miss_c = ctx.saved_tensors
        chunk, where, path = ctx.meta
        D, B, acc = image.shape[1], image.shape[0], lse_i.dtype
        gmax, coef_all = _coefs(grad, where, image.device, acc)
        starts = [sum(where.sizes[:q]) for q in range(where.world)]
        coef_r = coef_all[starts[where.rank]:starts[where.rank] + B]
        pos_w = -coef_r * (miss_r + miss_c)
        ring = _Ring(where, torch.cat([text.detach(), _as_columns(lse_t, text.dtype)], 1))
        d_i = torch.zeros(image.shape, dtype=acc, device=image.device)
        d_s = torch.zeros((), dtype=acc, device=image.device)
        carried = None  # the block in hand's [d texts | column statistics], float32
        for q, block in ring.blocks():
            own = q == where.rank
            coef_c = coef_all[starts[q]:starts[q] + where.sizes[q]]
            a, b, s, c_stat = path.lse_grads(
                image, block[:, :D], scale, gmax, lse_i, _from_columns(block[:, D:], acc),
                coef_r, coef_c, pos_w if own else None, 0 if own else None, chunk,
                bound=1.0 / min(where.sizes), col_stats=True)
            d_i += a
            d_s += s
            part = torch.cat([b.to(acc), c_stat[:, None]], 1)
            carried = part if carried is None else carried.add_(part)
            carried = ring.pass_on(carried, q)  # now the next block's (or, last, ours)
        d_s = d_s + reference.ordered_sum(carried[:, D])
        return (d_i.to(image.dtype), carried[:, :D].to(text.dtype),
                d_s.to(scale.dtype).reshape(scale.shape), None, None, None)


class SigLIPRing(torch.autograd.Function):
    """The loss in the forward (one pass per block); the gradients recomputed in the
    backward (three passes per block), scaled by this rank's incoming gradient before
    the texts' accumulator travels on."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, chunk, where: Dist, path):
        ctx.save_for_backward(image, text, scale, bias)
        ctx.meta = (chunk, where, path)
        return siglip_loss_only(image, text, scale, bias, chunk, where, path, "ring")

    @staticmethod
    def backward(ctx, grad):
        image, text, scale, bias = ctx.saved_tensors
        chunk, where, path = ctx.meta
        B = image.shape[0]
        ring = _Ring(where, text.detach())
        acc = torch.float64 if image.dtype == torch.float64 else torch.float32
        d_i = torch.zeros(image.shape, dtype=acc, device=image.device)
        d_s = torch.zeros((), dtype=acc, device=image.device)
        d_b = torch.zeros_like(d_s)
        carried = None
        for q, block in ring.blocks():
            _, g_i, g_t, post, s, b = path.siglip_panels(
                image, block, scale, bias, chunk, 0 if q == where.rank else None,
                grad_weight=1.0 / B)
            f = (grad * post).to(acc)
            d_i += g_i.to(acc) * f
            d_s += s
            d_b += b
            part = g_t.to(acc) * f
            carried = part if carried is None else carried.add_(part)
            carried = ring.pass_on(carried, q)
        return (d_i.to(image.dtype), carried.to(text.dtype),
                (grad * d_s).to(scale.dtype).reshape(scale.shape),
                (grad * d_b).to(bias.dtype).reshape(bias.shape), None, None, None)
