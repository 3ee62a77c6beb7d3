"""Contrastive loss benchmarks (issue: large-batch InfoNCE / SigLIP).

CPU: B=4096 (``--full``: 16384), D=512, float32, forward+backward, against open_clip's
ClipLoss and SigLipLoss in the same run (time and allocator peak); in ``--full`` also
B=65536 (open_clip's B x B logits do not fit in 24 GiB): mmkernels alone, time and
peak. GPU: B=65536 in bfloat16 (the dtype of CLIP training under autocast) against
open_clip, and Inf-CL's cal_inf_loss when installed; B=262144 mmkernels alone. Sweep:
InfoNCE forward+backward against B, with the exponents it must show (B^2 time; memory
O(B) for mmkernels, O(B^2) for open_clip). The issue's targets (2x open_clip's speed,
a tenth of its peak memory) are judged at the batch they are set at (:data:`TARGET_B`).
"""

from __future__ import annotations

import torch

import mmkernels
from mmkernels import reference
from mmkernels.bench.suites import Case, Check, Suite, sweep_case

D = 512
CHECK_B = 512  # the float64 reference materialises B x B logits

#: (device kind, level) -> (B of the point, the sweep's B, B of the mmkernels-only case
#: or None). The point is in the sweep; the mmkernels-only case joins mmkernels' fit.
SIZES = {("cpu", "quick"): (256, (128, 256), None),
         ("cpu", "default"): (4096, (1024, 2048, 4096), None),
         ("cpu", "full"): (16384, (1024, 2048, 4096, 8192, 16384), 65536),
         ("cuda", "quick"): (4096, (1024, 4096), None),
         ("cuda", "default"): (65536, (8192, 16384, 32768, 65536), 262144),
         ("cuda", "full"): (65536, (4096, 8192, 16384, 32768, 65536, 131072), 262144)}

#: fitted exponents of the sweep (time and peak memory against B): the losses do B^2 work
#: in O(B) memory; open_clip materialises B x B logits
EXPONENTS = {("mmkernels", "time"): (1.6, 2.3), ("mmkernels", "memory"): (0.0, 1.3),
             ("open_clip", "memory"): (1.5, 2.3)}

#: the batch the issue's targets are set at (2x open_clip's speed, 0.1x its memory); the
#: memory ratio of an O(B) loss to an O(B^2) one grows as B shrinks, so the targets are
#: judged at this size only (``--full`` on a CPU)
TARGET_B = {"cpu": 16384, "cuda": 65536}


def _inputs(B, device, with_bias=False):
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

    def make():
        g = torch.Generator().manual_seed(0)
        img = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1)
        txt = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1)
        out = [img.to(device, dtype).requires_grad_(), txt.to(device, dtype).requires_grad_(),
               torch.tensor(100.0, device=device).requires_grad_()]
        if with_bias:
            out.append(torch.tensor(-10.0, device=device).requires_grad_())
        return tuple(out)
    return make


def _open_clip_loss():
    import open_clip
    return open_clip.ClipLoss()


def _open_clip_siglip():
    import open_clip
    return open_clip.loss.SigLipLoss()


def _check(with_bias, device, providers):
    def check() -> Check:
        args = [a.detach() for a in _inputs(CHECK_B, device, with_bias)()]
        ref_fn = reference.sigmoid_contrastive if with_bias else reference.info_nce
        return Check(ref_fn(*[a.double() for a in args]),
                     {name: fn(*args) for name, fn in providers.items()})
    return check


def _infcl(i, t, s):
    from inf_cl import cal_inf_loss  # type: ignore[import-not-found]
    labels = torch.arange(i.shape[0], device=i.device)
    return (cal_inf_loss(i, t, scale=s, labels=labels).mean()
            + cal_inf_loss(t, i, scale=s, labels=labels).mean()) / 2


def suite(device: torch.device, level: str = "default") -> Suite:
    cuda = device.type == "cuda"
    B, sweep, huge = SIZES[("cuda" if cuda else "cpu", level)]
    dt = "bfloat16" if cuda else "float32"
    clip_providers = {"mmkernels": lambda i, t, s: mmkernels.info_nce(i, t, s),
                      "open_clip": lambda i, t, s: _open_clip_loss()(i, t, s)}
    if cuda:
        try:
            import inf_cl  # type: ignore[import-not-found]  # noqa: F401
            clip_providers["inf_cl"] = _infcl
        except ImportError:
            pass
    siglip_providers = {"mmkernels": lambda i, t, s, b: mmkernels.sigmoid_contrastive(i, t, s, b),
                        "open_clip": lambda i, t, s, b: _open_clip_siglip()(i, t, s, b)}
    fb = ("forward+backward",)
    # On a CPU each call at these sizes is seconds long on a slow machine, allocates and
    # faults in fresh memory as every later call does, and the code paths ran in the
    # check: no warm-up call. On a GPU the first call at a new size may autotune.
    warmup = 1 if cuda else 0
    at_target = B == TARGET_B["cuda" if cuda else "cpu"]
    targets = {("mmkernels", "forward+backward"): 2.0} if at_target else {}
    memory_targets = {"mmkernels": 0.1} if at_target else {}
    note = "" if at_target else f" (targets are set at B={TARGET_B['cuda' if cuda else 'cpu']})"
    point = Case("info_nce", f"B={B} D={D} {dt}, forward+backward{note}", _inputs(B, device),
                 clip_providers, baseline="open_clip", modes=fb, targets=targets,
                 memory_mode="forward+backward", memory_targets=memory_targets,
                 check=_check(False, device, clip_providers), repeats=3, warmup=warmup,
                 flops=2.0 * B * B * D, size=B)
    cases = [
        point,
        Case("sigmoid_contrastive", f"B={B} D={D} {dt}, forward+backward{note}",
             _inputs(B, device, with_bias=True), siglip_providers, baseline="open_clip",
             modes=fb, targets=targets, memory_mode="forward+backward",
             memory_targets=memory_targets,
             check=_check(True, device, siglip_providers), repeats=3, warmup=warmup,
             flops=2.0 * B * B * D),
    ]
    cases += [sweep_case(point, f"info_nce B={b}", b, _inputs(b, device), fb[0],
                         f"B={b} D={D} {dt}", flops=2.0 * b * b * D, repeats=None, warmup=None)
              for b in sweep if b != B]
    if huge:
        ours = {"mmkernels": clip_providers["mmkernels"]}
        cases.append(sweep_case(
            point, "info_nce_huge", huge, _inputs(huge, device), fb[0],
            f"B={huge} D={D} {dt} (open_clip cannot hold its B x B logits here)",
            providers=ours, baseline="mmkernels", repeats=1,
            warmup=0, flops=2.0 * huge * huge * D))
    return Suite("contrastive", cases, size_axis="B (pairs)", expected_exponents=EXPONENTS)
