"""Timing and memory measurement shared by ``python -m mmkernels.bench`` and the
pytest-benchmark suites in bench/.

* Time: warm-up, then repeats; median, p20 and p80. CPU: ``time.perf_counter``
  with ``torch.set_num_threads`` fixed and reported. CUDA: CUDA events.
* Peak memory: CUDA: ``torch.cuda.max_memory_allocated`` growth. CPU: the
  allocator peak from the profiler's memory timeline (every c10 allocation,
  including those made inside C++ kernels).
* Providers are always measured side by side in one run and compared as ratios.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

MODES = ("forward", "backward", "forward+backward")


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[i]


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 3,
            repeats: int = 15, min_time_s: float = 0.0, min_repeats: int | None = None,
            max_time_s: float | None = None) -> Timing:
    """Median/p20/p80 of ``fn()`` in milliseconds.

    ``repeats`` timed calls after ``warmup`` untimed ones; with ``max_time_s``, it stops
    early once ``min_repeats`` calls are timed and ``max_time_s`` has passed (a time
    budget per measurement, so that a slow provider gets fewer repeats). It keeps going
    past ``repeats`` until ``min_time_s`` has passed.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    cuda = device.type == "cuda"
    t_start = time.perf_counter()
    least = repeats if min_repeats is None else max(1, min(min_repeats, repeats))

    def more() -> bool:
        elapsed = time.perf_counter() - t_start
        if elapsed < min_time_s:
            return True
        if max_time_s is not None and len(times) >= least and elapsed >= max_time_s:
            return False
        return len(times) < repeats

    while more():
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8))


def mode_fn(make_inputs: Callable[[], tuple], run: Callable[..., torch.Tensor], mode: str):
    """A zero-argument callable that performs ``mode`` on the inputs.

    ``backward`` times ``out.backward(grad, retain_graph=True)`` on one forward.
    Gradients of the inputs are reset to None before every backward (as
    ``triton.testing.do_bench(grad_to_none=...)`` does), so the time is the op's
    backward, not the accumulation into ``.grad``.
    """
    inputs = make_inputs()
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def clear():
        for t in leaves:
            t.grad = None

    if mode == "forward":
        def f():
            with torch.no_grad():
                return run(*inputs)
        return f
    out = run(*inputs)
    grad = torch.randn_like(out)
    if mode == "backward":
        def b():
            clear()
            out.backward(grad, retain_graph=True)
        return b
    if mode == "forward+backward":
        def fb():
            clear()
            run(*inputs).backward(grad)
        return fb
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def peak_memory_cuda(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's native start/stop log lines (written to fd 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_cpu(fn: Callable[[], object]) -> int:
    """Allocator peak growth (bytes) during ``fn()`` on the CPU.

    Read from the PyTorch profiler's memory timeline, which records every
    allocation made through the c10 CPU allocator, including those inside C++
    kernels (host ``std::vector`` scratch, at most a few hundred KiB in our
    kernels, is not counted).
    """
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with _quiet_stderr(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
            record_shapes=True, with_stack=True) as prof:
        fn()
    timeline = MemoryProfileTimeline(prof._memory_profile())
    _, sizes = timeline._coalesce_timeline(torch.device("cpu"))
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0] if totals else 0


@dataclasses.dataclass
class Policy:
    """How long each measurement runs: ``warmup`` untimed calls, then timed calls until
    ``max_repeats``, or until ``min_repeats`` are done and ``budget_s`` has passed."""

    warmup: int
    min_repeats: int
    max_repeats: int
    budget_s: float

    def time(self, fn: Callable[[], object], device: torch.device, *, warmup: int | None = None,
             repeats: int | None = None) -> Timing:
        """``case.warmup`` / ``case.repeats`` override (lower) the policy's counts."""
        top = self.max_repeats if repeats is None else max(1, min(repeats, self.max_repeats))
        return time_fn(fn, device, warmup=self.warmup if warmup is None else warmup,
                       repeats=top, min_repeats=min(self.min_repeats, top),
                       max_time_s=self.budget_s)


#: the main job's policy per level (see mmkernels.bench.suites.LEVELS)
POLICIES = {"quick": Policy(warmup=1, min_repeats=2, max_repeats=5, budget_s=0.05),
            "default": Policy(warmup=1, min_repeats=3, max_repeats=10, budget_s=0.3),
            "full": Policy(warmup=2, min_repeats=5, max_repeats=25, budget_s=2.0)}


def _median_time_s(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    return time_fn(fn, device, warmup=1, repeats=repeats).median_ms * 1e-3


def gemm_flops_per_s(device: torch.device, dtype: torch.dtype | None = None, n: int = 2048,
                     repeats: int = 5) -> float:
    """Measured dense matmul rate (FLOP/s) of an n x n x n product: float32 on a CPU
    (the header's GEMM rate), bfloat16 on a GPU by default."""
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    return 2.0 * n ** 3 / _median_time_s(lambda: torch.mm(a, b), device, repeats)


def copy_bytes_per_s(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Measured copy bandwidth (bytes read + bytes written per second) of one
    ``nbytes`` buffer into another on ``device`` (device to device on a GPU)."""
    if nbytes < 4:
        raise ValueError(f"nbytes must be >= 4, got {nbytes}")
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2.0 * src.numel() * 4 / _median_time_s(lambda: dst.copy_(src), device, repeats)


@dataclasses.dataclass
class Ceilings:
    """The device's measured roofline: a large bf16 matmul and a large copy."""

    flops_per_s: float
    bytes_per_s: float


def measure_ceilings(device: torch.device, *, matmul_n: int = 8192, copy_bytes: int = 1 << 30,
                     dtype: torch.dtype = torch.bfloat16) -> Ceilings:
    """Measure both ceilings once (the defaults are sized for a GPU; tests pass small
    sizes to run it on a CPU)."""
    return Ceilings(gemm_flops_per_s(device, dtype, matmul_n), copy_bytes_per_s(device, copy_bytes))


def roofline(median_ms: float, flops: float | None, nbytes: float | None,
             ceilings: Ceilings) -> dict[str, float]:
    """Achieved TFLOP/s and GB/s of one call, each as % of the measured ceiling, and
    ``roofline_pct``: the time the roofline allows, max(flops / peak, bytes / bandwidth),
    as % of the measured time."""
    if median_ms <= 0:
        raise ValueError(f"median_ms must be > 0, got {median_ms}")
    s = median_ms * 1e-3
    out: dict[str, float] = {}
    floor = 0.0
    if flops:
        out["tflops"] = flops / s / 1e12
        out["pct_flops"] = 100.0 * flops / s / ceilings.flops_per_s
        floor = max(floor, flops / ceilings.flops_per_s)
    if nbytes:
        out["gbps"] = nbytes / s / 1e9
        out["pct_bandwidth"] = 100.0 * nbytes / s / ceilings.bytes_per_s
        floor = max(floor, nbytes / ceilings.bytes_per_s)
    if floor:
        out["roofline_pct"] = 100.0 * floor / s
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    import platform
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu-{model}".replace(" ", "-").replace("(R)", "")
