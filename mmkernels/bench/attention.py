"""Packed attention benchmarks (issue: varlen attention).

A LLaVA-style packed batch: sequences of ragged lengths, causal, with image blocks
(576 patches on a GPU, 64 on a CPU) that attend bidirectionally. Providers:
mmkernels.varlen_attention; torch SDPA on the batch padded to its longest sequence with
a boolean mask, and one SDPA call per sequence (what a user without varlen kernels
runs); FlexAttention (compiled) with a document mask built per batch, on a GPU and in
``--full`` on a CPU (forward only there: torch has no CPU backward for it, and its
compile takes ~10-20 s); on a GPU also flash_attn_varlen_func when installed (causal,
without image blocks, which it cannot express). Sweep: forward+backward against the
packed token count (the lengths scaled together).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mmkernels
from mmkernels import reference
from mmkernels.bench.suites import Case, Check, Suite, sweep_case

#: level -> the sweep's factors on the sequence lengths (1: the point)
FACTORS = {"quick": (0.5, 1.0), "default": (0.5, 1.0, 2.0), "full": (0.5, 1.0, 2.0, 4.0)}


def _shapes(device: torch.device, level: str, factor: float = 1.0):
    if device.type == "cuda":
        cfg = dict(lengths=[1100, 700, 2048, 1500, 300, 1900, 1024, 600], H=16, D=128,
                   dtype=torch.bfloat16, image=576)
    elif level == "quick":
        cfg = dict(lengths=[26, 12, 50], H=2, D=16, dtype=torch.float32, image=16)
    else:
        cfg = dict(lengths=[130, 60, 256, 190, 40, 220], H=8, D=64, dtype=torch.float32, image=64)
    cfg["lengths"] = [max(8, round(n * factor)) for n in cfg["lengths"]]
    cfg["image"] = round(cfg["image"] * factor)
    return cfg


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


def _visible(bid_q, bid_k, qpos, kpos):
    """Causal, or both positions in the same image block (block id != 0)."""
    return (kpos <= qpos) | ((bid_q == bid_k) & (bid_q != 0))


def _sdpa_loop(q, k, v, cu, bid, max_len):
    """One SDPA call per sequence, each with its (L, L) boolean mask."""
    outs = []
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        i = torch.arange(e - s, device=q.device)
        b = bid[s:e]
        mask = _visible(b[:, None], b[None, :], i[:, None], i[None, :])
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask).transpose(0, 1))
    return torch.cat(outs)


_FLEX = {}


def _flex(q, k, v, cu, bid, max_len):
    """FlexAttention (compiled) with a document mask built per batch, as a user of
    torch.nn.attention.flex_attention does: same sequence, and causal or the same
    image block."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    if q.device.type == "cpu" and not torch.is_grad_enabled():
        # it refuses inputs that require grad on a CPU (no CPU backward), even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    total = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=q.device),
                                  cu.diff().long(), output_size=total)

    def mask_mod(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & _visible(bid[qi], bid[ki], qi, ki)

    block_mask = create_block_mask(mask_mod, 1, 1, total, total, device=q.device)
    out = _FLEX["fn"](*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask)
    return out[0].transpose(0, 1)


def _flash_varlen(q, k, v, cu, bid, max_len):
    from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
    return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)


def _check(device, cfg, providers):
    def check() -> Check:
        q, k, v, cu, bid, m = _inputs(device, cfg)()
        small = slice(0, int(cu[2]))  # the first two sequences, in float64
        cu2 = cu[:3]
        args = [t.detach()[small] for t in (q, k, v)]
        ref, _ = reference.varlen_attention(*[a.double().cpu() for a in args], cu2.cpu(),
                                            cu2.cpu(), None, True, bid[small].cpu())
        m2 = int(cu2.diff().max())
        return Check(ref, {name: fn(*args, cu2, bid[small], m2).cpu()
                           for name, fn in providers.items()})
    return check


def _flops(cfg):
    return 4.0 * cfg["H"] * cfg["D"] * sum(n * n / 2 for n in cfg["lengths"])  # causal: half


def _describe(cfg):
    return (f"lengths={cfg['lengths']} H={cfg['H']} D={cfg['D']} {str(cfg['dtype'])[6:]} "
            f"causal + image blocks of {cfg['image']}")


def suite(device: torch.device, level: str = "default") -> Suite:
    cfg = _shapes(device, level)
    L = cfg["lengths"]
    providers = {"mmkernels": _ours, "sdpa-padded": _sdpa_padded, "sdpa-loop": _sdpa_loop}
    forward_only = ()
    if device.type == "cuda" or level == "full":
        # a compile of ~10-20 s on a CPU (in the warm-up, so untimed); torch 2.14 has no
        # CPU backward for FlexAttention
        providers["flex-attention"] = _flex
        forward_only = () if device.type == "cuda" else ("flex-attention",)
    point = Case("varlen_attention", _describe(cfg), _inputs(device, cfg), providers,
                 baseline="sdpa-padded", memory_mode="forward+backward",
                 check=_check(device, cfg, providers), flops=_flops(cfg), size=sum(L),
                 forward_only=forward_only)
    cases = [point]
    for f in FACTORS[level]:
        if f != 1.0:
            c = _shapes(device, level, f)
            cases.append(sweep_case(point, f"varlen_attention x{f:g}", sum(c["lengths"]),
                                    _inputs(device, c), "forward+backward", _describe(c),
                                    flops=_flops(c)))
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            cases.append(Case("varlen_attention_causal", "as above, causal only",
                              _inputs(device, cfg, with_blocks=False),
                              {"mmkernels": _ours, "flash_attn_varlen": _flash_varlen,
                               "sdpa-padded": _sdpa_padded},
                              baseline="flash_attn_varlen", flops=_flops(cfg)))
        except ImportError:
            pass
    return Suite("attention", cases, size_axis="tokens (packed)")
