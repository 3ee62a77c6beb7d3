"""Launching the contrastive kernels (mmkernels/triton/contrastive.py): launch
configurations, the Triton path of the chunked interface (``lse_rows_and_cols``,
``lse_grads``, ``siglip_panels``, as mmkernels.reference), and the kernel specs of the
static report. Imports nothing from mmkernels.ops.

Gradients are computed by row panels (:func:`panel_gradients`): the weights kernel
recomputes each similarity tile once and writes the panel's weights W (R x m) once, in
the operands' dtype; two cuBLAS GEMMs then give G_rows = W @ cols for the panel's rows
and G_cols += W^T @ rows. So the gradients cost three GEMM passes over n x m x D, and
the only B x B traffic is one write and two reads of W in the compute dtype. R is the
largest multiple of the tile height whose panel fits :data:`PANEL_BYTES` (all rows when
n * m * itemsize does): memory stays bounded, and with several panels G_cols is
accumulated in float32 (n / R round trips of an (m, D) buffer, 2 * D / R of W's
traffic: 19% at R = 8192, D = 768).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import Tensor

from mmkernels import reference
from mmkernels.triton import (
    KernelSpec,
    cdiv,
    cuda_sm_count,
    device_guard,
    interpreter_tiles,
    interpreting,
)


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    block_m: int
    block_n: int
    block_k: int      # feature-dim slice of the similarity tiles
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return (f"M{self.block_m}-N{self.block_n}-K{self.block_k}-w{self.num_warps}"
                f"-s{self.num_stages}")


_CC = ContrastiveConfig
# Launch configurations per kernel and operand class, best first: "mma" for fp16/bf16
# on tensor cores, "tf32" for fp32 with TF32 enabled, "fp32" for exact fp32 (FMA dot
# products, which need smaller tiles). Each entry was compiled for sm_80 and sm_90 in
# every mode and dtype of its class, for any batch and for batches that are multiples
# of 16, and kept only without spills; `python -m mmkernels.tools.kernel_report
# --only contrastive` re-checks them.
CONFIGS: dict[str, dict[str, list[ContrastiveConfig]]] = {
    "fwd": {"mma": [_CC(128, 64, 32, 8, 2)],  # 128 x 128 spills on sm_90 (fp16)
            "tf32": [_CC(64, 128, 64, 8, 2)],
            "fp32": [_CC(64, 32, 32, 4, 1)]},  # 64 x 64 spills on sm_90 (SigLIP)
    "weights": {"mma": [_CC(128, 64, 32, 8, 2)],  # 128 x 128 spills in SigLIP
                "tf32": [_CC(64, 128, 64, 8, 2)],
                "fp32": [_CC(64, 32, 32, 4, 1)]},  # 64 x 64 spills on sm_90 (SigLIP)
}
INTERPRET_CONFIGS = {"fwd": _CC(16, 16, 32, 4, 1), "weights": _CC(16, 16, 32, 4, 1)}
#: persistent forward programs per SM (the column partials take P x m floats, P = this
#: times the SM count)
PROGRAMS_PER_SM = 2
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: the largest weight panel (bytes) of the gradient GEMMs: 1 GiB, 8192 rows of bf16
#: weights at B = 65536
PANEL_BYTES = 1 << 30
#: the stored weights are scaled by a power of two that brings their largest possible
#: magnitude to at most this: weights of order 1 / B stay normal in fp16 up to
#: B = 2^23, and the fp16 GEMM outputs (at most 2 x this x max |feature|) cannot
#: overflow for features below 16 in magnitude
WEIGHT_TARGET = 2.0 ** 10


def _operand_class(precision: str, dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "mma"
    return "tf32" if precision == "tf32" else "fp32"


def config(kind: str, dtype: torch.dtype) -> ContrastiveConfig:
    """The launch configuration of kernel `kind` ("fwd", "weights") for this dtype, or
    INTERPRET_CONFIGS under the interpreter (outside
    :func:`mmkernels.triton.production_tiles`)."""
    if interpreter_tiles():
        return INTERPRET_CONFIGS[kind]
    return CONFIGS[kind][_operand_class(precision(dtype), dtype)][0]




def _num_programs(device: torch.device, row_blocks: int) -> int:
    """Persistent forward programs: a few per SM on a GPU; 3 in the interpreter, so
    the tests cover programs that take several row blocks."""
    if device.type == "cuda":
        cap = PROGRAMS_PER_SM * cuda_sm_count(device)
    else:
        cap = 3
    return max(1, min(row_blocks, cap))


def tf32_enabled() -> bool:
    """Whether torch's CUDA matmuls may use TF32 for float32, under either API.

    ``torch.backends.cuda.matmul.fp32_precision`` (torch >= 2.9) reports the effective
    setting whichever API set it ("tf32" also after the legacy ``allow_tf32 = True`` or
    ``set_float32_matmul_precision("high")``; "none" defers to
    ``torch.backends.fp32_precision`` and reads as that). Reading the legacy
    ``allow_tf32`` after the new API was used raises RuntimeError, so it is read only
    where the new attribute does not exist."""
    matmul = torch.backends.cuda.matmul
    try:
        prec = matmul.fp32_precision
    except AttributeError:  # torch without the new API
        return bool(matmul.allow_tf32)
    if prec == "none":  # inherits the global setting
        prec = getattr(torch.backends, "fp32_precision", "none")
    return prec == "tf32"


def precision(dtype: torch.dtype) -> str:
    """float32 tiles follow torch's matmul setting (TF32 only where the user enabled it
    for eager matmuls too); fp16/bf16 always use tensor cores."""
    return "tf32" if dtype == torch.float32 and tf32_enabled() else "ieee"


def uses_triton(t: Tensor) -> bool:
    """The Triton kernels take fp16/bf16/fp32 on CUDA (or fp16/fp32 under the
    interpreter, whose bf16 tl.dot is wrong); float64 and plain CPU tensors take the
    tiled PyTorch path."""
    if t.device.type == "cuda":
        return t.dtype in TRITON_DTYPES
    return interpreting() and t.dtype in (torch.float16, torch.float32)


def operand(x: Tensor) -> Tensor:
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


def launch_fwd(rows: Tensor, cols: Tensor, scale: Tensor, bias: Tensor | None, mode: int,
               with_cols: bool, pos_offset: int | None
               ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(row_out, part_m, part_l, pos): see _contrastive_fwd_kernel; pos only for InfoNCE
    with a pos_offset."""
    from mmkernels.triton.contrastive import _contrastive_fwd_kernel

    n, m, D = rows.shape[0], cols.shape[0], rows.shape[1]
    cfg = config("fwd", rows.dtype)
    scale, bias = _on_device(scale, rows), _on_device(bias, rows)
    P = _num_programs(rows.device, cdiv(n, cfg.block_m))
    f32 = dict(dtype=torch.float32, device=rows.device)
    row_out = torch.empty(n, **f32)
    part_m = part_l = pos = None
    if with_cols:  # rows padded to 16 floats: the stride the kernel report checked
        m16 = m + (-m % 16)
        part_m = torch.full((P, m16), float("-inf"), **f32)[:, :m]
        part_l = torch.zeros((P, m16), **f32)[:, :m]
    if mode == 0 and pos_offset is not None:
        pos = torch.empty(n, **f32)
    with device_guard(rows.device):
        _contrastive_fwd_kernel[(P,)](
            rows, cols, scale, bias if bias is not None else scale, row_out,
            part_m if with_cols else row_out, part_l if with_cols else row_out,
            pos if pos is not None else row_out, n, m, D, rows.stride(0), cols.stride(0),
            part_m.stride(0) if with_cols else 0, pos_offset or 0,
            MODE=mode, WITH_COLS=with_cols, POSITIVES=pos_offset is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            PRECISION=precision(rows.dtype), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
    return row_out, part_m, part_l, pos


def panel_rows(n: int, m: int, itemsize: int, block_m: int) -> int:
    """Rows per weight panel: all n when the n x m panel fits PANEL_BYTES, else the
    largest multiple of block_m that does (at least one tile)."""
    if n * m * itemsize <= PANEL_BYTES:
        return n
    return max(block_m, PANEL_BYTES // (m * itemsize) // block_m * block_m)


def weight_multiplier(bound: float) -> float:
    """The power of two that brings weights of magnitude <= bound to <= WEIGHT_TARGET."""
    return 2.0 ** math.floor(math.log2(WEIGHT_TARGET / bound))


def panel_gradients(rows: Tensor, cols: Tensor, scale: Tensor, bias: Tensor | None, mode: int,
                    lse_a: Tensor | None, lse_b: Tensor | None, coef_a: Tensor | None,
                    coef_b: Tensor | None, pos_w: Tensor | None, coef: float,
                    pos_offset: int | None, bound: float
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, float]:
    """(G_rows (n, D) rows' dtype, G_cols (m, D) rows' dtype, or float32 with several
    panels, stats (3, n) float32, col_stats (m,) float32 or None, w_mult): G = w_mult *
    (W @ cols, W^T @ rows) with W the weights of _contrastive_weights_kernel (|W| <=
    bound), stats the row sums of W_row * (rows . cols) (InfoNCE; W for SigLIP), of the
    loss and of W, col_stats (InfoNCE with lse_b) the column sums of the column term
    times (rows . cols). rows/cols as :func:`operand` returns them; lse_*, coef_*, pos_w
    float32 vectors (n,) / (m,)."""
    from mmkernels.triton.contrastive import _contrastive_weights_kernel

    n, m, D = rows.shape[0], cols.shape[0], rows.shape[1]
    cfg = config("weights", rows.dtype)
    scale, bias = _on_device(scale, rows), _on_device(bias, rows)
    w_mult = weight_multiplier(bound)
    R = panel_rows(n, m, rows.element_size(), cfg.block_m)
    m16 = m + (-m % 16)  # the panel's row stride, 16-element aligned as the report checks
    buf = rows.new_empty(min(R, n) * m16)
    g_rows = rows.new_empty(n, D)
    g_cols = None
    n_cb = cdiv(m, cfg.block_n)
    stats = torch.empty(3, n, dtype=torch.float32, device=rows.device)
    col_stats = None if lse_b is None else torch.zeros(m, dtype=torch.float32,
                                                       device=rows.device)
    dummy = stats
    for r0 in range(0, n, R):
        k = min(n, r0 + R) - r0
        w = buf[:k * m16].view(k, m16)[:, :m]
        part = torch.empty(3, n_cb, k, dtype=torch.float32, device=rows.device)
        n_rb = cdiv(k, cfg.block_m)
        part_c = (torch.empty(n_rb, m16, dtype=torch.float32, device=rows.device)[:, :m]
                  if lse_b is not None else dummy)

        def rows_of(t, r0=r0, k=k):
            return t[r0:r0 + k] if t is not None else dummy

        with device_guard(rows.device):
            _contrastive_weights_kernel[(n_rb, n_cb)](
                rows[r0:r0 + k], cols, scale, bias if bias is not None else scale,
                rows_of(lse_a), lse_b if lse_b is not None else dummy, rows_of(coef_a),
                coef_b if coef_b is not None else dummy, rows_of(pos_w), w, part, part_c,
                k, m, D, rows.stride(0), cols.stride(0), m16, k,
                part_c.stride(0) if lse_b is not None else 0, coef, w_mult,
                (pos_offset or 0) + r0,
                MODE=mode, USE_LSE_A=lse_a is not None, USE_LSE_B=lse_b is not None,
                POSITIVES=pos_offset is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                BLOCK_K=cfg.block_k, PRECISION=precision(rows.dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        stats[:, r0:r0 + k] = part.sum(1)
        if col_stats is not None:
            col_stats += part_c.sum(0)
        torch.mm(w, cols, out=g_rows[r0:r0 + k])
        contrib = torch.mm(w.T, rows[r0:r0 + k])
        if R >= n:
            g_cols = contrib
        elif g_cols is None:
            g_cols = contrib.float()
        else:
            g_cols += contrib
    return g_rows, g_cols, stats, col_stats, w_mult


# ---------------------------------------------------------------------------------
# the chunked interface (as mmkernels.reference) on the kernels
# ---------------------------------------------------------------------------------


def lse_rows_and_cols(rows: Tensor, cols: Tensor, scale: Tensor, chunk: int, with_cols: bool,
                      pos_offset: int | None = None):
    """As reference.lse_rows_and_cols (``chunk`` unused: the kernels tile by their
    launch configuration): (lse_r, lse_c, pos, neg_r, neg_c), pos the positives' dot
    products from the same tiles, neg_* the negatives' log-sum-exps (the kernel keeps
    the positives out of its sums and adds them back here)."""
    rows, cols = operand(rows), operand(cols)
    n, m = rows.shape[0], cols.shape[0]
    if n == 0 or m == 0:
        full = functools.partial(torch.full, dtype=torch.float32, device=rows.device)
        lse_c = full((m,), float("-inf")) if with_cols else None
        if pos_offset is None:
            return full((n,), float("-inf")), lse_c, None, None, None
        return full((n,), float("-inf")), lse_c, full((n,), 0.0), full((n,), float("-inf")), lse_c
    neg_r, part_m, part_l, pos = launch_fwd(rows, cols, scale, None, 0, with_cols, pos_offset)
    neg_c = None
    if with_cols:
        # merge the programs' column partials (base 2): log2 sum_p l_p 2^(m_p - top) +
        # top, with top 0 where every partial max is -inf (an all -inf column: -inf)
        top = part_m.amax(0)
        top = top.masked_fill(top == float("-inf"), 0.0)
        neg_c = (top + torch.log2((part_l * torch.exp2(part_m - top)).sum(0))) * math.log(2.0)
    if pos_offset is None:
        return neg_r, neg_c, None, None, None
    lse_r, lse_c = reference.add_positives(scale, neg_r, neg_c, pos, pos_offset, m)
    return lse_r, lse_c, pos, neg_r, neg_c


def lse_grads(rows: Tensor, cols: Tensor, scale: Tensor, grad: Tensor, lse_r: Tensor | None,
              lse_c: Tensor | None, coef_r, coef_c, pos_w: Tensor | None,
              pos_offset: int | None, chunk: int, bound: float, col_stats: bool = False):
    """As reference.lse_grads, on the weights kernel and two cuBLAS GEMMs (three GEMM
    passes). ``bound``: the largest |W|. The gradients are in the features' dtype
    (d_cols float32 with several panels), the scale's float32."""
    D = rows.shape[1]
    s = scale.float()
    rows, cols = operand(rows), operand(cols)
    n, m = rows.shape[0], cols.shape[0]
    if n == 0 or m == 0:
        z = torch.zeros((), dtype=torch.float32, device=rows.device)
        return (rows.new_zeros(n, D), cols.new_zeros(m, D), z,
                torch.zeros(m, dtype=torch.float32, device=rows.device) if col_stats else None)

    def vec(c, k):
        if c is None or isinstance(c, Tensor):
            return None if c is None else c.float().contiguous()
        return torch.full((k,), float(c), dtype=torch.float32, device=rows.device)

    def f32(t):
        return None if t is None else t.float().contiguous()

    g_r, g_c, stats, c_stats, w_mult = panel_gradients(
        rows, cols, scale, None, 0, f32(lse_r) if coef_r is not None else None,
        f32(lse_c) if coef_c is not None else None, vec(coef_r, n), vec(coef_c, m), f32(pos_w),
        0.0, pos_offset, bound)
    post = s * grad.float() / w_mult
    g = grad.float()
    d_s = reference.ordered_sum(stats[0]) * g
    if c_stats is not None and not col_stats:
        d_s = d_s + reference.ordered_sum(c_stats) * g
    return (g_r[:, :D] * post, g_c[:, :D] * post, d_s,
            c_stats * g if col_stats and c_stats is not None else None)


def siglip_panels(rows: Tensor, cols: Tensor, scale: Tensor, bias: Tensor, chunk: int,
                  diag_offset: int | None, grad_weight: float | None = None):
    """As reference.siglip_panels: the loss from the forward kernel (one pass), or with
    grad_weight the loss and the gradients from the weights kernel and two GEMMs (three
    passes); the gradients are G * post (G in the features' dtype, post a float32
    scalar tensor) so that the caller scales them once."""
    D = rows.shape[1]
    rows, cols = operand(rows), operand(cols)
    n, m = rows.shape[0], cols.shape[0]
    zeros = functools.partial(torch.zeros, dtype=torch.float32, device=rows.device)
    if grad_weight is None:
        if n == 0 or m == 0:
            return zeros(())
        loss = launch_fwd(rows, cols, scale, bias, 1, False, diag_offset)[0]
        return reference.ordered_sum(loss)
    if n == 0 or m == 0:
        return (zeros(()), rows.new_zeros(n, D), cols.new_zeros(m, D), zeros(()), zeros(()),
                zeros(()))
    g_r, g_c, stats, _, w_mult = panel_gradients(rows, cols, scale, bias, 1, None, None, None,
                                                 None, None, grad_weight, diag_offset,
                                                 abs(grad_weight))
    total, d_s, d_b = (reference.ordered_sum(stats[k]) for k in (1, 0, 2))
    if g_r.shape[1] != D:  # the padded feature dim: dense (n, D) factors, as the fake
        g_r, g_c = g_r[:, :D].contiguous(), g_c[:, :D].contiguous()
    return total, g_r, g_c, scale.float() / w_mult, d_s, d_b


# ---------------------------------------------------------------------------------
# static report
# ---------------------------------------------------------------------------------


def contrastive_spec(kernel, cfg: ContrastiveConfig, dtype: str, prec: str, consts: dict,
                     tag: str, batch16: bool = False) -> KernelSpec:
    """A KernelSpec specialised as every real launch is (see operand): pointers, row
    strides and D 16-divisible; scale/bias/statistics fp32. batch16: the batch sizes
    are multiples of 16 as well (Triton specialises those launches separately)."""
    import inspect

    names = list(inspect.signature(kernel.fn).parameters)
    consts = dict(consts, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  PRECISION=prec)
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = f"*{dtype}" if n in ("a_ptr", "b_ptr", "w_ptr") else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in ("coef", "w_mult"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if (n == "D" or n.startswith("stride_")
                    or (batch16 and n in ("n_rows", "n_cols"))):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return KernelSpec(kernel.fn.__name__, kernel, sig, consts,
                      {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
                      f"{tag} {dtype}{'' if dtype != 'fp32' else '/' + prec} {cfg}"
                      f"{' B%16' if batch16 else ''}",
                      needs_mma=prec != "ieee" or dtype != "fp32", attrs=attrs)


#: the variants the report compiles per kernel: (tag, constexprs). The others drop code
#: from these.
VARIANTS = {
    "fwd": [("infonce+cols+pos", dict(MODE=0, WITH_COLS=True, POSITIVES=True)),
            ("infonce", dict(MODE=0, WITH_COLS=False, POSITIVES=False)),
            ("siglip+pos", dict(MODE=1, WITH_COLS=False, POSITIVES=True))],
    "weights": [("infonce", dict(MODE=0, USE_LSE_A=True, USE_LSE_B=True, POSITIVES=True)),
                ("siglip", dict(MODE=1, USE_LSE_A=False, USE_LSE_B=False, POSITIVES=True))],
}


def kernel_specs() -> list[KernelSpec]:
    """The forward and weights kernels' variants (:data:`VARIANTS`) for bf16, fp16,
    fp32 with TF32 and fp32 exact (no tensor cores), any batch and batches that are
    multiples of 16, in every configuration of the tables."""
    from mmkernels.triton.contrastive import _contrastive_fwd_kernel, _contrastive_weights_kernel

    kernels = {"fwd": _contrastive_fwd_kernel, "weights": _contrastive_weights_kernel}
    dtypes = {"mma": (("bf16", "ieee"), ("fp16", "ieee")), "tf32": (("fp32", "tf32"),),
              "fp32": (("fp32", "ieee"),)}
    specs = []
    for kind, kernel in kernels.items():
        for operands, cfgs in CONFIGS[kind].items():
            for cfg in cfgs:
                for tag, consts in VARIANTS[kind]:
                    for dtype, prec in dtypes[operands]:
                        for batch16 in (False, True):
                            specs.append(contrastive_spec(kernel, cfg, dtype, prec, consts,
                                                          tag, batch16))
    return specs
