"""``python -m mmkernels.bench``: the main job.

Runs every suite on the default device (CUDA when visible, else CPU with a fixed
thread count), side by side with the baselines in one run, and prints, per case:
the median (p20-p80) time of each provider in forward / backward /
forward+backward, its speed-up over the baseline, the peak memory, the targets
from the issues (PASS/FAIL), and a correctness line (max error of each provider
against the float64 eager reference). Results are written to
``bench/results/<device>__mmkernels-<version>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

import mmkernels
from mmkernels.bench import harness, suites


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def run_case(suite_name: str, case: suites.Case, device: torch.device, threads: int,
             repeats: int, measure_memory: bool) -> dict:
    rows = []
    timings: dict[tuple[str, str], harness.Timing] = {}
    for mode in case.modes:
        for prov, fn in case.providers.items():
            t = harness.time_fn(harness.mode_fn(case.make_inputs, fn, mode), device,
                                repeats=case.repeats or repeats,
                                warmup=3 if case.warmup is None else case.warmup)
            timings[(prov, mode)] = t
    for mode in case.modes:
        base = timings[(case.baseline, mode)].median_ms
        for prov in case.providers:
            t = timings[(prov, mode)]
            target = case.targets.get((prov, mode))
            speedup = base / t.median_ms
            row = {"mode": mode, "provider": prov, "median_ms": t.median_ms, "p20_ms": t.p20_ms,
                   "p80_ms": t.p80_ms, "speedup_vs_baseline": speedup, "target": target,
                   "pass": None if target is None else speedup >= target}
            if device.type == "cuda" and mode == "forward":
                if case.flops:
                    row["tflops"] = case.flops / (t.median_ms * 1e-3) / 1e12
                if case.bytes_moved:
                    row["gbps"] = case.bytes_moved / (t.median_ms * 1e-3) / 1e9
            rows.append(row)
    memory = {}
    if measure_memory:
        for prov, run in case.providers.items():
            inputs = case.make_inputs()

            def call(run=run, inputs=inputs):
                if case.memory_mode == "forward":
                    with torch.no_grad():
                        return run(*inputs)
                out = run(*inputs)
                out.backward(torch.ones_like(out))
                return None
            if device.type == "cuda":
                memory[prov] = harness.peak_memory_cuda(call)
            else:
                memory[prov] = harness.peak_memory_cpu(call)
    mem_checks = {}
    for prov, limit in case.memory_targets.items():
        base = max(memory.get(case.baseline, 0), 1)
        ratio = memory.get(prov, 0) / base
        mem_checks[prov] = {"ratio": ratio, "target": limit, "pass": ratio <= limit}
    errors = case.check() if case.check is not None else {}
    return {"case": case.name, "description": case.description, "baseline": case.baseline,
            "rows": rows, "peak_memory_bytes": memory, "memory_mode": case.memory_mode,
            "memory_checks": mem_checks, "max_error_vs_float64": errors}


def print_case(suite_name: str, res: dict) -> None:
    print(f"\n== {suite_name}/{res['case']}: {res['description']}")
    print(f"   baseline: {res['baseline']}")
    print(f"   {'mode':<17} {'provider':<18} {'median ms':>10} {'p20-p80 ms':>17} "
          f"{'speed-up':>9}  target")
    for r in res["rows"]:
        target = "" if r["target"] is None else (
            f">= {r['target']:.1f}x {'PASS' if r['pass'] else 'FAIL'}")
        extra = ""
        if "tflops" in r:
            extra = f"  {r['tflops']:.2f} TFLOP/s {r.get('gbps', 0):.0f} GB/s"
        print(f"   {r['mode']:<17} {r['provider']:<18} {r['median_ms']:>10.3f} "
              f"{r['p20_ms']:>8.3f}-{r['p80_ms']:<8.3f} {r['speedup_vs_baseline']:>8.2f}x  "
              f"{target}{extra}")
    if res["peak_memory_bytes"]:
        mem = ", ".join(f"{p}: {_fmt_bytes(b)}" for p, b in res["peak_memory_bytes"].items())
        print(f"   peak memory ({res['memory_mode']}): {mem}")
    for prov, m in res["memory_checks"].items():
        print(f"   memory {prov}/{res['baseline']}: {m['ratio']:.3f} (target <= {m['target']}) "
              f"{'PASS' if m['pass'] else 'FAIL'}")
    if res["max_error_vs_float64"]:
        errs = ", ".join(f"{p}: {e:.2e}" for p, e in res["max_error_vs_float64"].items())
        print(f"   correctness, max |error| vs float64 reference: {errs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkernels.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", action="append", choices=suites.names(),
                        help="suite(s) to run (default: all)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if visible)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory runs")
    parser.add_argument("--out", default=os.path.join("bench", "results"),
                        help="directory for the JSON results file")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a speed or memory target fails")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    dev_name = harness.device_name(device)
    print(f"mmkernels {mmkernels.__version__}, torch {torch.__version__}, device {dev_name}, "
          f"torch.get_num_threads() = {torch.get_num_threads()}")
    results = {"mmkernels": mmkernels.__version__, "torch": torch.__version__,
               "device": dev_name, "threads": torch.get_num_threads(),
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "suites": {}}
    failed = []
    for name in args.suite or suites.names():
        suite = suites.get(name, device)
        results["suites"][name] = []
        for case in suite.cases:
            res = run_case(name, case, device, args.threads, args.repeats, not args.no_memory)
            print_case(name, res)
            results["suites"][name].append(res)
            failed += [f"{name}/{case.name}/{r['provider']}/{r['mode']}"
                       for r in res["rows"] if r["pass"] is False]
            failed += [f"{name}/{case.name}/{p}/memory"
                       for p, m in res["memory_checks"].items() if not m["pass"]]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{dev_name}__mmkernels-{mmkernels.__version__}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=lambda o: dataclasses.asdict(o))
    print(f"\nresults written to {path}")
    if failed:
        print("targets not met: " + ", ".join(failed))
        return 1 if args.strict else 0
    print("all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
