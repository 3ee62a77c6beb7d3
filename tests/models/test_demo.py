"""python -m mmkernels.models.demo: a smoke run per model (tiny configs, a few steps)."""

from __future__ import annotations

import os

import pytest

from mmkernels.models import demo
from mmkernels.testing import CONVERGENCE


@pytest.mark.parametrize("name", ["vilbert", "clip", "llava"])
def test_demo_runs_eager_then_patched_and_plots(name, tmp_path, capsys, monkeypatch):
    # the demo is a CPU program: the C++ / CPU kernels, not the Triton interpreter
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert demo.main(["--model", name, "--size", "tiny", "--steps", "2", "--batch-size", "2",
                      "--out", str(tmp_path), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "eager   loss" in out and "patched loss" in out and "speed:" in out
    png = tmp_path / f"demo_{name}.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = demo.run(name, steps=2, batch_size=2, out=str(tmp_path), quiet=True, size="tiny")
    assert r["max_rel_loss_diff"] <= CONVERGENCE["loss_rtol"] and r["eager_peak_bytes"] > 0
    assert r["eager_loss"][0] == pytest.approx(r["patched_loss"][0], rel=CONVERGENCE["loss_rtol"])
    assert os.path.samefile(r["png"], png)


def test_demo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="model"):
        demo.run("bert")
    with pytest.raises(ValueError, match="steps"):
        demo.run("llava", steps=0)
    with pytest.raises(ValueError, match="size"):
        demo.run("llava", size="huge")
    with pytest.raises(SystemExit):
        demo.main(["--model", "gpt"])
