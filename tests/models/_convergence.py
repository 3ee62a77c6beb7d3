"""Shared checks for the model tests: eager vs patched training (Liger-Kernel style),
patch/unpatch round trips, and the DDP comparison (2 gloo processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from mmkernels.models import patch, unpatch
from mmkernels.models.training import (
    eager_and_patched,
    max_parameter_difference,
    max_relative_difference,
    train,
)
from mmkernels.testing import CONVERGENCE, assert_close_to_reference

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DDP_WORKER = os.path.join(os.path.dirname(__file__), "_ddp_worker.py")


def executed_ops(fn: Callable[[], object]) -> set[str]:
    """Names of the profiler events recorded while ``fn()`` runs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def check_convergence(make_model: Callable[[], nn.Module], make_batch: Callable[[int], object],
                      loss_fn: Callable[[nn.Module, object], torch.Tensor],
                      logits_fn: Callable[[nn.Module, object], torch.Tensor], heldout: object,
                      expect_ops: Iterable[str], *, steps: int = 20, lr: float = 1e-3,
                      apply: Callable[[nn.Module], object] = patch) -> dict:
    """Train eager then patched for ``steps`` identical steps and check the
    CONVERGENCE table; the patched run must execute every op in ``expect_ops``
    (profiler names such as ``mmkernels::varlen_attention_fwd``). ``apply`` patches the
    copy in place (default :func:`mmkernels.models.patch`; the Hugging Face tests pass
    ``apply_to_clip`` / ``apply_to_llava``). Returns the figures."""
    eager, fused = eager_and_patched(make_model, apply)
    run_e = train(eager, make_batch, loss_fn, steps, lr)
    ran: dict = {}

    def patched_run():
        ran["run"] = train(fused, make_batch, loss_fn, steps, lr)

    names = executed_ops(patched_run)
    run_f = ran["run"]
    missing = sorted(op for op in expect_ops if op not in names)
    assert not missing, f"the patched run did not execute {missing}"
    leaked = sorted(n for n in names if n.startswith("mmkernels::"))
    rel = max_relative_difference(run_e.losses, run_f.losses)
    assert rel <= CONVERGENCE["loss_rtol"], (
        f"loss differs by {rel:.3e} relative (eager {run_e.losses}, patched {run_f.losses})")
    dparam = max_parameter_difference(eager, fused)
    assert dparam <= CONVERGENCE["param_atol"], f"parameters differ by {dparam:.3e}"
    eager.eval()
    fused.eval()
    with torch.no_grad():
        le, lf = logits_fn(eager, heldout), logits_fn(fused, heldout)
    torch.testing.assert_close(lf, le, atol=CONVERGENCE["logits_atol"],
                               rtol=CONVERGENCE["logits_rtol"])
    assert run_e.losses[-1] < run_e.losses[0], f"eager training did not learn: {run_e.losses}"
    log = os.environ.get("MMKERNELS_CONVERGENCE_LOG")
    if log:  # the figures of every convergence test, one JSON line each (closing notes)
        with open(log, "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "?"),
                                "loss_rel": rel, "param_abs": dparam, "ops": leaked}) + "\n")
    return {"loss_rel": rel, "param_abs": dparam, "ops": leaked,
            "losses": (run_e.losses, run_f.losses)}


def check_round_trip(model: nn.Module, run: Callable[[nn.Module], torch.Tensor],
                     apply: Callable[[nn.Module], list] = patch,
                     undo: Callable[[nn.Module], list] = unpatch) -> None:
    """patch then unpatch (or ``apply`` then ``undo``, each returning records with a
    ``name``) leaves a model that behaves bit-identically (forward and gradients), with
    the same parameter objects, module classes and state_dict."""
    params = [id(p) for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    torch.manual_seed(0)
    before, grads_before = _out_and_grads(model, run)
    replaced = apply(model)
    assert replaced, f"{apply.__name__}() replaced nothing"
    assert [id(p) for p in model.parameters()] == params
    assert model.state_dict().keys() == state.keys()
    restored = undo(model)
    assert sorted(r.name for r in restored) == sorted(r.name for r in replaced)
    assert [type(m) for m in model.modules()] == classes
    torch.manual_seed(0)
    after, grads_after = _out_and_grads(model, run)
    assert torch.equal(before, after)
    for a, b in zip(grads_before, grads_after, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def _out_and_grads(model, run):
    model.zero_grad(set_to_none=True)
    out = run(model)
    out.sum().backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out.detach().clone(), grads


def run_ranks(worker: str, world: int, args: list[str], tmp_path, timeout: float = 600
              ) -> list[dict]:
    """Run ``worker`` (a script: argv rank, world, port, *args) as ``world`` gloo
    processes on a free local port; each saves ``tmp_path/rank{r}.pt``, returned in
    rank order. A rank that fails fails the test with its output."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests"),
                                                       os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, worker, str(r), str(world), str(port), *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"rank {r} failed:\n{out}"
    return [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(world)]


def ddp_gradients(case: str, tmp_path, world: int = 2, timeout: float = 600) -> list[dict]:
    """Run ``case`` ("path/to/file.py:function", a function returning
    ``(make_model, make_batch(rank), loss_fn)``) under DDP on ``world`` gloo processes,
    eager and patched. Returns, per rank, {"eager": {name: grad}, "patched": {...},
    "loss": {"eager": float, "patched": float}}."""
    return run_ranks(DDP_WORKER, world, [case, str(tmp_path)], tmp_path, timeout)


def check_ddp(case: str, tmp_path, world: int = 2) -> float:
    """The patched model's DDP step gives the eager model's DDP gradients on every rank
    (within the CONVERGENCE parameter tolerance, relative to the gradient's scale).
    Returns the largest difference."""
    worst = 0.0
    for r, res in enumerate(ddp_gradients(case, tmp_path, world)):
        e, f = res["eager"], res["patched"]
        assert e.keys() == f.keys()
        assert abs(res["loss"]["eager"] - res["loss"]["patched"]) <= (
            CONVERGENCE["loss_rtol"] * abs(res["loss"]["eager"]))
        for n in e:
            assert_close_to_reference(f[n], e[n], tol="float32_fused_vs_eager_grads",
                                      what=f"rank {r} grad {n}")
            worst = max(worst, float((f[n] - e[n]).abs().max()))
    return worst
