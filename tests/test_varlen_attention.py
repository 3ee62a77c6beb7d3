"""varlen_attention: Triton kernels (under TRITON_INTERPRET=1 on CPU tensors, or on a
GPU) and the CPU path, against a float64 per-sequence reference."""

import itertools
import math

import pytest
import torch

import mmkernels
from mmkernels import _extension, reference
from mmkernels.ops import _attention_checks as _chk
from mmkernels.ops import _attention_cpu as acpu
from mmkernels.ops import varlen_attention as va
from mmkernels.testing import assert_close_to_reference
from mmkernels.triton import interpreting
from mmkernels.triton import varlen_attention as tva

BACKENDS = [pytest.param("triton", id="triton"), pytest.param("cpu", id="cpu")]


@pytest.fixture
def backend(request, monkeypatch):
    name = request.param
    if name == "triton" and not interpreting():
        pytest.skip("the Triton path on CPU tensors needs TRITON_INTERPRET=1 (GPU tests: cuda)")
    if name == "cpu":
        monkeypatch.setattr(_chk, "_uses_triton", lambda device: False)
    return name


def cu_of(lengths, device="cpu"):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32,
                        device=device)


def make_qkv(lq, lk, H, H_kv, D, dtype, device="cpu"):
    q = torch.randn(sum(lq), H, D, dtype=torch.float64).to(dtype=dtype, device=device)
    k = torch.randn(sum(lk), H_kv, D, dtype=torch.float64).to(dtype=dtype, device=device)
    v = torch.randn(sum(lk), H_kv, D, dtype=torch.float64).to(dtype=dtype, device=device)
    return q, k, v


def run_and_compare(lq, lk, H, H_kv, D, dtype, causal=False, block_ids=None, dropout_p=0.0,
                    device="cpu", scale=None, window=(-1, -1), softcap=0.0):
    cq, ck = cu_of(lq, device), cu_of(lk, device)
    q, k, v = make_qkv(lq, lk, H, H_kv, D, dtype, device)
    q.requires_grad_()
    k.requires_grad_()
    v.requires_grad_()
    seed = 1234 if dropout_p > 0 else None
    out, lse = mmkernels.varlen_attention(q, k, v, cq, ck, max(lq), max(lk), causal=causal,
                                          block_ids=block_ids, dropout_p=dropout_p,
                                          return_lse=True, dropout_seed=seed,
                                          softmax_scale=scale, window_size=window,
                                          softcap=softcap)
    keep = None
    if dropout_p > 0:
        keep = va.dropout_keep_mask(seed, cq, ck, H, dropout_p, device=q.device)
        keep = [m.cpu() for m in keep]
    q64, k64, v64 = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    bid = block_ids.cpu() if block_ids is not None else None
    ref, ref_lse = reference.varlen_attention(q64, k64, v64, cq.cpu(), ck.cpu(), scale, causal,
                                              bid, dropout_p, keep, window_size=window,
                                              softcap=softcap)
    g = torch.randn_like(ref)
    out.backward(g.to(dtype=dtype, device=device))
    ref.backward(g)
    eager = [None] * 4
    if dtype in (torch.float16, torch.bfloat16):
        ql, kl, vl = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
        eo, _ = reference.varlen_attention(ql, kl, vl, cq.cpu(), ck.cpu(), scale, causal, bid,
                                           dropout_p, keep, window_size=window, softcap=softcap)
        eo.backward(g.to(dtype))
        eager = [eo, ql.grad, kl.grad, vl.grad]
    assert_close_to_reference(out.cpu(), ref, eager_lowp=eager[0], what="out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    torch.testing.assert_close(lse.cpu()[finite].double(), ref_lse[finite].double(),
                               atol=1e-4 if dtype != torch.float32 else 2e-5, rtol=1e-4)
    for name, got, want, e in (("dq", q.grad, q64.grad, eager[1]), ("dk", k.grad, k64.grad, eager[2]),
                               ("dv", v.grad, v64.grad, eager[3])):
        assert_close_to_reference(got.cpu(), want, eager_lowp=e, what=name)
    return out


# ---------------------------------------------------------------------------------
# correctness grid
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [32, 64, 72, 80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_forward_backward(backend, dtype, D, causal):
    run_and_compare([7, 0, 21, 33], [7, 0, 21, 33], H=4, H_kv=2, D=D, dtype=dtype, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_runs_of_equal_length_sequences(backend, dtype, causal):
    # the CPU path attends a run of consecutive equal-length sequences (a ViT batch)
    # in one batched call: runs broken by another length, an empty sequence, and
    # unequal q/k lengths (which run one at a time, causal ones with a mask)
    lq = [5, 5, 5, 9, 9, 0, 5, 5, 3, 3]
    lk = [5, 5, 5, 9, 9, 0, 5, 5, 4, 4]
    run_and_compare(lq, lk, H=4, H_kv=2, D=16, dtype=dtype, causal=causal)
    cq, ck = (torch.tensor([0, *itertools.accumulate(lens)]) for lens in (lq, lk))
    sizes = [n for n, *_ in acpu._cpu_segments(*[torch.zeros(0)] * 3, cq, ck, None, causal)]
    assert sizes == ([3, 2, 2, 2] if not causal else [3, 2, 2, 1, 1])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 1), (6, 2)], ids=["MHA", "MQA", "GQA"])
def test_heads_and_unequal_lengths(backend, heads, causal):
    # seqlen_q != seqlen_k both ways: causal is bottom-right aligned; rows that see
    # no key (q longer than k) must be zeros with lse = -inf
    out = run_and_compare([19, 3, 0, 40], [5, 30, 9, 17], H=heads[0], H_kv=heads[1], D=32,
                          dtype=torch.float32, causal=causal)
    if causal:
        assert not out[:14].any(), "rows 0..13 of sequence 0 see no key"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_block_ids_prefix_lm(backend, dtype):
    # sequence 0: text(3) image(12) text(5) image(6) text(4); sequence 1 all text;
    # sequence 2 starts with an image; id 0 = text
    lengths = [30, 9, 26]
    bid = torch.zeros(sum(lengths), dtype=torch.int32)
    bid[3:15] = 1
    bid[20:26] = 2
    bid[39:55] = 7
    run_and_compare(lengths, lengths, H=2, H_kv=2, D=64, dtype=dtype, causal=True, block_ids=bid)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_block_ids_noncontiguous_same_id(backend):
    lengths = [40]
    bid = torch.zeros(40, dtype=torch.int32)
    bid[2:6] = 4
    bid[30:34] = 4  # the same id again, later: visible both ways
    run_and_compare(lengths, lengths, H=2, H_kv=1, D=32, dtype=torch.float32, causal=True,
                    block_ids=bid)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_block_ids_ignored_without_causal(backend):
    lengths = [12, 20]
    q, k, v = make_qkv(lengths, lengths, 2, 2, 32, torch.float32)
    cu = cu_of(lengths)
    bid = torch.randint(0, 3, (32,), dtype=torch.int32)
    a = mmkernels.varlen_attention(q, k, v, cu, cu, 20, 20, block_ids=bid)
    b = mmkernels.varlen_attention(q, k, v, cu, cu, 20, 20)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_with_returned_mask(backend, causal):
    p = 0.3
    out = run_and_compare([17, 0, 29], [17, 0, 29], H=2, H_kv=1, D=32, dtype=torch.float32,
                          causal=causal, dropout_p=p)
    masks = va.dropout_keep_mask(1234, cu_of([17, 0, 29]), cu_of([17, 0, 29]), 2, p)
    kept = torch.cat([m.flatten() for m in masks]).float().mean().item()
    assert abs(kept - (1 - p)) < 0.05, kept
    # same seed, same mask and output; another seed, another output
    q, k, v = make_qkv([17, 0, 29], [17, 0, 29], 2, 1, 32, torch.float32)
    cu = cu_of([17, 0, 29])
    a = mmkernels.varlen_attention(q, k, v, cu, cu, 29, 29, dropout_p=p, dropout_seed=5)
    b = mmkernels.varlen_attention(q, k, v, cu, cu, 29, 29, dropout_p=p, dropout_seed=5)
    c = mmkernels.varlen_attention(q, k, v, cu, cu, 29, 29, dropout_p=p, dropout_seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert out.shape == (46, 2, 32)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_empty_and_all_zero_lengths(backend):
    q, k, v = make_qkv([0, 0], [0, 0], 2, 2, 16, torch.float32)
    for t in (q, k, v):
        t.requires_grad_()
    cu = cu_of([0, 0])
    out, lse = mmkernels.varlen_attention(q, k, v, cu, cu, 0, 0, return_lse=True)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)
    out.sum().backward()
    assert q.grad.shape == q.shape
    # keys all empty: outputs are zeros, gradients zero
    run_and_compare([4, 6], [0, 0], H=2, H_kv=2, D=16, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_run_twice_deterministic_and_noncontiguous(backend):
    lengths = [9, 25]
    cu = cu_of(lengths)
    base = torch.randn(34, 3, 2, 48)  # q/k/v interleaved: non-contiguous views
    q, k, v = base[:, 0, :, :40], base[:, 1, :, :40], base[:, 2, :, :40]
    grads = []
    for _ in range(2):
        qq, kk, vv = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = mmkernels.varlen_attention(qq, kk, vv, cu, cu, 25, 25, causal=True)
        out.backward(torch.ones_like(out))
        grads.append((out, qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    run_and_compare(lengths, lengths, 2, 2, 40, torch.float32, causal=True)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_nan_propagates_within_its_sequence(backend):
    q, k, v = make_qkv([5, 6], [5, 6], 1, 1, 16, torch.float32)
    v[1, 0, 3] = float("nan")
    cu = cu_of([5, 6])
    out = mmkernels.varlen_attention(q, k, v, cu, cu, 6, 6)
    assert torch.isnan(out[:5]).any() and not torch.isnan(out[5:]).any()


@pytest.mark.parametrize("lengths, kwargs", [
    ([3, 4], dict(softmax_scale=0.3)),
    # dropout with a fixed seed: the backward regenerates the forward's mask
    ([3, 5], dict(dropout_p=0.4, dropout_seed=2024)),
], ids=["softmax_scale", "dropout-fixed-seed"])
def test_gradcheck_cpu(monkeypatch, lengths, kwargs):
    """float64 gradcheck of the CPU path."""
    monkeypatch.setattr(_chk, "_uses_triton", lambda device: False)
    cu = cu_of(lengths)
    q, k, v = [t.requires_grad_() for t in make_qkv(lengths, lengths, 2, 1, 8, torch.float64)]
    assert torch.autograd.gradcheck(
        lambda a, b, c: mmkernels.varlen_attention(a, b, c, cu, cu, max(lengths), max(lengths),
                                                   causal=True, **kwargs), (q, k, v))


# ---------------------------------------------------------------------------------
# the flash-attn API: sliding window, softcap, positional order, tensor max_seqlen
# ---------------------------------------------------------------------------------

WINDOWS = [((5, -1), "left5"), ((-1, 4), "right4"), ((6, 3), "left6-right3"), ((1, 0), "narrow")]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window", [w for w, _ in WINDOWS], ids=[i for _, i in WINDOWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_sliding_window(backend, dtype, window, causal):
    """window_size against the float64 reference, forward and backward, with lengths
    of several 16-row tiles (tiles outside the window are skipped) and seqlen_q !=
    seqlen_k (the window is bottom-right aligned, as flash-attn's)."""
    run_and_compare([7, 0, 45, 20], [7, 0, 45, 50], H=4, H_kv=2, D=32, dtype=dtype,
                    causal=causal, window=window)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_window_causal_blocks_gqa(backend, dtype):
    """A window combined with causal, image blocks and GQA: block visibility is added on
    top of the windowed causal mask (a block longer than the window sees itself whole)."""
    lengths = [40, 33]
    bid = torch.zeros(73, dtype=torch.int32)
    bid[3:30] = 1      # longer than the window
    bid[45:52] = 2
    run_and_compare(lengths, lengths, H=6, H_kv=2, D=32, dtype=dtype, causal=True,
                    block_ids=bid, window=(4, 0))


def test_window_block_semantics():
    """The documented rule on a tiny case: causal + window (1, 0) + one image block."""
    bid = torch.tensor([0, 1, 1, 1, 0, 0], dtype=torch.int32)
    vis = reference.attention_visibility(6, 6, True, bid, bid, window_size=(1, -1))
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0],
                         [0, 1, 1, 1, 0, 0],
                         [0, 1, 1, 1, 0, 0],
                         [0, 0, 0, 1, 1, 0],
                         [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(vis, want)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_softcap(backend, dtype, causal):
    """softcap: scale 1 makes the scores large (|S| up to ~20 at D=32), so the cap at 5
    changes the attention; forward and backward (the cap's derivative) against the
    float64 reference."""
    run_and_compare([7, 0, 40, 21], [7, 0, 40, 33], H=4, H_kv=2, D=32, dtype=dtype,
                    causal=causal, scale=1.0, softcap=5.0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_softcap_window_dropout(backend):
    """softcap with dropout (the regenerated mask) and a window, GQA."""
    run_and_compare([19, 33], [19, 33], H=4, H_kv=1, D=32, dtype=torch.float32, causal=True,
                    scale=1.0, softcap=3.0, dropout_p=0.3, window=(8, 0))


@pytest.mark.parametrize("kwargs", [dict(softcap=2.0, softmax_scale=0.9),
                                    dict(window_size=(2, 1)),
                                    dict(window_size=(1, -1), causal=True, softcap=1.5)],
                         ids=["softcap", "window", "window-causal-softcap"])
def test_gradcheck_cpu_softcap_window(monkeypatch, kwargs):
    """float64 gradcheck of the CPU path with softcap and a window."""
    monkeypatch.setattr(_chk, "_uses_triton", lambda device: False)
    lengths = [3, 5]
    cu = cu_of(lengths)
    q, k, v = [t.requires_grad_() for t in make_qkv(lengths, lengths, 2, 1, 8, torch.float64)]
    assert torch.autograd.gradcheck(
        lambda a, b, c: mmkernels.varlen_attention(a, b, c, cu, cu, 5, 5, **kwargs), (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_flash_attn_positional_order_and_tensor_max_seqlen(backend):
    """flash_attn_varlen_func's positional order (q, k, v, cu_q, cu_k, max_q, max_k,
    dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
    deterministic, return_attn_probs), and 0-dim Tensor max_seqlens giving the same
    result as ints."""
    lengths = [9, 20]
    cu = cu_of(lengths)
    q, k, v = make_qkv(lengths, lengths, 4, 2, 16, torch.float32)
    want = mmkernels.varlen_attention(q, k, v, cu, cu, 20, 20, softmax_scale=0.3, causal=True,
                                      window_size=(4, 0), softcap=2.0)
    got = mmkernels.varlen_attention(q, k, v, cu, cu, 20, 20, 0.0, 0.3, True, (4, 0), 2.0, None,
                                     True, False)
    assert torch.equal(got, want)
    m = torch.tensor(20, dtype=torch.int32)
    got = mmkernels.varlen_attention(q, k, v, cu, cu, m, m, 0.0, 0.3, True, (4, 0), 2.0)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        mmkernels.varlen_attention(q, k, v, cu, cu, m, torch.tensor(19))


# ---------------------------------------------------------------------------------
# opcheck, compile, module
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_opcheck(backend):
    lengths = [5, 11]
    cu = cu_of(lengths)
    q, k, v = [t.requires_grad_() for t in make_qkv(lengths, lengths, 2, 1, 16, torch.float32)]
    bid = torch.zeros(16, dtype=torch.int32)
    bid[6:10] = 1
    torch.library.opcheck(torch.ops.mmkernels.varlen_attention_fwd.default,
                          (q, k, v, cu, cu, bid, 11, 11, 0.25, True, 0.0, 0, 0))
    out, lse = torch.ops.mmkernels.varlen_attention_fwd(q, k, v, cu, cu, bid, 11, 11, 0.25, True,
                                                        0.0, 0, 0)
    torch.library.opcheck(torch.ops.mmkernels.varlen_attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                           out.detach(), lse, cu, cu, bid, 11, 11, 0.25, True, 0.0, 0, 0))


def test_torch_compile_fullgraph_cpu_path(monkeypatch):
    monkeypatch.setattr(_chk, "_uses_triton", lambda device: False)
    lengths = [5, 11]
    cu = cu_of(lengths)
    q, k, v = make_qkv(lengths, lengths, 2, 1, 16, torch.float32)

    def fn(q, k, v, cu):
        return mmkernels.varlen_attention(q * 2, k, v, cu, cu, 11, 11, causal=True).sum(-1)

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, cu), fn(q, k, v, cu))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_torch_compile_fullgraph_data_dependent_token_count(backend):
    """Tokens packed by masked_select_rows: under torch.compile their count is a
    data-dependent size. The input checks must neither guard on it nor put it in an
    assertion message (regression: both broke FusedPaddedSelfAttention's graph when it
    had a key_padding_mask)."""
    mask = torch.tensor([[True] * 5 + [False] * 3, [True] * 8])
    x = torch.randn(2, 8, 3 * 2 * 16)

    def fn(x, mask):
        rows, _ = mmkernels.masked_select_rows(x, mask)
        q, k, v = rows.view(-1, 6, 16).split(2, dim=1)
        zero = torch.zeros(1, dtype=torch.int32)
        cu = torch.cat([zero, mask.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32)])
        return mmkernels.varlen_attention(q, k, v, cu, cu, 8, 8)

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        torch._dynamo.reset()
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, mask)
    torch._dynamo.reset()
    torch.testing.assert_close(out, fn(x, mask))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_torch_compile_fullgraph_with_dropout(backend):
    """Dropout under torch.compile(fullgraph=True): the seed draw traces (no graph
    break), every call gets a fresh mask, and the same torch.manual_seed gives the
    same result. (Compiled random draws follow inductor's RNG, not eager's, as for
    torch's own random ops.)"""
    lengths = [5, 11]
    cu = cu_of(lengths)
    q, k, v = make_qkv(lengths, lengths, 2, 1, 16, torch.float32)

    def fn(q, k, v):
        return mmkernels.varlen_attention(q, k, v, cu, cu, 11, 11, dropout_p=0.3, causal=True)

    compiled = torch.compile(fn, fullgraph=True)
    torch.manual_seed(5)
    a, b = compiled(q, k, v), compiled(q, k, v)
    torch.manual_seed(5)
    assert torch.equal(a, compiled(q, k, v)) and not torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_varlen_self_attention_module(backend):
    torch.manual_seed(0)
    m = mmkernels.nn.VarlenSelfAttention(64, num_heads=4, num_kv_heads=2, causal=True)
    lengths = [7, 13]
    cu = cu_of(lengths)
    x = torch.randn(20, 64, requires_grad=True)
    bid = torch.zeros(20, dtype=torch.int32)
    bid[9:14] = 1
    y = m(x, cu, 13, block_ids=bid)
    # eager: the same projections, per-sequence reference attention
    qkv = torch.nn.functional.linear(x.double(), m.qkv.weight.double(), m.qkv.bias.double())
    q, k, v = qkv.view(20, 8, 16).split([4, 2, 2], dim=1)
    o, _ = reference.varlen_attention(q, k, v, cu, cu, None, True, bid)
    ref = torch.nn.functional.linear(o.reshape(20, 64), m.out_proj.weight.double(),
                                     m.out_proj.bias.double())
    assert_close_to_reference(y, ref, what="module output")
    y.sum().backward()
    assert x.grad is not None and m.qkv.weight.grad is not None
    assert "num_heads=4" in repr(m)


# ---------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------

def _bad(**over):
    lengths = [5, 7]
    q, k, v = make_qkv(lengths, lengths, 4, 2, 16, torch.float32)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_of(lengths), cu_seqlens_k=cu_of(lengths),
                max_seqlen_q=7, max_seqlen_k=7)
    kwargs = {}
    for key, val in over.items():
        (args if key in args else kwargs)[key] = val
    return lambda: mmkernels.varlen_attention(**args, **kwargs)


BAD = [
    ("cu-int64", _bad(cu_seqlens_q=torch.tensor([0, 5, 12])), TypeError, "int32"),
    ("cu-not-monotonic", _bad(cu_seqlens_q=torch.tensor([0, 8, 12], dtype=torch.int32).flip(0)),
     ValueError, "cu_seqlens_q"),
    ("cu-decreasing", _bad(cu_seqlens_k=torch.tensor([0, 9, 8, 12], dtype=torch.int32)),
     ValueError, "non-decreasing|same batch"),
    ("cu-not-zero-first", _bad(cu_seqlens_q=torch.tensor([1, 5, 12], dtype=torch.int32)),
     ValueError, r"\[0\] must be 0"),
    ("cu-wrong-end", _bad(cu_seqlens_k=torch.tensor([0, 5, 11], dtype=torch.int32)), ValueError,
     "number of packed tokens"),
    ("max-seqlen-small", _bad(max_seqlen_q=6), ValueError, "max_seqlen_q"),
    ("heads-not-multiple", _bad(k=torch.randn(12, 3, 16), v=torch.randn(12, 3, 16)), ValueError,
     "multiple"),
    ("dims-differ", _bad(k=torch.randn(12, 2, 8), v=torch.randn(12, 2, 8)), ValueError,
     "head dims"),
    ("dtype-differ", _bad(k=torch.randn(12, 2, 16).half(), v=torch.randn(12, 2, 16).half()),
     TypeError, "dtype"),
    ("head-dim-too-big", _bad(q=torch.randn(12, 4, 300), k=torch.randn(12, 2, 300),
                              v=torch.randn(12, 2, 300)), ValueError, "head_dim"),
    ("batch-mismatch", _bad(cu_seqlens_k=torch.tensor([0, 12], dtype=torch.int32),
                            max_seqlen_k=12), ValueError,
     "same batch"),
    ("dropout-range", _bad(dropout_p=1.0), ValueError, "dropout_p"),
    ("block-ids-dtype", _bad(causal=True, block_ids=torch.zeros(12, dtype=torch.int64)),
     TypeError, "block_ids"),
    ("block-ids-shape", _bad(causal=True, block_ids=torch.zeros(11, dtype=torch.int32)),
     ValueError, "block_ids"),
    ("block-ids-unequal-lengths", _bad(causal=True, block_ids=torch.zeros(12, dtype=torch.int32),
                                       cu_seqlens_k=torch.tensor([0, 6, 12], dtype=torch.int32)),
     ValueError, "seqlen_q == seqlen_k"),
]


@pytest.mark.parametrize("name,call,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 80, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cuda_forward_backward(dtype, D, causal):
    lengths = [130, 0, 257, 64, 1]
    bid = torch.zeros(sum(lengths), dtype=torch.int32, device="cuda")
    bid[140:300] = 3
    run_and_compare(lengths, lengths, H=8, H_kv=2, D=D, dtype=dtype, causal=causal,
                    block_ids=bid if causal else None, device="cuda")


@pytest.mark.cuda
def test_cuda_dropout_and_compile():
    lengths = [100, 37]
    run_and_compare(lengths, lengths, H=4, H_kv=4, D=64, dtype=torch.bfloat16, causal=True,
                    dropout_p=0.2, device="cuda")
    cu = cu_of(lengths, "cuda")
    q, k, v = make_qkv(lengths, lengths, 4, 4, 64, torch.bfloat16, "cuda")
    fn = torch.compile(lambda q, k, v: mmkernels.varlen_attention(q, k, v, cu, cu, 100, 100),
                       fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), mmkernels.varlen_attention(q, k, v, cu, cu, 100, 100))
    # with dropout: Generator.philox_state does not trace, the compiled call draws its seed
    drop = torch.compile(lambda q, k, v: mmkernels.varlen_attention(q, k, v, cu, cu, 100, 100,
                                                                    dropout_p=0.2), fullgraph=True)
    assert not torch.equal(drop(q, k, v), drop(q, k, v))


@pytest.mark.cuda
def test_cuda_matches_sdpa_per_sequence():
    lengths = [300, 511]
    cu = cu_of(lengths, "cuda")
    q, k, v = make_qkv(lengths, lengths, 8, 8, 128, torch.bfloat16, "cuda")
    out = mmkernels.varlen_attention(q, k, v, cu, cu, 511, 511, causal=True)
    for b in range(2):
        s = slice(int(cu[b]), int(cu[b + 1]))
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[s].transpose(0, 1), k[s].transpose(0, 1), v[s].transpose(0, 1), is_causal=True)
        torch.testing.assert_close(out[s], ref.transpose(0, 1), atol=2e-2, rtol=2e-2)
    assert math.isfinite(out.float().sum().item())


@pytest.mark.skipif(not interpreting(), reason="exercises tile shapes in the interpreter")
@pytest.mark.parametrize("tiles", [(32, 16), (16, 32), (32, 64)], ids=lambda t: f"M{t[0]}-N{t[1]}")
def test_tile_shapes_with_blocks(tiles, monkeypatch):
    """Reach-based tile skipping and the q-range start of dK/dV with BLOCK_M != BLOCK_N."""
    monkeypatch.setattr(tva, "INTERPRET_CONFIG", tva.AttnConfig(tiles[0], tiles[1], 4, 1))
    lengths = [45, 70]
    bid = torch.zeros(115, dtype=torch.int32)
    bid[10:30] = 1
    bid[50:90] = 2
    run_and_compare(lengths, lengths, H=2, H_kv=1, D=32, dtype=torch.float32, causal=True,
                    block_ids=bid)
    run_and_compare([45, 20], [30, 70], H=2, H_kv=2, D=32, dtype=torch.float32, causal=True)
    # window bounds rounded to tiles on both axes (forward key range, dK/dV query range)
    run_and_compare(lengths, lengths, H=2, H_kv=1, D=32, dtype=torch.float32, causal=True,
                    block_ids=bid, window=(9, 0))
    run_and_compare([45, 20], [30, 70], H=2, H_kv=2, D=32, dtype=torch.float32, window=(7, 20))


# ---------------------------------------------------------------------------------
# issue 10, defect 9 (same review for varlen): every argument checked, by name
# ---------------------------------------------------------------------------------

BAD_NAMED = [
    ("k-heads", _bad(k=torch.randn(12, 3, 16), v=torch.randn(12, 3, 16)), ValueError, "k has 3"),
    ("v-shape", _bad(v=torch.randn(12, 1, 16)), ValueError, "v must have k's shape"),
    ("k-tokens", _bad(k=torch.randn(11, 2, 16), v=torch.randn(11, 2, 16)), ValueError,
     r"cu_seqlens_k\[-1\] must equal the number of packed tokens of k"),
    ("q-tokens", _bad(q=torch.randn(13, 4, 16)), ValueError, "tokens of q"),
    ("v-dtype", _bad(v=torch.randn(12, 2, 16).double()), TypeError, "v dtype"),
    ("q-int", _bad(q=torch.ones(12, 4, 16, dtype=torch.int32)), TypeError, "q dtype"),
    ("k-device", _bad(k=torch.randn(12, 2, 16, device="meta")), ValueError, "k is on meta"),
    ("q-zero-heads", _bad(q=torch.randn(12, 0, 16)), ValueError, "q must have at least one"),
    ("q-sparse", _bad(q=torch.randn(12, 4, 16).to_sparse()), TypeError, "q must be a dense"),
    ("cu-device", _bad(cu_seqlens_q=torch.tensor([0, 5, 12], dtype=torch.int32,
                                                 device="meta")), ValueError, "cu_seqlens_q"),
    ("cu-empty", _bad(cu_seqlens_k=torch.zeros(0, dtype=torch.int32)), ValueError,
     "cu_seqlens_k"),
    ("max-seqlen-bool", _bad(max_seqlen_k=True), TypeError, "max_seqlen_k"),
    ("max-seqlen-negative", _bad(max_seqlen_q=-3), TypeError, "max_seqlen_q"),
    ("block-ids-device", _bad(causal=True, block_ids=torch.zeros(12, dtype=torch.int32,
                                                                 device="meta")),
     ValueError, "block_ids"),
    ("dropout-nan", _bad(dropout_p=float("nan")), ValueError, "dropout_p"),
    ("dropout-negative", _bad(dropout_p=-0.1), ValueError, "dropout_p"),
    ("window-not-pair", _bad(window_size=3), TypeError, "window_size"),
    ("window-three", _bad(window_size=(1, 2, 3)), TypeError, "window_size"),
    ("window-float", _bad(window_size=(1.5, 0)), TypeError, "window_size"),
    ("window-bool", _bad(window_size=(True, 0)), TypeError, "window_size"),
    ("window-below-minus-one", _bad(window_size=(-2, 0)), ValueError, "window_size"),
    ("softcap-negative", _bad(softcap=-1.0), ValueError, "softcap"),
    ("softcap-inf", _bad(softcap=float("inf")), ValueError, "softcap"),
    ("softcap-str", _bad(softcap="big"), TypeError, "softcap"),
    ("alibi", _bad(alibi_slopes=torch.ones(4)), NotImplementedError, "alibi_slopes"),
    ("return-attn-probs", _bad(return_attn_probs=True), NotImplementedError, "return_attn_probs"),
    ("max-seqlen-float-tensor", _bad(max_seqlen_q=torch.tensor(7.0)), TypeError, "max_seqlen_q"),
    ("max-seqlen-1d-tensor", _bad(max_seqlen_k=torch.tensor([7])), TypeError, "max_seqlen_k"),
]


@pytest.mark.parametrize("name,call,exc,match", BAD_NAMED, ids=[b[0] for b in BAD_NAMED])
def test_bad_input_names_the_argument(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_custom_op_checks_its_inputs(backend):
    """torch.ops.mmkernels.varlen_attention_fwd is reachable directly: it checks the
    shapes itself and, on CPU tensors, the offsets (no out-of-bounds read)."""
    lengths = [5, 7]
    q, k, v = make_qkv(lengths, lengths, 4, 2, 16, torch.float32)
    cu = cu_of(lengths)
    with pytest.raises(ValueError, match="k has 3"):
        torch.ops.mmkernels.varlen_attention_fwd(q, torch.randn(12, 3, 16), torch.randn(12, 3, 16),
                                                 cu, cu, None, 7, 7, 0.25, False, 0.0, 0, 0)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        torch.ops.mmkernels.varlen_attention_fwd(q, k[:9], v[:9], cu, cu, None, 7, 7, 0.25,
                                                 False, 0.0, 0, 0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_strided_cu_seqlens_and_huge_max_seqlen(backend):
    """A strided cu_seqlens view (the kernels read cu_ptr + b: the launcher makes it
    contiguous) and a max_seqlen far above the lengths (the grid is bounded by the
    token count, not by the caller's max_seqlen)."""
    lengths = [5, 0, 9, 3]
    q, k, v = make_qkv(lengths, lengths, 2, 1, 16, torch.float32)
    cu = torch.stack([cu_of(lengths), torch.full((5,), -7, dtype=torch.int32)], 1)[:, 0]
    assert not cu.is_contiguous()
    out = mmkernels.varlen_attention(q, k, v, cu, cu, 2**40, 2**40, causal=True)
    ref, _ = reference.varlen_attention(q.double(), k.double(), v.double(), cu_of(lengths),
                                        cu_of(lengths), None, True)
    assert_close_to_reference(out, ref)


# ---------------------------------------------------------------------------------
# issue 10, defects 10 and 11: one dropout mask definition, 64-bit Philox counters
# ---------------------------------------------------------------------------------

def test_philox_matches_random123_known_answers():
    """reference.philox4x32 (the mask definition every backend shares) is
    Philox4x32-10 as Random123 specifies it (kat_vectors)."""
    z = torch.zeros(1, dtype=torch.int64)
    f = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    pi = [torch.tensor([x]) for x in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)]
    cases = [((z, z, z, z), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((f, f, f, f), 2**64 - 1, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             (tuple(pi), 0x299F31D0_A4093822, (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        got = tuple(int(x) for x in reference.philox4x32(*ctr, key))
        assert got == want, [hex(g) for g in got]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_dropout_rows_2_32_over_max_seqlen_k_apart_differ(backend):
    """Before: the counter was (q_start + row) * max_seqlen_k + col in int32, so with
    max_seqlen_k = 32K rows 131,072 apart (8 x 32K packed tokens) shared a mask."""
    max_k = 32768
    gap = 2**32 // max_k
    rows = torch.tensor([0, gap, 777, 777 + gap, 5 * gap + 3, 3], dtype=torch.int32)
    keep = va.dropout_keep_rows(1234, 0, 0, rows, 256, 0.5, device="cpu")
    for a, b in ((0, 1), (2, 3), (4, 5)):
        assert not torch.equal(keep[a], keep[b]), (rows[a], rows[b])
    assert 0.4 < keep.float().mean() < 0.6


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_dropout_streams_never_share_a_counter(backend):
    """Heads are separated by a counter word, not by seed + h * 65537 (before, seed s
    head 1 was seed s + 65537 head 0), and calls by the offset (counter words 0-1,
    64-bit with carry)."""
    rows = torch.arange(64, dtype=torch.int32)

    def keep(seed, offset, stream):
        return va.dropout_keep_rows(seed, offset, stream, rows, 64, 0.5, device="cpu")

    assert not torch.equal(keep(9, 0, 1), keep(9 + 65537, 0, 0))
    assert not torch.equal(keep(9, 0, 0), keep(9, 0, 1))
    assert not torch.equal(keep(9, 0, 0), keep(9, 4 * 64, 0))
    assert not torch.equal(keep(9, 0, 0), keep(9 + 2**32, 0, 0))  # the key's high word counts
    # the offset is 64-bit: counter base 2^32 - 3 plus 64 columns carries into word 1
    assert not torch.equal(keep(9, 4 * (2**32 - 3), 0), keep(9, 4 * (2**64 // 4 - 3), 0))
    # columns of one row past the carry continue the counter, they do not wrap to 0
    k1 = keep(9, 4 * (2**32 - 3), 0)
    k2 = keep(9, 0, 0)
    assert not torch.equal(k1[:, 3:], k2[:, :61])


@pytest.mark.skipif(not interpreting(), reason="the Triton mask function runs in the interpreter")
@pytest.mark.parametrize("seed,offset,stream", [(0, 0, 0), (1234, 4 * 77, 3),
                                                (2**64 - 1, 4 * (2**32 - 5), 2**31 + 5),
                                                (-(2**63), 2**64 - 4, 7)])
def test_triton_and_reference_masks_are_bit_identical(seed, offset, stream):
    """The kernels' _dropout_keep and reference.dropout_keep are one definition."""
    rows = torch.tensor([0, 1, 17, 2**17, 2**31 - 1, 123456], dtype=torch.int32)
    got = va.dropout_keep_rows(seed, offset, stream, rows, 40, 0.3, device="cpu")
    want = reference.dropout_keep(seed, offset, stream, rows, torch.arange(40), 0.3)
    assert torch.equal(got, want)
    u = reference.dropout_uniform(seed, offset, stream, rows, torch.arange(40))
    assert ((u >= 0) & (u < 1)).all()
    # one Philox call per four columns: a call reserves max_seqlen_k values, rounded up
    assert [va.dropout_increment(n) for n in (0, 1, 4, 5, 100, 101)] == [4, 4, 4, 8, 100, 104]
    # the dK/dV tile's spelling of the counter carry (CARRY_BY_COMPARE) gives the same bits
    other = va._triton_keep(seed, offset, stream, rows, 40, 0.3, 1, torch.device("cpu"),
                           carry_by_compare=True)
    assert torch.equal(other[0], want)


# ---------------------------------------------------------------------------------
# the C++ CPU dropout op (csrc/attention/dropout_cpu.cpp) and lazy masks
# ---------------------------------------------------------------------------------

needs_dropout_op = pytest.mark.skipif(not _extension.has_kernel("dropout_keep", "cpu"),
                                      reason="mmkernels._C without the dropout ops")


def _op_uniform(seed, offset, stream0, num_streams, rows, cols):
    return torch.ops.mmkernels.dropout_uniform(acpu._as_int64(seed), acpu._as_int64(offset),
                                               acpu._as_int64(stream0), num_streams, rows, cols)


@needs_dropout_op
def test_dropout_op_matches_reference_bitwise():
    """mmkernels::dropout_uniform / dropout_keep == reference.dropout_uniform /
    dropout_keep bit for bit: random 64-bit seeds (>= 2^63 passed as negative int64),
    offsets whose counter base crosses 2^32 (carry into word 1) and 2^64 (wrap), streams
    wrapping past 2^32 - 1, rows near and past 2^32, int32 and int64 indices, scattered
    and negative columns."""
    import random
    rng = random.Random(10)
    seeds = [0, 1, 2**63, 2**63 + 12345, 2**64 - 1, -5] + [rng.getrandbits(64) for _ in range(6)]
    offsets = [0, 4 * 77, 4 * (2**32 - 3), 4 * (2**32 - 200) + 3, 2**63 + 8, 2**64 - 4,
               4 * (2**62 - 100)] + [rng.getrandbits(64) for _ in range(3)]
    streams = [0, 5, 2**31 + 1, 2**32 - 2]
    rows64 = torch.tensor([0, 1, 17, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1, 2**32, 2**32 + 7,
                           123456789])
    col_sets = [torch.arange(300), torch.tensor([0, 5, 2**31, 2**32 - 1, 2**32 + 9, 2**40, -1,
                                                 -(2**40), 2**63 - 1])]
    for i, seed in enumerate(seeds):
        offset, stream0 = offsets[i % len(offsets)], streams[i % len(streams)]
        for cols in col_sets:
            rows = rows64 if i % 2 else (rows64 & 0x7FFFFFFF).to(torch.int32)
            got = _op_uniform(seed, offset, stream0, 3, rows, cols)
            for h in range(3):
                want = reference.dropout_uniform(seed, offset, stream0 + h, rows, cols)
                assert torch.equal(got[h].view(torch.int32), want.view(torch.int32)), (
                    seed, offset, stream0, h)
            p = (0.0, 0.1, 0.5, 0.9)[i % 4]
            keep = torch.ops.mmkernels.dropout_keep(acpu._as_int64(seed), acpu._as_int64(offset),
                                                    acpu._as_int64(stream0), 3, rows, cols, p)
            assert torch.equal(keep, reference.dropout_keep_heads(seed, offset, stream0, 3, rows,
                                                                  cols, p))
    # every offset and seed once more on a (rows x 300) block across the carry
    for seed in seeds[:4]:
        for offset in offsets:
            got = _op_uniform(seed, offset, 7, 1, rows64, torch.arange(300))[0]
            want = reference.dropout_uniform(seed, offset, 7, rows64, torch.arange(300))
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (seed, offset)


@needs_dropout_op
def test_dropout_op_random123_known_answers():
    """The C++ op's uniforms are Random123's kat_vectors answers, mapped to a uniform as
    tl.rand does: counter words 0-1 = offset / 4 + column // 4, 2 = stream, 3 = row,
    key = seed, and column j takes output word j % 4 (one Philox call per four
    columns)."""
    def unit(word):
        x = torch.tensor([word], dtype=torch.int64)
        x = torch.where(x >= 2**31, 0xFFFFFFFF - x, x)
        return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)

    zeros = (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    ones = (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    # (seed, offset, column, stream, row) -> Philox4x32-10 output word
    cases = [(0, 0, j, 0, 0, zeros[j]) for j in range(4)]
    cases += [(0, 4 * 5, 4 * 7 + j, 0, 0, None) for j in range(4)]  # group 12: reference only
    cases += [(2**64 - 1, 0, -4 + j, 0xFFFFFFFF, 0xFFFFFFFF, ones[j]) for j in range(4)]
    # the counter reaches all ones through the offset: (2^32 - 1) + (-2^32) = -1
    cases += [(2**64 - 1, 4 * (2**32 - 1), -(2**34) + j, 0xFFFFFFFF, 0xFFFFFFFF, ones[j])
              for j in range(4)]
    for seed, offset, col, stream, row, word in cases:
        got = _op_uniform(seed, offset, stream, 1, torch.tensor([row]), torch.tensor([col]))
        if word is not None:
            assert torch.equal(got.view(1).view(torch.int32), unit(word).view(torch.int32)), (
                hex(word))
        want = reference.dropout_uniform(seed, offset, stream, torch.tensor([row]),
                                         torch.tensor([col]))
        assert torch.equal(got.view(1), want.view(1))
    # four consecutive columns are the four words of one counter
    cols = torch.arange(8)
    got = _op_uniform(0, 0, 0, 1, torch.tensor([0]), cols).view(8)
    assert torch.equal(got[:4].view(torch.int32), torch.cat([unit(w) for w in zeros]).view(
        torch.int32))
    assert not torch.equal(got[:4], got[4:])


@needs_dropout_op
def test_dropout_op_opcheck_threads_and_errors():
    rows = torch.tensor([0, 3, 2**32 - 1, 9])
    cols = torch.arange(37)
    for args in ((1234, 4 * 5, 2, 3, rows, cols), (-1, -4, 0, 2, rows.int(), cols[:0]),
                 (7, 0, 0, 0, rows, cols)):
        torch.library.opcheck(torch.ops.mmkernels.dropout_uniform.default, args)
        torch.library.opcheck(torch.ops.mmkernels.dropout_keep.default, (*args, 0.25))
    old = torch.get_num_threads()
    big = (99, 4 * (2**32 - 7), 0, 4, torch.arange(300), torch.arange(300))
    try:
        torch.set_num_threads(1)
        one = torch.ops.mmkernels.dropout_uniform(*big)
        torch.set_num_threads(2)
        two = torch.ops.mmkernels.dropout_uniform(*big)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one.view(torch.int32), two.view(torch.int32))
    with pytest.raises(RuntimeError, match="rows"):
        torch.ops.mmkernels.dropout_keep(1, 0, 0, 1, rows.float(), cols, 0.5)
    with pytest.raises(RuntimeError, match="cols"):
        torch.ops.mmkernels.dropout_keep(1, 0, 0, 1, rows, cols[None], 0.5)
    with pytest.raises(RuntimeError, match="num_streams"):
        torch.ops.mmkernels.dropout_keep(1, 0, 0, -1, rows, cols, 0.5)


@pytest.mark.parametrize("fallback", [False, True], ids=["op", "torch"])
def test_cpu_dropout_masks_generated_per_row_chunk(monkeypatch, fallback):
    """Before: the CPU forward and backward built every sequence's (H, Lq, Lk) mask
    before the row-chunk loop (memory O(H * total_q * Lk), ~96 bytes of int64
    temporaries per element); now each (sequence, row chunk) generates its block just
    before it is used: at most H * CPU_CHUNK_ROWS rows of mask exist at a time, with
    the C++ op or with the pure-torch generator."""
    monkeypatch.setattr(_chk, "_uses_triton", lambda device: False)
    monkeypatch.setattr(acpu, "CPU_CHUNK_ROWS", 8)
    events = []
    if fallback:  # the pure-torch generator (what the old code always ran)
        has = _extension.has_kernel
        monkeypatch.setattr(_extension, "has_kernel",
                            lambda op, dev: False if op == "dropout_keep" else has(op, dev))
        orig_keep = reference.dropout_keep

        def logged_keep(*args):
            out = orig_keep(*args)
            events.append(("mask", out.shape[0]))  # one head's rows
            return out
        monkeypatch.setattr(reference, "dropout_keep", logged_keep)
    else:
        orig_heads = acpu._keep_heads

        def logged_heads(*args):
            out = orig_heads(*args)
            events.append(("mask", out.shape[0] * out.shape[1]))
            return out
        monkeypatch.setattr(acpu, "_keep_heads", logged_heads)
    for name in ("attention", "attention_backward"):
        orig = getattr(reference, name)

        def logged_attn(*args, _orig=orig, _name=name, **kw):
            events.append((_name, args[0].shape[0]))
            return _orig(*args, **kw)
        monkeypatch.setattr(reference, name, logged_attn)
    H, lengths = 3, [30, 21]
    cu = cu_of(lengths)
    q, k, v = make_qkv(lengths, lengths, H, H, 16, torch.float32)
    q.requires_grad_()
    out = mmkernels.varlen_attention(q, k, v, cu, cu, 30, 30, dropout_p=0.3, dropout_seed=5)
    out.sum().backward()
    last_fwd = max(i for i, e in enumerate(events) if e[0] == "attention")
    for phase, start in (("attention", 0), ("attention_backward", last_fwd + 1)):
        chunks = [i for i, e in enumerate(events) if e[0] == phase]
        assert len(chunks) == 4 + 3  # ceil(30 / 8) + ceil(21 / 8) row chunks
        for a, b in zip([start - 1] + chunks, chunks):
            # between two row chunks: the next chunk's mask only (H heads x <= 8 rows)
            rows = sum(n for kind, n in events[a + 1:b] if kind == "mask")
            assert rows == H * events[b][1], (phase, rows, events[a + 1:b + 1])


def test_reference_attention_moves_the_mask_to_q_device():
    """Before: reference.attention / attention_backward multiplied P by a keep-mask
    built on the CPU whatever q's device (MMKERNELS_BACKEND=reference with CUDA tensors
    and dropout crashed); meta tensors stand in for CUDA here. DropoutMasks builds its
    blocks on the device it is given."""
    q = torch.randn(5, 2, 8, device="meta")
    k = v = torch.randn(7, 2, 8, device="meta")
    vis = torch.ones(5, 7, dtype=torch.bool, device="meta")
    keep = torch.ones(2, 5, 7, dtype=torch.bool)
    out, _ = reference.attention(q, k, v, 0.3, vis, keep, 0.2)
    grads = reference.attention_backward(q, k, v, 0.3, vis, torch.randn_like(q), keep, 0.2)
    assert out.device.type == "meta" and all(g.device.type == "meta" for g in grads)
    masks = reference.DropoutMasks(3, 0, cu_of([5, 2]), cu_of([7, 4]), 2, 0.2, device="meta")
    assert masks.block(0, 2, 99).shape == (2, 3, 7) and masks[1].device.type == "meta"
    cpu = reference.DropoutMasks(3, 0, cu_of([5, 2]), cu_of([7, 4]), 2, 0.2)
    eager = reference.dropout_keep_masks(3, 0, cu_of([5, 2]), cu_of([7, 4]), 2, 0.2)
    assert torch.equal(cpu.block(0, 1, 4), eager[0][:, 1:4]) and torch.equal(cpu[1], eager[1])


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cuda_reference_backend_with_dropout(monkeypatch, causal):
    """MMKERNELS_BACKEND=reference with CUDA tensors and dropout: the masks are built on
    q's device (before: a CPU mask times a CUDA P raised), and they are the kernels'."""
    lengths = [37, 0, 64]
    cu = cu_of(lengths, "cuda")
    q, k, v = make_qkv(lengths, lengths, 4, 2, 64, torch.float32, "cuda")
    kern = mmkernels.varlen_attention(q, k, v, cu, cu, 64, 64, causal=causal, dropout_p=0.25,
                                      dropout_seed=21)
    monkeypatch.setenv("MMKERNELS_BACKEND", "reference")
    qr = q.clone().requires_grad_()
    ref = mmkernels.varlen_attention(qr, k, v, cu, cu, 64, 64, causal=causal, dropout_p=0.25,
                                     dropout_seed=21)
    ref.sum().backward()
    assert ref.device.type == "cuda" and qr.grad.device.type == "cuda"
    assert_close_to_reference(kern, ref.double(), what="kernel vs reference backend (cuda)")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_reference_backend_uses_the_kernels_mask(backend, monkeypatch):
    """MMKERNELS_BACKEND=reference draws the same mask as the kernels for the same
    seed: outputs agree to the float32 tolerance."""
    lengths = [17, 0, 29]
    cu = cu_of(lengths)
    q, k, v = make_qkv(lengths, lengths, 4, 2, 32, torch.float32)
    kern = mmkernels.varlen_attention(q, k, v, cu, cu, 29, 29, causal=True, dropout_p=0.3,
                                      dropout_seed=99)
    monkeypatch.setenv("MMKERNELS_BACKEND", "reference")
    ref = mmkernels.varlen_attention(q, k, v, cu, cu, 29, 29, causal=True, dropout_p=0.3,
                                     dropout_seed=99)
    plain = mmkernels.varlen_attention(q, k, v, cu, cu, 29, 29, causal=True)
    assert not torch.equal(ref, plain)
    assert_close_to_reference(kern, ref.double(), what="kernel vs reference backend")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_default_dropout_state_reproducible_and_fresh(backend):
    """Without dropout_seed: the state comes from torch's default generator, so
    torch.manual_seed reproduces a call bit for bit, and two calls differ."""
    lengths = [20, 11]
    cu = cu_of(lengths)
    q, k, v = make_qkv(lengths, lengths, 2, 2, 16, torch.float32)

    def run():
        return mmkernels.varlen_attention(q, k, v, cu, cu, 20, 20, dropout_p=0.5)

    torch.manual_seed(3)
    a, b = run(), run()
    torch.manual_seed(3)
    assert torch.equal(run(), a)
    assert not torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_dropout_state_from_cuda_philox_generator():
    """CUDA: (seed, offset) reserved with Generator.philox_state, as PyTorch's own
    dropout: the offset advances by max_seqlen_k (a multiple of 4) per call, torch.manual_seed
    reproduces, and CUDA-graph capture with dropout raises instead of baking a mask."""
    lengths = [100, 37]
    cu = cu_of(lengths, "cuda")
    q, k, v = make_qkv(lengths, lengths, 4, 4, 64, torch.float16, "cuda")
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    torch.manual_seed(0)
    off0 = gen.get_offset()
    a = mmkernels.varlen_attention(q, k, v, cu, cu, 100, 100, dropout_p=0.2)
    assert gen.get_offset() - off0 >= 100
    b = mmkernels.varlen_attention(q, k, v, cu, cu, 100, 100, dropout_p=0.2)
    torch.manual_seed(0)
    assert torch.equal(mmkernels.varlen_attention(q, k, v, cu, cu, 100, 100, dropout_p=0.2), a)
    assert not torch.equal(a, b)
    keep = va.dropout_keep_mask(5, cu, cu, 4, 0.2, device="cuda")
    assert all(torch.equal(m, r) for m, r in
               zip(keep, va.dropout_keep_mask(5, cu.cpu(), cu.cpu(), 4, 0.2, device="cpu")))
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="graph capture"):
        with torch.cuda.graph(graph):
            mmkernels.varlen_attention(q, k, v, cu, cu, 100, 100, dropout_p=0.2)


# ---------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------

def _fwd_bwd(lengths, dtype, dropout_p, threads=None, H=4, H_kv=2, D=24):
    torch.manual_seed(0)
    q, k, v = [t.requires_grad_() for t in make_qkv(lengths, lengths, H, H_kv, D, dtype)]
    cu = cu_of(lengths)
    bid = torch.zeros(sum(lengths), dtype=torch.int32)
    bid[3:11] = 1
    old = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        out = mmkernels.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), causal=True,
                                         block_ids=bid, dropout_p=dropout_p)
        out.backward(torch.randn_like(out))
    finally:
        torch.set_num_threads(old)
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_deterministic_algorithms_run_to_run_bitwise(backend, deterministic, dropout_p):
    """Under use_deterministic_algorithms(True) the Triton backward takes its
    deterministic path (dK/dV per key tile, dQ in a second kernel, no atomics), the
    CPU path its explicit backward: bit-identical reruns; with dropout, the default
    state drawn after torch.manual_seed gives the same mask."""
    a = _fwd_bwd([19, 0, 40], torch.float32, dropout_p)
    b = _fwd_bwd([19, 0, 40], torch.float32, dropout_p)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.skipif(not interpreting(), reason="the Triton path on CPU tensors (interpreter)")
@pytest.mark.parametrize("mode", ["default", "deterministic-arg", "deterministic-mode"])
def test_backward_path_selection(monkeypatch, mode):
    """The one-pass backward (kernel kind "bwd": dK/dV and atomic dQ) by default; the
    two-kernel deterministic path ("dkdv" then "dq") with deterministic=True or under
    torch.use_deterministic_algorithms(True). Both against the float64 reference."""
    kinds = []
    pick = tva.pick_config
    monkeypatch.setattr(tva, "pick_config", lambda kind, d: kinds.append(kind) or pick(kind, d))
    lengths = [19, 0, 40]
    cu = cu_of(lengths)
    bid = torch.zeros(59, dtype=torch.int32)
    bid[3:11] = 1
    q, k, v = [t.requires_grad_() for t in make_qkv(lengths, lengths, 4, 2, 24, torch.float32)]
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(mode == "deterministic-mode")
    try:
        out = mmkernels.varlen_attention(q, k, v, cu, cu, 40, 40, causal=True, block_ids=bid,
                                         deterministic=mode == "deterministic-arg")
        g = torch.randn_like(out)
        out.backward(g)
    finally:
        torch.use_deterministic_algorithms(old)
    assert kinds[1:] == (["bwd"] if mode == "default" else ["dkdv", "dq"])
    q64, k64, v64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.varlen_attention(q64, k64, v64, cu, cu, None, True, bid)
    ref.backward(g.double())
    for got, want, name in ((q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"),
                            (v.grad, v64.grad, "dv")):
        assert_close_to_reference(got, want, what=name)


@pytest.mark.skipif(not interpreting(), reason="the Triton path on CPU tensors (interpreter)")
@pytest.mark.parametrize("deterministic", [False, True], ids=["one-pass", "deterministic"])
@pytest.mark.parametrize("D, buckets", [(72, (80, 96, 128)), (80, (80, 96, 128)),
                                        (96, (96, 96, 128)), (256, (256, 256, 256))])
def test_head_dim_buckets_per_kernel(monkeypatch, D, buckets, deterministic):
    """The head-dim bucket each kernel launches with (head_chunks): the forward in 64 +
    16 lanes for D <= 80, the one-pass backward in 64 + 32, the deterministic backward
    padded to 128; D = 256 (one masked loop in the dK/dV tile) everywhere 256. Each
    against the float64 reference, causal with image blocks and a window."""
    seen = []
    pick = tva.pick_config
    monkeypatch.setattr(tva, "pick_config", lambda kind, d: seen.append((kind, d)) or pick(kind, d))
    lengths = [19, 0, 33]
    cu = cu_of(lengths)
    bid = torch.zeros(52, dtype=torch.int32)
    bid[3:11] = 1
    q, k, v = [t.requires_grad_() for t in make_qkv(lengths, lengths, 2, 1, D, torch.float32)]
    out = mmkernels.varlen_attention(q, k, v, cu, cu, 33, 33, causal=True, block_ids=bid,
                                     window_size=(20, 0), deterministic=deterministic)
    g = torch.randn_like(out)
    out.backward(g)
    fwd, bwd, det = buckets
    want = [("fwd", fwd)] + ([("dkdv", det), ("dq", det)] if deterministic else [("bwd", bwd)])
    assert seen == want
    q64, k64, v64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.varlen_attention(q64, k64, v64, cu, cu, None, True, bid,
                                        window_size=(20, 0))
    ref.backward(g.double())
    assert_close_to_reference(out, ref, what="out")
    for got, want_, name in ((q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"),
                             (v.grad, v64.grad, "dv")):
        assert_close_to_reference(got, want_, what=name)


@pytest.mark.skipif(not interpreting(), reason="the Triton path on CPU tensors (interpreter)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_delta_prekernel(dtype):
    """delta = rowsum(dO * O) by the Triton pre-kernel, from operands in their dtype and
    strides (here non-contiguous, D not a power of two), against float64."""
    out = torch.randn(37, 80, 3, dtype=dtype).transpose(1, 2)  # (37, 3, 80), strided
    do = torch.randn(37, 3, 80, dtype=dtype)
    got = tva.attention_delta(out, do)
    want = (out.double() * do.double()).sum(-1).transpose(0, 1)
    assert got.shape == (3, 37) and got.dtype == torch.float32
    assert_close_to_reference(got, want, what="delta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_cpu_path_independent_of_thread_count(monkeypatch, deterministic, dtype, dropout_p):
    """Before: torch's fused CPU flash backward gave other float32 gradients with 2
    threads than with 1 (1100-row sequence); under deterministic algorithms the CPU
    path now runs its explicit backward."""
    monkeypatch.setattr(_chk, "_uses_triton", lambda device: False)
    lengths = [70, 0, 1100, 33] if dropout_p == 0 else [70, 0, 300, 33]
    monkeypatch.setattr(acpu, "CPU_CHUNK_ROWS", 1024 if dropout_p == 0 else 128)  # row chunks
    a = _fwd_bwd(lengths, dtype, dropout_p, threads=1)
    b = _fwd_bwd(lengths, dtype, dropout_p, threads=2)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.cuda
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_cuda_deterministic_run_to_run(deterministic, dropout_p):
    lengths = [300, 0, 77, 1000]
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        q, k, v = [t.requires_grad_() for t in make_qkv(lengths, lengths, 8, 2, 128,
                                                         torch.bfloat16, "cuda")]
        cu = cu_of(lengths, "cuda")
        out = mmkernels.varlen_attention(q, k, v, cu, cu, 1000, 1000, causal=True,
                                         dropout_p=dropout_p)
        out.float().square().sum().backward()
        runs.append([out, q.grad, k.grad, v.grad])
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_philox_arguments_are_never_specialised():
    """The dropout seed and counter change every call: a kernel specialised on them
    (== 1 or % 16) would recompile at random training steps (found in review). Checked
    on the compiled (non-interpreted) JIT functions, in a subprocess."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        from mmkernels.triton import attention, co_attention, varlen_attention
        kernels = [attention._dropout_mask_kernel] + [
            getattr(m, n) for m in (varlen_attention, co_attention) for n in dir(m)
            if n.endswith("_kernel") and "_delta_" not in n]  # (delta kernels: no dropout)
        for k in kernels:
            names = {p.name for p in k.params}
            skipped = {p.name for p in k.params if p.do_not_specialize}
            assert set(attention.PHILOX_ARGS) <= names, (k.fn.__name__, names)
            assert set(attention.PHILOX_ARGS) <= skipped, (k.fn.__name__, skipped)
        print(len(kernels))
    """)
    env = dict(__import__("os").environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) == 7
