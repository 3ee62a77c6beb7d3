"""The main job's machinery (mmkernels.bench): CLI parsing, op selection, the progress
fallback, the correctness gate, the time budget, the exponent fit, the roofline
helpers, the charts and a --quick end-to-end run of one family. No speed is asserted
here: speed targets are checked by the benchmarks themselves."""

from __future__ import annotations

import io
import json
import os
import sys
import types

import pytest
import torch

from mmkernels.bench import __main__ as cli
from mmkernels.bench import charts, harness, progress, report, runner, static, suites
from mmkernels.bench.suites import Case, Check, Suite, sweep_case

TINY = harness.Policy(warmup=0, min_repeats=1, max_repeats=2, budget_s=0.0)


# ---------------------------------------------------------------------------- CLI


def test_cli_levels_and_flags():
    p = cli.build_parser()
    assert p.parse_args([]).level == "default"
    assert p.parse_args(["--quick"]).level == "quick"
    args = p.parse_args(["--full", "--op", "roi_align", "--op", "info_nce", "--threads", "3",
                         "--device", "cpu", "--out", "x"])
    assert (args.level, args.op, args.threads, args.device, args.out) == (
        "full", ["roi_align", "info_nce"], 3, "cpu", "x")
    assert p.parse_args(["--suite", "attention"]).op == ["attention"]  # the old flag


@pytest.mark.parametrize("argv,match", [
    (["--quick", "--full"], "not allowed with"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--threads", "two"], "--threads must be an integer"),
    (["--repeats", "-1"], "--repeats must be >= 1"),
], ids=["quick+full", "threads-zero", "threads-text", "repeats-negative"])
def test_cli_rejects(argv, match, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(argv)
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("device", ["tpu", "bogus"])
def test_cli_rejects_devices(device, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--device", device, "--no-progress"])
    assert "--device must be cpu or cuda" in capsys.readouterr().err


def test_select_family_and_op():
    chosen = cli.select(["roi_align"], torch.device("cpu"), "quick")
    assert [n for n, _ in chosen] == ["roi_align"]
    assert {c.op for c in chosen[0][1].cases} == {"roi_align", "roi_align_channels_last",
                                                   "region_features"}
    (name, suite), = cli.select(["random_masking"], torch.device("cpu"), "quick")
    assert name == "token_gather"
    assert {c.op for c in suite.cases} == {"random_masking"}
    assert len(suite.sweep()) >= 2  # the op keeps its sweep cases


def test_select_two_ops_of_one_family():
    (name, suite), = cli.select(["restore_tokens", "masked_select_rows"], torch.device("cpu"),
                                "quick")
    assert name == "token_gather"
    assert [c.op for c in suite.cases] == ["restore_tokens", "masked_select_rows"]


def test_select_unknown_op_names_the_flag():
    with pytest.raises(ValueError, match="--op: unknown family or op 'nope'"):
        cli.select(["nope"], torch.device("cpu"), "quick")


def test_suites_get_validates_level():
    with pytest.raises(ValueError, match="level must be one of"):
        suites.get("roi_align", "cpu", "huge")


def test_every_suite_is_well_formed_at_every_level():
    for level in suites.LEVELS:
        for name in suites.names():
            s = suites.get(name, "cpu", level)
            names = [c.name for c in s.cases]
            assert len(names) == len(set(names)), (level, name)  # no case defined twice
            for op in s.ops():  # every op is checked against float64
                assert any(c.check is not None for c in s.cases if c.op == op), (level, op)
            if name != "models":
                assert len(s.sweep()) >= 2, (level, name)


def test_case_rejects_unknown_baseline():
    with pytest.raises(ValueError, match="baseline 'x'"):
        Case("c", "", lambda: (), {"a": lambda: None}, baseline="x")


# ------------------------------------------------------------------------ progress


def test_progress_plain_counter_when_not_a_terminal():
    out = io.StringIO()
    bar = progress.make_progress(2, stream=out)
    assert isinstance(bar, progress.PlainCounter)
    bar.step("roi_align/roi_align | mmkernels | forward")
    bar.advance()
    bar.step("roi_align/roi_align | torchvision | forward")
    bar.advance()
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[1/2] roi_align/roi_align | mmkernels | forward")
    assert "ETA ?" in lines[0] and "ETA " in lines[1] and "ETA ?" not in lines[1]


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_tqdm_on_a_terminal_and_fallback_without_tqdm(monkeypatch):
    pytest.importorskip("tqdm")
    bar = progress.make_progress(3, stream=_Tty())
    assert isinstance(bar, progress.TqdmBar)
    bar.step("case | provider | mode")
    bar.advance()
    bar.close()
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: tqdm not installed
    assert isinstance(progress.make_progress(3, stream=_Tty()), progress.PlainCounter)
    assert isinstance(progress.make_progress(3, enabled=False), progress.Silent)
    with pytest.raises(ValueError, match="total"):
        progress.make_progress(-1)


# ------------------------------------------------------------ gate and measurement


def _toy_suite() -> Suite:
    """A family with a correct op, a wrong one and one that raises, and a sweep."""
    def inputs(n):
        return lambda: (torch.randn(n, generator=torch.Generator().manual_seed(0))
                        .requires_grad_(),)

    def fail(x):
        raise RuntimeError("kernel exploded")

    providers = {"ours": lambda x: x * 2.0, "eager": lambda x: x + x,
                 "wrong": lambda x: x * 2.01, "raises": fail}

    def check():
        (x,) = inputs(16)()
        x = x.detach()
        return Check(x.double() * 2, {p: fn(x) for p, fn in providers.items()
                                      if p != "raises"})

    point = Case("double", "x * 2", inputs(64), providers, baseline="eager",
                 targets={("ours", "forward"): 0.0}, check=check, size=64,
                 memory_mode="forward+backward")
    return Suite("toy", [point, sweep_case(point, "double n=256", 256, inputs(256),
                                           "forward+backward", "n=256")],
                 size_axis="n", expected_exponents={("ours", "time"): (-10.0, 10.0)})


def test_correctness_gate_marks_a_broken_op_failed_and_times_nothing_of_it():
    suite = _toy_suite()
    # the check leaves "raises" out: it is "not checked", is timed, and its error is shown
    res = runner.run_suite(suite, torch.device("cpu"),
                           runner.Options(TINY, measure_memory=True), progress.Silent())
    gate = res["correctness"]["double"]
    assert gate["ours"]["pass"] is True and gate["eager"]["pass"] is True
    assert gate["wrong"]["pass"] is False and "wrong" in gate["wrong"]["message"]
    assert gate["raises"]["pass"] is None
    for case in res["cases"]:
        wrong = [r for r in case["rows"] if r["provider"] == "wrong"]
        assert wrong and all(r["status"] == "FAILED" and "median_ms" not in r for r in wrong)
        assert "wrong" not in case["peak_memory_bytes"]
        raised = [r for r in case["rows"] if r["provider"] == "raises"]
        assert all(r["status"].startswith("ERROR RuntimeError: kernel exploded") for r in raised)
        ok = [r for r in case["rows"] if r["provider"] == "ours"]
        assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in ok)
    assert "toy/double/wrong/correctness" in report.failures({"suites": {"toy": res}})
    text = "\n".join(report.family_lines("toy", res))
    assert "wrong FAILED" in text and "FAILED" in text
    (row,) = report.summary_rows({"suites": {"toy": res}})
    assert row["correct"] is True and row["speedup"]["forward"] > 0
    assert res["scaling"]["ours"]["time"]["pass"] is True


def test_gate_when_the_check_itself_raises():
    def check():
        raise RuntimeError("boom")
    case = Case("c", "", lambda: (), {"a": lambda: None, "b": lambda: None}, baseline="b",
                check=check)
    gate = runner.gate(case)
    assert all(r["pass"] is False and "boom" in r["message"] for r in gate.values())


def test_time_budget_stops_after_min_repeats():
    calls = []
    t = harness.time_fn(lambda: calls.append(1), torch.device("cpu"), warmup=1, repeats=50,
                        min_repeats=3, max_time_s=0.0)
    assert len(calls) == 1 + 3 and t.p20_ms <= t.median_ms <= t.p80_ms
    calls.clear()
    harness.time_fn(lambda: calls.append(1), torch.device("cpu"), warmup=0, repeats=4)
    assert len(calls) == 4
    with pytest.raises(ValueError, match="repeats"):
        harness.time_fn(lambda: None, torch.device("cpu"), repeats=0)


def test_policy_respects_case_caps():
    calls = []
    policy = harness.Policy(warmup=2, min_repeats=3, max_repeats=10, budget_s=100.0)
    policy.time(lambda: calls.append(1), torch.device("cpu"), warmup=0, repeats=2)
    assert len(calls) == 2


# --------------------------------------------------------------------- scaling


def test_fit_exponent():
    assert runner.fit_exponent([1, 2, 4], [3, 12, 48]) == pytest.approx(2.0)
    assert runner.fit_exponent([1024, 4096], [5.0, 5.0 * 4 ** 0.5]) == pytest.approx(0.5)
    assert runner.fit_exponent([8], [1.0]) is None
    assert runner.fit_exponent([8, 8], [1.0, 2.0]) is None  # one distinct size
    assert runner.fit_exponent([1, 2], [0.0, 1.0]) is None  # log of zero: dropped
    with pytest.raises(ValueError, match="sizes and values"):
        runner.fit_exponent([1, 2], [1.0])


def test_scaling_judges_expected_ranges():
    suite = Suite("s", [], expected_exponents={("a", "time"): (1.8, 2.2),
                                               ("a", "memory"): (0.0, 1.2)})
    suite.cases = [Case(f"n{n}", "", lambda: (), {"a": lambda: None}, baseline="a", size=n,
                        modes=("forward+backward",)) for n in (1, 2, 4)]
    results = [{"size": n, "rows": [{"provider": "a", "mode": "forward+backward",
                                     "status": "ok", "median_ms": 3.0 * n * n}],
                "peak_memory_bytes": {"a": 100 * n * n}} for n in (1, 2, 4)]
    out = runner.scaling(suite, results)["a"]
    assert out["time"]["exponent"] == pytest.approx(2.0) and out["time"]["pass"] is True
    assert out["memory"]["exponent"] == pytest.approx(2.0) and out["memory"]["pass"] is False
    assert runner.scaling(suite, results, judge=False)["a"]["memory"]["pass"] is None


# -------------------------------------------------------------------- roofline


def test_roofline_math():
    ceil = harness.Ceilings(flops_per_s=100e12, bytes_per_s=1e12)
    r = harness.roofline(1.0, flops=50e9, nbytes=0.5e9, ceilings=ceil)  # 1 ms
    assert r["tflops"] == pytest.approx(50.0) and r["pct_flops"] == pytest.approx(50.0)
    assert r["gbps"] == pytest.approx(500.0) and r["pct_bandwidth"] == pytest.approx(50.0)
    assert r["roofline_pct"] == pytest.approx(50.0)
    assert harness.roofline(1.0, None, 2e9, ceil)["roofline_pct"] == pytest.approx(200.0)
    assert harness.roofline(1.0, None, None, ceil) == {}
    with pytest.raises(ValueError, match="median_ms"):
        harness.roofline(0.0, 1.0, 1.0, ceil)


def test_ceilings_helpers_run_on_cpu():
    c = harness.measure_ceilings(torch.device("cpu"), matmul_n=64, copy_bytes=1 << 16,
                                 dtype=torch.float32)
    assert c.flops_per_s > 0 and c.bytes_per_s > 0
    assert harness.gemm_flops_per_s(torch.device("cpu"), n=32, repeats=2) > 0
    with pytest.raises(ValueError, match="nbytes"):
        harness.copy_bytes_per_s(torch.device("cpu"), nbytes=2)
    with pytest.raises(ValueError, match="n must be"):
        harness.gemm_flops_per_s(torch.device("cpu"), n=0)


@pytest.mark.cuda
def test_gpu_ceilings_and_roofline_rows(tmp_path):
    dev = torch.device("cuda")
    c = harness.measure_ceilings(dev, matmul_n=4096, copy_bytes=1 << 28)
    assert 1e12 < c.flops_per_s < 1e16 and 1e10 < c.bytes_per_s < 1e14
    assert cli.main(["--quick", "--device", "cuda", "--op", "roi_align", "--out",
                     str(tmp_path), "--no-progress", "--no-charts"]) == 0
    (path,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    with open(tmp_path / path) as f:
        res = json.load(f)
    assert res["ceilings"]["flops_per_s"] > 0
    rows = [r for case in res["suites"]["roi_align"]["cases"] for r in case["rows"]
            if r["mode"] == "forward" and r["status"] == "ok"]
    assert rows and all("roofline_pct" in r for r in rows)


# ------------------------------------------------------------ static, charts, e2e


def test_compact_kernel_report_selection():
    from mmkernels.tools.kernel_report import KernelReport, representative_specs

    spec = types.SimpleNamespace
    specs = [spec(name="k", config="full D64"), spec(name="k", config="full D128"),
             spec(name="k", config="causal D128"), spec(name="j", config="fp32")]
    assert [(s.name, s.config) for s in representative_specs(specs)] == [
        ("k", "full D128"), ("j", "fp32")]

    def rep(name, arch):
        return KernelReport("cuda-ext", name, arch, "-", 32, 0, 0, 0, 0, False)
    ext = [rep("f<double>", 80), rep("f<float>", 80), rep("f<float>", 120), rep("g<int>", 90)]
    assert [(r.name, r.arch) for r in static.compact_extension(ext, (80, 90))] == [
        ("f<float>", 80), ("g<int>", 90)]


def test_audit_failure_is_reported_not_raised(monkeypatch):
    def fake_run(cmd, **kw):
        assert "mmkernels.tools.kernel_audit" in cmd and kw["env"]["TRITON_INTERPRET"] == "1"
        return types.SimpleNamespace(returncode=2, stdout="", stderr="it broke")
    monkeypatch.setattr(static.subprocess, "run", fake_run)
    text, data = static.run_audit(quick=True)
    assert data is None and "FAILED (exit 2)" in text and "it broke" in text


def test_charts_written(tmp_path):
    pytest.importorskip("matplotlib")
    res = runner.run_suite(_toy_suite(), torch.device("cpu"),
                           runner.Options(TINY, measure_memory=True), progress.Silent())
    results = {"mmkernels": "0", "device": "cpu-test", "threads": 1, "suites": {"toy": res}}
    written = charts.write_charts(results, str(tmp_path / "run"))
    assert sorted(os.path.basename(p) for p in written) == ["run.summary.png", "run.toy.png"]
    for p in written:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_exits_1_on_a_correctness_failure(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "select", lambda names, device, level: [("toy", _toy_suite())])
    rc = cli.main(["--out", str(tmp_path), "--no-audit", "--no-kernel-report", "--no-charts",
                   "--no-progress", "--repeats", "1"])
    assert rc == 1
    assert "toy/double/wrong/correctness" in capsys.readouterr().out
    (js,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    with open(tmp_path / js) as f:
        assert "toy/double/wrong/correctness" in json.load(f)["failures"]


def test_quick_run_end_to_end(tmp_path, capsys):
    rc = cli.main(["--quick", "--op", "region_features", "--out", str(tmp_path), "--threads",
                   "1", "--no-audit", "--no-progress", "--repeats", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "measured GEMM rate" in out and "== roi_align" in out and "== summary" in out
    files = sorted(os.listdir(tmp_path))
    (js,) = [f for f in files if f.endswith("__quick.json")]
    assert js.replace(".json", ".txt") in files
    with open(tmp_path / js) as f:
        res = json.load(f)
    assert res["level"] == "quick" and res["threads"] == 1 and res["gemm_gflops"] > 0
    suite = res["suites"]["roi_align"]
    assert all(r["pass"] for r in suite["correctness"]["region_features"].values())
    assert {c["op"] for c in suite["cases"]} == {"region_features"}
    assert res["kernel_report"] is None  # skipped in --quick
