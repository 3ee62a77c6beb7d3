"""co_attention (both directions in one launch) and the BiAttention drop-in, against
float64 per-sample references and the eager ViLBERT BertBiAttention."""

import types

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
    if request.param == "triton" and not interpreting():
        pytest.skip("the Triton path on CPU tensors needs TRITON_INTERPRET=1 (GPU tests: cuda)")
    if request.param == "cpu":
        monkeypatch.setattr(va, "_uses_triton", lambda device: False)
    return request.param


def cu_of(lengths, device="cpu"):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def run_and_compare(la, lb, H, D, dtype, dropout_p=0.0, device="cpu"):
    ts = [torch.randn(sum(l), H, D, dtype=torch.float64).to(dtype=dtype, device=device)
          .requires_grad_() for l in (la, la, la, lb, lb, lb)]
    cua, cub = cu_of(la, device), cu_of(lb, device)
    seed = 77 if dropout_p else None
    out_a, out_b = mmkernels.co_attention(*ts, cua, cub, max(la), max(lb), dropout_p=dropout_p,
                                          dropout_seed=seed)
    keep_a = keep_b = None
    if dropout_p:
        keep_a = va.dropout_keep_mask(seed, cua, cub, H, dropout_p, stream0=0, device=device)
        keep_b = va.dropout_keep_mask(seed, cub, cua, H, dropout_p, stream0=H, device=device)
    t64 = [t.detach().cpu().double().requires_grad_() for t in ts]
    ref_a, ref_b = reference.co_attention(*t64, cua.cpu(), cub.cpu(), None, keep_a, keep_b,
                                          (dropout_p, dropout_p))
    ga, gb = torch.randn_like(ref_a), torch.randn_like(ref_b)
    torch.autograd.backward([out_a, out_b], [ga.to(dtype=dtype, device=device),
                                             gb.to(dtype=dtype, device=device)])
    torch.autograd.backward([ref_a, ref_b], [ga, gb])
    eager = [None] * 8
    if dtype in (torch.float16, torch.bfloat16):
        tl_ = [t.detach().cpu().requires_grad_() for t in ts]
        ea, eb = reference.co_attention(*tl_, cua.cpu(), cub.cpu(), None, keep_a, keep_b,
                                        (dropout_p, dropout_p))
        torch.autograd.backward([ea, eb], [ga.to(dtype), gb.to(dtype)])
        eager = [ea, eb] + [t.grad for t in tl_]
    assert_close_to_reference(out_a.cpu(), ref_a, eager_lowp=eager[0], what="out_a")
    assert_close_to_reference(out_b.cpu(), ref_b, eager_lowp=eager[1], what="out_b")
    for i, name in enumerate(("dq_a", "dk_a", "dv_a", "dq_b", "dk_b", "dv_b")):
        assert_close_to_reference(ts[i].grad.cpu(), t64[i].grad, eager_lowp=eager[2 + i],
                                  what=name)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_co_attention(backend, dtype, H, D):
    # ragged, with an empty sample in each stream and one empty in both
    run_and_compare([9, 0, 23, 4, 0], [36, 5, 0, 17, 0], H=H, D=D, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_co_attention_dropout(backend):
    run_and_compare([9, 0, 23], [30, 5, 12], H=2, D=64, dtype=torch.float32, dropout_p=0.2)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_co_attention_dropout_per_direction(backend):
    la, lb = [10, 20], [15, 5]
    ts = [torch.randn(sum(l), 2, 32) for l in (la, la, la, lb, lb, lb)]
    cua, cub = cu_of(la), cu_of(lb)
    a0, b0 = mmkernels.co_attention(*ts, cua, cub, 20, 15, dropout_p=(0.0, 0.5), dropout_seed=3)
    a1, b1 = mmkernels.co_attention(*ts, cua, cub, 20, 15)
    assert torch.equal(a0, a1) and not torch.equal(b0, b1)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_opcheck(backend):
    la, lb = [5, 0, 11], [7, 3, 0]
    ts = [torch.randn(sum(l), 2, 16, requires_grad=True) for l in (la, la, la, lb, lb, lb)]
    args = (*ts, cu_of(la), cu_of(lb), 11, 7, 0.25, 0.0, 0.0, 0, 0)
    torch.library.opcheck(torch.ops.mmkernels.co_attention_fwd.default, args)
    oa, ob, la_, lb_ = torch.ops.mmkernels.co_attention_fwd(*args)
    bargs = (torch.randn_like(oa), torch.randn_like(ob), *[t.detach() for t in ts], oa.detach(),
             ob.detach(), la_, lb_, cu_of(la), cu_of(lb), 11, 7, 0.25, 0.0, 0.0, 0, 0)
    torch.library.opcheck(torch.ops.mmkernels.co_attention_bwd.default, bargs)


BAD = [
    ("batch-mismatch", dict(cu_b=torch.tensor([0, 12], dtype=torch.int32), max_b=12), ValueError,
     "same batch"),
    ("dims-mismatch", dict(dim_b=32), ValueError, "head dim"),
    ("dtype-mismatch", dict(dtype_b=torch.float16), TypeError, "dtype"),
    ("cu-int64", dict(cu_a=torch.tensor([0, 5, 12])), TypeError, "int32"),
    ("dropout-range", dict(dropout_p=(0.1, 1.5)), ValueError, "dropout_p"),
]


@pytest.mark.parametrize("name,over,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(name, over, exc, match):
    la, lb = [5, 7], [4, 8]
    qa = torch.randn(12, 2, 16)
    qb = torch.randn(12, 2, over.get("dim_b", 16), dtype=over.get("dtype_b", torch.float32))
    with pytest.raises(exc, match=match):
        mmkernels.co_attention(qa, qa, qa, qb, qb, qb, over.get("cu_a", cu_of(la)),
                               over.get("cu_b", cu_of(lb)), 7, over.get("max_b", 8),
                               dropout_p=over.get("dropout_p", 0.0))


# ---------------------------------------------------------------------------------
# BiAttention drop-in for ViLBERT's BertBiAttention
# ---------------------------------------------------------------------------------

def vilbert_config(**over):
    cfg = dict(bi_hidden_size=64, bi_num_attention_heads=4, v_hidden_size=48, hidden_size=40,
               v_attention_probs_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
               visualization=False)
    cfg.update(over)
    return types.SimpleNamespace(**cfg)


def padded_batch(B, Nv, Nt, lengths_v, lengths_t):
    x1 = torch.randn(B, Nv, 48)
    x2 = torch.randn(B, Nt, 40)
    m1 = torch.zeros(B, 1, 1, Nv)
    m2 = torch.zeros(B, 1, 1, Nt)
    for b in range(B):
        m1[b, ..., lengths_v[b]:] = -10000.0
        m2[b, ..., lengths_t[b]:] = -10000.0
    return x1, m1, x2, m2


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_biattention_matches_eager_vilbert(backend, mode):
    cfg = vilbert_config()
    if mode == "train":  # train mode with dropout 0: the same numbers
        cfg = vilbert_config(v_attention_probs_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    eager = reference.BertBiAttention(cfg)
    fused = mmkernels.nn.BiAttention(cfg)
    assert list(fused.state_dict()) == list(eager.state_dict())
    fused.load_state_dict(eager.state_dict())
    eager.train(mode == "train")
    fused.train(mode == "train")
    lv, lt = [36, 20, 7], [12, 30, 1]
    x1, m1, x2, m2 = padded_batch(3, 36, 30, lv, lt)
    x1f, x2f = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    x1e, x2e = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    c1, c2, data = fused(x1f, m1, x2f, m2)
    e1, e2, _ = eager(x1e, m1, x2e, m2)
    assert data is None and c1.shape == e1.shape == (3, 30, 64) and c2.shape == e2.shape
    valid_t = m2.reshape(3, 30) == 0
    valid_v = m1.reshape(3, 36) == 0
    torch.testing.assert_close(c1[valid_t], e1[valid_t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c2[valid_v], e2[valid_v], rtol=1e-5, atol=1e-5)
    assert not c1[~valid_t].any() and not c2[~valid_v].any()
    # gradients through the valid outputs
    g1, g2 = torch.randn_like(c1) * valid_t[..., None], torch.randn_like(c2) * valid_v[..., None]
    torch.autograd.backward([c1, c2], [g1, g2])
    torch.autograd.backward([e1, e2], [g1, g2])
    torch.testing.assert_close(x1f.grad, x1e.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x2f.grad, x2e.grad, rtol=1e-4, atol=1e-5)
    for (n, pf), pe in zip(fused.named_parameters(), eager.parameters()):
        torch.testing.assert_close(pf.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_biattention_visualization_falls_back_to_eager():
    cfg = vilbert_config(visualization=True)
    fused = mmkernels.nn.BiAttention(cfg).eval()
    x1, m1, x2, m2 = padded_batch(2, 5, 4, [5, 3], [4, 2])
    _, _, data = fused(x1, m1, x2, m2)
    assert data is not None and data["attn1"].shape == (2, 4, 4, 5)


# ---------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cuda_co_attention(dtype, D):
    run_and_compare([36, 0, 20, 36], [40, 22, 0, 31], H=8, D=D, dtype=dtype, device="cuda")
    run_and_compare([36, 7], [40, 9], H=8, D=D, dtype=dtype, dropout_p=0.1, device="cuda")


@pytest.mark.cuda
def test_cuda_biattention():
    cfg = vilbert_config()
    eager = reference.BertBiAttention(cfg).cuda().eval()
    fused = mmkernels.nn.BiAttention(cfg).cuda().eval()
    fused.load_state_dict(eager.state_dict())
    x1, m1, x2, m2 = (t.cuda() for t in padded_batch(3, 36, 30, [36, 20, 7], [12, 30, 1]))
    c1, c2, _ = fused(x1, m1, x2, m2)
    e1, e2, _ = eager(x1, m1, x2, m2)
    valid_t = m2.reshape(3, 30) == 0
    torch.testing.assert_close(c1[valid_t], e1[valid_t], rtol=1e-5, atol=1e-5)
