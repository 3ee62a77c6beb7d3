"""Reference ViLBERT, CLIP and LLaVA models built from eager modules, and
:func:`patch` / :func:`unpatch`, which swap the fused kernels in and out in place.

Submodules: :mod:`~mmkernels.models.vilbert`, :mod:`~mmkernels.models.clip`,
:mod:`~mmkernels.models.llava` (loaded on first access), :mod:`~mmkernels.models.layers`
(the eager building blocks and their fused versions).
"""

from __future__ import annotations

import importlib

from mmkernels.models import layers
from mmkernels.models.patching import Replacement, is_patched, patch, register, unpatch

_SUBMODULES = ("vilbert", "clip", "llava", "training")

__all__ = ["patch", "unpatch", "is_patched", "register", "Replacement", "layers", *_SUBMODULES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"mmkernels.models.{name}")
    raise AttributeError(f"module 'mmkernels.models' has no attribute {name!r}")
