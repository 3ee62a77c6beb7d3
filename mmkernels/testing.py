"""Shared test and correctness-report helpers: the tolerance table and the
low-precision comparison rule. Used by tests/ and by ``python -m mmkernels.bench``.

Rule (flash-attn's): every kernel is compared with the float64 eager reference.
  * float64 / float32: ``|out - ref| <= atol + rtol * |ref|`` with the table below.
  * float16 / bfloat16: the kernel's max error may be at most ``LOWP_FACTOR`` times
    the max error of the eager reference run in that dtype, plus the error of
    rounding the exact answer to that dtype once (a kernel cannot beat that).
Two implementations of the same math (ours against open_clip, one mode or world size
against another, one summation order against another) are compared with a named entry
of ``COMPARISONS`` instead: ``assert_close_to_reference(a, b, tol="name")``.
These tables are the only place tolerances live; never loosen an entry to pass a test.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: (atol, rtol) against the float64 reference, per dtype of the kernel's inputs.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
}

#: Named (atol, rtol) for comparing two implementations of the same math (in float64
#: when both are float32/float64), each with the reason for its value. Measured errors
#: are the worst seen over the tests that use the entry.
COMPARISONS: dict[str, tuple[float, float]] = {
    # float64, ours against open_clip (or its per-rank emulation across gloo ranks): the
    # same sums in another order; measured <= 5e-15 on O(1) losses and gradients.
    "float64_vs_open_clip": (1e-12, 1e-12),
    # float64, mode="ring" against mode="all_gather" on every rank: blocks accumulated
    # in ring order instead of all at once, so again accumulation order alone; measured
    # <= 1.8e-15 on 2-4 ranks.
    "float64_ring_vs_all_gather": (1e-12, 1e-12),
    # float64, one of our ops by two of its paths (region_features against
    # roi_align(...).mean, the reference backend, profiles against dense sampling, CUDA
    # against CPU): the same math summed in another order; measured <= 1.2e-15.
    "float64_reordered": (1e-12, 1e-12),
    # float64, RoIAlign / MultiScaleRoIAlign against torchvision: the same bilinear taps
    # summed in another order; measured <= 2.3e-16.
    "float64_vs_torchvision": (1e-12, 1e-12),
    # float32, the same op with its sums in another order (weight panels split, strided
    # features, torch.compile, ring against all_gather, open_clip or torchvision in
    # float32): a few ulps; measured at most 0.21 of the tolerance (9.5e-7, ring against
    # all_gather on 3 ranks).
    "float32_reordered": (1e-6, 1e-6),
    # float32, a module or whole model through our kernels against the same one eager in
    # float32 (Hugging Face towers, BiAttention; also packed against one sample at a time,
    # cached decoding against a full forward): a few ulps per layer, compounded over the
    # layers; measured 2.3e-6 (0.11 of the tolerance).
    "float32_fused_vs_eager": (1e-5, 1e-5),
    # the scalar loss of those models: measured 4.8e-7 on a loss of 1.7 (0.18).
    "float32_fused_vs_eager_loss": (1e-6, 1e-6),
    # their input and parameter gradients (one step, also under DDP): sums over the
    # batch and positions of the output errors; measured at most 0.18 of the tolerance
    # (CLIP under DDP; BiAttention: 0.13 here, 0.64 of (1e-6, 1e-4), too close to share
    # the entry below).
    "float32_fused_vs_eager_grads": (1e-5, 1e-4),
    # ViLBERT patched and compiled (aot_eager) against eager, one step's parameter
    # gradients: measured 1.8e-7 (0.08 of the tolerance).
    "float32_compiled_vs_eager_grads": (1e-6, 1e-4),
    # float32 parameter gradients of a loss split over 2 gloo ranks (averaged) against
    # the single-process global batch: another reduction order across ranks as well;
    # measured 4.8e-6 (0.16 of the tolerance).
    "float32_distributed_vs_single_grads": (1e-5, 1e-4),
    # float32, the Triton kernels on a GPU against the chunked CPU path: two
    # implementations, each within a few ulps of a loss of log(B) ~ 4.6. Unmeasured
    # without a GPU: the value the cuda test had.
    "float32_cuda_vs_cpu": (1e-5, 1e-5),
    # the CPU weight passes' exp() against float64 exp of the same rounded arguments:
    # the output's rounding (0.5 ulp) plus the vectorised exp's error (a few ulps).
    # atol: both passes floor exp() near e^-80..e^-87 (no subnormals); weights below
    # 1e-25 are invisible next to each row's largest weight (>= e^-5 in the test).
    "exp_float32": (1e-25, 4e-7),
    "exp_float64": (1e-25, 1e-12),
}

#: float16/bfloat16 kernels may err at most this many times eager PyTorch in that dtype.
LOWP_FACTOR = 2.0

LOWP_DTYPES = (torch.float16, torch.bfloat16)


def max_error(a: Tensor, b: Tensor) -> float:
    """max |a - b| in float64 (NaNs compare equal when both are NaN)."""
    a, b = a.detach().double(), b.detach().double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    d = (a - b).abs().masked_fill(both_nan, 0.0)
    if d.numel() == 0:
        return 0.0
    if torch.isnan(d).any():
        return float("inf")
    return float(d.max())


def assert_close_to_reference(out: Tensor, ref64: Tensor, *, eager_lowp: Tensor | None = None,
                              what: str = "output", tol: str | None = None) -> None:
    """Check ``out`` (any float dtype) against the float64 reference ``ref64``.

    For float16/bfloat16 ``out``, ``eager_lowp`` is the eager reference computed in
    that dtype, which sets the error budget.

    With ``tol`` (a key of ``COMPARISONS``), ``ref64`` is another implementation's
    result (float32 or float64) and that entry replaces the per-dtype one.
    """
    if out.shape != ref64.shape:
        raise AssertionError(f"{what}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}")
    if tol is not None:
        if out.dtype in LOWP_DTYPES or ref64.dtype in LOWP_DTYPES:
            raise ValueError(f"tol={tol!r} compares float32/float64 results, got {out.dtype} "
                             f"and {ref64.dtype}")
        atol, rtol = COMPARISONS[tol]
    elif out.dtype in LOWP_DTYPES:
        if eager_lowp is None:
            raise ValueError("eager_lowp is required for float16/bfloat16 outputs")
        err = max_error(out, ref64)
        eager_err = max_error(eager_lowp, ref64)
        ref64 = ref64.detach()
        finite = ref64[torch.isfinite(ref64)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        rounding = torch.finfo(out.dtype).eps / 2 * scale
        budget = LOWP_FACTOR * eager_err + rounding
        if not err <= budget:
            raise AssertionError(
                f"{what} ({out.dtype}): max error {err:.3e} exceeds {LOWP_FACTOR} x eager "
                f"{out.dtype} error {eager_err:.3e} + rounding {rounding:.3e}")
        return
    else:
        atol, rtol = TOLERANCES[out.dtype]
    torch.testing.assert_close(out.double(), ref64.double(), atol=atol, rtol=rtol,
                               equal_nan=True, msg=lambda m: f"{what} ({out.dtype}): {m}")


#: Eager vs patched training (the convergence tests): the loss at every step within
#: ``loss_rtol`` relative, every final parameter within ``param_atol``, and the two
#: trained models' held-out logits within ``logits_atol`` + ``logits_rtol`` * |eager|
#: (the parameters may differ by ``param_atol``, so their logits may too). All fp32.
CONVERGENCE = {"loss_rtol": 1e-5, "param_atol": 1e-4, "logits_atol": 1e-4, "logits_rtol": 1e-4}
