"""varlen_attention: Triton kernels (under TRITON_INTERPRET=1 on CPU tensors, or on a
GPU) and the CPU path, against a float64 per-sequence reference."""

import math

import pytest
import torch

import mmkernels
from mmkernels import reference
from mmkernels.ops import varlen_attention as va
from mmkernels.testing import assert_close_to_reference
from mmkernels.triton import interpreting

BACKENDS = [pytest.param("triton", id="triton"), pytest.param("cpu", id="cpu")]


@pytest.fixture
def backend(request, monkeypatch):
    name = request.param
    if name == "triton" and not interpreting():
        pytest.skip("the Triton path on CPU tensors needs TRITON_INTERPRET=1 (GPU tests: cuda)")
    if name == "cpu":
        monkeypatch.setattr(va, "_uses_triton", lambda device: False)
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
                    device="cpu", scale=None):
    cq, ck = cu_of(lq, device), cu_of(lk, device)
    q, k, v = make_qkv(lq, lk, H, H_kv, D, dtype, device)
    q.requires_grad_()
    k.requires_grad_()
    v.requires_grad_()
    seed = 1234 if dropout_p > 0 else None
    out, lse = mmkernels.varlen_attention(q, k, v, cq, ck, max(lq), max(lk), causal=causal,
                                          block_ids=block_ids, dropout_p=dropout_p,
                                          return_lse=True, dropout_seed=seed,
                                          softmax_scale=scale)
    keep = None
    if dropout_p > 0:
        keep = va.dropout_keep_mask(seed, cq, ck, H, dropout_p, device=q.device)
        keep = [m.cpu() for m in keep]
    q64, k64, v64 = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    bid = block_ids.cpu() if block_ids is not None else None
    ref, ref_lse = reference.varlen_attention(q64, k64, v64, cq.cpu(), ck.cpu(), scale, causal,
                                              bid, dropout_p, keep)
    g = torch.randn_like(ref)
    out.backward(g.to(dtype=dtype, device=device))
    ref.backward(g)
    eager = [None] * 4
    if dtype in (torch.float16, torch.bfloat16):
        ql, kl, vl = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
        eo, _ = reference.varlen_attention(ql, kl, vl, cq.cpu(), ck.cpu(), scale, causal, bid,
                                           dropout_p, keep)
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
@pytest.mark.parametrize("D", [32, 64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_forward_backward(backend, dtype, D, causal):
    run_and_compare([7, 0, 21, 33], [7, 0, 21, 33], H=4, H_kv=2, D=D, dtype=dtype, causal=causal)


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


def test_softmax_scale_and_gradcheck_cpu(monkeypatch):
    monkeypatch.setattr(va, "_uses_triton", lambda device: False)
    lengths = [3, 4]
    cu = cu_of(lengths)
    q, k, v = [t.requires_grad_() for t in make_qkv(lengths, lengths, 2, 1, 8, torch.float64)]
    assert torch.autograd.gradcheck(
        lambda a, b, c: mmkernels.varlen_attention(a, b, c, cu, cu, 4, 4, causal=True,
                                                   softmax_scale=0.3), (q, k, v))


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
    monkeypatch.setattr(va, "_uses_triton", lambda device: False)
    lengths = [5, 11]
    cu = cu_of(lengths)
    q, k, v = make_qkv(lengths, lengths, 2, 1, 16, torch.float32)

    def fn(q, k, v, cu):
        return mmkernels.varlen_attention(q * 2, k, v, cu, cu, 11, 11, causal=True).sum(-1)

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, cu), fn(q, k, v, cu))


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
    torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=2e-5)
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
    monkeypatch.setattr(va, "INTERPRET_CONFIG", va.AttnConfig(tiles[0], tiles[1], 4, 1))
    lengths = [45, 70]
    bid = torch.zeros(115, dtype=torch.int32)
    bid[10:30] = 1
    bid[50:90] = 2
    run_and_compare(lengths, lengths, H=2, H_kv=1, D=32, dtype=torch.float32, causal=True,
                    block_ids=bid)
    run_and_compare([45, 20], [30, 70], H=2, H_kv=2, D=32, dtype=torch.float32, causal=True)
