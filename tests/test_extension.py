"""Importing mmkernels never fails because the extension is missing; calling an op
whose kernel is absent raises an actionable error."""

import subprocess
import sys
import textwrap

import pytest


def test_import_without_extension_and_actionable_error():
    code = textwrap.dedent("""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "mmkernels._C":
                    raise ImportError("simulated: mmkernels._C was not built")
                return None

        sys.meta_path.insert(0, Block())
        import torch
        import mmkernels
        from mmkernels import _extension
        assert not _extension.is_available()
        try:
            mmkernels.roi_align(torch.randn(1, 2, 4, 4), torch.tensor([[0.0, 0, 0, 2, 2]]), 2)
        except RuntimeError as e:
            msg = str(e)
            assert "pip install --no-build-isolation" in msg and "simulated" in msg, msg
            print("OK")
        else:
            raise SystemExit("no error raised")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout


def test_kernel_report_parses_the_extension():
    from mmkernels.tools import kernel_report

    try:
        cuobjdump = kernel_report.find_tool("cuobjdump")
    except FileNotFoundError:
        import pytest
        pytest.skip("cuobjdump not available")
    reports, notes = kernel_report.extension_reports(cuobjdump)
    if notes:
        import pytest
        pytest.skip("extension built without CUDA: " + "; ".join(notes))
    names = {r.name for r in reports}
    assert any("_roi_align_fwd_kernel" in n for n in names)
    assert any("_move_rows_kernel" in n for n in names)
    # one cubin per arch of the build's list (default: every arch torch ships)
    assert {r.arch for r in reports} == set(kernel_report.expected_extension_archs()[0])
    assert all(r.local == 0 and r.stack == 0 for r in reports)


def test_kernel_report_without_cuda_code(capsys, monkeypatch):
    """An extension with no device code (MMKERNELS_SKIP_CUDA=1) is reported as such;
    the report neither crashes nor, outside CI, fails (issue 10, defect 15)."""
    import pytest
    import torch

    from mmkernels.tools import kernel_report

    try:
        kernel_report.find_tool("cuobjdump")
    except FileNotFoundError:
        pytest.skip("cuobjdump not available")
    cpu_only_so = torch._C.__file__  # a host-only shared object, as a CPU-only _C is
    monkeypatch.delenv("MMKERNELS_REQUIRE_CUDA", raising=False)
    assert kernel_report.main(["--no-triton", "--extension", cpu_only_so]) == 0
    out = capsys.readouterr().out
    assert "has no CUDA code" in out and "MMKERNELS_SKIP_CUDA=1" in out
    monkeypatch.setenv("MMKERNELS_REQUIRE_CUDA", "1")
    assert kernel_report.main(["--no-triton", "--extension", cpu_only_so]) == 1


def test_default_cuda_archs_cover_every_torch_arch():
    """The default arch list has SASS for every arch torch ships and PTX for the
    newest, so newer GPUs JIT it (defect 17)."""
    from mmkernels._build_config import default_cuda_arch_list, parse_arch_list, torch_cuda_archs

    sass, ptx = parse_arch_list(default_cuda_arch_list())
    assert sass == torch_cuda_archs()
    assert {80, 90} <= set(sass)
    assert ptx == [max(sass)]
    assert parse_arch_list("8.0;9.0+PTX") == ([80, 90], [90])


def test_default_build_is_portable():
    """The default build targets the compiler's generic x86-64: no AVX/AVX-512
    (VEX/EVEX ymm/zmm) instructions outside the run-time dispatched clones of the
    contrastive passes, so a wheel built on an AVX-512 host runs on any x86-64 CPU
    (defect 16). MMKERNELS_CPU_ARCH=native is an opt-in."""
    import os
    import platform
    import shutil
    import subprocess

    import pytest

    from mmkernels.tools.kernel_report import extension_path

    if os.environ.get("MMKERNELS_CPU_ARCH"):
        pytest.skip("built with MMKERNELS_CPU_ARCH set")
    if platform.machine() != "x86_64" or shutil.which("objdump") is None:
        pytest.skip("needs x86_64 and objdump")
    so = extension_path()
    if so is None:
        pytest.skip("mmkernels._C is not built")
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-j", ".text", so],
                          capture_output=True, text=True, check=True).stdout
    # Wide instructions may only sit in run-time dispatched clones (GCC target_clones:
    # symbols ending .avx2 / .arch_x86_64_v4, picked by CPUID through an ifunc).
    wide, clones, fn = [], 0, ""
    for line in text.splitlines():
        if line.endswith(">:"):
            fn = line
        elif "%ymm" in line or "%zmm" in line:
            if fn.endswith((".avx2>:", ".arch_x86_64_v4>:")):
                clones += 1
            else:
                wide.append(f"{fn} {line.strip()}")
    assert not wide, f"{len(wide)} AVX instructions outside dispatched clones, e.g. {wide[:3]}"
    assert clones > 0, "the contrastive passes should carry AVX2/AVX-512 clones"


def test_torch_minimum_is_stated_and_enforced():
    """pyproject states the oldest torch the C++20 sources build against, and the
    build refuses an older torch with a clear message (defect 18)."""
    import pathlib
    import re

    import pytest

    from mmkernels._build_config import MIN_TORCH, check_torch_version

    root = pathlib.Path(__file__).resolve().parents[1]
    pyproject = (root / "pyproject.toml").read_text()
    stated = set(re.findall(r'"torch>=([\d.]+)"', pyproject))
    assert stated == {".".join(map(str, MIN_TORCH))}, stated
    check_torch_version("2.14.1+cu130")
    check_torch_version(".".join(map(str, MIN_TORCH)) + ".0")
    with pytest.raises(RuntimeError, match="C\\+\\+20"):
        check_torch_version("2.6.0")


def test_kernel_report_parallel_compiles_match_serial(tmp_path):
    """--jobs compiles in spawned worker processes; the reports (and their order) are
    those of the serial run, and --only selects by "name config". (A subprocess: the
    test session runs Triton's interpreter, which cannot compile ahead of time.)"""
    import json
    import os

    pytest.importorskip("triton")
    from mmkernels.tools import kernel_report

    try:
        kernel_report.find_tool("cuobjdump")
    except FileNotFoundError:
        pytest.skip("cuobjdump not available")
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = {}
    for jobs in (1, 2):
        path = tmp_path / f"r{jobs}.json"
        subprocess.run([sys.executable, "-m", "mmkernels.tools.kernel_report", "--no-extension",
                        "--only", r"^_attn_bwd_delta_kernel D64$", "--jobs", str(jobs),
                        "--json", str(path)], check=True, env=env, capture_output=True)
        out[jobs] = json.loads(path.read_text())
    assert [(r["name"], r["arch"]) for r in out[1]] == [("_attn_bwd_delta_kernel", 80),
                                                       ("_attn_bwd_delta_kernel", 90)]
    assert out[2] == out[1]
    assert all(r["local"] == 0 and r["stack"] == 0 for r in out[1])
