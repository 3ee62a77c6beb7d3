"""Shared by the SASS tests of the CUDA sources: a .cu file compiled alone with nvcc
for sm_80 and sm_90, read back with the kernel report (no GPU needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmkernels.tools import kernel_report

ARCHS = (80, 90)


def cu_source_reports(relpath: str, workdir) -> dict[int, list]:
    """{arch: [KernelReport, ...]} of csrc/`relpath` for sm_80 and sm_90; skips the
    calling test when nvcc is not available."""
    src = Path(__file__).resolve().parents[1] / "csrc" / relpath
    out = {}
    for arch in ARCHS:
        try:
            out[arch] = kernel_report.source_reports(str(src), arch, str(workdir))
        except FileNotFoundError as e:
            pytest.skip(str(e))
    return out
