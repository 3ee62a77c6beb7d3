"""Triton kernels. Importing this package needs triton; the ops import it lazily.

:func:`kernel_specs` lists every kernel configuration the package can launch, for
the static report (``python -m mmkernels.tools.kernel_report``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch

_production_depth = 0  # open production_tiles() contexts (process-wide)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_tiles() -> bool:
    """True when launches should take the interpreter's small tiles
    (``INTERPRET_CONFIG`` / ``INTERPRET_CONFIGS``): under the interpreter, outside
    :func:`production_tiles`. Every launch-config choice consults this, not
    :func:`interpreting`."""
    return interpreting() and _production_depth == 0


@contextlib.contextmanager
def production_tiles():
    """Within this context, launches use the production (GPU) launch configs even
    under the interpreter: the tiles a GPU runs, so that the FLOP/traffic audit
    (``python -m mmkernels.tools.kernel_audit``) counts what a GPU executes. Results
    agree with the small tiles' up to fp32 accumulation order (tested against
    mmkernels.reference in tests/test_kernel_audit.py). num_warps / num_stages are
    passed but ignored by the interpreter. Nests. It is process-wide, not per thread,
    so that a backward run by another thread (the autograd engine's) sees it too."""
    global _production_depth
    _production_depth += 1
    try:
        yield
    finally:
        _production_depth -= 1


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the grid sizes of the launchers."""
    return -(-a // b)


def device_guard(device: torch.device):
    """Launch under the tensors' device (CUDA); nothing to guard on the CPU (the
    interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def cuda_sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the CUDA `device` (cached per device index)."""
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@dataclasses.dataclass
class KernelSpec:
    name: str
    fn: object                 # the @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, object]
    options: dict[str, int]
    config: str
    needs_mma: bool = True
    attrs: dict | None = None  # {(arg index,): [["tt.divisibility", 16]]}, as a real launch


def kernel_specs() -> list[KernelSpec]:
    from mmkernels.triton import co_attention, varlen_attention
    from mmkernels.triton import contrastive_launch as contrastive

    return (list(varlen_attention.kernel_specs()) + list(co_attention.kernel_specs())
            + list(contrastive.kernel_specs()))
