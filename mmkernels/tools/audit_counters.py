"""Counters of the FLOP/traffic audit (:mod:`mmkernels.tools.kernel_audit`).

:func:`measure` opens three counters at once and returns their totals as a
:class:`Counts`:

* :class:`TritonCounter`: hooks Triton's CPU interpreter
  (``triton.runtime.interpreter``, TRITON_INTERPRET=1) and counts, per kernel (the
  name of the ``@triton.jit`` function whose grid is running):

  - executed MMA FLOPs, ``2 * M * N * K`` per ``tl.dot`` (``InterpreterBuilder.create_dot``;
    leading batch dims multiply), and the distinct (M, N, K) dot shapes, which show the
    tiles the launches really used;
  - global-memory bytes loaded and stored by ``tl.load`` / ``tl.store``
    (``create_load``, ``create_masked_load``, ``create_store``, ``create_masked_store``),
    counting only the lanes whose mask is true. In Triton 3.8 the unmasked builders call
    the masked ones; a depth guard counts each access once whichever calls which (tensor
    descriptor loads and stores reach the masked builders too);
  - atomics (``create_atomic_rmw`` with its mask, ``create_atomic_cas``): each active
    lane reads and writes its location, so its bytes count as loaded and as stored, and
    again under ``atomic_bytes``;
  - launches and programs (``GridExecutor.__call__`` and ``set_grid_idx``).

* ``torch.utils.flop_counter.FlopCounterMode``: the FLOPs of GEMMs run through torch
  (mm, bmm, addmm, baddbmm, SDPA, convolutions), by aten op.

* :class:`TorchCounter`: a dispatch mode that makes the ``mmkernels::`` custom ops
  transparent (FlopCounterMode alone sees an opaque custom op and counts nothing
  inside it) and counts the bytes of every aten op they run, approximately: each
  tensor argument read once, each output written once, broadcast (stride-0) dims
  counted once, views and allocations free, ``fill_`` / ``zero_`` / ``copy_``
  destinations written but not read. Ops that run while a Triton kernel runs (the
  interpreter's argument copies) are not counted.

Bytes are requests to global memory: nothing models the L2 cache, so they are an
upper bound on DRAM traffic.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["Counts", "KernelCount", "TorchCounter", "TritonCounter", "measure"]


@dataclasses.dataclass
class KernelCount:
    """What one Triton kernel executed, summed over its launches."""
    name: str
    launches: int = 0
    programs: int = 0
    dots: int = 0
    mma_flops: int = 0
    bytes_loaded: int = 0
    bytes_stored: int = 0
    atomic_bytes: int = 0
    dot_shapes: set = dataclasses.field(default_factory=set)  # {(batch..., M, N, K)}

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dot_shapes"] = sorted(list(s) for s in self.dot_shapes)
        return d


def _itemsize(handle) -> int:
    """Bytes of one element behind a pointer TensorHandle (int1 is stored as a byte)."""
    return max(1, handle.get_element_ty().primitive_bitwidth // 8)


def _active(ptrs, mask) -> int:
    """Lanes of a pointer block whose mask is true (all of them without a mask)."""
    if mask is None:
        return int(np.asarray(ptrs.data).size)
    return int(np.count_nonzero(np.broadcast_to(mask.data, np.shape(ptrs.data))))


class TritonCounter:
    """Context manager: while open, counts what the interpreter executes, per kernel,
    into :attr:`kernels` (name -> :class:`KernelCount`). Needs TRITON_INTERPRET=1 when
    the kernels were defined. Not reentrant."""

    # (builder method, position of the pointer, position of the mask or None, kind)
    _MEMORY = (("create_load", 0, None, "load"), ("create_masked_load", 0, 1, "load"),
               ("create_store", 0, None, "store"), ("create_masked_store", 0, 2, "store"))

    def __init__(self) -> None:
        self.kernels: dict[str, KernelCount] = {}
        self._stack: list[KernelCount] = []
        self._memory_depth = 0
        self._saved: list[tuple[type, str, object]] = []

    def running(self) -> bool:
        """True while a kernel's grid runs."""
        return bool(self._stack)

    def _current(self) -> KernelCount:
        if self._stack:
            return self._stack[-1]
        return self.kernels.setdefault("<outside a launch>", KernelCount("<outside a launch>"))

    def _patch(self, cls: type, name: str, make) -> None:
        original = getattr(cls, name)
        self._saved.append((cls, name, original))
        setattr(cls, name, make(original))

    def _launch(self, original):
        def call(executor, *args, **kwargs):
            name = executor.fn.__name__
            k = self.kernels.setdefault(name, KernelCount(name))
            k.launches += 1
            self._stack.append(k)
            try:
                return original(executor, *args, **kwargs)
            finally:
                self._stack.pop()
        return call

    def _program(self, original):
        def set_grid_idx(builder, *args, **kwargs):
            self._current().programs += 1
            return original(builder, *args, **kwargs)
        return set_grid_idx

    def _dot(self, original):
        def create_dot(builder, a, b, *args, **kwargs):
            sa, sb = np.shape(a.data), np.shape(b.data)
            batch = np.broadcast_shapes(sa[:-2], sb[:-2])
            m, kdim, n = sa[-2], sa[-1], sb[-1]
            k = self._current()
            k.dots += 1
            k.mma_flops += 2 * int(np.prod(batch, dtype=np.int64)) * m * n * kdim
            k.dot_shapes.add((*batch, m, n, kdim))
            return original(builder, a, b, *args, **kwargs)
        return create_dot

    def _memory(self, original, ptr_at: int, mask_at: int | None, kind: str):
        def access(builder, *args, **kwargs):
            outer = self._memory_depth == 0
            self._memory_depth += 1
            try:
                out = original(builder, *args, **kwargs)
            finally:
                self._memory_depth -= 1
            if outer:
                ptrs = args[ptr_at]
                mask = args[mask_at] if mask_at is not None and mask_at < len(args) else None
                nbytes = _active(ptrs, mask) * _itemsize(ptrs)
                k = self._current()
                if kind == "load":
                    k.bytes_loaded += nbytes
                else:
                    k.bytes_stored += nbytes
            return out
        return access

    def _atomic(self, original, ptr_at: int, mask_at: int | None):
        def atomic(builder, *args, **kwargs):
            ptrs = args[ptr_at]
            mask = args[mask_at] if mask_at is not None else None
            nbytes = _active(ptrs, mask) * _itemsize(ptrs)
            k = self._current()
            k.bytes_loaded += nbytes
            k.bytes_stored += nbytes
            k.atomic_bytes += nbytes
            return original(builder, *args, **kwargs)
        return atomic

    def __enter__(self) -> TritonCounter:
        from triton.runtime import interpreter as ti

        builder = ti.InterpreterBuilder
        self._patch(ti.GridExecutor, "__call__", self._launch)
        self._patch(builder, "set_grid_idx", self._program)
        self._patch(builder, "create_dot", self._dot)
        for name, ptr_at, mask_at, kind in self._MEMORY:
            self._patch(builder, name, lambda f, p=ptr_at, m=mask_at, k=kind: self._memory(f, p, m, k))
        # create_atomic_rmw(rmwOp, ptr, val, mask, sem, scope); create_atomic_cas(ptr, cmp, val, ...)
        self._patch(builder, "create_atomic_rmw", lambda f: self._atomic(f, 1, 3))
        self._patch(builder, "create_atomic_cas", lambda f: self._atomic(f, 0, None))
        return self

    def __exit__(self, *exc) -> None:
        while self._saved:
            cls, name, original = self._saved.pop()
            setattr(cls, name, original)


_BELOW_PYTHON = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)
_WRITE_ONLY = {"fill_", "zero_", "copy_"}


def _footprint(t: torch.Tensor) -> int:
    """Bytes a tensor (view) spans, each broadcast (stride-0) dim counted once."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, torch.Tensor):
                yield v


class TorchCounter(TorchDispatchMode):
    """Dispatch mode: runs the custom ops of `namespaces` inline, so that the modes
    below it (FlopCounterMode) see the aten ops inside them, and counts the bytes
    of every aten op into :attr:`ops` (op name -> [calls, bytes read, bytes
    written]). Enter it after (inside) FlopCounterMode."""

    def __init__(self, triton: TritonCounter | None = None, namespaces=("mmkernels",)) -> None:
        super().__init__()
        self.triton = triton
        self.namespaces = tuple(namespaces)
        self.ops: dict[str, list[int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in self.namespaces:
            keys = torch._C.DispatchKeySet(torch._C.DispatchKey.Undefined)
            for t in _tensors(list(args) + list(kwargs.values())):
                keys = keys | torch._C._dispatch_keys(t)
            keys = keys & _BELOW_PYTHON
            with self:  # run the op's kernel below this mode, its aten ops through it
                return func.redispatch(keys, *args, **kwargs)
        out = func(*args, **kwargs)
        if not (self.triton is not None and self.triton.running()):
            self._count(func, args, kwargs, out)
        return out

    def _count(self, func, args, kwargs, out) -> None:
        if func.is_view or func.overloadpacket.__name__.startswith(("empty", "new_empty")):
            return
        schema = func._schema
        name = func.overloadpacket.__name__
        read = written = 0
        for i, a in enumerate(schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(a.name)
            for t in _tensors(value):
                nbytes = _footprint(t)
                if a.alias_info is not None and a.alias_info.is_write:
                    written += nbytes
                    if name not in _WRITE_ONLY:
                        read += nbytes
                else:
                    read += nbytes
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for r, value in zip(schema.returns, outs):
            if r.alias_info is None:
                written += sum(_footprint(t) for t in _tensors(value))
        if read or written:
            entry = self.ops.setdefault(f"aten.{name}", [0, 0, 0])
            entry[0] += 1
            entry[1] += read
            entry[2] += written


@dataclasses.dataclass
class Counts:
    """The totals of one :func:`measure` block."""
    kernels: dict[str, KernelCount] = dataclasses.field(default_factory=dict)
    torch_flops: dict[str, int] = dataclasses.field(default_factory=dict)  # aten op -> FLOPs
    torch_ops: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # [calls, read, written]

    @property
    def mma_flops(self) -> int:
        return sum(k.mma_flops for k in self.kernels.values())

    @property
    def flops(self) -> int:
        """Triton MMA FLOPs plus torch GEMM FLOPs."""
        return self.mma_flops + sum(self.torch_flops.values())

    @property
    def bytes_loaded(self) -> int:
        return (sum(k.bytes_loaded for k in self.kernels.values())
                + sum(v[1] for v in self.torch_ops.values()))

    @property
    def bytes_stored(self) -> int:
        return (sum(k.bytes_stored for k in self.kernels.values())
                + sum(v[2] for v in self.torch_ops.values()))

    @property
    def torch_bytes(self) -> int:
        return sum(v[1] + v[2] for v in self.torch_ops.values())


@contextlib.contextmanager
def measure(namespaces=("mmkernels",)):
    """Count everything the block runs (see the module docstring), looking inside the
    custom ops of `namespaces`; yields a :class:`Counts`, filled when the block exits."""
    counts = Counts()
    triton = TritonCounter()
    flop = FlopCounterMode(display=False)
    ops = TorchCounter(triton, namespaces)
    with triton, flop, ops:
        yield counts
    counts.kernels = triton.kernels
    counts.torch_flops = {str(k): int(v) for k, v in flop.get_flop_counts().get("Global", {}).items()}
    counts.torch_ops = ops.ops
