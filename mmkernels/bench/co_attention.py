"""Co-attention benchmarks (issue: ViLBERT co-attention).

ViLBERT shapes: B=32 samples, 36 regions each, hidden 1024 for both streams, 8 heads
(as the issue states), 20-40 text tokens (padded to 40), float32 on a CPU, bfloat16
on a GPU. Cases:

* ``biattention``: mmkernels.nn.BiAttention against the eager BertBiAttention
  (mmkernels.reference), same weights; the full module, projections included.
* ``co_attention_kernel``: the attention only, both directions, against two SDPA
  calls on padded tensors, and two flash_attn_varlen_func calls when installed.

Sweep: the module's forward+backward against the batch B.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

import mmkernels
from mmkernels import reference
from mmkernels.bench.suites import Case, Check, Suite, sweep_case

NV, NT_MIN, NT_MAX = 36, 20, 40
CHECK_B = 4  # samples in the correctness checks

#: level -> (hidden, heads, B of the point, the sweep's B)
SIZES = {"quick": (64, 2, 4, (2, 4)),
         "default": (1024, 8, 32, (8, 16, 32)),
         "full": (1024, 8, 32, (8, 16, 32, 64, 128))}


def _config(hidden, heads):
    return types.SimpleNamespace(bi_hidden_size=hidden, bi_num_attention_heads=heads,
                                 v_hidden_size=hidden, hidden_size=hidden,
                                 v_attention_probs_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, visualization=False)


def _modules(device, dtype, hidden, heads):
    torch.manual_seed(0)
    eager = reference.BertBiAttention(_config(hidden, heads)).to(device=device, dtype=dtype)
    fused = mmkernels.nn.BiAttention(_config(hidden, heads)).to(device=device, dtype=dtype)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def _module_inputs(device, dtype, b, hidden):
    def make():
        g = torch.Generator().manual_seed(1)
        x1 = torch.randn(b, NV, hidden, generator=g).to(device=device, dtype=dtype)
        x2 = torch.randn(b, NT_MAX, hidden, generator=g).to(device=device, dtype=dtype)
        lengths = torch.randint(NT_MIN, NT_MAX + 1, (b,), generator=g)
        m1 = torch.zeros(b, 1, 1, NV, dtype=dtype)
        m2 = torch.zeros(b, 1, 1, NT_MAX, dtype=dtype)
        for i in range(b):
            m2[i, ..., int(lengths[i]):] = -10000.0
        return x1.requires_grad_(), m1.to(device), x2.requires_grad_(), m2.to(device)
    return make


def _both(module):
    def run(x1, m1, x2, m2):
        c1, c2, _ = module(x1, m1, x2, m2)
        # one output tensor for the harness: text contexts then region contexts
        return torch.cat([c1.flatten(), c2.flatten()])
    return run


def _kernel_inputs(device, dtype, b, hidden, heads):
    def make():
        g = torch.Generator().manual_seed(2)
        lt = torch.randint(NT_MIN, NT_MAX + 1, (b,), generator=g).tolist()
        lv = [NV] * b
        d = hidden // heads
        ts = [torch.randn(sum(l), heads, d, generator=g).to(device=device, dtype=dtype)
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


def _check_module(device, dtype, hidden, heads):
    def check() -> Check:
        eager, fused = _modules(device, dtype, hidden, heads)
        x1, m1, x2, m2 = (t.detach() if t.requires_grad else t
                          for t in _module_inputs(device, dtype, CHECK_B, hidden)())
        e64 = reference.BertBiAttention(_config(hidden, heads)).double()
        e64.load_state_dict(eager.state_dict())
        # the padded text positions' contexts are not defined: compare the valid ones
        valid = torch.cat([(m2.reshape(CHECK_B, NT_MAX) == 0).flatten().repeat_interleave(hidden),
                           torch.ones(CHECK_B * NV * hidden, dtype=torch.bool, device=m2.device)])
        ref = _both(e64.to(device))(x1.double(), m1.double(), x2.double(), m2.double())
        return Check(ref[valid].cpu(), {"mmkernels": _both(fused)(x1, m1, x2, m2)[valid].cpu(),
                                        "vilbert-eager": _both(eager)(x1, m1, x2, m2)[valid].cpu()})
    return check


def _check_kernel(device, dtype, hidden, heads, providers):
    def check() -> Check:
        args = [t.detach() for t in _kernel_inputs(device, dtype, CHECK_B, hidden, heads)()]
        out_a, out_b = reference.co_attention(*[a.double() if a.is_floating_point() else a
                                                for a in args])
        ref = torch.cat([out_a.flatten(), out_b.flatten()]).cpu()
        return Check(ref, {name: fn(*args).cpu() for name, fn in providers.items()})
    return check


def suite(device: torch.device, level: str = "default") -> Suite:
    hidden, heads, B, sweep = SIZES[level]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    eager, fused = _modules(device, dtype, hidden, heads)
    module_providers = {"mmkernels": _both(fused), "vilbert-eager": _both(eager)}

    def describe(b):
        return (f"B={b} regions={NV} text {NT_MIN}-{NT_MAX} hidden={hidden} heads={heads} "
                f"{str(dtype)[6:]}")

    point = Case("biattention", describe(B) + " (module, projections included)",
                 _module_inputs(device, dtype, B, hidden), module_providers,
                 baseline="vilbert-eager", targets={("mmkernels", "forward+backward"): 1.0},
                 check=_check_module(device, dtype, hidden, heads), size=B)
    kernel_providers = {"mmkernels": _fused_kernel, "2x sdpa-padded": _two_sdpa}
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            kernel_providers["2x flash_attn_varlen"] = _two_flash
        except ImportError:
            pass
    cases = [point,
             Case("co_attention_kernel", describe(B) + " (the attention only, both directions)",
                  _kernel_inputs(device, dtype, B, hidden, heads), kernel_providers,
                  baseline="2x sdpa-padded",
                  check=_check_kernel(device, dtype, hidden, heads, kernel_providers))]
    cases += [sweep_case(point, f"biattention B={b}", b, _module_inputs(device, dtype, b, hidden),
                         "forward+backward", describe(b)) for b in sweep if b != B]
    return Suite("co_attention", cases, size_axis="B (image-caption pairs)")
