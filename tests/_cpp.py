"""Shared by the host unit tests of the HOST_DEVICE headers: a tests/cpp/*.cpp file
built by the host compiler (with UBSan where it links) and run; it prints OK."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_host_unit(name: str, workdir) -> None:
    """Build tests/cpp/`name` against csrc/ and run it; skips the calling test when no
    C++ compiler (or no csrc tree) is available."""
    src = ROOT / "tests" / "cpp" / name
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None or not (ROOT / "csrc").is_dir():
        pytest.skip("needs a C++ compiler and the csrc tree")
    exe = Path(workdir) / src.stem
    base = [cxx, "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)]
    ubsan = ["-fsanitize=undefined,float-cast-overflow", "-fno-sanitize-recover=all"]
    build = subprocess.run(base + ubsan, capture_output=True, text=True)
    if build.returncode != 0:  # no sanitizer runtime: the explicit checks still run
        build = subprocess.run(base, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr
