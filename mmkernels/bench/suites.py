"""Benchmark suite registry: one module per op family registers its cases here."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import torch


@dataclasses.dataclass
class Case:
    """One benchmark problem, measured for every provider in the same run.

    make_inputs() -> tuple of tensors (on the suite's device), with requires_grad
    set where the backward is measured. providers: name -> fn(*inputs) -> Tensor.
    targets: (provider, mode) -> minimum speed-up over ``baseline``; memory_target:
    maximum ratio of provider peak memory to the baseline's (forward+backward or
    forward, see memory_mode). check(): (name -> max error vs float64) for the
    correctness report.
    """

    name: str
    description: str
    make_inputs: Callable[[], tuple]
    providers: dict[str, Callable[..., torch.Tensor]]
    baseline: str
    modes: tuple[str, ...] = ("forward", "backward", "forward+backward")
    targets: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    memory_mode: str = "forward"
    memory_targets: dict[str, float] = dataclasses.field(default_factory=dict)
    check: Callable[[], dict[str, float]] | None = None
    repeats: int | None = None        # override the run's repeat count (very large cases)
    warmup: int | None = None
    flops: float | None = None        # per forward, for TFLOP/s on a GPU
    bytes_moved: float | None = None  # minimum bytes per forward, for GB/s


@dataclasses.dataclass
class Suite:
    name: str
    cases: list[Case]

    def case(self, name: str) -> Case:
        for c in self.cases:
            if c.name == name:
                return c
        raise KeyError(f"suite {self.name!r} has no case {name!r}")


_MODULES = {
    "roi_align": "mmkernels.bench.roi_align",
    "token_gather": "mmkernels.bench.token_gather",
    "attention": "mmkernels.bench.attention",
    "co_attention": "mmkernels.bench.co_attention",
    "contrastive": "mmkernels.bench.contrastive",
    "models": "mmkernels.bench.models",
}


def names() -> list[str]:
    return list(_MODULES)


def get(name: str, device: str | torch.device | None = None) -> Suite:
    if name not in _MODULES:
        raise KeyError(f"unknown suite {name!r}; available: {names()}")
    mod = importlib.import_module(_MODULES[name])
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return mod.suite(torch.device(device))
