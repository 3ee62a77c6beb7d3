"""Large-batch contrastive losses without the B x B matrix: ``info_nce`` (CLIP) and
``sigmoid_contrastive`` (SigLIP), on one process or across processes.

Only tiles of similarities exist at any time: the row and column log-sum-exps are
accumulated tile by tile in the forward (each tile serves both directions), and the
backward recomputes the tiles, behind the custom ops ``mmkernels::info_nce_fwd/_bwd``
and ``mmkernels::sigmoid_contrastive_fwd``. Three implementations share one interface
(``lse_rows_and_cols``, ``lse_backward``, ``siglip_panels``; chosen by :func:`_path`):
  * Triton kernels (mmkernels/triton/contrastive.py): CUDA fp16/bf16/fp32, and CPU
    tensors under TRITON_INTERPRET=1;
  * the tiled path of mmkernels.reference with the fused C++ panel passes
    (csrc/contrastive/): CPU tensors;
  * the same tiled path with eager passes: float64 on a GPU, builds without the
    extension, MMKERNELS_BACKEND=reference.

Distributed (``process_group``, or an initialised default group with world size > 1):
each rank passes its local features and the loss is that of open_clip's
``ClipLoss(local_loss=True, gather_with_grad=True)``: local image rows against every
global text, local text rows against every global image, labels offset by the rank.
Features move by one all_gather_into_tensor per forward: every rank contributes its
(B_local, D) block (image and text side by side for InfoNCE). The local batches are
equal, as in open_clip, or given on the host as ``local_batch_sizes`` (padded to the
largest for the collective and unpadded): sizes are never read back from a device, so
no call syncs with the host. A rank holds O(B_global * D) features and one similarity
tile per program (or per CPU step), never a B_local x B_global matrix. In the
backward, the gradients a rank computes for the other ranks' features (its columns)
are summed across ranks with one all-reduce of the (B_global, D) buffers, the same sum
open_clip's all_gather backward performs. An all-gather rather than a send/recv ring
because NCCL and gloo both implement it with bandwidth-optimal algorithms, the
features are small next to the panel compute, and
one collective per direction keeps the backward deterministic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types

import torch
import torch.distributed as dist
from torch import Tensor

from mmkernels import _extension, reference
from mmkernels.triton import KernelSpec, interpreter_tiles, interpreting

__all__ = ["info_nce", "sigmoid_contrastive"]


# ---------------------------------------------------------------------------------
# Triton path (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1): kernels in
# mmkernels/triton/contrastive.py, launched here with the chunked path's signatures
# ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    block_m: int
    block_n: int
    block_k: int      # feature-dim slice of the similarity tiles
    block_d: int      # feature-dim slice of the gradient accumulation (backward)
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return (f"M{self.block_m}-N{self.block_n}-K{self.block_k}-D{self.block_d}"
                f"-w{self.num_warps}-s{self.num_stages}")


_CC = ContrastiveConfig
# Launch configurations per kernel and operand class, best first: "mma" for fp16/bf16
# on tensor cores, "tf32" for fp32 with TF32 enabled, "fp32" for exact fp32 (FMA dot
# products, which need smaller tiles). Each entry was compiled for sm_80 and sm_90 in
# every mode and dtype of its class, for any batch and for batches that are multiples
# of 16, and kept only without spills; `python -m mmkernels.tools.kernel_report`
# re-checks them all in CI.
CONFIGS: dict[str, dict[str, list[ContrastiveConfig]]] = {
    "fwd": {"mma": [_CC(128, 128, 32, 0, 8, 2)],
            "tf32": [_CC(64, 128, 64, 0, 8, 2)],
            "fp32": [_CC(64, 64, 32, 0, 4, 1)]},
    "bwd": {"mma": [_CC(64, 64, 64, 128, 8, 1), _CC(64, 64, 64, 64, 8, 2)],
            "tf32": [_CC(64, 64, 64, 128, 8, 1), _CC(64, 64, 64, 64, 8, 2)],
            "fp32": [_CC(32, 32, 32, 64, 4, 1)]},
}
INTERPRET_CONFIGS = {"fwd": _CC(16, 16, 32, 0, 4, 1), "bwd": _CC(16, 16, 32, 32, 4, 1)}
#: persistent forward programs per SM (the column partials take P x m floats, P = this
#: times the SM count)
PROGRAMS_PER_SM = 2
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _guard(device: torch.device):
    """Launch under the tensors' device (CUDA); nothing to guard on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _operand_class(precision: str, dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "mma"
    return "tf32" if precision == "tf32" else "fp32"


def _config(kind: str, dtype: torch.dtype) -> ContrastiveConfig:
    """The launch configuration of kernel `kind` ("fwd", "bwd") for this dtype, or
    INTERPRET_CONFIGS under the interpreter (outside
    :func:`mmkernels.triton.production_tiles`)."""
    if interpreter_tiles():
        return INTERPRET_CONFIGS[kind]
    return CONFIGS[kind][_operand_class(_precision(dtype), dtype)][0]


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_programs(device: torch.device, row_blocks: int) -> int:
    """Persistent forward programs: a few per SM on a GPU; 3 in the interpreter, so
    the tests cover programs that take several row blocks."""
    if device.type == "cuda":
        cap = PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None
                                          else torch.cuda.current_device())
    else:
        cap = 3
    return max(1, min(row_blocks, cap))


def _tf32_enabled() -> bool:
    """Whether torch's CUDA matmuls may use TF32 for float32, under either API.

    ``torch.backends.cuda.matmul.fp32_precision`` (torch >= 2.9) reports the effective
    setting whichever API set it ("tf32" also after the legacy ``allow_tf32 = True`` or
    ``set_float32_matmul_precision("high")``; "none" defers to
    ``torch.backends.fp32_precision`` and reads as that). Reading the legacy
    ``allow_tf32`` after the new API was used raises RuntimeError, so it is read only
    where the new attribute does not exist."""
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except AttributeError:  # torch without the new API
        return bool(matmul.allow_tf32)
    if precision == "none":  # inherits the global setting
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def _precision(dtype: torch.dtype) -> str:
    """float32 tiles follow torch's matmul setting (TF32 only where the user enabled it
    for eager matmuls too); fp16/bf16 always use tensor cores."""
    return "tf32" if dtype == torch.float32 and _tf32_enabled() else "ieee"


def _uses_triton(t: Tensor) -> bool:
    """The Triton kernels take fp16/bf16/fp32 on CUDA (or fp16/fp32 under the
    interpreter, whose bf16 tl.dot is wrong); float64 and plain CPU tensors take the
    tiled PyTorch path."""
    if t.device.type == "cuda":
        return t.dtype in TRITON_DTYPES
    return interpreting() and t.dtype in (torch.float16, torch.float32)


def _operand(x: Tensor) -> Tensor:
    """The features as the kernels are compiled for them (and as the kernel report
    checks them): contiguous, 16-byte aligned, the feature dim zero-padded to a multiple
    of 16 (zeros leave every dot product unchanged). Without this, an odd D or an
    unaligned view launches an unspecialised variant that spills registers."""
    D = x.shape[1]
    pad = -D % 16
    if pad == 0 and x.is_contiguous() and x.data_ptr() % 16 == 0:
        return x
    out = x.new_zeros(x.shape[0], D + pad)
    out[:, :D] = x
    return out


def _on_device(scalar: Tensor | None, like: Tensor) -> Tensor | None:
    """A one-element scale/bias where the kernels read it (a CPU scalar with CUDA
    features is copied over; the kernels never dereference a host pointer)."""
    return None if scalar is None else scalar.to(like.device).reshape(1)


def _launch_fwd(rows: Tensor, cols: Tensor, scale: Tensor, bias: Tensor | None, mode: int,
                with_cols: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    from mmkernels.triton.contrastive import _contrastive_fwd_kernel

    n, m, D = rows.shape[0], cols.shape[0], rows.shape[1]
    cfg = _config("fwd", rows.dtype)
    scale, bias = _on_device(scale, rows), _on_device(bias, rows)
    P = _num_programs(rows.device, _cdiv(n, cfg.block_m))
    row_out = torch.empty(n, dtype=torch.float32, device=rows.device)
    part_m = part_l = None
    if with_cols:  # rows padded to 16 floats: the stride the kernel report checked
        m16 = m + (-m % 16)
        part_m = torch.full((P, m16), float("-inf"), dtype=torch.float32,
                            device=rows.device)[:, :m]
        part_l = torch.zeros((P, m16), dtype=torch.float32, device=rows.device)[:, :m]
    with _guard(rows.device):
        _contrastive_fwd_kernel[(P,)](
            rows, cols, scale, bias if bias is not None else scale, row_out,
            part_m if with_cols else row_out, part_l if with_cols else row_out,
            n, m, D, rows.stride(0), cols.stride(0), part_m.stride(0) if with_cols else 0,
            MODE=mode, WITH_COLS=with_cols, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, PRECISION=_precision(rows.dtype), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
    return row_out, part_m, part_l


def _launch_bwd(rows: Tensor, cols: Tensor, scale: Tensor, bias: Tensor | None, mode: int,
                lse_a: Tensor | None, lse_b: Tensor | None, c_a: float, c_b: float,
                with_loss: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """G (n, D) fp32 = dLoss/dS @ cols for `rows` (see the kernel), and with_loss the
    (n,) row sums of the SigLIP loss and weights."""
    from mmkernels.triton.contrastive import _contrastive_bwd_kernel

    n, m, D = rows.shape[0], cols.shape[0], rows.shape[1]
    cfg = _config("bwd", rows.dtype)
    scale, bias = _on_device(scale, rows), _on_device(bias, rows)
    g = torch.zeros(n, D, dtype=torch.float32, device=rows.device)
    loss = wsum = None
    if with_loss:
        loss = torch.empty(n, dtype=torch.float32, device=rows.device)
        wsum = torch.empty(n, dtype=torch.float32, device=rows.device)
    dummy = g
    with _guard(rows.device):
        _contrastive_bwd_kernel[(_cdiv(n, cfg.block_m),)](
            rows, cols, scale, bias if bias is not None else scale,
            lse_a if lse_a is not None else dummy, lse_b if lse_b is not None else dummy, g,
            loss if with_loss else dummy, wsum if with_loss else dummy,
            n, m, D, rows.stride(0), cols.stride(0), g.stride(0), c_a, c_b,
            MODE=mode, USE_LSE_A=lse_a is not None, USE_LSE_B=lse_b is not None,
            WITH_LOSS=with_loss, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, PRECISION=_precision(rows.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return g, loss, wsum


def _triton_lse_rows_and_cols(rows: Tensor, cols: Tensor, scale: Tensor, chunk: int,
                              with_cols: bool) -> tuple[Tensor, Tensor | None]:
    """As reference.lse_rows_and_cols (``chunk`` unused: the kernels tile by their
    launch configuration)."""
    rows, cols = _operand(rows), _operand(cols)
    n, m = rows.shape[0], cols.shape[0]
    if n == 0 or m == 0:
        full = functools.partial(torch.full, dtype=torch.float32, device=rows.device)
        return full((n,), float("-inf")), (full((m,), float("-inf")) if with_cols else None)
    lse_r, part_m, part_l = _launch_fwd(rows, cols, scale, None, 0, with_cols)
    if not with_cols:
        return lse_r, None
    # merge the programs' column partials (base 2): log2 sum_p l_p 2^(m_p - top) + top,
    # with top 0 where every partial max is -inf (an all -inf column: -inf, not NaN)
    top = part_m.amax(0)
    top = top.masked_fill(top == float("-inf"), 0.0)
    lse_c = (top + torch.log2((part_l * torch.exp2(part_m - top)).sum(0))) * math.log(2.0)
    return lse_r, lse_c


def _triton_lse_backward(rows: Tensor, cols: Tensor, scale: Tensor, lse_r: Tensor,
                         lse_c: Tensor | None, w_row: float, w_col: float, chunk: int
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """As reference.lse_backward: the row gradient from one launch, the column gradient
    from the same kernel with the operands (and the two log-sum-exps) swapped."""
    D = rows.shape[1]
    rows, cols = _operand(rows), _operand(cols)
    use_c = lse_c is not None and w_col != 0
    top = max(w_row, w_col if use_c else 0.0)
    s = scale.float()
    if rows.shape[0] == 0 or cols.shape[0] == 0 or top == 0:
        return (torch.zeros(rows.shape[0], D, dtype=torch.float32, device=rows.device),
                torch.zeros(cols.shape[0], D, dtype=torch.float32, device=rows.device),
                torch.zeros((), dtype=torch.float32, device=rows.device))
    lse_cc = lse_c if use_c else None
    g_r = _launch_bwd(rows, cols, scale, None, 0, lse_r, lse_cc, w_row / top, w_col / top,
                      False)[0]
    g_c = _launch_bwd(cols, rows, scale, None, 0, lse_cc, lse_r, w_col / top, w_row / top,
                      False)[0]
    g_r, g_c = g_r[:, :D].mul_(top), g_c[:, :D].mul_(top)
    d_s = reference.ordered_sum(rows[:, :D].float() * g_r)
    return g_r * s, g_c * s, d_s


def _triton_siglip_panels(rows: Tensor, cols: Tensor, scale: Tensor, bias: Tensor, chunk: int,
                          diag_offset: int | None, grad_weight: float | None = None):
    """As reference.siglip_panels. The kernels treat every pair as a negative; the
    positives (i, i + diag_offset) are corrected here from their n dot products."""
    D = rows.shape[1]
    rows, cols = _operand(rows), _operand(cols)
    n, m = rows.shape[0], cols.shape[0]
    want = grad_weight is not None
    s = scale.float()
    zeros = functools.partial(torch.zeros, dtype=torch.float32, device=rows.device)
    if n == 0 or m == 0:
        total = zeros(())
        if not want:
            return total
        return total, zeros(n, D), zeros(m, D), zeros(()), zeros(())
    if want:
        g_r, loss, wsum = _launch_bwd(rows, cols, scale, bias, 1, None, None, 1.0, 1.0, True)
        g_c = _launch_bwd(cols, rows, scale, bias, 1, None, None, 1.0, 1.0, False)[0]
        g_r, g_c = g_r[:, :D], g_c[:, :D]
        d_b = reference.ordered_sum(wsum)
    else:
        loss = _launch_fwd(rows, cols, scale, bias, 1, False)[0]
    total = reference.ordered_sum(loss)
    if diag_offset is not None:
        i, j, d, a_i, b_j = reference.siglip_positives(rows[:, :D], cols[:, :D], scale, bias,
                                                       diag_offset)
        total = total - reference.ordered_sum(d)  # softplus(-d) - softplus(d) = -d
        if want:
            g_r.index_add_(0, i, b_j, alpha=-1.0)
            g_c.index_add_(0, j, a_i, alpha=-1.0)
            d_b = d_b - i.numel()
    if not want:
        return total
    g_r.mul_(grad_weight)
    g_c.mul_(grad_weight)
    d_s = reference.ordered_sum(rows[:, :D].float() * g_r)
    return total, g_r * s, g_c * s, d_s, d_b * grad_weight


_TRITON_PATH = types.SimpleNamespace(lse_rows_and_cols=_triton_lse_rows_and_cols,
                                     lse_backward=_triton_lse_backward,
                                     siglip_panels=_triton_siglip_panels)


class FusedCpuPasses:
    """The chunked path's panel passes as the fused C++ CPU kernels
    (csrc/contrastive/contrastive_cpu.cpp); same contract as
    reference.EagerPanelPasses."""

    @staticmethod
    def lse_panel(S, row_max, row_sum, col_max, col_sum):
        torch.ops.mmkernels.contrastive_lse_panel_(S, row_max, row_sum, col_max, col_sum)

    @staticmethod
    def grad_panel(S, row_shift, col_shift):
        torch.ops.mmkernels.contrastive_grad_panel_(S, row_shift.contiguous(), col_shift)

    @staticmethod
    def siglip_panel(L, bias, grad_weight, with_grad):
        return torch.ops.mmkernels.siglip_panel_(L, bias, grad_weight, with_grad)


# fake kernels of the C++ panel passes (they mutate their arguments in place)
if _extension.is_available():
    @torch.library.register_fake("mmkernels::contrastive_lse_panel_")
    def _(S, row_max, row_sum, col_max, col_sum):
        return None

    @torch.library.register_fake("mmkernels::contrastive_grad_panel_")
    def _(S, row_shift, col_shift):
        return None

    @torch.library.register_fake("mmkernels::siglip_panel_")
    def _(L, bias, grad_weight, with_grad):
        return L.new_empty(())


def _chunked_path(passes) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        lse_rows_and_cols=functools.partial(reference.lse_rows_and_cols, passes=passes),
        lse_backward=functools.partial(reference.lse_backward, passes=passes),
        siglip_panels=functools.partial(reference.siglip_panels, passes=passes))


_CPU_PATH = _chunked_path(FusedCpuPasses())
_EAGER_PATH = _chunked_path(reference.EAGER_PASSES)


def _path(t: Tensor):
    """The implementation for these features, all with the same three functions: the
    Triton kernels (CUDA fp16/bf16/fp32, or the interpreter), the chunked path with the
    fused C++ panel passes (CPU), or the chunked path with eager passes (float64 on a GPU,
    a build without the extension, or MMKERNELS_BACKEND=reference)."""
    if _extension.backend_override() == "reference":
        return _EAGER_PATH
    if _uses_triton(t):
        return _TRITON_PATH
    if t.device.type == "cpu" and _extension.has_kernel("contrastive_lse_panel_", "cpu"):
        return _CPU_PATH
    return _EAGER_PATH


# ---------------------------------------------------------------------------------
# collectives
# ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Dist:
    """Where a loss is computed: ``world == 1`` is one process (no collective at all);
    otherwise ``rank`` of ``world`` in ``group``, with every rank's local batch size."""
    group: object = None
    world: int = 1
    rank: int = 0
    sizes: tuple[int, ...] = ()


_LOCAL = _Dist()


def _group_info(process_group) -> tuple[object, int, int]:
    """(group, world size, rank): the given group, else the initialised default group,
    else one process."""
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None, 1, 0
        process_group = dist.group.WORLD
    return process_group, dist.get_world_size(process_group), dist.get_rank(process_group)


def _local_sizes(x: Tensor, group, world: int, rank: int,
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


def _info_nce_value(image: Tensor, text: Tensor, scale: Tensor, lse_i: Tensor,
                    lse_t: Tensor) -> Tensor:
    """(sum lse_i + sum lse_t) / (2B) - s * sum_i I_i . T_i / B, in the LSEs' dtype."""
    B, acc = image.shape[0], lse_i.dtype
    pos = reference.ordered_sum(image.to(acc) * text.to(acc))
    lse = reference.ordered_sum(lse_i) + reference.ordered_sum(lse_t)
    return lse / (2 * B) - scale.to(acc) * pos / B


def _add_positive_grads(image: Tensor, text: Tensor, scale: Tensor, d_i: Tensor, d_t: Tensor,
                        d_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Add the gradients of -s * sum_i I_i . T_i / B to the log-sum-exp gradients."""
    B, acc = image.shape[0], d_i.dtype
    s = scale.to(acc)
    return (d_i - s * text.to(acc) / B, d_t - s * image.to(acc) / B,
            d_s - reference.ordered_sum(image.to(acc) * text.to(acc)) / B)


class _InfoNCEDistributed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, chunk, where: _Dist):
        D = image.shape[1]
        # one collective for both: rank r's block is [image_r | text_r]
        both = _gather_rows(torch.cat([image.detach(), text.detach()], 1), where.sizes,
                            where.group)
        all_i, all_t = both[:, :D], both[:, D:]
        group, sizes, rank = where.group, where.sizes, where.rank
        lse_i, _ = _path(image).lse_rows_and_cols(image, all_t, scale, chunk, with_cols=False)
        lse_t, _ = _path(image).lse_rows_and_cols(text, all_i, scale, chunk, with_cols=False)
        loss = _info_nce_value(image, text, scale, lse_i, lse_t)
        ctx.save_for_backward(image, text, scale, lse_i, lse_t, all_i, all_t)
        ctx.meta = (chunk, group, sum(sizes[:rank]))
        return loss.to(image.dtype)

    @staticmethod
    def backward(ctx, grad):
        image, text, scale, lse_i, lse_t, all_i, all_t = ctx.saved_tensors
        chunk, group, offset = ctx.meta
        B = image.shape[0]
        acc = lse_i.dtype
        w = 1.0 / (2 * B)
        g = grad.to(acc)
        d_i, d_all_t, ds1 = _path(image).lse_backward(image, all_t, scale, lse_i, None, w, 0.0, chunk)
        d_t, d_all_i, ds2 = _path(image).lse_backward(text, all_i, scale, lse_t, None, w, 0.0, chunk)
        d_i, d_t, d_s = _add_positive_grads(image, text, scale, d_i, d_t, ds1 + ds2)
        d_i, d_t, d_s = g * d_i, g * d_t, g * d_s
        # gradients for every rank's features (this rank's columns), summed over ranks
        cols = torch.cat([d_all_i, d_all_t]).mul_(g)
        dist.all_reduce(cols, group=group)
        N = all_i.shape[0]
        d_i += cols[offset:offset + B]
        d_t += cols[N + offset:N + offset + B]
        return (d_i.to(image.dtype), d_t.to(text.dtype),
                d_s.to(scale.dtype).reshape(scale.shape), None, None)


class _SigLIPDistributed(torch.autograd.Function):
    """open_clip SigLipLoss across ranks: local images against every global text, the
    positives at this rank's own block; divided by the local batch. Gradients come from
    the forward's panels (see _siglip_fwd); the text gradients of the other
    ranks' blocks are summed across ranks in the backward."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, chunk, where: _Dist):
        group, sizes, rank = where.group, where.sizes, where.rank
        all_t = _gather_rows(text.detach(), sizes, group)
        offset = sum(sizes[:rank])
        B = image.shape[0]
        total, d_i, d_all_t, d_s, d_b = _path(image).siglip_panels(
            image, all_t, scale, bias, chunk, offset, grad_weight=1.0 / B)
        ctx.save_for_backward(d_i, d_all_t, d_s, d_b)
        ctx.meta = (group, offset, B, image.dtype, scale.shape, bias.shape)
        return (total / B).to(image.dtype)

    @staticmethod
    def backward(ctx, grad):
        d_i, d_all_t, d_s, d_b = ctx.saved_tensors
        group, offset, B, dtype, s_shape, b_shape = ctx.meta
        g = grad.to(d_i.dtype)
        cols = (d_all_t * g).contiguous()
        dist.all_reduce(cols, group=group)
        return ((g * d_i).to(dtype), cols[offset:offset + B].to(dtype),
                (g * d_s).to(dtype).reshape(s_shape), (g * d_b).to(dtype).reshape(b_shape),
                None, None)


# ---------------------------------------------------------------------------------
# single-process ops (torch.library: fake kernels, autograd, opcheck-clean)
# ---------------------------------------------------------------------------------


@torch.library.custom_op("mmkernels::info_nce_fwd", mutates_args=())
def _info_nce_fwd(image: Tensor, text: Tensor, scale: Tensor, chunk: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """loss (scalar, image's dtype), lse_row (B,), lse_col (B,) (float32 or float64)."""
    lse_r, lse_c = _path(image).lse_rows_and_cols(image, text, scale, chunk, with_cols=True)
    return _info_nce_value(image, text, scale, lse_r, lse_c).to(image.dtype), lse_r, lse_c


@_info_nce_fwd.register_fake
def _(image, text, scale, chunk):
    acc = torch.float64 if image.dtype == torch.float64 else torch.float32
    B = image.shape[0]
    return image.new_empty(()), image.new_empty((B,), dtype=acc), image.new_empty((B,), dtype=acc)


@torch.library.custom_op("mmkernels::info_nce_bwd", mutates_args=())
def _info_nce_bwd(grad: Tensor, image: Tensor, text: Tensor, scale: Tensor, lse_r: Tensor,
                  lse_c: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    B = image.shape[0]
    w = 1.0 / (2 * B)
    d_i, d_t, d_s = _add_positive_grads(
        image, text, scale, *_path(image).lse_backward(image, text, scale, lse_r, lse_c, w, w, chunk))
    g = grad.to(lse_r.dtype)
    return (g * d_i).to(image.dtype), (g * d_t).to(text.dtype), (g * d_s).to(scale.dtype)


@_info_nce_bwd.register_fake
def _(grad, image, text, scale, lse_r, lse_c, chunk):
    # the real op returns contiguous gradients whatever the features' layout
    return image.new_empty(image.shape), text.new_empty(text.shape), scale.new_empty(())


def _info_nce_setup(ctx, inputs, output):
    image, text, scale, chunk = inputs
    _, lse_r, lse_c = output
    ctx.save_for_backward(image, text, scale, lse_r, lse_c)
    ctx.chunk = chunk
    ctx.mark_non_differentiable(lse_r, lse_c)


def _info_nce_backward(ctx, grad, _g_r, _g_c):
    image, text, scale, lse_r, lse_c = ctx.saved_tensors
    d_i, d_t, d_s = _info_nce_bwd(grad, image, text, scale, lse_r, lse_c, ctx.chunk)
    return d_i, d_t, d_s, None


_info_nce_fwd.register_autograd(_info_nce_backward, setup_context=_info_nce_setup)


@torch.library.custom_op("mmkernels::sigmoid_contrastive_fwd", mutates_args=())
def _siglip_fwd(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, chunk: int,
                with_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """loss, and (with_grad) the gradients of the loss w.r.t. image, text, scale, bias from
    the same panels (each element's gradient depends on its own logit only); without
    with_grad the four are empty."""
    B = image.shape[0]
    if with_grad:
        total, d_i, d_t, d_s, d_b = _path(image).siglip_panels(image, text, scale, bias, chunk, 0,
                                                            grad_weight=1.0 / B)
        return ((total / B).to(image.dtype), d_i.to(image.dtype), d_t.to(text.dtype),
                d_s.to(scale.dtype), d_b.to(bias.dtype))
    total = _path(image).siglip_panels(image, text, scale, bias, chunk, 0)
    return ((total / B).to(image.dtype), image.new_empty((0, image.shape[1])),
            text.new_empty((0, text.shape[1])), scale.new_empty(()), bias.new_empty(()))


@_siglip_fwd.register_fake
def _(image, text, scale, bias, chunk, with_grad):
    if with_grad:
        return (image.new_empty(()), image.new_empty(image.shape), text.new_empty(text.shape),
                scale.new_empty(()), bias.new_empty(()))
    return (image.new_empty(()), image.new_empty((0, image.shape[1])),
            text.new_empty((0, text.shape[1])), scale.new_empty(()), bias.new_empty(()))


def _siglip_setup(ctx, inputs, output):
    _, d_i, d_t, d_s, d_b = output
    ctx.save_for_backward(d_i, d_t, d_s, d_b)
    ctx.with_grad = inputs[5]
    ctx.mark_non_differentiable(d_i, d_t, d_s, d_b)


def _siglip_backward(ctx, grad, *_):
    if not ctx.with_grad:
        raise RuntimeError("sigmoid_contrastive: the forward ran without gradients "
                           "(with_grad=False); call it with grad enabled to backpropagate")
    d_i, d_t, d_s, d_b = ctx.saved_tensors
    return grad * d_i, grad * d_t, grad * d_s, grad * d_b, None, None


_siglip_fwd.register_autograd(_siglip_backward, setup_context=_siglip_setup)


# ---------------------------------------------------------------------------------
# functional API
# ---------------------------------------------------------------------------------


#: the largest feature dim the ops accept (the kernel report checks the kernels to it)
MAX_FEATURE_DIM = 4096


def _check(image_features, text_features, logit_scale, logit_bias=None, check_bias=False):
    """Validate the inputs; every error names the argument at fault."""
    for t, n in ((image_features, "image_features"), (text_features, "text_features")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{n} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{n} must be (B, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{n} must be floating point, got {t.dtype}")
    (B, D), (B_t, D_t) = image_features.shape, text_features.shape
    if B_t != B:
        raise ValueError(f"text_features has {B_t} rows but image_features has {B}: the same "
                         "(B, D) is needed, text i being image i's pair")
    if D_t != D:
        raise ValueError(f"text_features has feature dim {D_t} but image_features has {D}: "
                         "the same (B, D) is needed")
    if text_features.dtype != image_features.dtype:
        raise TypeError(f"text_features is {text_features.dtype} but image_features is "
                        f"{image_features.dtype}: they must share a dtype")
    if text_features.device != image_features.device:
        raise ValueError(f"text_features is on {text_features.device} but image_features on "
                         f"{image_features.device}: they must be on one device")
    if B == 0:
        raise ValueError("image_features and text_features must hold at least one pair "
                         "(B >= 1); the mean over an empty batch is undefined")
    if D > MAX_FEATURE_DIM:
        raise ValueError(f"image_features: the feature dim must be <= {MAX_FEATURE_DIM}, got {D}")
    scalars = [(logit_scale, "logit_scale")] + ([(logit_bias, "logit_bias")] if check_bias else [])
    for t, n in scalars:
        if not isinstance(t, Tensor):
            raise TypeError(f"{n} must be a Tensor (a scalar parameter), got {type(t).__name__}")
        if t.numel() != 1:
            raise ValueError(f"{n} must be a scalar (one element), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{n} must be floating point, got {t.dtype}")
        if t.device != image_features.device and t.device.type != "cpu":
            raise ValueError(f"{n} is on {t.device}: it must be on the features' device "
                             f"({image_features.device}) or the CPU")


def _chunk(chunk_size, cols):
    if chunk_size is None:
        return reference.default_chunk(cols)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def _distribution(x: Tensor, group, world: int, rank: int, local_batch_sizes) -> _Dist:
    if world <= 1:
        if local_batch_sizes is not None and tuple(local_batch_sizes) != (x.shape[0],):
            raise ValueError(f"local_batch_sizes {local_batch_sizes!r} does not match one "
                             f"process with {x.shape[0]} rows")
        return _LOCAL
    return _Dist(group, world, rank, _local_sizes(x, group, world, rank, local_batch_sizes))


def _info_nce_on(image_features, text_features, logit_scale, chunk_size, group, world, rank,
                 local_batch_sizes=None) -> Tensor:
    """info_nce on an explicit (group, world, rank); world 1: local, no collective."""
    _check(image_features, text_features, logit_scale)
    where = _distribution(image_features, group, world, rank, local_batch_sizes)
    scale = logit_scale.reshape(())
    if where.world > 1:
        chunk = _chunk(chunk_size, sum(where.sizes))
        return _InfoNCEDistributed.apply(image_features, text_features, scale, chunk, where)
    chunk = _chunk(chunk_size, image_features.shape[0])
    return _info_nce_fwd(image_features, text_features, scale, chunk)[0]


def _sigmoid_contrastive_on(image_features, text_features, logit_scale, logit_bias, chunk_size,
                            group, world, rank, local_batch_sizes=None) -> Tensor:
    """sigmoid_contrastive on an explicit (group, world, rank); world 1: local."""
    _check(image_features, text_features, logit_scale, logit_bias, check_bias=logit_bias is not None)
    where = _distribution(image_features, group, world, rank, local_batch_sizes)
    scale = logit_scale.reshape(())
    if logit_bias is None:  # open_clip adds no bias: the same as a constant 0
        bias = torch.zeros((), dtype=logit_scale.dtype, device=logit_scale.device)
    else:
        bias = logit_bias.reshape(())
    if where.world > 1:
        chunk = _chunk(chunk_size, sum(where.sizes))
        return _SigLIPDistributed.apply(image_features, text_features, scale, bias, chunk, where)
    chunk = _chunk(chunk_size, image_features.shape[0])
    with_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (image_features, text_features, scale, bias))
    return _siglip_fwd(image_features, text_features, scale, bias, chunk, with_grad)[0]


def info_nce(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, *,
             chunk_size: int | None = None, process_group=None,
             local_batch_sizes=None) -> Tensor:
    """CLIP's symmetric InfoNCE without the B x B logits.

    ``(CE(s I T^T, arange) + CE(s T I^T, arange)) / 2`` with ``s = logit_scale`` already
    exponentiated, as open_clip's ClipLoss. Features are used as given (normalise them
    first, as CLIP does).

    Args:
        image_features, text_features: (B, D), one float dtype, any strides, B >= 1,
            D <= 4096.
        logit_scale: a one-element floating-point tensor (shape () or (1,) ...), on the
            features' device or the CPU; it receives a gradient.
        chunk_size: rows per similarity tile on the chunked (CPU / float64) path; tiles
            are (chunk_size x 1024), default chunk_size 1024 (4 MiB float32 tiles). The
            Triton kernels tile by their launch configuration instead.
        process_group: distributed group (default: the initialised world, if any, with
            world size > 1). Each rank passes its local features; the value and the
            gradients equal open_clip ``ClipLoss(local_loss=True, gather_with_grad=True)``.
            (``mmkernels.nn.ClipLoss`` goes distributed only when given world_size > 1.)
        local_batch_sizes: distributed only: every rank's local batch, the same list on
            every rank, for uneven batches. Default: the local batches are equal (as
            open_clip requires); CPU features check that with one tiny host-side
            collective, GPU features are not checked (a check would cost a host sync per
            call; TORCH_DISTRIBUTED_DEBUG=DETAIL makes torch check every collective).

    Returns:
        The scalar loss (features' dtype; accumulation in float32, or float64 for
        float64). Memory: O(B * D) plus one similarity tile per step (on a GPU also
        the forward's (2 x SMs, B) column partials); never B x B.
        NaN features give a NaN loss (never a silent number); an all -inf row or
        column of logits has log-sum-exp -inf, as torch.logsumexp.
    """
    group, world, rank = _group_info(process_group)
    return _info_nce_on(image_features, text_features, logit_scale, chunk_size, group, world,
                        rank, local_batch_sizes)


def sigmoid_contrastive(image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                        logit_bias: Tensor | None, *, chunk_size: int | None = None,
                        process_group=None, local_batch_sizes=None) -> Tensor:
    """SigLIP's sigmoid loss without the B x B logits.

    ``-sum_ij logsigmoid(z_ij (s I_i . T_j + b)) / B`` with z = +1 on the diagonal and -1
    elsewhere, normalised as open_clip's SigLipLoss. Distributed: each rank's local images
    against every global text (positives in its own block), divided by the local batch,
    as SigLipLoss with world_size > 1 (whose neighbour exchange passes gradients back the
    same way). Args as :func:`info_nce`, plus ``logit_bias`` (one element, gets a gradient;
    None adds no bias, as open_clip).
    """
    group, world, rank = _group_info(process_group)
    return _sigmoid_contrastive_on(image_features, text_features, logit_scale, logit_bias,
                                   chunk_size, group, world, rank, local_batch_sizes)


# ---------------------------------------------------------------------------------
# static report
# ---------------------------------------------------------------------------------


def contrastive_spec(kernel, cfg: ContrastiveConfig, dtype: str, precision: str,
                     consts: dict, tag: str, batch16: bool = False) -> KernelSpec:
    """A KernelSpec specialised as every real launch is (see _operand): pointers, row
    strides and D 16-divisible; scale/bias/statistics fp32. batch16: the batch sizes
    are multiples of 16 as well (Triton specialises those launches separately)."""
    import inspect

    names = list(inspect.signature(kernel.fn).parameters)
    consts = dict(consts, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  PRECISION=precision)
    if "BLOCK_D" in names:
        consts["BLOCK_D"] = cfg.block_d
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = f"*{dtype}" if n in ("a_ptr", "b_ptr") else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in ("c_a", "c_b"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if n == "D" or n.startswith("stride_") or (batch16 and n in ("n_rows", "n_cols")):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return KernelSpec(kernel.fn.__name__, kernel, sig, consts,
                      {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
                      f"{tag} {dtype}{'' if dtype != 'fp32' else '/' + precision} {cfg}"
                      f"{' B%16' if batch16 else ''}",
                      needs_mma=precision != "ieee" or dtype != "fp32", attrs=attrs)


def kernel_specs() -> list[KernelSpec]:
    """The forward (InfoNCE with and without the column statistics, SigLIP) and the
    heaviest backward variants (InfoNCE with both log-sum-exps, SigLIP with the loss;
    the others drop code from these), for bf16, fp16, fp32 with TF32 and fp32 exact
    (no tensor cores), any batch and batches that are multiples of 16, in every
    configuration of the tables."""
    from mmkernels.triton.contrastive import _contrastive_bwd_kernel, _contrastive_fwd_kernel

    variants = {
        _contrastive_fwd_kernel: [("infonce+cols", dict(MODE=0, WITH_COLS=True)),
                                  ("infonce", dict(MODE=0, WITH_COLS=False)),
                                  ("siglip", dict(MODE=1, WITH_COLS=False))],
        _contrastive_bwd_kernel: [("infonce", dict(MODE=0, USE_LSE_A=True, USE_LSE_B=True,
                                                   WITH_LOSS=False)),
                                  ("siglip+loss", dict(MODE=1, USE_LSE_A=False,
                                                       USE_LSE_B=False, WITH_LOSS=True))],
    }
    dtypes = {"mma": (("bf16", "ieee"), ("fp16", "ieee")), "tf32": (("fp32", "tf32"),),
              "fp32": (("fp32", "ieee"),)}
    specs = []
    for kernel, kind in ((_contrastive_fwd_kernel, "fwd"), (_contrastive_bwd_kernel, "bwd")):
        for operands, cfgs in CONFIGS[kind].items():
            for cfg in cfgs:
                for tag, consts in variants[kernel]:
                    for dtype, precision in dtypes[operands]:
                        for batch16 in (False, True):
                            specs.append(contrastive_spec(kernel, cfg, dtype, precision, consts,
                                                          tag, batch16))
    return specs
