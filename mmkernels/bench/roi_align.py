"""RoIAlign family benchmarks (issue: foundation + RoIAlign).

Problem: N=2, C=256, a 64x64 feature map at stride 16 (a 1024x1024 image), K=512
detector-style boxes with sides uniform in [16, 640] image pixels, 7x7 output,
sampling_ratio=2, aligned=True, float32. Baselines: torchvision.ops.roi_align
(its CPU kernel is single-threaded), and roi_align + mean for region_features.
Sweep: roi_align forward+backward against the number of boxes K.
"""

from __future__ import annotations

import torch

import mmkernels
from mmkernels import reference
from mmkernels.bench.suites import Case, Check, Suite, sweep_case

N, H, W = 2, 64, 64
IMAGE = 1024
SCALE = H / IMAGE
OUT = (7, 7)
SR = 2
CHECK_K, CHECK_C = 16, 16  # the correctness check's regions and channels

#: level -> (channels, K of the point, the sweep's K)
SIZES = {"quick": (32, 64, (16, 64)),
         "default": (256, 512, (128, 256, 512)),
         "full": (256, 512, (128, 256, 512, 1024, 2048, 4096))}


def make_boxes(k: int, n: int, image: int, generator: torch.Generator) -> torch.Tensor:
    wh = torch.rand(k, 2, generator=generator) * 624 + 16
    xy = torch.rand(k, 2, generator=generator) * (image - wh)
    idx = torch.randint(0, n, (k, 1), generator=generator).float()
    return torch.cat([idx, xy, xy + wh], 1)


def _inputs(device, channels: int, k: int, channels_last=False):
    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N, channels, H, W, generator=g).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.requires_grad_(), make_boxes(k, N, IMAGE, g).to(device)
    return make


def _tv_roi_align(x, rois):
    import torchvision
    return torchvision.ops.roi_align(x, rois, OUT, SCALE, SR, True)


def _check(op_name, providers, device, channels_last=False):
    def check() -> Check:
        x, rois = _inputs(device, CHECK_C, CHECK_K, channels_last)()
        x = x.detach()
        ref = getattr(reference, op_name)(x.double().cpu(), rois.double().cpu(), OUT, SCALE, SR,
                                          True)
        return Check(ref, {name: fn(x, rois).cpu() for name, fn in providers.items()})
    return check


def suite(device: torch.device, level: str = "default") -> Suite:
    C, K, sweep = SIZES[level]
    roi_providers = {
        "mmkernels": lambda x, r: mmkernels.roi_align(x, r, OUT, SCALE, SR, True),
        "torchvision": _tv_roi_align,
    }
    region_providers = {
        "mmkernels": lambda x, r: mmkernels.region_features(x, r, OUT, SCALE, SR, True),
        "torchvision+mean": lambda x, r: _tv_roi_align(x, r).mean((2, 3)),
    }

    def flops(k):
        return k * OUT[0] * OUT[1] * SR * SR * C * 8.0

    def moved(k, out_elems):
        return 4.0 * (N * C * H * W + k * C * out_elems)

    shape = f"N={N} C={C} {H}x{W}"
    point = Case("roi_align", f"{shape} K={K} out=7x7 sr=2 aligned fp32",
                 _inputs(device, C, K), roi_providers, baseline="torchvision",
                 targets={("mmkernels", "forward"): 1.8, ("mmkernels", "forward+backward"): 1.8},
                 check=_check("roi_align", roi_providers, device),
                 flops=flops(K), bytes_moved=moved(K, 49), size=K)
    cases = [
        point,
        Case("roi_align_channels_last", f"as roi_align (K={K}), channels_last input",
             _inputs(device, C, K, channels_last=True), roi_providers, baseline="torchvision",
             check=_check("roi_align", roi_providers, device, channels_last=True),
             flops=flops(K), bytes_moved=moved(K, 49)),
        Case("region_features", f"as roi_align (K={K}), pooled to (K, C)",
             _inputs(device, C, K), region_providers, baseline="torchvision+mean",
             targets={("mmkernels", "forward"): 2.0},
             memory_mode="forward", memory_targets={"mmkernels": 0.25},
             check=_check("region_features", region_providers, device),
             flops=flops(K), bytes_moved=moved(K, 1)),
    ]
    cases += [sweep_case(point, f"roi_align K={k}", k, _inputs(device, C, k), "forward+backward",
                         f"{shape} K={k}", flops=flops(k), bytes_moved=moved(k, 49))
              for k in sweep if k != K]
    return Suite("roi_align", cases, size_axis="K (boxes)")
