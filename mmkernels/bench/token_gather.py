"""Token gather benchmarks (issue: masked-region and token gather kernels).

random_masking: B=256, N=196 (ViT-B/16 at 224), D=768, ratio 0.5, float32, against
MAE's eager argsort + gather (mmkernels.reference.random_masking), noise given to
both. The other ops are reported against their eager formulations.
"""

from __future__ import annotations

import torch

import mmkernels
from mmkernels import reference
from mmkernels.bench.suites import Case, Suite
from mmkernels.testing import max_error

B, N, D, RATIO = 256, 196, 768, 0.5
N_KEEP = int(N * (1 - RATIO))


def _masking_inputs(device):
    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, N, D, generator=g).to(device).requires_grad_()
        return x, torch.rand(B, N, generator=g).to(device)
    return make


def _restore_inputs(device):
    def make():
        g = torch.Generator().manual_seed(1)
        kept = torch.randn(B, N_KEEP, D, generator=g).to(device).requires_grad_()
        ids = torch.argsort(torch.rand(B, N, generator=g), 1).to(device)
        token = torch.randn(D, generator=g).to(device).requires_grad_()
        return kept, ids, token
    return make


def _select_inputs(device):
    def make():
        g = torch.Generator().manual_seed(2)
        x = torch.randn(64, 512, D, generator=g).to(device).requires_grad_()  # MLM: 15% masked
        return x, (torch.rand(64, 512, generator=g) < 0.15).to(device)
    return make


def _image_inputs(device):
    def make():  # LLaVA-1.5: 576 image tokens in a 2048-token sequence, D=4096
        g = torch.Generator().manual_seed(3)
        bsz, length, dim = 4, 2048, 4096
        embeds = torch.randn(bsz, length, dim, generator=g).to(device).requires_grad_()
        mask = torch.zeros(bsz, length, dtype=torch.bool)
        mask[:, 35:35 + 576] = True
        feats = torch.randn(bsz * 576, dim, generator=g).to(device).requires_grad_()
        return embeds, mask.to(device), feats
    return make


def _check_masking(device):
    def check():
        x, noise = _masking_inputs(device)()
        ref = reference.random_masking(x.detach().double(), N_KEEP, noise)[0]
        ours = mmkernels.random_masking(x.detach(), RATIO, noise=noise)[0]
        eager = reference.random_masking(x.detach(), N_KEEP, noise)[0]
        return {"mmkernels": max_error(ours, ref), "mae-eager": max_error(eager, ref)}
    return check


def suite(device: torch.device) -> Suite:
    cases = [
        Case("random_masking", f"B={B} N={N} D={D} ratio={RATIO} fp32 (x_kept)",
             _masking_inputs(device),
             {"mmkernels": lambda x, nz: mmkernels.random_masking(x, RATIO, noise=nz)[0],
              "mae-eager": lambda x, nz: reference.random_masking(x, N_KEEP, nz)[0]},
             baseline="mae-eager",
             targets={("mmkernels", "forward"): 2.0, ("mmkernels", "forward+backward"): 2.0},
             check=_check_masking(device), bytes_moved=2.0 * 4 * B * N_KEEP * D),
        Case("restore_tokens", f"B={B} N={N} N_keep={N_KEEP} D={D} fp32", _restore_inputs(device),
             {"mmkernels": mmkernels.restore_tokens, "mae-eager": reference.restore_tokens},
             baseline="mae-eager", bytes_moved=4.0 * (B * N_KEEP * D + B * N * D)),
        Case("masked_select_rows", "B=64 L=512 D=768, 15% selected, fp32", _select_inputs(device),
             {"mmkernels": lambda x, m: mmkernels.masked_select_rows(x, m)[0],
              "eager x[mask]": lambda x, m: x[m]},
             baseline="eager x[mask]"),
        Case("scatter_image_features", "B=4 L=2048 D=4096, 576 image tokens each, fp32",
             _image_inputs(device),
             {"mmkernels": mmkernels.scatter_image_features,
              "hf-masked_scatter": reference.scatter_image_features},
             baseline="hf-masked_scatter"),
    ]
    return Suite("token_gather", cases)
