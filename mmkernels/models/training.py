"""A small, deterministic training loop shared by the convergence tests and the demo.

Each step reseeds torch's generator (``seed + step``) before the forward, so an eager
run and a patched run of the same model draw the same noise (FLIP masking) and see the
same batches.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mmkernels.models.patching import patch


@dataclass
class TrainRun:
    """losses: the loss at every step (before that step's update); seconds: the wall
    time of all steps."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW (as CLIP, LLaVA and ViLBERT's BertAdam-style training), no weight decay on
    biases and norms."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                              {"params": rest, "weight_decay": 0.0}], lr=lr)


def train(model: nn.Module, make_batch: Callable[[int], object],
          loss_fn: Callable[[nn.Module, object], Tensor], steps: int, lr: float = 1e-3,
          seed: int = 0, optimizer: torch.optim.Optimizer | None = None,
          on_step: Callable[[int, float], None] | None = None) -> TrainRun:
    """Train ``model`` for ``steps`` steps on ``make_batch(step)``; returns the losses."""
    model.train()
    opt = optimizer if optimizer is not None else make_optimizer(model, lr)
    run = TrainRun()
    t0 = time.perf_counter()
    for step in range(steps):
        run.losses.append(train_step(model, make_batch(step), loss_fn, opt, seed + step))
        if on_step is not None:
            on_step(step, run.losses[-1])
    run.seconds = time.perf_counter() - t0
    return run


def train_step(model: nn.Module, batch: object, loss_fn: Callable[[nn.Module, object], Tensor],
               optimizer: torch.optim.Optimizer, seed: int) -> float:
    """One optimizer step on ``batch`` after ``torch.manual_seed(seed)``; returns the loss."""
    torch.manual_seed(seed)
    loss = loss_fn(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def eager_and_patched(make_model: Callable[[], nn.Module],
                      apply: Callable[[nn.Module], object] = patch) -> tuple[nn.Module, nn.Module]:
    """Two copies of one freshly built model (same initial parameters): the eager one and
    a patched one (``apply(copy)``: :func:`mmkernels.models.patch`, or e.g.
    :func:`mmkernels.integrations.transformers.apply_to_clip`; it must report changes)."""
    eager = make_model()
    fused = copy.deepcopy(eager)
    if not apply(fused):
        raise ValueError(f"{getattr(apply, '__name__', apply)}() changed nothing: the model uses "
                         "no module it knows")
    return eager, fused


def max_relative_difference(a: list[float], b: list[float]) -> float:
    """max_i |a_i - b_i| / max(|a_i|, tiny)."""
    return max((abs(x - y) / max(abs(x), 1e-30) for x, y in zip(a, b, strict=True)), default=0.0)


def max_parameter_difference(a: nn.Module, b: nn.Module) -> float:
    """max |p_a - p_b| over the parameters of two copies of one model."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if pa.keys() != pb.keys():
        raise ValueError("the two models do not have the same parameters")
    return max((float((pa[n].detach() - pb[n].detach()).abs().max()) for n in pa
                if pa[n].numel()), default=0.0)


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated while ``fn()`` runs (the benchmark harness's measure:
    torch.cuda's allocator statistics on CUDA, the profiler's memory timeline on CPU)."""
    from mmkernels.bench.harness import peak_memory_cpu, peak_memory_cuda

    return peak_memory_cuda(fn) if torch.device(device).type == "cuda" else peak_memory_cpu(fn)
