"""Co-attention benchmarks (issue: ViLBERT co-attention).

ViLBERT shapes: B=32 samples, 36 regions each (v_hidden 2048... here bi_hidden 1024 for
both streams, as the issue states: hidden 1024, 8 heads), 20-40 text tokens (padded to
40), float32. Providers: mmkernels.nn.BiAttention and the eager BertBiAttention
(mmkernels.reference), same weights; forward, backward, forward+backward of the full
module (projections included). On a GPU the raw fused kernel is also compared with two
SDPA calls on padded tensors, and with two flash_attn_varlen_func calls when installed.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

import mmkernels
from mmkernels import reference
from mmkernels.bench.suites import Case, Suite
from mmkernels.testing import max_error

B, NV, NT_MAX, HIDDEN, HEADS = 32, 36, 40, 1024, 8


def _config():
    return types.SimpleNamespace(bi_hidden_size=HIDDEN, bi_num_attention_heads=HEADS,
                                 v_hidden_size=HIDDEN, hidden_size=HIDDEN,
                                 v_attention_probs_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, visualization=False)


def _modules(device, dtype):
    torch.manual_seed(0)
    eager = reference.BertBiAttention(_config()).to(device=device, dtype=dtype)
    fused = mmkernels.nn.BiAttention(_config()).to(device=device, dtype=dtype)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def _module_inputs(device, dtype):
    def make():
        g = torch.Generator().manual_seed(1)
        x1 = torch.randn(B, NV, HIDDEN, generator=g).to(device=device, dtype=dtype)
        x2 = torch.randn(B, NT_MAX, HIDDEN, generator=g).to(device=device, dtype=dtype)
        lengths = torch.randint(20, NT_MAX + 1, (B,), generator=g)
        m1 = torch.zeros(B, 1, 1, NV, dtype=dtype)
        m2 = torch.zeros(B, 1, 1, NT_MAX, dtype=dtype)
        for b in range(B):
            m2[b, ..., int(lengths[b]):] = -10000.0
        return x1.requires_grad_(), m1.to(device), x2.requires_grad_(), m2.to(device)
    return make


def _both(module):
    def run(x1, m1, x2, m2):
        c1, c2, _ = module(x1, m1, x2, m2)
        # one output tensor for the harness: text contexts then region contexts
        return torch.cat([c1.flatten(), c2.flatten()])
    return run


def _kernel_inputs(device, dtype):
    def make():
        g = torch.Generator().manual_seed(2)
        lt = torch.randint(20, NT_MAX + 1, (B,), generator=g).tolist()
        lv = [NV] * B
        d = HIDDEN // HEADS
        ts = [torch.randn(sum(l), HEADS, d, generator=g).to(device=device, dtype=dtype)
              .requires_grad_() for l in (lt, lt, lt, lv, lv, lv)]
        cu = [torch.tensor([0] + torch.tensor(l).cumsum(0).tolist(), dtype=torch.int32,
                           device=device) for l in (lt, lv)]
        return (*ts, *cu)
    return make


def _fused_kernel(qa, ka, va, qb, kb, vb, cua, cub):
    oa, ob = mmkernels.co_attention(qa, ka, va, qb, kb, vb, cua, cub, NT_MAX, NV)
    return torch.cat([oa.flatten(), ob.flatten()])


def _pad(t, cu, L):
    lengths = cu.diff().tolist()
    out = t.new_zeros(len(lengths), L, *t.shape[1:])
    mask = torch.zeros(len(lengths), L, dtype=torch.bool, device=t.device)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    out[mask] = t
    return out.transpose(1, 2), mask


def _two_sdpa(qa, ka, va, qb, kb, vb, cua, cub):
    (pqa, ma), (pka, _), (pva, _) = (_pad(t, cua, NT_MAX) for t in (qa, ka, va))
    (pqb, mb), (pkb, _), (pvb, _) = (_pad(t, cub, NV) for t in (qb, kb, vb))
    oa = F.scaled_dot_product_attention(pqa, pkb, pvb, attn_mask=mb[:, None, None, :])
    ob = F.scaled_dot_product_attention(pqb, pka, pva, attn_mask=ma[:, None, None, :])
    return torch.cat([oa.transpose(1, 2)[ma].flatten(), ob.transpose(1, 2)[mb].flatten()])


def _two_flash(qa, ka, va, qb, kb, vb, cua, cub):
    from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
    oa = flash_attn_varlen_func(qa, kb, vb, cua, cub, NT_MAX, NV)
    ob = flash_attn_varlen_func(qb, ka, va, cub, cua, NV, NT_MAX)
    return torch.cat([oa.flatten(), ob.flatten()])


def _check(device, dtype):
    def check():
        eager, fused = _modules(device, dtype)
        x1, m1, x2, m2 = (t.detach() if t.requires_grad else t
                          for t in _module_inputs(device, dtype)())
        e64 = reference.BertBiAttention(_config()).double()
        e64.load_state_dict(eager.state_dict())
        valid = torch.cat([(m2.reshape(B, NT_MAX) == 0).flatten().repeat_interleave(HIDDEN),
                           torch.ones(B * NV * HIDDEN, dtype=torch.bool, device=m2.device)])
        ref = _both(e64.to(device))(x1.double(), m1.double(), x2.double(), m2.double())
        return {"mmkernels": max_error(_both(fused)(x1, m1, x2, m2)[valid].cpu(),
                                       ref[valid].cpu()),
                "vilbert-eager": max_error(_both(eager)(x1, m1, x2, m2)[valid].cpu(),
                                           ref[valid].cpu())}
    return check


def suite(device: torch.device) -> Suite:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    eager, fused = _modules(device, dtype)
    cases = [Case("biattention", f"B={B} regions={NV} text 20-{NT_MAX} hidden={HIDDEN} "
                  f"heads={HEADS} {str(dtype)[6:]} (module, projections included)",
                  _module_inputs(device, dtype),
                  {"mmkernels": _both(fused), "vilbert-eager": _both(eager)},
                  baseline="vilbert-eager",
                  targets={("mmkernels", "forward+backward"): 1.0},
                  check=_check(device, dtype))]
    if device.type == "cuda":
        providers = {"mmkernels": _fused_kernel, "2x sdpa-padded": _two_sdpa}
        try:
            import flash_attn  # noqa: F401
            providers["2x flash_attn_varlen"] = _two_flash
        except ImportError:
            pass
        cases.append(Case("co_attention_kernel", "the attention only, both directions",
                          _kernel_inputs(device, dtype), providers, baseline="2x sdpa-padded"))
    return Suite("co_attention", cases)
