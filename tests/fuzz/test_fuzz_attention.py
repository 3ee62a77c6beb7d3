"""Property-based fuzzing of packed attention: varlen_attention, co_attention and the
modules nn.VarlenSelfAttention and nn.BiAttention.

Valid inputs (random lengths with empty sequences, heads/GQA, head dims 1..80, dtypes,
layouts: contiguous, sliced, heads-first, expanded (stride 0), size-1; strided
cu_seqlens; causal and image blocks; dropout with random 64-bit seeds) are checked,
forward and backward, against the float64 references of mmkernels.reference with the
one tolerance table (mmkernels.testing). Invalid inputs must raise the documented
exception naming the argument. Both backends run: Triton (the interpreter here, the
GPU in CI) and the CPU path. Shapes past 2^31 elements run on meta tensors.
"""

from __future__ import annotations

import contextlib
import types
from unittest import mock

import pytest
import torch
from _fuzz import examples
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mmkernels
from mmkernels import reference
from mmkernels.ops import _attention_checks as _chk
from mmkernels.ops import varlen_attention as va
from mmkernels.testing import assert_close_to_reference
from mmkernels.triton import interpreting


def backend_ctx(backend: str):
    if backend == "cpu":
        return mock.patch.object(_chk, "_uses_triton", lambda device: False)
    return contextlib.nullcontext()


BACKENDS = ["triton", "cpu"] if interpreting() else ["cpu"]
LAYOUTS = ["contiguous", "sliced", "heads-first", "expanded"]


def cu_of(lengths, strided=False):
    cu = torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist(),
                      dtype=torch.int32)
    if strided:  # a non-contiguous view with the same values
        cu = torch.stack([cu, torch.full_like(cu, -5)], 1)[:, 0]
    return cu


def make(shape, dtype, layout, gen):
    """(leaf, view): the leaf receives the gradient; view(leaf) is the op's input with
    the requested layout, and view(leaf64) is the same view of the float64 copy."""
    T, H, D = shape
    if layout == "sliced":      # last dim is a slice of a wider one: stride_t > H * D
        leaf = torch.randn(T, H, D + 3, generator=gen, dtype=torch.float64)
        view = lambda t: t[..., 1:D + 1]  # noqa: E731
    elif layout == "heads-first":  # (H, T, D) storage, seen as (T, H, D)
        leaf = torch.randn(H, T, D, generator=gen, dtype=torch.float64)
        view = lambda t: t.transpose(0, 1)  # noqa: E731
    elif layout == "expanded":  # one head broadcast over all heads (stride 0)
        leaf = torch.randn(T, 1, D, generator=gen, dtype=torch.float64)
        view = lambda t: t.expand(T, H, D)  # noqa: E731
    else:
        leaf = torch.randn(T, H, D, generator=gen, dtype=torch.float64)
        view = lambda t: t  # noqa: E731
    leaf64 = leaf.clone().requires_grad_()
    return leaf.to(dtype).detach().requires_grad_(), leaf64, view


def compare(outs, refs, leaves, leaves64, eager=None, eager_leaves=None):
    """Outputs and the leaves' gradients against float64 (eager in the low dtype sets
    the budget for float16/bfloat16)."""
    grads = [torch.randn_like(r) for r in refs]
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads, outs)])
    torch.autograd.backward(refs, grads)
    if eager is not None:
        torch.autograd.backward(eager, [g.to(e.dtype) for g, e in zip(grads, eager)])
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert_close_to_reference(o.detach(), r.detach(),
                                  eager_lowp=None if eager is None else eager[i].detach(),
                                  what=f"out{i}")
    def grad(t):  # an input the (empty) reference output does not use gets no grad
        return t.grad if t.grad is not None else torch.zeros_like(t)

    for i, (a, b) in enumerate(zip(leaves, leaves64)):
        e = None if eager_leaves is None else grad(eager_leaves[i])
        assert_close_to_reference(grad(a), grad(b), eager_lowp=e, what=f"grad{i}")


def dtypes_for(backend):
    return ([torch.float32, torch.float16] if backend == "triton"
            else [torch.float32, torch.float16, torch.bfloat16, torch.float64])


# ---------------------------------------------------------------------------------
# varlen_attention
# ---------------------------------------------------------------------------------

@settings(max_examples=examples(12))
@given(data=st.data())
def test_fuzz_varlen_valid(data):
    backend = data.draw(st.sampled_from(BACKENDS), "backend")
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), "dtype")
    batch = data.draw(st.integers(0, 3), "batch")
    lq = data.draw(st.lists(st.integers(0, 33), min_size=batch, max_size=batch), "lq")
    causal = data.draw(st.booleans(), "causal")
    same = data.draw(st.booleans(), "same lengths")
    lk = lq if same else data.draw(st.lists(st.integers(0, 33), min_size=batch,
                                            max_size=batch), "lk")
    H_kv = data.draw(st.integers(1, 2), "H_kv")
    H = H_kv * data.draw(st.integers(1, 3), "group")
    D = data.draw(st.sampled_from([1, 5, 16, 33, 64, 80]), "D")
    layouts = [data.draw(st.sampled_from(LAYOUTS), f"layout {n}") for n in "qkv"]
    blocks = causal and same and data.draw(st.booleans(), "block ids")
    p = data.draw(st.sampled_from([0.0, 0.0, 0.3]), "dropout_p")
    seed = data.draw(st.integers(-(2**63), 2**64 - 1), "seed")
    scale = data.draw(st.sampled_from([None, 0.7]), "softmax_scale")
    strided_cu = data.draw(st.booleans(), "strided cu")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), "data seed"))
    # float16/bfloat16 budgets scale with the exact gradient; with at most one key per
    # sequence dQ is exactly 0 (softmax over one key), eager fp16 gets exactly 0 and
    # the FA2 backward's delta = rowsum(dO * O) from the rounded O leaves ~1e-5: a
    # zero budget, not a kernel error. Such batches are fuzzed in float32/float64.
    assume(dtype in (torch.float32, torch.float64) or max(lk, default=0) >= 2)

    cq, ck = cu_of(lq, strided_cu), cu_of(lk, strided_cu)
    made = [make((sum(n), h, D), dtype, lay, gen)
            for n, h, lay in ((lq, H, layouts[0]), (lk, H_kv, layouts[1]), (lk, H_kv, layouts[2]))]
    leaves = [m[0] for m in made]
    leaves64 = [m[1] for m in made]
    bid = None
    if blocks:
        bid = torch.randint(0, 3, (sum(lq),), generator=gen, dtype=torch.int32)
    max_q, max_k = max(lq, default=0), max(lk, default=0)
    with backend_ctx(backend):
        out = mmkernels.varlen_attention(*[m[2](leaf) for m, leaf in zip(made, leaves)], cq, ck,
                                         max_q + data.draw(st.integers(0, 3), "slack"), max_k,
                                         causal=causal, block_ids=bid, dropout_p=p,
                                         dropout_seed=seed, softmax_scale=scale)
    keep = va.dropout_keep_mask(seed, cq, ck, H, p) if p else None
    ref, _ = reference.varlen_attention(*[m[2](leaf) for m, leaf in zip(made, leaves64)], cq, ck,
                                        scale, causal, bid, p, keep)
    eager = eager_leaves = None
    if dtype in (torch.float16, torch.bfloat16):
        eager_leaves = [leaf.detach().clone().requires_grad_() for leaf in leaves]
        e, _ = reference.varlen_attention(*[m[2](leaf) for m, leaf in zip(made, eager_leaves)],
                                          cq, ck, scale, causal, bid, p, keep)
        eager = [e]
    with backend_ctx(backend):  # the backward runs on the same backend
        compare([out], [ref], leaves, leaves64, eager, eager_leaves)


def _varlen_args(**over):
    lengths = [5, 0, 7]
    args = dict(q=torch.randn(12, 4, 16), k=torch.randn(12, 2, 16), v=torch.randn(12, 2, 16),
                cu_seqlens_q=cu_of(lengths), cu_seqlens_k=cu_of(lengths), max_seqlen_q=7,
                max_seqlen_k=7)
    args.update(over)
    return args


def _big(T, H, D):
    return torch.zeros(1, 1, 1).expand(T, H, D)  # no allocation


VARLEN_INVALID = {
    "cu-non-monotonic": (dict(cu_seqlens_q=torch.tensor([0, 8, 5, 12], dtype=torch.int32),
                              cu_seqlens_k=torch.tensor([0, 5, 5, 12], dtype=torch.int32)),
                         ValueError, "cu_seqlens_q must be non-decreasing"),
    "cu-wrong-end": (dict(cu_seqlens_k=torch.tensor([0, 5, 5, 11], dtype=torch.int32)),
                     ValueError, r"cu_seqlens_k\[-1\]"),
    "cu-not-zero-first": (dict(cu_seqlens_q=torch.tensor([2, 5, 5, 12], dtype=torch.int32)),
                          ValueError, r"cu_seqlens_q\[0\]"),
    "cu-int64": (dict(cu_seqlens_k=torch.tensor([0, 5, 5, 12])), TypeError, "cu_seqlens_k"),
    "cu-float": (dict(cu_seqlens_q=torch.tensor([0.0, 5, 5, 12])), TypeError, "cu_seqlens_q"),
    "cu-list": (dict(cu_seqlens_q=[0, 5, 5, 12]), TypeError, "cu_seqlens_q"),
    "max-q-small": (dict(max_seqlen_q=6), ValueError, "max_seqlen_q"),
    "max-k-small": (dict(max_seqlen_k=0), ValueError, "max_seqlen_k"),
    "max-k-float": (dict(max_seqlen_k=7.0), TypeError, "max_seqlen_k"),
    "k-heads": (dict(k=torch.randn(12, 3, 16), v=torch.randn(12, 3, 16)), ValueError, "k has 3"),
    "k-dims": (dict(k=torch.randn(12, 2, 8), v=torch.randn(12, 2, 8)), ValueError, "k has 8"),
    "k-tokens": (dict(k=torch.randn(13, 2, 16), v=torch.randn(13, 2, 16)), ValueError,
                 "tokens of k"),
    "q-tokens": (dict(q=torch.randn(11, 4, 16)), ValueError, "tokens of q"),
    "v-shape": (dict(v=torch.randn(12, 2, 17)), ValueError, "v must have k's shape"),
    "v-dtype": (dict(v=torch.randn(12, 2, 16, dtype=torch.float16)), TypeError, "v dtype"),
    "q-int": (dict(q=torch.ones(12, 4, 16, dtype=torch.int64)), TypeError, "q dtype"),
    "q-4d": (dict(q=torch.randn(12, 4, 16, 1)), ValueError, "q must be"),
    "head-dim-257": (dict(q=_big(12, 4, 257), k=_big(12, 2, 257), v=_big(12, 2, 257)),
                     ValueError, "head_dim"),
    "k-device": (dict(k=torch.randn(12, 2, 16, device="meta")), ValueError, "k is on"),
    "block-ids-shape": (dict(causal=True, block_ids=torch.zeros(13, dtype=torch.int32)),
                        ValueError, "block_ids"),
    "block-ids-int64": (dict(causal=True, block_ids=torch.zeros(12, dtype=torch.int64)),
                        TypeError, "block_ids"),
    "dropout-1": (dict(dropout_p=1.0), ValueError, "dropout_p"),
    "dropout-nan": (dict(dropout_p=float("nan")), ValueError, "dropout_p"),
    # more tokens than int32 cu_seqlens address (2^31 + 1 rows, expanded: no memory)
    "tokens-past-2^31": (dict(q=_big(2**31 + 1, 4, 16)), ValueError, "q has 2147483649 tokens"),
}


@settings(max_examples=examples(25))
@given(kind=st.sampled_from(sorted(VARLEN_INVALID)), backend=st.sampled_from(BACKENDS))
def test_fuzz_varlen_invalid(kind, backend):
    over, exc, match = VARLEN_INVALID[kind]
    args = _varlen_args(**over)
    with backend_ctx(backend), pytest.raises(exc, match=match):
        mmkernels.varlen_attention(**args)


@settings(max_examples=examples(5))
@given(T=st.sampled_from([2**24, 2**25 + 3]), H=st.sampled_from([8, 16]),
       D=st.sampled_from([16, 128]))
def test_fuzz_varlen_past_2_31_elements_on_meta(T, H, D):
    """Element counts past 2^31 (meta tensors: shapes only, never allocated): the
    validation and the registered fake kernels give the right shapes forward and
    backward."""
    q = torch.empty(T, H, D, device="meta", requires_grad=True)
    k = torch.empty(T, H // 4, D, device="meta", requires_grad=True)
    cu = torch.tensor([0, T // 3, T], dtype=torch.int32, device="meta")
    out, lse = mmkernels.varlen_attention(q, k, k, cu, cu, T, T, causal=True, return_lse=True)
    assert out.shape == (T, H, D) and lse.shape == (H, T) and q.numel() > 2**31 - 1
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


# ---------------------------------------------------------------------------------
# co_attention
# ---------------------------------------------------------------------------------

STREAM_NAMES = ("q_a", "k_a", "v_a", "q_b", "k_b", "v_b")


@settings(max_examples=examples(10))
@given(data=st.data())
def test_fuzz_co_attention_valid(data):
    backend = data.draw(st.sampled_from(BACKENDS), "backend")
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), "dtype")
    batch = data.draw(st.integers(0, 3), "batch")
    la = data.draw(st.lists(st.integers(0, 30), min_size=batch, max_size=batch), "la")
    lb = data.draw(st.lists(st.integers(0, 30), min_size=batch, max_size=batch), "lb")
    H = data.draw(st.integers(1, 3), "H")
    D = data.draw(st.sampled_from([1, 7, 16, 64, 80]), "D")
    layouts = [data.draw(st.sampled_from(LAYOUTS), f"layout {n}") for n in STREAM_NAMES]
    p = data.draw(st.sampled_from([0.0, 0.0, 0.2, (0.0, 0.4)]), "dropout_p")
    seed = data.draw(st.integers(0, 2**64 - 1), "seed")
    strided_cu = data.draw(st.booleans(), "strided cu")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), "data seed"))
    # (see test_fuzz_varlen_valid: a one-key batch has an exactly-zero dQ)
    assume(dtype in (torch.float32, torch.float64) or min(max(la, default=0),
                                                          max(lb, default=0)) >= 2)

    cua, cub = cu_of(la, strided_cu), cu_of(lb, strided_cu)
    made = [make((sum(la if i < 3 else lb), H, D), dtype, lay, gen)
            for i, lay in enumerate(layouts)]
    leaves = [m[0] for m in made]
    leaves64 = [m[1] for m in made]
    with backend_ctx(backend):
        outs = mmkernels.co_attention(*[m[2](leaf) for m, leaf in zip(made, leaves)], cua, cub,
                                      max(la, default=0), max(lb, default=0), dropout_p=p,
                                      dropout_seed=seed)
    pa, pb = p if isinstance(p, tuple) else (p, p)
    keep_a = va.dropout_keep_mask(seed, cua, cub, H, pa, stream0=0) if pa else None
    keep_b = va.dropout_keep_mask(seed, cub, cua, H, pb, stream0=H) if pb else None
    refs = reference.co_attention(*[m[2](leaf) for m, leaf in zip(made, leaves64)], cua, cub,
                                  None, keep_a, keep_b, (pa, pb))
    eager = eager_leaves = None
    if dtype in (torch.float16, torch.bfloat16):
        eager_leaves = [leaf.detach().clone().requires_grad_() for leaf in leaves]
        eager = list(reference.co_attention(*[m[2](leaf) for m, leaf in zip(made, eager_leaves)],
                                            cua, cub, None, keep_a, keep_b, (pa, pb)))
    with backend_ctx(backend):
        compare(list(outs), list(refs), leaves, leaves64, eager, eager_leaves)


def _co_invalid_cases():
    """(name, overrides, exception, match): every tensor of both streams in heads, head
    dim, tokens, dtype and device; the offsets of both streams; max_seqlen; dropout."""
    cases = []
    for n in STREAM_NAMES:
        T = 7 if n.endswith("a") else 9
        cases += [(f"{n}-heads", {n: torch.randn(T, 1, 16)}, ValueError, n),
                  (f"{n}-dim", {n: torch.randn(T, 2, 8)}, ValueError, n),
                  (f"{n}-dtype", {n: torch.randn(T, 2, 16, dtype=torch.float16)}, TypeError, n),
                  (f"{n}-device", {n: torch.randn(T, 2, 16, device="meta")}, ValueError, n),
                  (f"{n}-2d", {n: torch.randn(T, 32)}, ValueError, n)]
        if not n.startswith("q"):
            cases.append((f"{n}-tokens", {n: torch.randn(T - 4, 2, 16)}, ValueError, n))
    for s, T in (("a", 7), ("b", 9)):
        c = f"cu_seqlens_{s}"
        cases += [
            (f"{c}-non-monotonic", {c: torch.tensor([0, 5, 3, T], dtype=torch.int32)},
             ValueError, c),
            (f"{c}-end", {c: torch.tensor([0, 3, T - 1], dtype=torch.int32)}, ValueError, c),
            (f"{c}-start", {c: torch.tensor([1, 3, T], dtype=torch.int32)}, ValueError, c),
            (f"{c}-int64", {c: torch.tensor([0, 3, T])}, TypeError, c),
            (f"max_seqlen_{s}-small", {f"max_seqlen_{s}": 2}, ValueError, f"max_seqlen_{s}"),
            (f"{s}-past-2^31-tokens", {f"q_{s}": _big(2**31, 2, 16)}, ValueError, f"q_{s}"),
        ]
    cases += [("dropout-range", {"dropout_p": (0.1, 1.0)}, ValueError, "dropout_p"),
              ("batch-mismatch", {"cu_seqlens_b": torch.tensor([0, 9], dtype=torch.int32),
                                  "max_seqlen_b": 9}, ValueError, "same batch")]
    return {c[0]: c[1:] for c in cases}


CO_INVALID = _co_invalid_cases()


@settings(max_examples=examples(40))
@given(kind=st.sampled_from(sorted(CO_INVALID)), backend=st.sampled_from(BACKENDS))
def test_fuzz_co_attention_invalid(kind, backend):
    over, exc, match = CO_INVALID[kind]
    args = {n: torch.randn(7 if n.endswith("a") else 9, 2, 16) for n in STREAM_NAMES}
    args.update(cu_seqlens_a=cu_of([3, 4]), cu_seqlens_b=cu_of([4, 5]), max_seqlen_a=4,
                max_seqlen_b=5)
    args.update({k: v for k, v in over.items() if k != "dropout_p"})
    with backend_ctx(backend), pytest.raises(exc, match=match):
        mmkernels.co_attention(**args, dropout_p=over.get("dropout_p", 0.0))


# ---------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------

@settings(max_examples=examples(6))
@given(data=st.data())
def test_fuzz_varlen_self_attention_module(data):
    backend = data.draw(st.sampled_from(BACKENDS), "backend")
    kv = data.draw(st.integers(1, 2), "kv heads")
    heads = kv * data.draw(st.integers(1, 2), "group")
    head_dim = data.draw(st.sampled_from([4, 16]), "head dim")
    causal = data.draw(st.booleans(), "causal")
    lengths = data.draw(st.lists(st.integers(0, 20), min_size=1, max_size=3), "lengths")
    torch.manual_seed(data.draw(st.integers(0, 2**31), "seed"))
    E = heads * head_dim
    m = mmkernels.nn.VarlenSelfAttention(E, heads, kv, causal=causal, dtype=torch.float64)
    total = sum(lengths)
    x = torch.randn(total, E, dtype=torch.float64, requires_grad=True)
    cu = cu_of(lengths)
    with backend_ctx(backend):
        if backend == "triton":  # the kernels run float32; the reference float64
            m = m.float()
        y = m(x.to(next(m.parameters()).dtype), cu, max(lengths))
    w = {n: p.detach().double() for n, p in m.named_parameters()}
    qkv = torch.nn.functional.linear(x, w["qkv.weight"], w["qkv.bias"])
    q, k, v = qkv.view(total, heads + 2 * kv, head_dim).split([heads, kv, kv], dim=1)
    o, _ = reference.varlen_attention(q, k, v, cu, cu, None, causal)
    ref = torch.nn.functional.linear(o.reshape(total, E), w["out_proj.weight"],
                                     w["out_proj.bias"])
    assert_close_to_reference(y.detach(), ref.detach())


@settings(max_examples=examples(6))
@given(data=st.data())
def test_fuzz_biattention_module(data):
    backend = data.draw(st.sampled_from(BACKENDS), "backend")
    B = data.draw(st.integers(1, 3), "B")
    Nv, Nt = data.draw(st.integers(1, 12), "Nv"), data.draw(st.integers(1, 10), "Nt")
    lv = data.draw(st.lists(st.integers(0, Nv), min_size=B, max_size=B), "lengths v")
    lt = data.draw(st.lists(st.integers(0, Nt), min_size=B, max_size=B), "lengths t")
    heads = data.draw(st.sampled_from([1, 2, 4]), "heads")
    torch.manual_seed(data.draw(st.integers(0, 2**31), "seed"))
    cfg = types.SimpleNamespace(bi_hidden_size=8 * heads, bi_num_attention_heads=heads,
                                v_hidden_size=12, hidden_size=10,
                                v_attention_probs_dropout_prob=0.1,
                                attention_probs_dropout_prob=0.1, visualization=False)
    eager = reference.BertBiAttention(cfg).double().eval()
    fused = mmkernels.nn.BiAttention(cfg).eval()
    fused.load_state_dict({k: v.float() for k, v in eager.state_dict().items()})
    x1, x2 = torch.randn(B, Nv, 12, dtype=torch.float64), torch.randn(B, Nt, 10,
                                                                       dtype=torch.float64)
    m1, m2 = torch.zeros(B, 1, 1, Nv), torch.zeros(B, 1, 1, Nt)
    for b in range(B):
        m1[b, ..., lv[b]:] = -10000.0
        m2[b, ..., lt[b]:] = -10000.0
    with backend_ctx(backend):
        c1, c2, _ = fused(x1.float(), m1, x2.float(), m2)
    e1, e2, _ = eager(x1, m1.double(), x2, m2.double())
    vt, vv = m2.reshape(B, Nt) == 0, m1.reshape(B, Nv) == 0
    # a text row whose sample has no region sees only padding in the eager module
    has_v = torch.tensor([n > 0 for n in lv])[:, None]
    has_t = torch.tensor([n > 0 for n in lt])[:, None]
    assert_close_to_reference(c1[vt & has_v], e1[vt & has_v].detach())
    assert_close_to_reference(c2[vv & has_t], e2[vv & has_t].detach())
    assert not c1[~vt].any() and not c2[~vv].any()


def _module_invalid_cases():
    cfg = types.SimpleNamespace(bi_hidden_size=16, bi_num_attention_heads=2, v_hidden_size=12,
                                hidden_size=10, v_attention_probs_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, visualization=False)
    bi = mmkernels.nn.BiAttention(cfg)
    sa = mmkernels.nn.VarlenSelfAttention(16, 4, 2)
    x1, x2 = torch.randn(2, 5, 12), torch.randn(2, 4, 10)
    m1, m2 = torch.zeros(2, 1, 1, 5), torch.zeros(2, 1, 1, 4)
    cu = cu_of([3, 4])
    return {
        "bi-mask1-shape": (lambda: bi(x1, torch.zeros(2, 1, 1, 4), x2, m2), ValueError,
                           "attention_mask1"),
        "bi-mask2-shape": (lambda: bi(x1, m1, x2, torch.zeros(3, 1, 1, 4)), ValueError,
                           "attention_mask2"),
        "bi-x1-hidden": (lambda: bi(torch.randn(2, 5, 11), m1, x2, m2), ValueError,
                         "input_tensor1"),
        "bi-x2-2d": (lambda: bi(x1, m1, torch.randn(4, 10), m2), ValueError, "input_tensor2"),
        "bi-batch": (lambda: bi(x1, m1, torch.randn(3, 4, 10), torch.zeros(3, 1, 1, 4)),
                     ValueError, "input_tensor2"),
        "sa-x-dim": (lambda: sa(torch.randn(7, 15), cu, 4), ValueError, "x must be"),
        "sa-cu-end": (lambda: sa(torch.randn(8, 16), cu, 4), ValueError, "cu_seqlens"),
        "sa-cu-dtype": (lambda: sa(torch.randn(7, 16), cu.long(), 4), TypeError, "cu_seqlens"),
        "sa-max-seqlen": (lambda: sa(torch.randn(7, 16), cu, 3), ValueError, "max_seqlen"),
        "sa-block-ids": (lambda: sa(torch.randn(7, 16), cu, 4, torch.zeros(6, dtype=torch.int32)),
                         ValueError, "block_ids"),
        "sa-ctor-embed": (lambda: mmkernels.nn.VarlenSelfAttention(15, 4), ValueError,
                          "embed_dim"),
        "sa-ctor-kv": (lambda: mmkernels.nn.VarlenSelfAttention(16, 4, 3), ValueError,
                       "num_kv_heads"),
        "sa-ctor-zero-heads": (lambda: mmkernels.nn.VarlenSelfAttention(16, 0), ValueError,
                               "num_heads"),
    }


MODULE_INVALID = _module_invalid_cases()


@settings(max_examples=examples(25))
@given(kind=st.sampled_from(sorted(MODULE_INVALID)), backend=st.sampled_from(BACKENDS))
def test_fuzz_modules_invalid(kind, backend):
    call, exc, match = MODULE_INVALID[kind]
    with backend_ctx(backend), pytest.raises(exc, match=match):
        call()


# every invalid class at least once per backend (the hypothesis runs above sample them)
ALL_INVALID = ([("varlen", k) for k in sorted(VARLEN_INVALID)]
               + [("co", k) for k in sorted(CO_INVALID)]
               + [("module", k) for k in sorted(MODULE_INVALID)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family,kind", ALL_INVALID, ids=[f"{f}-{k}" for f, k in ALL_INVALID])
def test_every_invalid_class_raises(family, kind, backend):
    test = {"varlen": test_fuzz_varlen_invalid, "co": test_fuzz_co_attention_invalid,
            "module": test_fuzz_modules_invalid}[family]
    test.hypothesis.inner_test(kind=kind, backend=backend)


# ---------------------------------------------------------------------------------
# NaN / Inf features (both ops): never a silent finite number where the reference has
# none, and never a leak into another sequence, forward or backward.
# ---------------------------------------------------------------------------------

def _poison(t, lengths, gen, data, name):
    """Write NaN/+Inf/-Inf into a few random rows of (total, H, D) float32 ``t``;
    returns the set of sequences touched."""
    touched = set()
    starts = [0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()
    for j in range(data.draw(st.integers(0, 2), f"{name} bad entries")):
        if t.shape[0] == 0:
            break
        row = int(torch.randint(0, t.shape[0], (1,), generator=gen))
        h = int(torch.randint(0, t.shape[1], (1,), generator=gen))
        d = int(torch.randint(0, t.shape[2], (1,), generator=gen))
        t[row, h, d] = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]),
                                 f"{name} value {j}")
        touched.add(max(i for i in range(len(lengths)) if starts[i] <= row))
    return touched


def _rows(lengths, seqs):
    starts = [0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()
    idx = [r for s in sorted(seqs) for r in range(starts[s], starts[s + 1])]
    return torch.tensor(idx, dtype=torch.long)


def _check_non_finite(out, ref, clean_rows):
    """Clean sequences match the float64 reference; wherever the reference output is
    not finite the op's is not finite either (a NaN/Inf input never turns into a silent
    number)."""
    assert_close_to_reference(out.detach()[clean_rows], ref.detach()[clean_rows],
                              what="clean sequences")
    bad = ~torch.isfinite(ref.detach())
    assert (~torch.isfinite(out.detach()[bad])).all(), "non-finite reference, finite output"


@settings(max_examples=examples(10))
@given(data=st.data())
def test_fuzz_varlen_non_finite_features(data):
    backend = data.draw(st.sampled_from(BACKENDS), "backend")
    batch = data.draw(st.integers(1, 3), "batch")
    lengths = data.draw(st.lists(st.integers(1, 20), min_size=batch, max_size=batch), "lengths")
    causal = data.draw(st.booleans(), "causal")
    H, D = 2, data.draw(st.sampled_from([8, 16, 33]), "D")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), "data seed"))
    T = sum(lengths)
    q, k, v = [torch.randn(T, H, D, generator=gen) for _ in range(3)]
    touched = set()
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        touched |= _poison(t, lengths, gen, data, n)
    cu = cu_of(lengths)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    with backend_ctx(backend):
        out = mmkernels.varlen_attention(*leaves, cu, cu, max(lengths), max(lengths),
                                         causal=causal)
    ref, _ = reference.varlen_attention(*leaves64, cu, cu, None, causal)
    clean = _rows(lengths, set(range(batch)) - touched)
    _check_non_finite(out, ref, clean)
    grad = torch.randn(T, H, D, generator=gen, dtype=torch.float64)
    with backend_ctx(backend):
        out.backward(grad.float())
    ref.backward(grad)
    for a, b, n in zip(leaves, leaves64, "qkv"):  # gradients of clean sequences: no leak
        assert_close_to_reference(a.grad[clean], b.grad[clean], what=f"d{n} (clean sequences)")


@settings(max_examples=examples(8))
@given(data=st.data())
def test_fuzz_co_attention_non_finite_features(data):
    backend = data.draw(st.sampled_from(BACKENDS), "backend")
    batch = data.draw(st.integers(1, 3), "batch")
    la = data.draw(st.lists(st.integers(1, 16), min_size=batch, max_size=batch), "la")
    lb = data.draw(st.lists(st.integers(1, 16), min_size=batch, max_size=batch), "lb")
    H, D = 2, data.draw(st.sampled_from([8, 16]), "D")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), "data seed"))
    ts = [torch.randn(sum(la if i < 3 else lb), H, D, generator=gen) for i in range(6)]
    touched = set()
    for i, (t, n) in enumerate(zip(ts, STREAM_NAMES)):
        touched |= _poison(t, la if i < 3 else lb, gen, data, n)
    cua, cub = cu_of(la), cu_of(lb)
    leaves = [t.clone().requires_grad_() for t in ts]
    leaves64 = [t.double().requires_grad_() for t in ts]
    with backend_ctx(backend):
        outs = mmkernels.co_attention(*leaves, cua, cub, max(la), max(lb))
    refs = reference.co_attention(*leaves64, cua, cub)
    clean = set(range(batch)) - touched  # sample i of both streams untouched
    rows_a, rows_b = _rows(la, clean), _rows(lb, clean)
    _check_non_finite(outs[0], refs[0], rows_a)
    _check_non_finite(outs[1], refs[1], rows_b)
    grads = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in refs]
    with backend_ctx(backend):
        torch.autograd.backward(list(outs), [g.float() for g in grads])
    torch.autograd.backward(list(refs), grads)
    for i, (a, b, n) in enumerate(zip(leaves, leaves64, STREAM_NAMES)):
        rows = rows_a if i < 3 else rows_b
        assert_close_to_reference(a.grad[rows], b.grad[rows], what=f"d{n} (clean samples)")
