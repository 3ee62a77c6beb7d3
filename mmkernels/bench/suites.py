"""Benchmark suite registry: one module per op family registers its cases here.

Every case is defined once, in its family's module, for a device and a *level*:

* ``quick``: a smoke run (tiny sizes, under a minute for everything);
* ``default``: every op at one realistic point, and a short size sweep per family,
  sized so that the whole main job fits in 5 minutes on a slow 2-core CPU;
* ``full``: the deep sweeps and the largest problems (B=16384 and B=65536 contrastive
  on a CPU).

``python -m mmkernels.bench`` and the pytest-benchmark suites in bench/ both take
their cases from :func:`get`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import torch
from torch import Tensor

LEVELS = ("quick", "default", "full")


@dataclasses.dataclass
class Check:
    """The result of running each provider once on a small problem: the float64
    reference and each provider's output (compared by the correctness gate with
    :func:`mmkernels.testing.assert_close_to_reference`)."""

    reference: Tensor
    outputs: dict[str, Tensor]


@dataclasses.dataclass
class Case:
    """One benchmark problem, measured for every provider in the same run.

    make_inputs() -> tuple of tensors (on the suite's device), with requires_grad
    set where the backward is measured. providers: name -> fn(*inputs) -> Tensor.
    targets: (provider, mode) -> minimum speed-up over ``baseline``; memory_targets:
    provider -> maximum ratio of its peak memory to the baseline's (in
    ``memory_mode``: forward, or forward+backward).

    op: the operation the case times (several cases of a sweep share one); the
    correctness gate runs once per op. check: () -> :class:`Check` at a small size,
    given on one case per op. size: the case's value on its suite's size axis (None:
    not part of the sweep). forward_only: providers timed in the forward mode only.
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
    check: Callable[[], Check] | None = None
    repeats: int | None = None        # at most this many timed calls (very large cases)
    warmup: int | None = None
    flops: float | None = None        # per forward, for TFLOP/s on a GPU
    bytes_moved: float | None = None  # minimum bytes per forward, for GB/s
    op: str = ""
    size: float | None = None
    forward_only: tuple[str, ...] = ()  # providers without a backward here

    def runs(self, provider: str, mode: str) -> bool:
        """Whether ``provider`` is timed in ``mode``."""
        return mode == "forward" or provider not in self.forward_only

    def __post_init__(self):
        if not self.op:
            self.op = self.name
        if self.baseline not in self.providers:
            raise ValueError(f"baseline {self.baseline!r} is not one of the providers "
                             f"{list(self.providers)} of case {self.name!r}")


@dataclasses.dataclass
class Suite:
    """The cases of one op family. The cases with a ``size`` form the family's sweep,
    timed in ``sweep_mode``; ``expected_exponents`` maps (provider, "time" or
    "memory") to the (low, high) range the fitted exponent must fall in."""

    name: str
    cases: list[Case]
    size_axis: str = ""
    sweep_mode: str = "forward+backward"
    expected_exponents: dict[tuple[str, str], tuple[float, float]] = dataclasses.field(
        default_factory=dict)

    def case(self, name: str) -> Case:
        for c in self.cases:
            if c.name == name:
                return c
        raise KeyError(f"suite {self.name!r} has no case {name!r}")

    def sweep(self) -> list[Case]:
        """The sweep's cases, in increasing size."""
        return sorted((c for c in self.cases if c.size is not None), key=lambda c: c.size)

    def ops(self) -> list[str]:
        return list(dict.fromkeys(c.op for c in self.cases))


def sweep_case(point: Case, name: str, size: float, make_inputs: Callable[[], tuple],
               mode: str, description: str, **changes) -> Case:
    """A case of ``point``'s op at another size, timed in ``mode`` only. The point's
    targets are not carried over: they were set for its size."""
    return dataclasses.replace(point, **{
        "name": name, "description": description, "make_inputs": make_inputs, "size": size,
        "modes": (mode,), "check": None, "op": point.op, "targets": {}, "memory_targets": {},
        **changes})


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


def get(name: str, device: str | torch.device | None = None, level: str = "default") -> Suite:
    if name not in _MODULES:
        raise KeyError(f"unknown suite {name!r}; available: {names()}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    mod = importlib.import_module(_MODULES[name])
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return mod.suite(torch.device(device), level)
