"""Text tables of the main job: one per family, then the summary (one line per op)."""

from __future__ import annotations


def fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _verdict(passed: bool | None) -> str:
    return "" if passed is None else ("PASS" if passed else "FAIL")


def correctness_lines(correctness: dict) -> list[str]:
    lines = []
    for op, provs in correctness.items():
        parts = []
        for p, r in provs.items():
            err = "-" if r["max_error"] is None else f"{r['max_error']:.2e}"
            status = {True: "PASS", False: "FAILED", None: "not checked"}[r["pass"]]
            parts.append(f"{p} {status} ({err})" + (f" [{r['message']}]" if r["pass"] is False
                                                    else ""))
        lines.append(f"   correctness {op}, max |error| vs float64: " + ", ".join(parts))
    return lines


def case_lines(res: dict, device_is_cuda: bool = False) -> list[str]:
    lines = [f"-- {res['case']}: {res['description']}",
             f"   baseline: {res['baseline']}; speed-up = baseline time / provider time"]
    head = (f"   {'mode':<17} {'provider':<21} {'median ms':>10} {'p20-p80 ms':>19} "
            f"{'speed-up':>9}  target")
    if device_is_cuda:
        head += "   TFLOP/s  GB/s  % roofline"
    lines.append(head)
    for r in res["rows"]:
        if r["status"] != "ok":
            lines.append(f"   {r['mode']:<17} {r['provider']:<21} {r['status']}")
            continue
        target = "" if r["target"] is None else f">= {r['target']:.1f}x {_verdict(r['pass'])}"
        sp = "-" if r["speedup_vs_baseline"] is None else f"{r['speedup_vs_baseline']:.2f}x"
        line = (f"   {r['mode']:<17} {r['provider']:<21} {r['median_ms']:>10.3f} "
                f"{r['p20_ms']:>9.3f}-{r['p80_ms']:<9.3f} {sp:>9}  {target:<14}")
        if "roofline_pct" in r:
            line += (f" {r.get('tflops', 0):>8.2f} {r.get('gbps', 0):>6.0f} "
                     f"{r['roofline_pct']:>10.1f}%")
        lines.append(line.rstrip())
    subject = res["subject"]
    others = {b for sp in res["speedups"].values() for b in sp} - {res["baseline"]}
    for b in sorted(others):
        per_mode = ", ".join(f"{m} {sp[b]:.2f}x" for m, sp in res["speedups"].items() if b in sp)
        lines.append(f"   {subject} speed-up vs {b}: {per_mode}")
    if res["peak_memory_bytes"]:
        mem = ", ".join(f"{p} {fmt_bytes(b)}" for p, b in res["peak_memory_bytes"].items())
        lines.append(f"   peak memory ({res['memory_mode']}): {mem}")
    for b, m in res["memory_ratios"].items():
        target = "" if m["target"] is None else f" (target <= {m['target']}) {_verdict(m['pass'])}"
        lines.append(f"   peak memory {subject}/{b}: {m['ratio']:.3f}{target}")
    return lines


def scaling_lines(name: str, suite_res: dict) -> list[str]:
    if not suite_res["scaling"]:
        return []
    lines = [f"   scaling against {suite_res['size_axis']} (log-log least squares): time of "
             f"{suite_res['sweep_mode']} ~ size^a, peak memory of "
             f"{suite_res['sweep_memory_mode']} ~ size^b"]
    for prov, e in suite_res["scaling"].items():
        parts = []
        for metric, letter in (("time", "a"), ("memory", "b")):
            m = e[metric]
            if m["exponent"] is None:
                continue
            exp = f"{letter} = {m['exponent']:.2f}"
            if m["expected"] is not None:
                lo, hi = m["expected"]
                exp += f" (expected {lo:g}-{hi:g}) {_verdict(m['pass'])}"
            parts.append(exp)
        if parts:
            sizes = sorted({s for s, _ in e["time"]["points"]})
            lines.append(f"     {prov:<21} " + ", ".join(parts)
                         + f"  [{len(sizes)} sizes: {', '.join(f'{s:g}' for s in sizes)}]")
    return lines


def family_lines(name: str, suite_res: dict, device_is_cuda: bool = False) -> list[str]:
    lines = ["", f"== {name}"]
    lines += correctness_lines(suite_res["correctness"])
    for res in suite_res["cases"]:
        lines += case_lines(res, device_is_cuda)
    lines += scaling_lines(name, suite_res)
    return lines


def _point(suite_res: dict, op: str) -> dict | None:
    """The op's case with the most modes (its point), the first if several."""
    cands = [r for r in suite_res["cases"] if r["op"] == op]
    return max(cands, key=lambda r: len({row["mode"] for row in r["rows"]}), default=None)


def summary_rows(results: dict) -> list[dict]:
    """One row per op (its point case): speed-ups of the subject against the baseline,
    the memory ratio, correctness and the targets."""
    rows = []
    for name, suite_res in results["suites"].items():
        ops = list(dict.fromkeys(r["op"] for r in suite_res["cases"]))
        for op in ops:
            res = _point(suite_res, op)
            if res is None:
                continue
            checks = suite_res["correctness"].get(op, {})
            subj = checks.get(res["subject"], {}).get("pass")
            sp = {m: s.get(res["baseline"]) for m, s in res["speedups"].items()}
            mem = res["memory_ratios"].get(res["baseline"], {}).get("ratio")
            verdicts = [r["pass"] for r in res["rows"] if r.get("pass") is not None]
            verdicts += [m["pass"] for m in res["memory_ratios"].values() if m["pass"] is not None]
            rows.append({"family": name, "case": res["case"], "description": res["description"],
                         "subject": res["subject"], "baseline": res["baseline"],
                         "correct": subj, "speedup": sp, "memory_ratio": mem,
                         "targets": None if not verdicts else all(verdicts)})
    return rows


def summary_lines(results: dict) -> list[str]:
    lines = ["", "== summary: speed-up of each op over its baseline (baseline time / op time), "
             "peak memory op / baseline",
             f"   {'family/case':<38} {'vs':<18} {'correct':<8} {'fwd':>7} {'bwd':>7} "
             f"{'fwd+bwd':>8} {'memory':>7}  targets"]

    def x(v):
        return "-" if v is None else f"{v:.2f}x"
    for r in summary_rows(results):
        correct = {True: "PASS", False: "FAILED", None: "-"}[r["correct"]]
        mem = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.3f}"
        lines.append(f"   {r['family'] + '/' + r['case']:<38} {r['baseline'][:18]:<18} {correct:<8} "
                     f"{x(r['speedup'].get('forward')):>7} {x(r['speedup'].get('backward')):>7} "
                     f"{x(r['speedup'].get('forward+backward')):>8} {mem:>7}  "
                     f"{_verdict(r['targets'])}")
    return lines


def failures(results: dict) -> list[str]:
    """Every target missed, correctness failure and exponent outside its range."""
    out = []
    for name, suite_res in results["suites"].items():
        for op, provs in suite_res["correctness"].items():
            out += [f"{name}/{op}/{p}/correctness" for p, r in provs.items() if r["pass"] is False]
        for res in suite_res["cases"]:
            out += [f"{name}/{res['case']}/{r['provider']}/{r['mode']}" for r in res["rows"]
                    if r.get("pass") is False]
            out += [f"{name}/{res['case']}/{b}/memory" for b, m in res["memory_ratios"].items()
                    if m["pass"] is False]
        for prov, e in suite_res["scaling"].items():
            out += [f"{name}/{prov}/{metric} exponent" for metric, m in e.items()
                    if m["pass"] is False]
    return out
