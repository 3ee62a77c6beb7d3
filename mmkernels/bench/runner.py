"""The measuring part of the main job: the correctness gate, then the timings and peak
memory of every case, then the fitted scaling exponents.

Order, for each suite: every op's check runs once against the float64 reference at a
small size (:class:`mmkernels.bench.suites.Check`, compared with
:func:`mmkernels.testing.assert_close_to_reference`); a provider that fails it, or
raises, is reported FAILED and is not timed in any case of that op. Then each case
is timed for every provider and mode that passed, side by side in one run, and its
peak memory is measured once per provider.
"""

from __future__ import annotations

import dataclasses
import math
import traceback

import torch

from mmkernels.bench import harness
from mmkernels.bench.suites import Case, Suite
from mmkernels.testing import LOWP_DTYPES, assert_close_to_reference, max_error


@dataclasses.dataclass
class Options:
    policy: harness.Policy
    measure_memory: bool = True
    ceilings: harness.Ceilings | None = None  # a GPU's measured roofline
    judge: bool = True  # False (--quick): targets and expected exponents are not judged


def subject(case: Case) -> str:
    """The provider the case is about: the first one (mmkernels, or the patched model)."""
    return next(iter(case.providers))


def count_steps(suite: Suite, measure_memory: bool) -> int:
    """Checks, timed (provider, mode) pairs and memory runs of ``suite``."""
    n = sum(1 for c in suite.cases if c.check is not None)
    for c in suite.cases:
        n += sum(1 for m in c.modes for p in c.providers if c.runs(p, m))
        if measure_memory:
            n += sum(1 for p in c.providers if c.runs(p, c.memory_mode))
    return n


def gate(case: Case) -> dict[str, dict]:
    """Run ``case.check`` once: {provider: {"max_error", "pass", "message"}}."""
    try:
        check = case.check()
    except Exception as e:  # the check runs every provider: any one may raise
        msg = f"check raised {type(e).__name__}: {e}".splitlines()[0][:300]
        return {p: {"max_error": None, "pass": False, "message": msg} for p in case.providers}
    base = check.outputs.get(case.baseline)
    out = {}
    for prov in case.providers:
        if prov not in check.outputs:
            out[prov] = {"max_error": None, "pass": None, "message": "not checked"}
            continue
        y = check.outputs[prov]
        res = {"max_error": max_error(y, check.reference) if y.shape == check.reference.shape
               else None, "pass": True, "message": ""}
        try:
            assert_close_to_reference(y, check.reference,
                                      eager_lowp=base if y.dtype in LOWP_DTYPES else None,
                                      what=f"{case.op}/{prov}")
        except (AssertionError, ValueError) as e:
            res["pass"] = False
            res["message"] = str(e).splitlines()[0][:300]
        out[prov] = res
    return out


def _memory_call(case: Case, run, inputs):
    def call():
        if case.memory_mode == "forward":
            with torch.no_grad():
                return run(*inputs)
        out = run(*inputs)
        out.backward(torch.ones_like(out))
        return None
    return call


def run_case(case: Case, device: torch.device, opts: Options, failed: set[str], progress,
             label: str) -> dict:
    """Time every (provider, mode) of ``case`` whose provider is not in ``failed``."""
    timings: dict[tuple[str, str], harness.Timing] = {}
    errors: dict[str, str] = {}
    for mode in case.modes:
        for prov, fn in case.providers.items():
            if not case.runs(prov, mode):
                continue
            progress.step(f"{label} | {prov} | {mode}")
            if prov not in failed and prov not in errors:
                try:
                    timings[(prov, mode)] = opts.policy.time(
                        harness.mode_fn(case.make_inputs, fn, mode), device,
                        warmup=case.warmup, repeats=case.repeats)
                except Exception as e:  # reported in the table, the run goes on
                    errors[prov] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                    traceback.print_exc()
            progress.advance()
    rows = []
    for mode in case.modes:
        base = timings.get((case.baseline, mode))
        for prov in case.providers:
            if not case.runs(prov, mode):
                continue
            t = timings.get((prov, mode))
            if t is None:
                status = "FAILED" if prov in failed else f"ERROR {errors.get(prov, '')}"
                rows.append({"mode": mode, "provider": prov, "status": status})
                continue
            target = case.targets.get((prov, mode)) if opts.judge else None
            speedup = None if base is None else base.median_ms / t.median_ms
            row = {"mode": mode, "provider": prov, "status": "ok", "median_ms": t.median_ms,
                   "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "speedup_vs_baseline": speedup,
                   "target": target,
                   "pass": None if target is None or speedup is None else speedup >= target}
            if opts.ceilings is not None and mode == "forward":
                row.update(harness.roofline(t.median_ms, case.flops, case.bytes_moved,
                                            opts.ceilings))
            rows.append(row)
    memory = {}
    if opts.measure_memory:
        for prov, run in case.providers.items():
            if not case.runs(prov, case.memory_mode):
                continue
            progress.step(f"{label} | {prov} | peak memory")
            if prov not in failed and prov not in errors:
                call = _memory_call(case, run, case.make_inputs())
                memory[prov] = (harness.peak_memory_cuda(call) if device.type == "cuda"
                                else harness.peak_memory_cpu(call))
            progress.advance()
    return {"case": case.name, "op": case.op, "size": case.size,
            "description": case.description, "baseline": case.baseline,
            "subject": subject(case), "rows": rows, "peak_memory_bytes": memory,
            "memory_mode": case.memory_mode,
            "memory_ratios": memory_ratios(case, memory, opts.judge),
            "speedups": speedups(case, timings)}


def speedups(case: Case, timings: dict[tuple[str, str], harness.Timing]) -> dict:
    """{mode: {baseline: baseline time / subject time}} against every other provider."""
    me = subject(case)
    out: dict[str, dict[str, float]] = {}
    for mode in case.modes:
        mine = timings.get((me, mode))
        if mine is None:
            continue
        out[mode] = {p: timings[(p, mode)].median_ms / mine.median_ms
                     for p in case.providers if p != me and (p, mode) in timings}
    return out


def memory_ratios(case: Case, memory: dict[str, int], judge: bool = True) -> dict:
    """{baseline: {"ratio": subject peak / baseline peak, "target", "pass"}}: the target
    (from ``case.memory_targets``) applies to the ratio against ``case.baseline``."""
    me = subject(case)
    out = {}
    if me not in memory:
        return out
    for prov, peak in memory.items():
        if prov == me:
            continue
        ratio = memory[me] / max(peak, 1)
        target = case.memory_targets.get(me) if prov == case.baseline and judge else None
        out[prov] = {"ratio": ratio, "target": target,
                     "pass": None if target is None else ratio <= target}
    return out


def fit_exponent(sizes: list[float], values: list[float]) -> float | None:
    """The least-squares slope of log(value) against log(size): ``value ~ size^slope``.
    None with fewer than two distinct positive points."""
    if len(sizes) != len(values):
        raise ValueError(f"sizes and values differ in length: {len(sizes)} != {len(values)}")
    pts = [(math.log(s), math.log(v)) for s, v in zip(sizes, values) if s > 0 and v > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def scaling(suite: Suite, results: list[dict], judge: bool = True) -> dict:
    """Per provider of the sweep: the fitted exponents of time (in the sweep mode) and
    of peak memory against the size axis, with the suite's expected ranges."""
    sweep = [r for r in results if r["size"] is not None]
    providers = list(dict.fromkeys(p for c in suite.sweep() for p in c.providers))
    out = {}
    for prov in providers:
        t_pts = [(r["size"], row["median_ms"]) for r in sweep for row in r["rows"]
                 if row["provider"] == prov and row["mode"] == suite.sweep_mode
                 and row["status"] == "ok"]
        m_pts = [(r["size"], r["peak_memory_bytes"][prov]) for r in sweep
                 if prov in r["peak_memory_bytes"]]
        entry = {}
        for metric, pts in (("time", t_pts), ("memory", m_pts)):
            exp = fit_exponent([s for s, _ in pts], [v for _, v in pts]) if pts else None
            expected = suite.expected_exponents.get((prov, metric)) if judge else None
            entry[metric] = {
                "exponent": exp, "points": pts, "expected": expected,
                "pass": None if expected is None or exp is None
                else expected[0] <= exp <= expected[1]}
        out[prov] = entry
    return out


def run_suite(suite: Suite, device: torch.device, opts: Options, progress) -> dict:
    correctness: dict[str, dict] = {}
    for case in suite.cases:
        if case.check is not None:
            progress.step(f"{suite.name}/{case.op} | all providers | check vs float64")
            correctness[case.op] = gate(case)
            progress.advance()
    results = []
    for case in suite.cases:
        failed = {p for p, r in correctness.get(case.op, {}).items() if r["pass"] is False}
        results.append(run_case(case, device, opts, failed, progress,
                                f"{suite.name}/{case.name}"))
    sweep = suite.sweep()
    return {"size_axis": suite.size_axis, "sweep_mode": suite.sweep_mode,
            "sweep_memory_mode": sweep[0].memory_mode if sweep else None,
            "correctness": correctness, "cases": results, "scaling": scaling(suite, results, opts.judge)}
