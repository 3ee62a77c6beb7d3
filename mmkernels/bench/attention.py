"""Packed attention benchmarks (issue: varlen attention).

A LLaVA-style packed batch: sequences of ragged lengths, causal, with image blocks
(576 patches) that attend bidirectionally. Providers: mmkernels.varlen_attention, and
torch SDPA on the batch padded to its longest sequence with a boolean mask (what a
user without varlen kernels runs); on a GPU also flash_attn_varlen_func when installed
(causal, without image blocks, which it cannot express).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mmkernels
from mmkernels import reference
from mmkernels.bench.suites import Case, Suite
from mmkernels.testing import max_error


def _shapes(device: torch.device):
    if device.type == "cuda":
        return dict(lengths=[1100, 700, 2048, 1500, 300, 1900, 1024, 600], H=16, D=128,
                    dtype=torch.bfloat16, image=576)
    return dict(lengths=[130, 60, 256, 190, 40, 220], H=8, D=64, dtype=torch.float32, image=64)


def _inputs(device, cfg, with_blocks=True):
    def make():
        g = torch.Generator().manual_seed(0)
        lengths = cfg["lengths"]
        total, H, D = sum(lengths), cfg["H"], cfg["D"]
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        bid = torch.zeros(total, dtype=torch.int32)
        if with_blocks:
            for b, start in enumerate(cu[:-1].tolist()):  # an image after a 5-token prompt
                n = min(cfg["image"], lengths[b] - 5)
                bid[start + 5:start + 5 + n] = b + 1
        qkv = [torch.randn(total, H, D, generator=g).to(device=device, dtype=cfg["dtype"])
               .requires_grad_() for _ in range(3)]
        return (*qkv, cu.to(device), bid.to(device), max(lengths))
    return make


def _ours(q, k, v, cu, bid, max_len):
    return mmkernels.varlen_attention(q, k, v, cu, cu, max_len, max_len, causal=True,
                                      block_ids=bid)


def _sdpa_padded(q, k, v, cu, bid, max_len):
    """Pad to (B, H, Lmax, D), one boolean (B, 1, Lmax, Lmax) mask, SDPA, unpad."""
    lengths = cu.diff().tolist()
    B, H, D = len(lengths), q.shape[1], q.shape[2]
    pad = torch.zeros(B, max_len, dtype=torch.bool, device=q.device)
    for b, n in enumerate(lengths):
        pad[b, :n] = True

    def to_padded(t):
        out = t.new_zeros(B, max_len, H, D)
        out[pad] = t
        return out.transpose(1, 2)
    bids = bid.new_zeros(B, max_len)
    bids[pad] = bid
    i = torch.arange(max_len, device=q.device)
    mask = (i[None, :] <= i[:, None])[None] | ((bids[:, :, None] == bids[:, None, :])
                                              & (bids[:, :, None] != 0))
    mask = (mask & pad[:, None, :])[:, None]
    out = F.scaled_dot_product_attention(to_padded(q), to_padded(k), to_padded(v), attn_mask=mask)
    return out.transpose(1, 2)[pad]


def _flash_varlen(q, k, v, cu, bid, max_len):
    from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
    return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)


def _check(device, cfg):
    def check():
        q, k, v, cu, bid, m = _inputs(device, cfg)()
        small = slice(0, int(cu[2]))  # the first two sequences, in float64
        cu2 = cu[:3]
        args = [t.detach()[small] for t in (q, k, v)]
        ref, _ = reference.varlen_attention(*[a.double().cpu() for a in args], cu2.cpu(),
                                            cu2.cpu(), None, True, bid[small].cpu())
        m2 = int(cu2.diff().max())
        return {"mmkernels": max_error(_ours(*args, cu2, bid[small], m2).cpu(), ref),
                "sdpa-padded": max_error(_sdpa_padded(*args, cu2, bid[small], m2).cpu(), ref)}
    return check


def suite(device: torch.device) -> Suite:
    cfg = _shapes(device)
    L = cfg["lengths"]
    flops = 4.0 * cfg["H"] * cfg["D"] * sum(n * n / 2 for n in L)  # causal: half the pairs
    providers = {"mmkernels": _ours, "sdpa-padded": _sdpa_padded}
    cases = [Case("varlen_attention",
                  f"lengths={L} H={cfg['H']} D={cfg['D']} {str(cfg['dtype'])[6:]} causal + "
                  f"image blocks of {cfg['image']}", _inputs(device, cfg), providers,
                  baseline="sdpa-padded", memory_mode="forward+backward",
                  check=_check(device, cfg), flops=flops)]
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            cases.append(Case("varlen_attention_causal", "as above, causal only",
                              _inputs(device, cfg, with_blocks=False),
                              {"mmkernels": _ours, "flash_attn_varlen": _flash_varlen,
                               "sdpa-padded": _sdpa_padded},
                              baseline="flash_attn_varlen", flops=flops))
        except ImportError:
            pass
    return Suite("attention", cases)
