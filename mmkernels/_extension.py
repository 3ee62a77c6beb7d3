"""Loading of the compiled extension ``mmkernels._C``.

Importing :mod:`mmkernels` never fails because the extension is missing or was
built without CUDA (xformers' rule, not flash-attn's): the failure is recorded
here and turned into an actionable error when an op that needs it is called.
"""

from __future__ import annotations

import importlib
import os

import torch

_REBUILD_HINT = (
    "Rebuild it against the installed torch with `pip install --no-build-isolation -e .` "
    "(or `make install`) from the mmkernels source tree; set MMKERNELS_SKIP_CUDA=1 for a "
    "CPU-only build, and check that nvcc is on PATH (or CUDA_HOME is set) for the CUDA kernels."
)

_load_error: BaseException | None = None
_loaded = False


def _load() -> bool:
    global _load_error, _loaded
    if _loaded:
        return True
    if _load_error is not None:
        return False
    try:
        importlib.import_module("mmkernels._C")
    except (ImportError, OSError) as exc:  # missing, or built against another torch
        _load_error = exc
        return False
    _loaded = True
    return True


def is_available() -> bool:
    """True when ``mmkernels._C`` imported (its ops are registered)."""
    return _load()


@torch.compiler.assume_constant_result
def has_kernel(op: str, device_type: str) -> bool:
    """True when ``mmkernels::<op>`` has a kernel for ``device_type`` ("cpu"/"cuda")."""
    if not _load():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"mmkernels::{op}", key)


def require(op: str, device_type: str) -> None:
    """Raise an actionable RuntimeError when ``op`` has no kernel for ``device_type``."""
    if not _load():
        raise RuntimeError(
            f"mmkernels.{op}: the C++/CUDA extension mmkernels._C could not be imported "
            f"({type(_load_error).__name__}: {_load_error}). {_REBUILD_HINT}"
        )
    if device_type in ("cpu", "cuda") and not has_kernel(op, device_type):
        raise RuntimeError(
            f"mmkernels.{op}: no {device_type.upper()} kernel in this build of mmkernels._C "
            f"(was it built with MMKERNELS_SKIP_CUDA=1, or without nvcc?). {_REBUILD_HINT}"
        )
    if device_type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"mmkernels.{op}: tensors on device type {device_type!r} are not supported "
            "(supported: cpu, cuda)"
        )


@torch.compiler.assume_constant_result
def backend_override() -> str | None:
    """``MMKERNELS_BACKEND=reference`` forces the eager reference everywhere (debugging)."""
    value = os.environ.get("MMKERNELS_BACKEND", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value != "reference":
        raise ValueError(f"MMKERNELS_BACKEND must be 'reference' or 'auto', got {value!r}")
    return value
