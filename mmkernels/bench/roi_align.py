"""RoIAlign family benchmarks (issue: foundation + RoIAlign).

Problem: N=2, C=256, a 64x64 feature map at stride 16 (a 1024x1024 image), K=512
detector-style boxes with sides uniform in [16, 640] image pixels, 7x7 output,
sampling_ratio=2, aligned=True, float32. Baselines: torchvision.ops.roi_align
(its CPU kernel is single-threaded), and roi_align + mean for region_features.
"""

from __future__ import annotations

import torch

import mmkernels
from mmkernels import reference
from mmkernels.bench.suites import Case, Suite
from mmkernels.testing import max_error

N, C, H, W, K = 2, 256, 64, 64, 512
IMAGE = 1024
SCALE = H / IMAGE
OUT = (7, 7)
SR = 2
CHECK_K = 48  # regions checked against the float64 reference (it loops in Python)


def make_boxes(k: int, n: int, image: int, generator: torch.Generator) -> torch.Tensor:
    wh = torch.rand(k, 2, generator=generator) * 624 + 16
    xy = torch.rand(k, 2, generator=generator) * (image - wh)
    idx = torch.randint(0, n, (k, 1), generator=generator).float()
    return torch.cat([idx, xy, xy + wh], 1)


def _inputs(device, channels_last=False):
    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N, C, H, W, generator=g).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.requires_grad_(), make_boxes(K, N, IMAGE, g).to(device)
    return make


def _tv_roi_align(x, rois):
    import torchvision
    return torchvision.ops.roi_align(x, rois, OUT, SCALE, SR, True)


def _check(op_name, providers, device):
    def check():
        x, rois = _inputs(device)()
        x = x.detach()
        rois = rois[:CHECK_K]
        ref_fn = getattr(reference, op_name)
        ref = ref_fn(x.double().cpu(), rois.double().cpu(), OUT, SCALE, SR, True)
        return {name: max_error(fn(x, rois).cpu(), ref) for name, fn in providers.items()}
    return check


def suite(device: torch.device) -> Suite:
    roi_providers = {
        "mmkernels": lambda x, r: mmkernels.roi_align(x, r, OUT, SCALE, SR, True),
        "torchvision": _tv_roi_align,
    }
    region_providers = {
        "mmkernels": lambda x, r: mmkernels.region_features(x, r, OUT, SCALE, SR, True),
        "torchvision+mean": lambda x, r: _tv_roi_align(x, r).mean((2, 3)),
    }
    samples = K * OUT[0] * OUT[1] * SR * SR
    cases = [
        Case("roi_align", f"N={N} C={C} {H}x{W} K={K} out=7x7 sr=2 aligned fp32",
             _inputs(device), roi_providers, baseline="torchvision",
             targets={("mmkernels", "forward"): 1.8, ("mmkernels", "forward+backward"): 1.8},
             check=_check("roi_align", roi_providers, device),
             flops=samples * C * 8.0, bytes_moved=4.0 * (N * C * H * W + K * C * 49)),
        Case("roi_align_channels_last", "as roi_align, channels_last input",
             _inputs(device, channels_last=True), roi_providers, baseline="torchvision",
             flops=samples * C * 8.0, bytes_moved=4.0 * (N * C * H * W + K * C * 49)),
        Case("region_features", "as roi_align, pooled to (K, C)", _inputs(device),
             region_providers, baseline="torchvision+mean",
             targets={("mmkernels", "forward"): 2.0},
             memory_mode="forward", memory_targets={"mmkernels": 0.25},
             check=_check("region_features", region_providers, device),
             flops=samples * C * 8.0, bytes_moved=4.0 * (N * C * H * W + K * C)),
    ]
    return Suite("roi_align", cases)
