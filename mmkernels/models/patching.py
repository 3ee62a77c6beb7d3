"""Drop-in patching: swap the eager modules of a model for their fused versions.

Each fused class is a subclass of its eager class that adds no state (see
:mod:`mmkernels.models.layers`), so patching changes a module's class **in place**:
the module object, its parameters (identity included: an optimizer built before the
patch keeps working), buffers, hooks and ``state_dict`` are untouched. Only modules
whose type is exactly a registered eager class are patched; a user's subclass with
its own ``forward`` is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mmkernels import reference
from mmkernels.models import layers
from mmkernels.nn.co_attention import BiAttention

_FUSED: dict[type, type] = {}
_EAGER: dict[type, type] = {}


@dataclass(frozen=True)
class Replacement:
    """One patched (or unpatched) module: its qualified name in the model ("" for the
    model itself), the class it had and the class it has now."""

    name: str
    before: type
    after: type


def register(eager_cls: type, fused_cls: type) -> None:
    """Teach :func:`patch` a new pair. ``fused_cls`` must subclass ``eager_cls`` and
    add no parameters, buffers or submodules (only ``forward`` may differ)."""
    if not (isinstance(eager_cls, type) and issubclass(eager_cls, nn.Module)):
        raise TypeError(f"eager_cls must be an nn.Module subclass, got {eager_cls!r}")
    if not (isinstance(fused_cls, type) and issubclass(fused_cls, eager_cls)):
        raise TypeError(f"fused_cls must be a subclass of {eager_cls.__name__}, got {fused_cls!r}")
    if _FUSED.get(eager_cls, fused_cls) is not fused_cls:
        raise ValueError(f"{eager_cls.__name__} is already registered with "
                         f"{_FUSED[eager_cls].__name__}")
    if _EAGER.get(fused_cls, eager_cls) is not eager_cls:  # unpatch must know one eager class
        raise ValueError(f"{fused_cls.__name__} is already registered for "
                         f"{_EAGER[fused_cls].__name__}")
    _FUSED[eager_cls] = fused_cls
    _EAGER[fused_cls] = eager_cls


for _pair in ((layers.PaddedSelfAttention, layers.FusedPaddedSelfAttention),
              (layers.PackedSelfAttention, layers.FusedPackedSelfAttention),
              (reference.BertBiAttention, BiAttention),
              (layers.RegionPooling, layers.FusedRegionPooling),
              (layers.RandomTokenMasking, layers.FusedRandomTokenMasking),
              (layers.MaskedRowSelect, layers.FusedMaskedRowSelect),
              (layers.ImageFeatureMerge, layers.FusedImageFeatureMerge),
              (layers.InfoNCELoss, layers.FusedInfoNCELoss),
              (layers.SigmoidContrastiveLoss, layers.FusedSigmoidContrastiveLoss)):
    register(*_pair)


def _swap(model: nn.Module, table: dict[type, type]) -> list[Replacement]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    done = []
    for name, module in model.named_modules():  # each shared module once
        target = table.get(type(module))
        if target is not None:
            before = type(module)
            module.__class__ = target
            done.append(Replacement(name, before, target))
    return done


def patch(model: nn.Module) -> list[Replacement]:
    """Replace, in place, every eager module of ``model`` that has a fused version.

    Works on the reference models (:mod:`mmkernels.models.vilbert`, ``clip``,
    ``llava``) and on any model built from the same eager classes. Returns what was
    replaced (empty when nothing was; patching twice is a no-op).

    Example::

        model = mmkernels.models.clip.CLIP(config)
        opt = torch.optim.AdamW(model.parameters())
        mmkernels.models.patch(model)     # opt keeps working: same parameters
    """
    return _swap(model, _FUSED)


def unpatch(model: nn.Module) -> list[Replacement]:
    """Undo :func:`patch`: every fused module of ``model`` gets its eager class back.
    Returns what was restored."""
    return _swap(model, _EAGER)


def is_patched(model: nn.Module) -> bool:
    """True when any module of ``model`` is a fused module from the registry."""
    return any(type(m) in _EAGER for m in model.modules())
