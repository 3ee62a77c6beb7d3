"""Train a small reference model eager, then patched, and compare.

    python -m mmkernels.models.demo --model {vilbert,clip,llava} [--steps 300]
        [--batch-size N] [--threads N] [--out DIR]

Both runs start from the same initial parameters and see the same synthetic batches
(:mod:`mmkernels.models.training` reseeds every step). The demo prints both loss
curves' end points, the speed ratio (eager time / patched time over all steps; the
two models train in lockstep, step i eager then step i patched, so that a change in
the machine's load affects both alike) and
the peak-memory ratio of one training step (eager / patched, the benchmark harness's
measure), and saves a PNG of the two curves. Runs on the CPU by default (the C++ and
CPU kernels; ``--device cuda`` for a GPU). No download, no dataset.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmkernels.models.patching import patch
from mmkernels.models.training import TrainRun, make_optimizer, peak_memory, train_step


@dataclass
class DemoCase:
    """A model to demo: its builder, the batch of a step, the loss of a batch."""

    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[int], dict]
    loss_fn: Callable[[nn.Module, dict], Tensor]
    lr: float
    describe: str


def _config(cls, size: str):
    """``cls()`` (the tiny test config) or ``cls.small()`` / ``cls.base()``."""
    return cls() if size == "tiny" else getattr(cls, size)()


def _cycled(make: Callable[[int], dict], device: torch.device) -> Callable[[int], dict]:
    """make_batch(step): 8 synthetic batches (seeds 0-7) in turn, each built on first
    use and moved to ``device``."""
    @functools.cache
    def batch(seed: int) -> dict:
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in make(seed).items()}

    return lambda step: batch(step % 8)


def _loss(model: nn.Module, batch: dict) -> Tensor:
    return model(**batch).loss


def _vilbert(batch_size: int, device: torch.device, size: str) -> DemoCase:
    from mmkernels.models import vilbert

    cfg = _config(vilbert.ViLBertConfig, size).without_dropout()
    return DemoCase("vilbert", lambda: vilbert.ViLBertForPreTraining(cfg),
                    _cycled(lambda s: vilbert.synthetic_batch(cfg, batch_size, seed=s), device),
                    _loss, 1e-3, f"ViLBERT {size} ({batch_size} image-caption pairs per step, "
                    "MLM + masked regions + ITM)")


def _clip(batch_size: int, device: torch.device, size: str) -> DemoCase:
    from mmkernels.models import clip

    cfg = _config(clip.CLIPConfig, size)

    def make(seed: int) -> dict:  # (the class ids are for evaluation)
        return {k: v for k, v in clip.synthetic_batch(cfg, batch_size, seed=seed).items()
                if k != "classes"}

    return DemoCase("clip", lambda: clip.CLIP(cfg), _cycled(make, device), _loss, 1e-3,
                    f"CLIP {size} ({batch_size} pairs per step, FLIP masking, InfoNCE)")


def _llava(batch_size: int, device: torch.device, size: str) -> DemoCase:
    from mmkernels.models import llava

    cfg = _config(llava.LlavaConfig, size)
    images = tuple(i % 3 for i in range(batch_size))  # 0, 1 or 2 images per sample
    return DemoCase("llava", lambda: llava.Llava(cfg),
                    _cycled(lambda s: llava.synthetic_pack(cfg, seed=s, images=images), device),
                    _loss, 1e-3,
                    f"LLaVA {size} ({batch_size} samples packed per step, causal varlen)")


CASES = {"vilbert": _vilbert, "clip": _clip, "llava": _llava}
# small: the demo; tiny: the test configs (a smoke run); base: realistic (GPU benchmarks)
SIZES = ("small", "tiny", "base")
DEFAULT_BATCH = {"vilbert": 16, "clip": 64, "llava": 8}


def _plot(path: str, title: str, eager: list[float], fused: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(eager, label="eager PyTorch", linewidth=2.5, alpha=0.6)
    ax.plot(fused, label="patched (mmkernels)", linewidth=1.0, linestyle="--")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(name: str, steps: int = 300, batch_size: int | None = None,
        device: str = "cpu", out: str = ".", seed: int = 0, quiet: bool = False,
        size: str = "small") -> dict:
    """Train eager then patched; returns the figures (and writes ``demo_<name>.png``)."""
    if name not in CASES:
        raise ValueError(f"model must be one of {sorted(CASES)}, got {name!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    dev = torch.device(device)
    case = CASES[name](batch_size or DEFAULT_BATCH[name], dev, size)
    torch.manual_seed(seed)
    eager = case.make_model().to(dev)
    fused = copy.deepcopy(eager)
    patch(fused)

    def one_step(model):
        def f():
            model.zero_grad(set_to_none=True)
            case.loss_fn(model, case.make_batch(0)).backward()
        return f

    mem = {k: peak_memory(one_step(m), dev) for k, m in (("eager", eager), ("patched", fused))}
    for m in (eager, fused):
        m.zero_grad(set_to_none=True)

    # lockstep: step i eager, then step i patched, each timed on its own, so that a
    # change in the machine's load during the run affects both alike
    models = {"eager": eager, "patched": fused}
    runs = {tag: TrainRun() for tag in models}
    opts = {tag: make_optimizer(m, case.lr) for tag, m in models.items()}
    for m in models.values():
        m.train()
    for step in range(steps):
        batch = case.make_batch(step)
        for tag, model in models.items():
            t0 = time.perf_counter()
            runs[tag].losses.append(train_step(model, batch, case.loss_fn, opts[tag], seed + step))
            runs[tag].seconds += time.perf_counter() - t0
        if not quiet and (step % max(steps // 10, 1) == 0 or step == steps - 1):
            print(f"  step {step:4d}/{steps}  loss eager {runs['eager'].losses[-1]:.4f}  "
                  f"patched {runs['patched'].losses[-1]:.4f}", file=sys.stderr)
    e, f = runs["eager"], runs["patched"]
    rel = max(abs(a - b) / max(abs(a), 1e-30) for a, b in zip(e.losses, f.losses, strict=True))
    png = os.path.join(out, f"demo_{name}.png")
    os.makedirs(out, exist_ok=True)
    _plot(png, f"{case.describe}\n{dev.type}, {torch.get_num_threads()} threads", e.losses,
          f.losses)
    return {"model": name, "describe": case.describe, "steps": steps,
            "eager_loss": (e.losses[0], e.losses[-1]),
            "patched_loss": (f.losses[0], f.losses[-1]), "max_rel_loss_diff": rel,
            "eager_s": e.seconds, "patched_s": f.seconds, "speedup": e.seconds / f.seconds,
            "eager_peak_bytes": mem["eager"], "patched_peak_bytes": mem["patched"],
            "memory_ratio": mem["eager"] / max(mem["patched"], 1), "png": png}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmkernels.models.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(CASES), required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--out", default=".", help="directory for the PNG")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run(args.model, args.steps, args.batch_size, args.device, args.out, size=args.size)
    mib = 2.0 ** 20
    print(f"{r['describe']}, {r['steps']} steps, {args.device}, {torch.get_num_threads()} threads")
    print(f"  eager   loss {r['eager_loss'][0]:.4f} -> {r['eager_loss'][1]:.4f}   "
          f"{r['eager_s']:.1f} s   peak step memory {r['eager_peak_bytes'] / mib:.1f} MiB")
    print(f"  patched loss {r['patched_loss'][0]:.4f} -> {r['patched_loss'][1]:.4f}   "
          f"{r['patched_s']:.1f} s   peak step memory {r['patched_peak_bytes'] / mib:.1f} MiB")
    print(f"  speed: patched is {r['speedup']:.2f}x eager; peak memory: eager / patched = "
          f"{r['memory_ratio']:.2f}x; max relative loss difference over all steps "
          f"{r['max_rel_loss_diff']:.2e}")
    print(f"  curves: {r['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
