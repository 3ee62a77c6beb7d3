"""``python -m mmkernels.bench`` (``mmkernels-bench``, ``make bench``): the main job.

Runs every op family on the default device (CUDA when visible, else the CPU with a
fixed thread count), side by side with the baselines in one run:

1. correctness first: each op once against the float64 reference at a small size; a
   provider that fails is reported FAILED and gets no speed figure;
2. every op at one point, forward / backward / forward+backward: median and p20-p80,
   the speed-up and peak-memory ratio against each baseline, the targets (PASS/FAIL);
3. a size sweep per family, with the fitted exponent of time and peak memory;
4. without a GPU: the FLOP/traffic audit and a compact kernel report; on a GPU: the
   measured matmul and copy ceilings, and each kernel's % of that roofline.

Levels: the default fits in 5 minutes on a slow 2-core CPU; ``--quick`` is a smoke run
(under a minute); ``--full`` runs the deep sweeps and the largest problems.
Writes ``<out>/<device>__mmkernels-<version>[__<level>].json`` and ``.txt`` (what is
printed), and the charts ``.<family>.png`` and ``.summary.png`` (with matplotlib).
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
from mmkernels.bench import charts, harness, report, runner, static, suites
from mmkernels.bench.progress import make_progress


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value
    return parse


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmkernels.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    level = p.add_mutually_exclusive_group()
    level.add_argument("--quick", action="store_const", dest="level", const="quick",
                       help="smoke run: tiny sizes, few repeats (under a minute)")
    level.add_argument("--full", action="store_const", dest="level", const="full",
                       help="deep sweeps and the largest problems (B=16384 and B=65536 "
                            "contrastive on a CPU); tens of minutes on a CPU")
    p.set_defaults(level="default")
    p.add_argument("--op", "--suite", action="append", dest="op", metavar="NAME",
                   help="run only this op family (" + ", ".join(suites.names())
                        + ") or op (a case name, e.g. info_nce); repeatable")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible)")
    p.add_argument("--threads", type=_positive_int("--threads"), default=None,
                   help="CPU threads (default: the CPUs this process may use)")
    p.add_argument("--out", default=os.path.join("bench", "results"),
                   help="directory for the JSON, text and chart files (default bench/results)")
    p.add_argument("--repeats", type=_positive_int("--repeats"), default=None,
                   help="at most this many timed calls per measurement (default: the level's)")
    switches = {
        "--no-memory": "skip the peak-memory runs",
        "--no-audit": "skip the FLOP/traffic audit",
        "--no-kernel-report": "skip the compact kernel report (--quick always skips it)",
        "--no-charts": "write no PNG files",
        "--no-progress": "no progress bar or counter",
        "--strict": "exit 1 when a speed, memory or scaling target fails too (a correctness "
                    "failure always exits 1)",
    }
    for flag, text in switches.items():
        p.add_argument(flag, action="store_true", help=text)
    return p


def select(names: list[str] | None, device: torch.device, level: str
           ) -> list[tuple[str, suites.Suite]]:
    """The suites to run; a name that is not a family keeps only that op's cases
    (all its cases: point and sweep). Raises ValueError naming ``--op`` on an unknown
    name."""
    families = suites.names()
    if not names:
        return [(n, suites.get(n, device, level)) for n in families]
    built = {n: suites.get(n, device, level) for n in families
             if n in names or any(x not in families for x in names)}
    chosen: dict[str, suites.Suite] = {}
    for name in names:
        if name in families:
            chosen[name] = built[name]
            continue
        hits = [(fam, s) for fam, s in built.items()
                if any(name in (c.op, c.name) for c in s.cases)]
        if not hits:
            known = sorted({c.op for s in built.values() for c in s.cases})
            raise ValueError(f"--op: unknown family or op {name!r}; families: {families}, "
                             f"ops: {known}")
        for fam, s in hits:
            ops = {c.op for c in s.cases if name in (c.op, c.name)}
            keep = [c for c in s.cases if c.op in ops]
            if fam in chosen and chosen[fam] is not s:
                keep = list({id(c): c for c in chosen[fam].cases + keep}.values())
            chosen[fam] = dataclasses.replace(s, cases=keep)
    return [(f, chosen[f]) for f in families if f in chosen]


def header(device: torch.device, level: str, threads: int | None
           ) -> tuple[list[str], dict, harness.Ceilings | None]:
    dev = harness.device_name(device)
    info = {"mmkernels": mmkernels.__version__, "torch": torch.__version__, "device": dev,
            "level": level, "threads": threads,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    lines = [f"mmkernels {mmkernels.__version__}, torch {torch.__version__}, device {dev}, "
             f"level {level}"]
    ceilings = None
    if device.type == "cuda":
        ceilings = harness.measure_ceilings(device)
        info["ceilings"] = dataclasses.asdict(ceilings)
        lines.append(f"measured roofline: bf16 matmul 8192^3 {ceilings.flops_per_s / 1e12:.1f} "
                     f"TFLOP/s, device-to-device copy {ceilings.bytes_per_s / 1e9:.0f} GB/s; "
                     "each forward row's % roofline = roofline time / measured time")
    else:
        rate = harness.gemm_flops_per_s(device)
        info["gemm_gflops"] = rate / 1e9
        lines.append(f"torch.get_num_threads() = {threads}; measured GEMM rate (float32 "
                     f"2048^3 matmul): {rate / 1e9:.0f} GFLOP/s")
    return lines, info, ceilings


def result_prefix(out: str, info: dict) -> str:
    level = "" if info["level"] == "default" else f"__{info['level']}"
    return os.path.join(out, f"{info['device']}__mmkernels-{info['mmkernels']}{level}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    threads = None
    if device.type == "cpu":
        threads = args.threads or default_threads()
        torch.set_num_threads(threads)
    start = time.perf_counter()
    lines, results, ceilings = header(device, args.level, threads)
    try:
        chosen = select(args.op, device, args.level)
    except ValueError as e:
        parser.error(str(e))
    policy = harness.POLICIES[args.level]
    if args.repeats is not None:
        policy = dataclasses.replace(policy, max_repeats=args.repeats,
                                     min_repeats=min(policy.min_repeats, args.repeats))
    opts = runner.Options(policy=policy, measure_memory=not args.no_memory, ceilings=ceilings,
                          judge=args.level != "quick")
    transcript: list[str] = []
    progress = make_progress(sum(runner.count_steps(s, opts.measure_memory) for _, s in chosen),
                             enabled=not args.no_progress)

    def note(text: str) -> None:  # what runs after the progress bar: to stderr
        if not args.no_progress:
            print(text, file=sys.stderr, flush=True)

    def emit(text_lines: list[str]) -> None:
        text = "\n".join(text_lines)
        transcript.append(text)
        progress.write(text)

    lines.append(f"policy: {policy.warmup} warm-up, then {policy.min_repeats}-"
                 f"{policy.max_repeats} timed calls per measurement (stopping after "
                 f"{policy.budget_s:g} s); times in ms")
    if not opts.judge:
        lines.append("--quick: tiny sizes; the targets and expected exponents are not judged")
    emit(lines)
    results["suites"] = {}
    try:
        for name, suite in chosen:
            res = runner.run_suite(suite, device, opts, progress)
            results["suites"][name] = res
            emit(report.family_lines(name, res, device.type == "cuda"))
    finally:
        progress.close()
    emit(report.summary_lines(results))
    if device.type == "cpu" and not args.no_audit:
        quick = args.level != "full"  # the full sizes take ~40-60 s on 2 cores
        note(f"running the FLOP/traffic audit ({'~10' if quick else '~60'} s) ...")
        text, audit = static.run_audit(quick=quick)
        results["audit"] = audit
        emit(["", "== FLOP/traffic audit (GPU kernels counted without a GPU)"
              + (": its --quick sizes, where tile tails weigh more than at the audit's own "
                 "sizes (`make audit`, or --full here)" if quick else ""), text])
    if device.type == "cpu" and not args.no_kernel_report:
        if args.level == "quick":
            text, kreport = ("skipped in --quick (python -m mmkernels.tools.kernel_report "
                             "--compact prints it)"), None
        else:
            note("compiling the kernel report (~20-40 s) ...")
            text, kreport = static.run_kernel_report()
        results["kernel_report"] = kreport
        emit(["", "== kernel report (GPU resources, compiled without a GPU)", text])
    if device.type == "cpu":
        emit(["", "Only on a GPU: TFLOP/s, GB/s and % of the measured roofline per kernel, the "
              "GPU sizes (bf16), and the flash_attn, Inf-CL and FlexAttention (with backward) "
              "baselines; a CPU run measures none of these."])
    prefix = result_prefix(args.out, results)
    os.makedirs(args.out, exist_ok=True)
    written = [] if args.no_charts else charts.write_charts(results, prefix)
    fails = report.failures(results)
    results["failures"] = fails
    results["wall_s"] = time.perf_counter() - start
    closing = ["", f"wall time {results['wall_s']:.0f} s"]
    if not args.no_charts and not written and not charts.available():
        closing.append("charts: matplotlib is not installed (pip install 'mmkernels[bench]')")
    closing += [f"wrote {p}" for p in (f"{prefix}.json", f"{prefix}.txt", *written)]
    correctness = [f for f in fails if f.endswith("/correctness")]
    closing.append("targets not met: " + ", ".join(fails) if fails else "all targets met")
    emit(closing)
    with open(f"{prefix}.json", "w") as f:
        json.dump(results, f, indent=1)
    with open(f"{prefix}.txt", "w") as f:
        f.write("\n".join(transcript) + "\n")
    if correctness:
        return 1
    return 1 if (fails and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
