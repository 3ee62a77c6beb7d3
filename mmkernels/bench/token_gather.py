"""Token gather benchmarks (issue: masked-region and token gather kernels).

random_masking: B=256, N=196 (ViT-B/16 at 224), D=768, ratio 0.5, float32, against
MAE's eager argsort + gather (mmkernels.reference.random_masking), noise given to
both. restore_tokens against MAE's decoder unshuffle, masked_select_rows against
``x[mask]`` (MLM, 15% of B=64 x L=512 selected), scatter_image_features against HF
LLaVA's ``masked_scatter`` (576 image tokens in 2048, D=4096; B=2, ``--full`` B=4). Sweep:
random_masking forward+backward against the batch B.
"""

from __future__ import annotations

import torch

import mmkernels
from mmkernels import reference
from mmkernels.bench.suites import Case, Check, Suite, sweep_case

N, RATIO = 196, 0.5
N_KEEP = int(N * (1 - RATIO))
CHECK_B = 4  # samples in the correctness check

#: level -> (D, B of the point, the sweep's B, masked_select (B, L), scatter (B, L, D, image))
SIZES = {"quick": (64, 16, (4, 16), (4, 64), (2, 128, 64, 36)),
         "default": (768, 256, (64, 128, 256), (64, 512), (2, 2048, 4096, 576)),
         "full": (768, 256, (32, 64, 128, 256, 512, 1024), (64, 512), (4, 2048, 4096, 576))}


def _masking_inputs(device, b, d):
    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, N, d, generator=g).to(device).requires_grad_()
        return x, torch.rand(b, N, generator=g).to(device)
    return make


def _restore_inputs(device, b, d):
    def make():
        g = torch.Generator().manual_seed(1)
        kept = torch.randn(b, N_KEEP, d, generator=g).to(device).requires_grad_()
        ids = torch.argsort(torch.rand(b, N, generator=g), 1).to(device)
        token = torch.randn(d, generator=g).to(device).requires_grad_()
        return kept, ids, token
    return make


def _select_inputs(device, b, length, d):
    def make():  # MLM: 15% of the positions selected
        g = torch.Generator().manual_seed(2)
        x = torch.randn(b, length, d, generator=g).to(device).requires_grad_()
        return x, (torch.rand(b, length, generator=g) < 0.15).to(device)
    return make


def _image_inputs(device, bsz, length, dim, image):
    def make():  # LLaVA-1.5: 576 image tokens in a 2048-token sequence, D=4096
        g = torch.Generator().manual_seed(3)
        embeds = torch.randn(bsz, length, dim, generator=g).to(device).requires_grad_()
        mask = torch.zeros(bsz, length, dtype=torch.bool)
        mask[:, 35:35 + image] = True
        feats = torch.randn(bsz * image, dim, generator=g).to(device).requires_grad_()
        return embeds, mask.to(device), feats
    return make


def _check(make_inputs, providers, ref_fn):
    """Each provider on the (small) inputs, and ``ref_fn`` on them in float64."""
    def check() -> Check:
        args = [a.detach() for a in make_inputs()]
        args64 = [a.double() if a.is_floating_point() else a for a in args]
        return Check(ref_fn(*args64).cpu(), {p: fn(*args).cpu() for p, fn in providers.items()})
    return check


def suite(device: torch.device, level: str = "default") -> Suite:
    D, B, sweep, (sel_b, sel_l), (img_b, img_l, img_d, img_n) = SIZES[level]
    masking = {"mmkernels": lambda x, nz: mmkernels.random_masking(x, RATIO, noise=nz)[0],
               "mae-eager": lambda x, nz: reference.random_masking(x, N_KEEP, nz)[0]}
    restore = {"mmkernels": mmkernels.restore_tokens, "mae-eager": reference.restore_tokens}
    select = {"mmkernels": lambda x, m: mmkernels.masked_select_rows(x, m)[0],
              "eager x[mask]": lambda x, m: x[m]}
    scatter = {"mmkernels": mmkernels.scatter_image_features,
               "hf-masked_scatter": reference.scatter_image_features}
    point = Case("random_masking", f"B={B} N={N} D={D} ratio={RATIO} fp32 (x_kept)",
                 _masking_inputs(device, B, D), masking, baseline="mae-eager",
                 targets={("mmkernels", "forward"): 2.0, ("mmkernels", "forward+backward"): 2.0},
                 check=_check(_masking_inputs(device, CHECK_B, D), masking,
                              lambda x, nz: reference.random_masking(x, N_KEEP, nz)[0]),
                 bytes_moved=2.0 * 4 * B * N_KEEP * D, size=B)
    cases = [
        point,
        Case("restore_tokens", f"B={B} N={N} N_keep={N_KEEP} D={D} fp32",
             _restore_inputs(device, B, D), restore, baseline="mae-eager",
             check=_check(_restore_inputs(device, CHECK_B, D), restore, reference.restore_tokens),
             bytes_moved=4.0 * (B * N_KEEP * D + B * N * D)),
        Case("masked_select_rows", f"B={sel_b} L={sel_l} D={D}, 15% selected, fp32",
             _select_inputs(device, sel_b, sel_l, D), select, baseline="eager x[mask]",
             check=_check(_select_inputs(device, CHECK_B, sel_l, D), select,
                          lambda x, m: reference.masked_select_rows(x, m)[0])),
        Case("scatter_image_features",
             f"B={img_b} L={img_l} D={img_d}, {img_n} image tokens each, fp32",
             _image_inputs(device, img_b, img_l, img_d, img_n), scatter,
             baseline="hf-masked_scatter",
             check=_check(_image_inputs(device, 1, img_l, 64, img_n), scatter,
                          reference.scatter_image_features)),
    ]
    cases += [sweep_case(point, f"random_masking B={b}", b, _masking_inputs(device, b, D),
                         "forward+backward", f"B={b} N={N} D={D}",
                         bytes_moved=2.0 * 4 * b * N_KEEP * D)
              for b in sweep if b != B]
    return Suite("token_gather", cases, size_axis="B (images)")
