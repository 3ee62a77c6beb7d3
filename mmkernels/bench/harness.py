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
            repeats: int = 15, min_time_s: float = 0.0) -> Timing:
    """Median/p20/p80 of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = device.type == "cuda"
    t_start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - t_start) < min_time_s:
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
