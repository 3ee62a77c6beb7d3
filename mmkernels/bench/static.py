"""What the main job appends about the hardware limit.

Without a GPU:

* the FLOP/traffic audit (:mod:`mmkernels.tools.kernel_audit`): each Triton kernel's
  executed FLOPs against the algorithm's minimum and its H100 roofline time. It runs
  the kernels in Triton's interpreter, which must be selected before triton is first
  imported, while the timed CPU paths must not use it: so it runs in a child
  process (``python -m mmkernels.tools.kernel_audit --json``), whose table is
  printed and whose JSON joins the results;
* a compact kernel report (:mod:`mmkernels.tools.kernel_report`, one representative
  configuration per Triton kernel, AOT-compiled for sm_80 and sm_90, and the CUDA
  extension's kernels for those archs when it was built with CUDA, one template
  instantiation each): registers, spills, shared memory and tensor-core (MMA)
  instruction count per kernel x arch.

On a GPU: the two measured ceilings (:func:`mmkernels.bench.harness.measure_ceilings`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time


def run_audit(quick: bool, timeout_s: float = 900.0) -> tuple[str, dict | None]:
    """(the audit's table, its JSON results or None when it failed)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "audit.json")
        cmd = [sys.executable, "-m", "mmkernels.tools.kernel_audit", "--json", path]
        if quick:
            cmd.append("--quick")
        env = dict(os.environ, TRITON_INTERPRET="1")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"FLOP/traffic audit: timed out after {timeout_s:.0f} s", None
        if proc.returncode != 0 or not os.path.exists(path):
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            return f"FLOP/traffic audit FAILED (exit {proc.returncode}):\n{tail}", None
        with open(path) as f:
            return proc.stdout.rstrip(), json.load(f)


def compact_extension(reports: list, archs: tuple[int, ...]) -> list:
    """The CUDA extension's kernels on ``archs`` only, one template instantiation per
    kernel (the float one where there is one)."""
    chosen: dict[tuple[str, int], object] = {}
    for r in reports:
        if r.arch not in archs:
            continue
        key = (r.name.split("<")[0], r.arch)
        if key not in chosen or ("<float" in r.name and "<float" not in chosen[key].name):
            chosen[key] = r
    return list(chosen.values())


def run_kernel_report() -> tuple[str, dict]:
    """(the compact kernel report's table, {"rows": [...], "notes": [...], "seconds"})."""
    from mmkernels.tools import kernel_report as kr

    start = time.perf_counter()
    try:
        cuobjdump = kr.find_tool("cuobjdump")
    except FileNotFoundError as e:
        return f"kernel report: skipped ({e})", {"rows": [], "notes": [str(e)], "seconds": 0.0}
    ext, notes = kr.extension_reports(cuobjdump, only=kr.ARCHS)
    reports = compact_extension(ext, kr.ARCHS)
    try:
        reports += kr.triton_reports(cuobjdump, kr.ARCHS, jobs=os.cpu_count() or 1,
                                     compact=True)
    except Exception as e:  # a compiler problem is reported, not fatal to the benchmark
        notes.append(f"Triton AOT compile failed: {type(e).__name__}: {e}".splitlines()[0])
    seconds = time.perf_counter() - start
    lines = [f"Kernel report (compact: one representative configuration per Triton kernel; "
             f"`python -m mmkernels.tools.kernel_report` builds all of them), "
             f"archs sm_{', sm_'.join(map(str, kr.ARCHS))}:",
             f"{'source':<9} {'kernel':<34} {'arch':<6} {'config':<42} {'REG':>4} "
             f"{'spills B':>8} {'SHARED B':>9} {'MMA':>5}  status"]
    for r in reports:
        probs = r.problems()
        lines.append(f"{r.source:<9} {r.name[:34]:<34} sm_{r.arch:<3} {r.config[:42]:<42} {r.regs:>4} "
                     f"{r.stack + r.local:>8} {r.shared:>9} {r.mma:>5}  "
                     + ("ok" if not probs else "FAIL: " + "; ".join(probs)))
    lines += [f"note: {n}" for n in notes]
    lines.append(f"{len(reports)} kernel builds in {seconds:.0f} s")
    return "\n".join(lines), {"rows": [dataclasses.asdict(r) for r in reports], "notes": notes,
                              "seconds": seconds}
