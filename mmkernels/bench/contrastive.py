"""Contrastive loss benchmarks (issue: large-batch InfoNCE / SigLIP).

CPU: B=16384, D=512, float32, forward+backward, against open_clip's ClipLoss and
SigLipLoss in the same run (time and allocator peak); B=65536 (open_clip's B x B logits
do not fit in 24 GiB): mmkernels alone, time and peak. GPU: B=65536 in bfloat16 (the
dtype of CLIP training under autocast) against open_clip, and Inf-CL's cal_inf_loss
when installed; B=262144 mmkernels alone.
"""

from __future__ import annotations

import torch

import mmkernels
from mmkernels import reference
from mmkernels.bench.suites import Case, Suite
from mmkernels.testing import max_error

D = 512


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


def _check(with_bias, device):
    def check():
        B = 512  # materialised float64 reference at a size it can hold
        args = _inputs(B, device, with_bias)()
        args64 = [a.detach().double() for a in args]
        if with_bias:
            ref = reference.sigmoid_contrastive(*args64)
            return {"mmkernels": max_error(mmkernels.sigmoid_contrastive(*[a.detach() for a in args]), ref),
                    "open_clip": max_error(_open_clip_siglip()(*[a.detach() for a in args]), ref)}
        ref = reference.info_nce(*args64)
        return {"mmkernels": max_error(mmkernels.info_nce(*[a.detach() for a in args]), ref),
                "open_clip": max_error(_open_clip_loss()(*[a.detach() for a in args]), ref)}
    return check


def suite(device: torch.device) -> Suite:
    big = 16384 if device.type == "cpu" else 65536
    huge = 65536 if device.type == "cpu" else 262144
    dt = "float32" if device.type == "cpu" else "bfloat16"
    clip_providers = {"mmkernels": lambda i, t, s: mmkernels.info_nce(i, t, s),
                      "open_clip": lambda i, t, s: _open_clip_loss()(i, t, s)}
    if device.type == "cuda":
        try:
            from inf_cl import cal_inf_loss  # type: ignore[import-not-found]

            def _infcl(i, t, s):
                labels = torch.arange(i.shape[0], device=i.device)
                return (cal_inf_loss(i, t, scale=s, labels=labels).mean()
                        + cal_inf_loss(t, i, scale=s, labels=labels).mean()) / 2
            clip_providers["inf_cl"] = _infcl
        except ImportError:
            pass
    cases = [
        Case("info_nce", f"B={big} D={D} {dt}, forward+backward", _inputs(big, device),
             clip_providers, baseline="open_clip", modes=("forward+backward",),
             targets={("mmkernels", "forward+backward"): 2.0},
             memory_mode="forward+backward", memory_targets={"mmkernels": 0.1},
             check=_check(False, device), repeats=3, warmup=1, flops=2.0 * big * big * D),
        Case("sigmoid_contrastive", f"B={big} D={D} {dt}, forward+backward",
             _inputs(big, device, with_bias=True),
             {"mmkernels": lambda i, t, s, b: mmkernels.sigmoid_contrastive(i, t, s, b),
              "open_clip": lambda i, t, s, b: _open_clip_siglip()(i, t, s, b)},
             baseline="open_clip", modes=("forward+backward",),
             targets={("mmkernels", "forward+backward"): 2.0},
             memory_mode="forward+backward", memory_targets={"mmkernels": 0.1},
             check=_check(True, device), repeats=3, warmup=1),
        Case("info_nce_huge", f"B={huge} D={D} {dt}, forward+backward (open_clip cannot "
             "hold its B x B logits here)", _inputs(huge, device),
             {"mmkernels": lambda i, t, s: mmkernels.info_nce(i, t, s)}, baseline="mmkernels",
             modes=("forward+backward",), memory_mode="forward+backward", repeats=1, warmup=0),
    ]
    return Suite("contrastive", cases)
