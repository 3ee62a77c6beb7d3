"""Reference-model benchmarks: one training step (loss forward, and forward+backward)
of each reference model, eager against patched (issue 11).

On CUDA the realistic configurations run (``ViLBertConfig.base()``: BERT-base text,
6 co-attention layers, 36 regions of 2048-d pooled from a 14x14 map; ``CLIPConfig.base()``:
ViT-B/16 at 224 with FLIP 50% masking, 77-token text; ``LlavaConfig.base()``: ViT-B/16
tower and a Qwen2-0.5B-shaped LM, 4 samples packed per row). On the CPU the demo
configurations (``small()``) run, so that the main job stays within minutes on 2 cores;
``--quick`` runs the test configurations (``tiny``); the case descriptions say which.
The models have no size sweep.

Correctness gate: the loss of the test configuration (``tiny``, 2 samples), eager and
patched, against the eager model run in float64.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from mmkernels.bench.suites import Case, Check, Suite
from mmkernels.models.patching import patch

#: batch per model and device kind
_BATCH = {("vilbert", "cuda"): 32, ("vilbert", "cpu"): 16, ("clip", "cuda"): 128,
          ("clip", "cpu"): 64, ("llava", "cuda"): 4, ("llava", "cpu"): 8}


def _tensors(batch: dict, device: torch.device) -> tuple[list[str], tuple]:
    keys = [k for k, v in batch.items() if isinstance(v, Tensor)]
    return keys, tuple(batch[k].to(device) for k in keys)


def _pair(demo_case, device: torch.device):
    """The eager model, its patched copy (same weights), the batch's tensors, and
    provider(model) -> fn(*tensors) -> loss."""
    torch.manual_seed(0)
    eager = demo_case.make_model().to(device).train()
    fused = copy.deepcopy(eager)
    patch(fused)
    batch = demo_case.make_batch(0)
    keys, values = _tensors(batch, device)
    extra = {k: v for k, v in batch.items() if not isinstance(v, Tensor)}

    def provider(model: nn.Module):
        def run(*tensors):
            torch.manual_seed(0)  # the same masking noise for both providers
            return model(**dict(zip(keys, tensors, strict=True)), **extra).loss
        return run

    return eager, fused, values, provider


def _check(make_small_case, device: torch.device):
    """The loss of the small (test) config, eager and patched in float32, against the
    eager model in float64, on the same weights and batch."""
    def check() -> Check:
        eager, fused, values, provider = _pair(make_small_case(), device)
        ref = copy.deepcopy(eager).double()
        args = tuple(v.double() if v.is_floating_point() else v for v in values)
        with torch.no_grad():
            return Check(provider(ref)(*args),
                         {p: provider(m)(*values) for p, m in (("patched", fused), ("eager", eager))})
    return check


def suite(device: torch.device, level: str = "default") -> Suite:
    from mmkernels.models import demo

    kind = "cuda" if device.type == "cuda" else "cpu"
    size = "tiny" if level == "quick" else "base" if kind == "cuda" else "small"
    cases = []
    for name in ("vilbert", "clip", "llava"):
        batch = max(2, _BATCH[(name, kind)] // 4) if level == "quick" else _BATCH[(name, kind)]
        case = demo.CASES[name](batch, torch.device("cpu"), size)
        eager, fused, values, provider = _pair(case, device)
        check = _check(lambda name=name: demo.CASES[name](2, torch.device("cpu"), "tiny"), device)
        cases.append(Case(f"{name}_step", f"{case.describe}, fp32", lambda values=values: values,
                          {"patched": provider(fused), "eager": provider(eager)},
                          baseline="eager", modes=("forward", "forward+backward"),
                          memory_mode="forward+backward", check=check, repeats=5, warmup=1))
    return Suite("models", cases)
