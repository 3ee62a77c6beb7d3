"""co_attention (both directions in one launch) and the BiAttention drop-in, against
float64 per-sample references and the eager ViLBERT BertBiAttention."""

import types

import pytest
import torch

import mmkernels
from mmkernels import reference
from mmkernels.ops import _attention_checks as _chk
from mmkernels.ops import varlen_attention as va
from mmkernels.testing import assert_close_to_reference
from mmkernels.triton import co_attention as tco
from mmkernels.triton import interpreting

BACKENDS = [pytest.param("triton", id="triton"), pytest.param("cpu", id="cpu")]


@pytest.fixture
def backend(request, monkeypatch):
    if request.param == "triton" and not interpreting():
        pytest.skip("the Triton path on CPU tensors needs TRITON_INTERPRET=1 (GPU tests: cuda)")
    if request.param == "cpu":
        monkeypatch.setattr(_chk, "_uses_triton", lambda device: False)
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
@pytest.mark.parametrize("D", [72, 96])
def test_co_attention_split_head_dims(backend, D):
    """Head dims run in two chunks of lanes (64 + 16: D = 72, 80; 64 + 32: D = 96)."""
    run_and_compare([9, 0, 23], [36, 5, 17], H=2, D=D, dtype=torch.float32)


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


@pytest.mark.parametrize("layout", ["contiguous", "heads-first"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_opcheck(backend, layout):
    """The fake kernels' outputs match the real ones in shape and strides, also for
    dense inputs in another layout (the op returns contiguous tensors; the fakes used
    empty_like, which kept the input's strides: inductor then asserted)."""
    la, lb = [5, 0, 11], [7, 3, 0]
    if layout == "heads-first":
        ts = [torch.randn(2, sum(l), 16).transpose(0, 1).requires_grad_()
              for l in (la, la, la, lb, lb, lb)]
    else:
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
    assert_close_to_reference(c1[valid_t], e1[valid_t], tol="float32_fused_vs_eager")
    assert_close_to_reference(c2[valid_v], e2[valid_v], tol="float32_fused_vs_eager")
    assert not c1[~valid_t].any() and not c2[~valid_v].any()
    # gradients through the valid outputs
    g1, g2 = torch.randn_like(c1) * valid_t[..., None], torch.randn_like(c2) * valid_v[..., None]
    torch.autograd.backward([c1, c2], [g1, g2])
    torch.autograd.backward([e1, e2], [g1, g2])
    assert_close_to_reference(x1f.grad, x1e.grad, tol="float32_fused_vs_eager_grads")
    assert_close_to_reference(x2f.grad, x2e.grad, tol="float32_fused_vs_eager_grads")
    for (n, pf), pe in zip(fused.named_parameters(), eager.parameters()):
        assert_close_to_reference(pf.grad, pe.grad, tol="float32_fused_vs_eager_grads", what=n)


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
    assert_close_to_reference(c1[valid_t], e1[valid_t], tol="float32_fused_vs_eager")


# ---------------------------------------------------------------------------------
# issue 10, defect 9: every tensor of both streams is checked against its stream
# ---------------------------------------------------------------------------------

def _streams(la=(3, 4), lb=(3, 4), H=2, D=16, **over):
    names = ("q_a", "k_a", "v_a", "q_b", "k_b", "v_b")
    shapes = {n: (sum(la if n.endswith("a") else lb), H, D) for n in names}
    ts = {n: over.get(n, torch.randn(shapes[n])) for n in names}
    return [ts[n] for n in names], cu_of(list(la)), cu_of(list(lb))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("which", ["k_b", "v_b", "k_a", "v_a"])
def test_kv_with_one_head_when_h2_raises(backend, which):
    """Before: k_b/v_b with 1 head (H=2) ran: garbage (1.7e38 off) under the
    interpreter, silent GQA on the CPU path."""
    over = {which: torch.randn(7, 1, 16)}
    if which in ("k_b", "v_b"):  # both K and V of a stream with 1 head: a "valid GQA" shape
        over = {"k_b": torch.randn(7, 1, 16), "v_b": torch.randn(7, 1, 16)}
        which = "k_b"
    ts, cua, cub = _streams(**over)
    with pytest.raises(ValueError, match=which):
        mmkernels.co_attention(*ts, cua, cub, 4, 4)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_k_a_with_3_tokens_while_cu_seqlens_a_ends_at_7_raises(backend):
    """Before: killed Python with SIGFPE on the CPU path (run in a subprocess, so a
    regression fails this test instead of killing the session)."""
    code = f"""
import torch, mmkernels
from mmkernels.ops import co_attention as co_ops
from mmkernels.ops import _attention_checks as chk
if {backend!r} == "cpu":
    chk._uses_triton = lambda device: False
cu = torch.tensor([0, 3, 7], dtype=torch.int32)
t = lambda n, h=2: torch.randn(n, h, 16)
try:
    mmkernels.co_attention(t(7), t(3), t(3), t(7), t(7), t(7), cu, cu, 4, 4)
    print("ACCEPTED")
except ValueError as e:
    print("ValueError:", e)
"""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "ValueError:" in r.stdout and "k_a" in r.stdout, r.stdout


CO_BAD = [
    ("q_b-heads", dict(q_b=torch.randn(7, 3, 16)), ValueError, "q_b"),
    ("k_a-dim", dict(k_a=torch.randn(7, 2, 8)), ValueError, "k_a"),
    ("v_a-dim", dict(v_a=torch.randn(7, 2, 32)), ValueError, "v_a"),
    ("v_b-tokens", dict(v_b=torch.randn(6, 2, 16)), ValueError, "v_b"),
    ("k_b-dtype", dict(k_b=torch.randn(7, 2, 16, dtype=torch.float16)), TypeError, "k_b"),
    ("v_a-dtype-int", dict(v_a=torch.ones(7, 2, 16, dtype=torch.int32)), TypeError, "v_a"),
    ("k_a-device", dict(k_a=torch.randn(7, 2, 16, device="meta")), ValueError, "k_a"),
    ("q_a-2d", dict(q_a=torch.randn(7, 32)), ValueError, "q_a"),
    ("k_b-not-tensor", dict(k_b=[[1.0]]), TypeError, "k_b"),
    ("q_a-zero-heads", dict(q_a=torch.randn(7, 0, 16), k_a=torch.randn(7, 0, 16),
                            v_a=torch.randn(7, 0, 16), q_b=torch.randn(7, 0, 16),
                            k_b=torch.randn(7, 0, 16), v_b=torch.randn(7, 0, 16)),
     ValueError, "q_a"),
]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("name,over,exc,match", CO_BAD, ids=[b[0] for b in CO_BAD])
def test_bad_stream_tensor_raises(backend, name, over, exc, match):
    ts, cua, cub = _streams(**over)
    with pytest.raises(exc, match=match):
        mmkernels.co_attention(*ts, cua, cub, 4, 4)


CU_BAD = [
    ("cu_a-end", dict(cu_a=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError,
     r"cu_seqlens_a\[-1\]"),
    ("cu_b-start", dict(cu_b=torch.tensor([1, 3, 7], dtype=torch.int32)), ValueError,
     r"cu_seqlens_b\[0\]"),
    ("cu_a-decreasing", dict(cu_a=torch.tensor([0, 5, 4, 7], dtype=torch.int32),
                             cu_b=torch.tensor([0, 3, 4, 7], dtype=torch.int32)), ValueError,
     "cu_seqlens_a must be non-decreasing"),
    ("cu_b-int64", dict(cu_b=torch.tensor([0, 3, 7])), TypeError, "cu_seqlens_b"),
    ("cu_b-2d", dict(cu_b=torch.tensor([[0, 3, 7]], dtype=torch.int32)), ValueError,
     "cu_seqlens_b"),
    ("cu_a-device", dict(cu_a=torch.tensor([0, 3, 7], dtype=torch.int32, device="meta")),
     ValueError, "cu_seqlens_a"),
    ("max_a-small", dict(max_a=3), ValueError, "max_seqlen_a"),
    ("max_b-negative", dict(max_b=-1), TypeError, "max_seqlen_b"),
    ("max_b-float", dict(max_b=4.0), TypeError, "max_seqlen_b"),
    ("dropout-nan", dict(dropout_p=float("nan")), ValueError, "dropout_p"),
    ("dropout-triple", dict(dropout_p=(0.1, 0.1, 0.1)), ValueError, "dropout_p"),
    ("dropout-str", dict(dropout_p="x"), TypeError, "dropout_p"),
]


@pytest.mark.parametrize("name,over,exc,match", CU_BAD, ids=[b[0] for b in CU_BAD])
def test_bad_offsets_raise(name, over, exc, match):
    ts, cua, cub = _streams()
    with pytest.raises(exc, match=match):
        mmkernels.co_attention(*ts, over.get("cu_a", cua), over.get("cu_b", cub),
                               over.get("max_a", 4), over.get("max_b", 4),
                               dropout_p=over.get("dropout_p", 0.0))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_custom_op_checks_its_inputs(backend):
    """torch.ops.mmkernels.co_attention_fwd is reachable directly: it checks shapes
    itself (and, on CPU, the offsets), so it never reads garbage either."""
    ts, cua, cub = _streams(k_b=torch.randn(7, 1, 16), v_b=torch.randn(7, 1, 16))
    with pytest.raises(ValueError, match="k_b"):
        torch.ops.mmkernels.co_attention_fwd(*ts, cua, cub, 4, 4, 0.25, 0.0, 0.0, 0, 0)
    ts, cua, cub = _streams()
    with pytest.raises(ValueError, match="cu_seqlens_a"):
        torch.ops.mmkernels.co_attention_fwd(*ts, torch.tensor([0, 3, 9], dtype=torch.int32),
                                             cub, 4, 4, 0.25, 0.0, 0.0, 0, 0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_kv_strides_differ_from_q(backend):
    """K/V with other strides than their Q (heads-first views, a size-1 expanded head
    dim): the kernels read them with Q's strides, so the launcher must re-lay them
    out, also when the custom op is called directly."""
    la, lb, H, D = [5, 9], [7, 3], 2, 16
    q_a = torch.randn(14, H, D)
    k_a = torch.randn(H, 14, D).transpose(0, 1)
    v_a = torch.randn(14, 1, D).expand(14, H, D)
    q_b = torch.randn(10, H, 2 * D)[..., ::2]
    k_b = torch.randn(10, H, D)
    v_b = torch.randn(H, D, 10).permute(2, 0, 1)
    ts = [q_a, k_a, v_a, q_b, k_b, v_b]
    cua, cub = cu_of(la), cu_of(lb)
    ref_a, ref_b = reference.co_attention(*[t.double() for t in ts], cua, cub, 0.25)
    oa, ob, _, _ = torch.ops.mmkernels.co_attention_fwd(*ts, cua, cub, 9, 7, 0.25, 0.0, 0.0, 0, 0)
    assert_close_to_reference(oa, ref_a, what="out_a")
    assert_close_to_reference(ob, ref_b, what="out_b")


# ---------------------------------------------------------------------------------
# issue 10, defect 10: MMKERNELS_BACKEND=reference honours dropout
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_reference_backend_honours_dropout(backend, monkeypatch):
    """"Honour" = the same masks as the kernels (one Philox definition,
    reference.dropout_keep), applied as P * keep / (1 - p): with a fixed seed the
    reference backend and the kernels agree to the float32 tolerance, and the
    reference output is exactly reference.co_attention with the hook's masks."""
    la, lb, H = [9, 0, 23], [30, 5, 12], 2
    ts = [torch.randn(sum(l), H, 32) for l in (la, la, la, lb, lb, lb)]
    cua, cub = cu_of(la), cu_of(lb)
    p = (0.3, 0.15)
    kern = mmkernels.co_attention(*ts, cua, cub, 23, 30, dropout_p=p, dropout_seed=11)
    monkeypatch.setenv("MMKERNELS_BACKEND", "reference")
    ref = mmkernels.co_attention(*ts, cua, cub, 23, 30, dropout_p=p, dropout_seed=11)
    no_drop = mmkernels.co_attention(*ts, cua, cub, 23, 30)
    keep_a = va.dropout_keep_mask(11, cua, cub, H, p[0], stream0=0)
    keep_b = va.dropout_keep_mask(11, cub, cua, H, p[1], stream0=H)
    want = reference.co_attention(*ts, cua, cub, None, keep_a, keep_b, p)
    for r, k, w, n in zip(ref, kern, want, no_drop):
        assert torch.equal(r, w)
        assert not torch.equal(r, n)          # dropout was applied
        assert_close_to_reference(k, r.double(), what="kernel vs reference backend")


@pytest.mark.cuda
def test_cuda_reference_backend_honours_dropout(monkeypatch):
    """MMKERNELS_BACKEND=reference with CUDA tensors and dropout: masks on q's device
    (before: built on the CPU, and P * keep raised), the kernels' masks."""
    la, lb, H = [9, 0, 23], [30, 5, 12], 2
    ts = [torch.randn(sum(l), H, 32, device="cuda") for l in (la, la, la, lb, lb, lb)]
    cua, cub = cu_of(la).cuda(), cu_of(lb).cuda()
    kern = mmkernels.co_attention(*ts, cua, cub, 23, 30, dropout_p=0.3, dropout_seed=11)
    monkeypatch.setenv("MMKERNELS_BACKEND", "reference")
    ref = mmkernels.co_attention(*ts, cua, cub, 23, 30, dropout_p=0.3, dropout_seed=11)
    for r, k in zip(ref, kern):
        assert r.device.type == "cuda"
        assert_close_to_reference(k, r.double(), what="kernel vs reference backend (cuda)")


@pytest.mark.parametrize("mode", ["reference", "triton", "cpu"])
def test_dropout_keep_rate_and_scaling(mode, monkeypatch):
    """Uniform attention (q = 0) over V = 1: each output is kept / (L (1 - p)), an
    integer multiple of 1 / (L (1 - p)), and the kept fraction is 1 - p."""
    if mode == "reference":
        monkeypatch.setenv("MMKERNELS_BACKEND", "reference")
    elif mode == "cpu":
        monkeypatch.setattr(_chk, "_uses_triton", lambda device: False)
    elif not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    L, H, p = 48, 2, 0.25
    q = torch.zeros(L, H, 16, dtype=torch.float64 if mode != "triton" else torch.float32)
    v = torch.ones_like(q)
    cu = cu_of([L])
    out_a, out_b = mmkernels.co_attention(q, q, v, q, q, v, cu, cu, L, L, dropout_p=p,
                                          dropout_seed=5)
    for out in (out_a, out_b):
        kept = out[..., 0].double() * L * (1 - p)
        torch.testing.assert_close(kept, kept.round(), atol=1e-4, rtol=0)
        frac = kept.sum().item() / (2 * L * L)
        assert abs(frac - (1 - p)) < 0.02, frac


# ---------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------

def _co_fwd_bwd(dropout_p, threads=None, la=(9, 0, 70), lb=(40, 5, 0)):
    torch.manual_seed(0)
    ts = [torch.randn(sum(l), 2, 24, requires_grad=True) for l in (la, la, la, lb, lb, lb)]
    old = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        oa, ob = mmkernels.co_attention(*ts, cu_of(list(la)), cu_of(list(lb)), max(la), max(lb),
                                        dropout_p=dropout_p)
        torch.autograd.backward([oa, ob], [torch.randn_like(oa), torch.randn_like(ob)])
    finally:
        torch.set_num_threads(old)
    return [oa.detach(), ob.detach()] + [t.grad for t in ts]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dropout_p", [0.0, (0.2, 0.1)], ids=["no-dropout", "dropout"])
def test_deterministic_algorithms_run_to_run_bitwise(backend, deterministic, dropout_p):
    for x, y in zip(_co_fwd_bwd(dropout_p), _co_fwd_bwd(dropout_p)):
        assert torch.equal(x, y)


@pytest.mark.skipif(not interpreting(), reason="the Triton path on CPU tensors (interpreter)")
@pytest.mark.parametrize("mode", ["default", "deterministic-mode"])
def test_backward_path_selection(monkeypatch, mode):
    """The one-pass backward (kernel kind "bwd": dK/dV and atomic dQ of both streams in
    one launch) by default; the two-kernel deterministic path ("dkdv" then "dq") under
    torch.use_deterministic_algorithms(True). Both against the float64 reference, with
    an empty sample in each stream."""
    kinds = []
    pick = tco._pick
    monkeypatch.setattr(tco, "_pick", lambda kind, d: kinds.append(kind) or pick(kind, d))
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(mode == "deterministic-mode")
    try:
        run_and_compare([19, 0, 40], [7, 33, 0], H=2, D=24, dtype=torch.float32)
    finally:
        torch.use_deterministic_algorithms(old)
    assert kinds == (["fwd", "bwd"] if mode == "default" else ["fwd", "dkdv", "dq"])


@pytest.mark.parametrize("dropout_p", [0.0, (0.2, 0.1)], ids=["no-dropout", "dropout"])
def test_cpu_path_independent_of_thread_count(monkeypatch, deterministic, dropout_p):
    monkeypatch.setattr(_chk, "_uses_triton", lambda device: False)
    lens = dict(la=(9, 0, 700), lb=(400, 5, 0)) if dropout_p == 0 else {}
    a = _co_fwd_bwd(dropout_p, threads=1, **lens)
    b = _co_fwd_bwd(dropout_p, threads=2, **lens)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.cuda
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_cuda_deterministic_run_to_run(deterministic, dropout_p):
    la, lb = [300, 0, 77], [129, 64, 1]
    ts = [torch.randn(sum(l), 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
          for l in (la, la, la, lb, lb, lb)]
    runs = []
    for _ in range(2):
        for t in ts:
            t.grad = None
        torch.manual_seed(1)
        oa, ob = mmkernels.co_attention(*ts, cu_of(la, "cuda"), cu_of(lb, "cuda"), 300, 129,
                                        dropout_p=dropout_p)
        (oa.float().square().sum() + ob.float().sum()).backward()
        runs.append([oa, ob] + [t.grad.clone() for t in ts])
    for x, y in zip(*runs):
        assert torch.equal(x, y)
