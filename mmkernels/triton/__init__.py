"""Triton kernels. Importing this package needs triton; the ops import it lazily.

:func:`kernel_specs` lists every kernel configuration the package can launch, for
the static report (``python -m mmkernels.tools.kernel_report``).
"""

from __future__ import annotations

import dataclasses
import os


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    from mmkernels.ops import co_attention, contrastive, varlen_attention

    return (list(varlen_attention.kernel_specs()) + list(co_attention.kernel_specs())
            + list(contrastive.kernel_specs()))
