"""The distributed ring mode against the all_gather mode (gloo, 2, 3 and 4 ranks, uneven
batches), the precision rules of the low-precision weights, and autocast."""

import os
import subprocess
import sys

import pytest
import torch

import mmkernels
from mmkernels import reference
from mmkernels.ops import contrastive as ops
from mmkernels.testing import assert_close_to_reference
from mmkernels.triton import contrastive_launch as launch
from mmkernels.triton import interpreting, production_tiles

WORKER = os.path.join(os.path.dirname(__file__), "_dist_worker.py")


def _env(dtype) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(mmkernels.__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    if dtype == torch.float64:
        env.pop("TRITON_INTERPRET", None)
    return env


def _unit(n, d, dtype=torch.float64):
    return torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)


@pytest.mark.parametrize("local_sizes,dtype", [
    pytest.param([12, 5], torch.float64, id="2-ranks-uneven"),
    pytest.param([7, 12, 4], torch.float64, id="3-ranks-uneven"),
    pytest.param([6, 9, 3, 8], torch.float64, id="4-ranks-uneven"),
    # float32: the Triton kernels in every rank (under the interpreter without a GPU)
    pytest.param([9, 14, 5], torch.float32, id="3-ranks-uneven-float32-triton"),
])
def test_ring_equals_all_gather_gloo(tmp_path, local_sizes, dtype):
    """mode="ring" (blocks passed by isend/irecv, accumulators travelling with them)
    gives the all_gather mode's loss and gradients on every rank, with and without
    gradients."""
    torch.manual_seed(len(local_sizes))
    world, N, D = len(local_sizes), sum(local_sizes), 20
    bounds = [0]
    for n in local_sizes:
        bounds.append(bounds[-1] + n)
    data = dict(image=_unit(N, D, dtype), text=_unit(N, D, dtype),
                scale=torch.tensor(9.0, dtype=dtype), bias=torch.tensor(-3.0, dtype=dtype),
                bounds=bounds, chunk=4)
    torch.save(data, tmp_path / "data.pt")
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), str(world), str(tmp_path / "init"),
                               str(tmp_path / "data.pt"), str(tmp_path), "modes"],
                              env=_env(dtype), stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errs)
    for r in range(world):
        res = torch.load(tmp_path / f"rank{r}.pt")
        for kind in ("clip", "siglip"):
            ring, ag = res[f"ring-{kind}"], res[f"all_gather-{kind}"]
            for key in ("loss", "no_grad", "image", "text", "scale", "bias"):
                if ag[key] is None:
                    assert ring[key] is None
                    continue
                tol = ("float64_ring_vs_all_gather" if dtype == torch.float64
                       else "float32_reordered")
                assert_close_to_reference(ring[key], ag[key], tol=tol,
                                          what=f"rank {r} {kind} {key}")


def test_bad_mode_raises():
    img, txt = _unit(4, 8), _unit(4, 8)
    with pytest.raises(ValueError, match="mode"):
        mmkernels.info_nce(img, txt, torch.tensor(1.0), mode="tree")
    with pytest.raises(ValueError, match="mode"):
        mmkernels.sigmoid_contrastive(img, txt, torch.tensor(1.0), None, mode="ring ")
    for mode in ("tree", None, 1):  # the modules check it at construction
        with pytest.raises(ValueError, match="mode"):
            mmkernels.nn.ClipLoss(mode=mode)
        with pytest.raises(ValueError, match="mode"):
            mmkernels.nn.SigLipLoss(mode=mode)
    assert "mode='ring'" in repr(mmkernels.nn.ClipLoss(mode="ring"))
    # one process: mode changes nothing
    s = torch.tensor(5.0)
    for mode in ("all_gather", "ring"):
        assert mmkernels.nn.ClipLoss(mode=mode)(img, txt, s) == mmkernels.info_nce(img, txt, s)
        assert (mmkernels.nn.SigLipLoss(mode=mode)(img, txt, s, None)
                == mmkernels.sigmoid_contrastive(img, txt, s, None))


# ---------------------------------------------------------------------------------
# precision of the fp16 weights (the Triton path, under the interpreter on CPU)
# ---------------------------------------------------------------------------------

needs_triton = pytest.mark.skipif(not interpreting(), reason="the Triton path on CPU tensors "
                                  "needs TRITON_INTERPRET=1 (the GPU: the cuda tests)")


def _converged(B, D, scale):
    """Features whose positive pairs dominate: P_ii ~ 0.999 at this scale."""
    img = _unit(B, D)
    txt = torch.nn.functional.normalize(img + 0.05 * torch.randn(B, D, dtype=torch.float64), dim=1)
    return img, txt, torch.tensor(scale, dtype=torch.float64)


def _grads(fn, *xs):
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    fn(*leaves).backward()
    return [x.grad for x in leaves]


@needs_triton
def test_positive_subtracted_before_rounding():
    """Near convergence P_ii - 1 cancels. Here (B=64, D=32, s=40) 1 - P_ii ~ 1e-8, far
    below the float32 rounding of a log-sum-exp of ~40 (4e-6): forming P_ii - 1 from
    the log-sum-exp, even in float32 before the fp16 rounding, gave d_image errors of
    8.9e-7 against a true gradient of at most 6.6e-8 (eager fp16 rounds it to zero: error
    6.6e-8). The forward now sums the negatives apart (the positive stays out of both
    directions' sums), so 1 - P_ii = exp(neg - lse) keeps its relative accuracy, and
    the positive's weight -(1 - P_ii + 1 - Q_ii) / 2B comes from it: measured 3.0e-8."""
    B, D = 64, 32
    torch.manual_seed(0)
    img, txt, s = _converged(B, D, 40.0)
    g64 = _grads(reference.info_nce, img, txt, s)
    eager = _grads(reference.info_nce, img.half(), txt.half(), s.half())
    g16 = _grads(mmkernels.info_nce, img.half(), txt.half(), s.float())
    for a, r, e in zip(g16[:2], g64[:2], eager[:2]):
        assert_close_to_reference(a, r, eager_lowp=e, what="grad")


def _weight_panel(monkeypatch, img, txt, s):
    """The fp16 weight panel the weights kernel stores (the first operand of the first
    gradient GEMM), and the multiplier it was stored with."""
    seen, real_mm = [], torch.mm

    def spy(a, b, **kw):
        if a.dtype == torch.float16 and not seen:
            seen.append(a.clone())
        return real_mm(a, b, **kw)

    monkeypatch.setattr(torch, "mm", spy)
    _grads(mmkernels.info_nce, img.half(), txt.half(), s.float())
    monkeypatch.setattr(torch, "mm", real_mm)
    return seen[0].double() / launch.weight_multiplier(1.0 / img.shape[0])


@needs_triton
def test_fp16_weights_are_not_subnormal(monkeypatch):
    """The loss weights (P / 2B, of order 1 / (2 B^2)) are subnormal in fp16 for any
    B > 90; the kernels store them times a power of two (WEIGHT_TARGET / bound).

    The gradients' max error cannot show it (the earlier version of this test): at
    B=300 it is set by the largest gradient elements, rounded to fp16 twice (the GEMM's
    output and the final cast, 6.3e-5 = 1 ulp of 0.06), which the multiplier does not
    change; the subnormal weights' error (a quantum of 6e-8 on weights of 5e-6) only
    reaches the small elements. So this checks the stored weights themselves against
    the float64 weights of the same fp16 features: within one fp16 ulp, relative, with
    the multiplier; more than ten ulps off with it forced to 1 (measured at B=200: 4.8e-4,
    half an ulp, against 1.0, weights flushed to zero). The gradients still meet the
    tolerance rule."""
    B, D = 200, 16
    torch.manual_seed(1)
    img, txt, s = _unit(B, D), _unit(B, D), torch.tensor(20.0, dtype=torch.float64)
    i16, t16 = img.half().double(), txt.half().double()
    S = float(s) * i16 @ t16.T
    exact = (S.softmax(1) + S.softmax(0)) / (2 * B) - torch.eye(B, dtype=torch.float64) / B
    # every weight that the scaled fp16 panel can hold as a normal number (the tails of
    # the softmax, below 2^-14 / multiplier, are zero or subnormal either way)
    big = exact.abs() * launch.weight_multiplier(1.0 / B) >= 2.0 ** -14

    def rel(w):
        return float(((w - exact).abs() / exact.abs())[big].max())

    eps = torch.finfo(torch.float16).eps
    scaled = rel(_weight_panel(monkeypatch, img, txt, s))
    assert launch.weight_multiplier(1.0 / B) * (1.0 / (2 * B * B)) >= 2.0 ** -14
    assert scaled <= eps
    monkeypatch.setattr(launch, "weight_multiplier", lambda bound: 1.0)
    unscaled = rel(_weight_panel(monkeypatch, img, txt, s))
    assert unscaled > 10 * eps
    monkeypatch.undo()
    g64 = _grads(reference.info_nce, img, txt, s)[0]
    eager = _grads(reference.info_nce, img.half(), txt.half(), s.half())[0]
    g16 = _grads(mmkernels.info_nce, img.half(), txt.half(), s.float())[0]
    assert_close_to_reference(g16, g64, eager_lowp=eager, what="d image")


def test_weight_multiplier_is_a_power_of_two_within_the_target():
    for bound in (1.0, 1 / 3, 1 / 65536, 1 / 1e7, 2.0):
        m = launch.weight_multiplier(bound)
        assert m == 2.0 ** round(torch.log2(torch.tensor(m)).item())
        assert m * bound <= launch.WEIGHT_TARGET < 2 * m * bound


@needs_triton
def test_several_weight_panels(monkeypatch):
    """Panels smaller than the batch (the dT accumulation across panels) give the one
    panel results."""
    B, D = 70, 24
    torch.manual_seed(2)
    img, txt = _unit(B, D, torch.float32), _unit(B, D, torch.float32)
    s, b = torch.tensor(8.0), torch.tensor(-2.0)
    one = [_grads(mmkernels.info_nce, img, txt, s),
           _grads(mmkernels.sigmoid_contrastive, img, txt, s, b)]
    monkeypatch.setattr(launch, "PANEL_BYTES", 20 * B * 4)  # 16-row panels
    assert launch.panel_rows(B, B, 4, 16) == 16
    many = [_grads(mmkernels.info_nce, img, txt, s),
            _grads(mmkernels.sigmoid_contrastive, img, txt, s, b)]
    for a, c in zip(one, many):
        for x, y in zip(a, c):
            assert_close_to_reference(y, x, tol="float32_reordered", what="grad")


# ---------------------------------------------------------------------------------
# autocast
# ---------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("kind", ["info_nce", "sigmoid"])
def test_autocast_takes_the_tensor_core_kernels(kind, monkeypatch):
    """Under torch.autocast(float16) with float32 features, the ops run the fp16
    (tensor-core class) launch configuration, return a float32 loss and float32
    gradients for the float32 leaves, and match open_clip under the same autocast
    within the fp16 tolerance rule."""
    import open_clip

    B, D = 40, 32
    torch.manual_seed(3)
    img, txt = _unit(B, D), _unit(B, D)
    s, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)
    seen = []
    real = launch.config
    monkeypatch.setattr(launch, "config", lambda k, dt: seen.append((k, dt)) or real(k, dt))
    ours = mmkernels.info_nce if kind == "info_nce" else mmkernels.sigmoid_contrastive
    theirs = open_clip.ClipLoss() if kind == "info_nce" else open_clip.loss.SigLipLoss()
    extra = () if kind == "info_nce" else (b,)
    leaves = [x.float().requires_grad_() for x in (img, txt, s, *extra)]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = ours(*leaves)
    loss.backward()
    assert loss.dtype == torch.float32
    assert all(x.grad.dtype == torch.float32 for x in leaves)
    assert seen and all(dt == torch.float16 for _, dt in seen), seen
    assert {k for k, _ in seen} == {"fwd", "weights"} if kind == "info_nce" else {"weights"}
    ref = [x.detach().clone().requires_grad_() for x in (img, txt, s, *extra)]
    exact = theirs(*ref)
    exact.backward()
    lp = [x.float().detach().requires_grad_() for x in (img, txt, s, *extra)]
    with torch.autocast("cpu", dtype=torch.float16):
        eager = theirs(*lp)
    eager.backward()
    assert_close_to_reference(loss.half(), exact, eager_lowp=eager.half(), what="loss")
    for a, e, r in zip(leaves, lp, ref):
        assert_close_to_reference(a.grad.half(), r.grad, eager_lowp=e.grad.half(),
                                  what="grad")


@pytest.mark.slow
def test_autocast_kernels_use_tensor_cores_in_the_report(tmp_path):
    """The kernel report's specs of the configurations autocast selects (float16 and
    bfloat16 features: the "mma" class) compile for sm_80 and sm_90 with HMMA / HGMMA
    instructions and without spills. Compiled by the report in a subprocess with
    TRITON_INTERPRET=0: this session runs Triton's interpreter, which cannot compile
    ahead of time."""
    import json
    import re

    from mmkernels.tools import kernel_report

    try:
        kernel_report.find_tool("cuobjdump")
    except FileNotFoundError:
        pytest.skip("cuobjdump not available")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img = ops._autocast_features(_unit(4, 16, torch.float32), _unit(4, 16, torch.float32))[0]
    assert img.dtype == torch.bfloat16  # the features the kernels see under autocast
    with production_tiles():
        cfgs = {k: {launch.config(k, dt) for dt in (torch.float16, torch.bfloat16)}
                for k in ("fwd", "weights")}
    assert all(len(c) == 1 for c in cfgs.values())  # one "mma" config per kernel
    # the InfoNCE forward in fp16 and the SigLIP weights in bf16: both kernels, both
    # dtypes, both losses
    only = "|".join(f"^{re.escape(f'{name} {tag} {dt} {cfg}')}$" for name, tag, dt, cfg in (
        ("_contrastive_fwd_kernel", "infonce+cols+pos", "fp16", *cfgs["fwd"]),
        ("_contrastive_weights_kernel", "siglip", "bf16", *cfgs["weights"])))
    path = tmp_path / "report.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    subprocess.run([sys.executable, "-m", "mmkernels.tools.kernel_report", "--no-extension",
                    "--only", only, "--jobs", "1", "--json", str(path)], check=True, env=env,
                   capture_output=True)
    reports = json.loads(path.read_text())
    assert sorted((r["name"], r["arch"]) for r in reports) == [
        ("_contrastive_fwd_kernel", 80), ("_contrastive_fwd_kernel", 90),
        ("_contrastive_weights_kernel", 80), ("_contrastive_weights_kernel", 90)]
    for r in reports:
        assert r["needs_mma"] and r["mma"] > 0, r
        assert r["local"] == 0 and r["stack"] == 0, r


# ---------------------------------------------------------------------------------
# GPU: production tiles at B >= 8192 (several row blocks per persistent program)
# ---------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["info_nce", "sigmoid"])
def test_cuda_production_tiles_large_batch(kind, dtype):
    B, D = 8192 + 77, 768
    torch.manual_seed(4)
    img, txt = (_unit(B, D).cuda() for _ in range(2))
    s, b = torch.tensor(30.0, dtype=torch.float64, device="cuda"), torch.tensor(
        -8.0, dtype=torch.float64, device="cuda")
    ours = mmkernels.info_nce if kind == "info_nce" else mmkernels.sigmoid_contrastive
    ref = reference.info_nce if kind == "info_nce" else reference.sigmoid_contrastive
    extra = () if kind == "info_nce" else (b,)
    g64 = _grads(ref, img, txt, s, *extra)
    glp = _grads(ref, img.to(dtype), txt.to(dtype), s.to(dtype), *(e.to(dtype) for e in extra))
    got = _grads(ours, img.to(dtype), txt.to(dtype), s.float(), *(e.float() for e in extra))
    for a, r, e in zip(got[:2], g64[:2], glp[:2]):
        assert_close_to_reference(a, r, eager_lowp=e, what="grad")


@pytest.mark.cuda
def test_cuda_memory_of_one_process_is_linear_in_batch():
    """Peak memory beyond the inputs: O(B D) + the forward's partials + one weight
    panel (capped at PANEL_BYTES), never B x B."""
    B, D = 16384, 256
    img, txt = (_unit(B, D, torch.bfloat16).cuda().requires_grad_() for _ in range(2))
    s = torch.tensor(10.0, device="cuda", requires_grad=True)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    mmkernels.info_nce(img, txt, s).backward()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= min(B * B * 2, launch.PANEL_BYTES) + 16 * B * D * 2 + (1 << 24), extra


