"""info_nce / sigmoid_contrastive and the ClipLoss / SigLipLoss drop-ins, against open_clip
and float64 eager references, on one process (across processes:
test_contrastive_dist.py; the fused CPU passes: test_contrastive_cpu_passes.py).

Both implementations run: the Triton kernels (under TRITON_INTERPRET=1 on CPU tensors,
fp32/fp16; bf16 on a GPU only) and the chunked PyTorch path (CPU, and float64 anywhere).
"""


import open_clip
import pytest
import torch

import mmkernels
from mmkernels import reference
from mmkernels.ops import contrastive as ops
from mmkernels.testing import assert_close_to_reference
from mmkernels.triton import interpreting

BACKENDS = [pytest.param("triton", id="triton"), pytest.param("cpu", id="cpu"),
            pytest.param("eager", id="eager")]


@pytest.fixture
def backend(request, monkeypatch):
    """'triton': the kernels (interpreter on CPU tensors); 'cpu': the chunked path with
    the fused C++ panel passes; 'eager': the chunked path with eager passes."""
    name = request.param
    if name == "triton" and not interpreting():
        pytest.skip("the Triton path on CPU tensors needs TRITON_INTERPRET=1 (GPU tests: cuda)")
    if name in ("cpu", "eager"):
        monkeypatch.setattr(ops, "_uses_triton", lambda t: False)
    if name == "eager":
        monkeypatch.setenv("MMKERNELS_BACKEND", "reference")
    return name


def features(B, D, dtype=torch.float64):
    f = [torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1)
         for _ in range(2)]
    return [t.to(dtype) for t in f]


def grads(loss_fn, *inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = loss_fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


# B=50 spans 4 interpreter row blocks over 3 persistent forward programs (one program
# merges two blocks' column statistics); D=100 takes the zero-padded feature path.
CASES = [pytest.param(B, D, chunk, id=f"B{B}-D{D}-chunk{chunk}")
         for B, D, chunk in [(1, 64, None), (37, 64, 8), (50, 512, 16), (33, 768, 7), (64, 64, 64),
                             (29, 100, None)]]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("B,D,chunk", CASES)
def test_info_nce_matches_open_clip_and_float64(B, D, chunk, backend):
    img, txt = features(B, D)
    scale = torch.tensor(14.7, dtype=torch.float64)
    ours, g_ours = grads(lambda i, t, s: mmkernels.info_nce(i, t, s, chunk_size=chunk),
                         img, txt, scale)
    theirs, g_theirs = grads(open_clip.ClipLoss(), img, txt, scale)
    assert_close_to_reference(ours, theirs, tol="float64_vs_open_clip", what="loss")
    for a, b in zip(g_ours, g_theirs):  # logit_scale's gradient included
        assert_close_to_reference(a, b, tol="float64_vs_open_clip", what="grad")
    # float32 against the float64 reference, within the tolerance table
    o32, g32 = grads(lambda i, t, s: mmkernels.info_nce(i, t, s, chunk_size=chunk),
                     img.float(), txt.float(), scale.float())
    assert_close_to_reference(o32, theirs, what="loss")
    for a, b, n in zip(g32, g_theirs, ("d image", "d text", "d logit_scale")):
        assert_close_to_reference(a, b, what=n)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("B,D,chunk", CASES)
def test_sigmoid_matches_open_clip_and_float64(B, D, chunk, backend):
    img, txt = features(B, D)
    scale = torch.tensor(10.0, dtype=torch.float64)
    bias = torch.tensor(-10.0, dtype=torch.float64)
    fn = lambda i, t, s, b: mmkernels.sigmoid_contrastive(i, t, s, b, chunk_size=chunk)  # noqa: E731
    ours, g_ours = grads(fn, img, txt, scale, bias)
    theirs, g_theirs = grads(open_clip.loss.SigLipLoss(), img, txt, scale, bias)
    assert_close_to_reference(ours, theirs, tol="float64_vs_open_clip", what="loss")
    for a, b in zip(g_ours, g_theirs):
        assert_close_to_reference(a, b, tol="float64_vs_open_clip", what="grad")
    o32, g32 = grads(fn, img.float(), txt.float(), scale.float(), bias.float())
    assert_close_to_reference(o32, theirs, what="loss")
    for a, b, n in zip(g32, g_theirs, ("d image", "d text", "d logit_scale", "d logit_bias")):
        assert_close_to_reference(a, b, what=n)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["info_nce", "sigmoid"])
def test_low_precision_within_twice_eager_error(kind, dtype, backend):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the interpreter's bf16 tl.dot is wrong; bf16 Triton: the cuda tests")
    img, txt = features(96, 128)
    scale = torch.tensor(20.0, dtype=torch.float64)
    bias = torch.tensor(-5.0, dtype=torch.float64)
    if kind == "info_nce":
        ours_fn = lambda i, t, s: mmkernels.info_nce(i, t, s, chunk_size=40)  # noqa: E731
        ref_fn = reference.info_nce
        args = (img, txt, scale)
    else:
        ours_fn = lambda i, t, s, b: mmkernels.sigmoid_contrastive(i, t, s, b, chunk_size=40)  # noqa: E731
        ref_fn = reference.sigmoid_contrastive
        args = (img, txt, scale, bias)
    ref, g_ref = grads(ref_fn, *args)
    low = [a.to(dtype) for a in args]
    ours, g_ours = grads(ours_fn, *low)
    eager, g_eager = grads(ref_fn, *low)
    assert ours.dtype == dtype
    assert_close_to_reference(ours, ref, eager_lowp=eager, what="loss")
    for a, b, e in zip(g_ours, g_ref, g_eager):
        assert_close_to_reference(a, b, eager_lowp=e, what="grad")


def test_gradcheck():
    img, txt = features(9, 5)
    img.requires_grad_()
    txt.requires_grad_()
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda i, t, s: mmkernels.info_nce(i, t, s, chunk_size=4),
                                    (img, txt, s))
    assert torch.autograd.gradcheck(
        lambda i, t, s, b: mmkernels.sigmoid_contrastive(i, t, s, b, chunk_size=4),
        (img, txt, s, b))


def test_modules_are_drop_ins():
    img, txt = features(20, 32)
    s, b = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    assert_close_to_reference(mmkernels.nn.ClipLoss()(img, txt, s),
                              open_clip.ClipLoss()(img, txt, s), tol="float64_vs_open_clip")
    out = mmkernels.nn.ClipLoss()(img, txt, s, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    assert_close_to_reference(mmkernels.nn.ClipLoss()(img, txt, s, logit_bias=b),
                              open_clip.ClipLoss()(img, txt, s, logit_bias=b),
                              tol="float64_vs_open_clip")
    assert_close_to_reference(mmkernels.nn.SigLipLoss()(img, txt, s, b),
                              open_clip.loss.SigLipLoss()(img, txt, s, b),
                              tol="float64_vs_open_clip")
    with pytest.raises(ValueError, match="local_loss=True"):
        mmkernels.nn.ClipLoss(world_size=2)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_non_contiguous_features(backend):
    img, txt = features(45, 40, torch.float32)
    # column-major storage and a strided row view
    img_nc = img.T.contiguous().T
    wide = torch.zeros(txt.shape[0], 2 * txt.shape[1])
    wide[:, ::2] = txt
    txt_nc = wide[:, ::2]
    assert not img_nc.is_contiguous() and not txt_nc.is_contiguous()
    s, b = torch.tensor(9.0), torch.tensor(-3.0)
    assert_close_to_reference(mmkernels.info_nce(img_nc, txt_nc, s),
                              mmkernels.info_nce(img, txt, s), tol="float32_reordered")
    assert_close_to_reference(mmkernels.sigmoid_contrastive(img_nc, txt_nc, s, b),
                              mmkernels.sigmoid_contrastive(img, txt, s, b),
                              tol="float32_reordered")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_large_logit_scale(backend):
    """CLIP's clamp value s = 100: most exp() arguments are far below the float32 range."""
    img, txt = features(70, 32)
    s, b = torch.tensor(100.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    ref, g_ref = grads(reference.info_nce, img, txt, s)
    ours, g_ours = grads(mmkernels.info_nce, img.float(), txt.float(), s.float())
    assert_close_to_reference(ours, ref, what="loss")
    for a, r in zip(g_ours, g_ref):
        assert_close_to_reference(a, r, what="grad")
    ref, g_ref = grads(reference.sigmoid_contrastive, img, txt, s, b)
    ours, g_ours = grads(mmkernels.sigmoid_contrastive, img.float(), txt.float(), s.float(),
                         b.float())
    assert_close_to_reference(ours, ref, what="loss")
    for a, r in zip(g_ours, g_ref):
        assert_close_to_reference(a, r, what="grad")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_zero_feature_dim(backend):
    """D = 0: every logit is the bias, as open_clip computes it."""
    img, txt = torch.zeros(3, 0), torch.zeros(3, 0)
    s, b = torch.tensor(2.0), torch.tensor(-1.0)
    assert_close_to_reference(mmkernels.info_nce(img, txt, s), open_clip.ClipLoss()(img, txt, s),
                              tol="float32_reordered")
    assert_close_to_reference(mmkernels.sigmoid_contrastive(img, txt, s, b),
                              open_clip.loss.SigLipLoss()(img, txt, s, b), tol="float32_reordered")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_nan_features_give_nan_loss(backend):
    img, txt = features(8, 16, torch.float32)
    img[3, 2] = float("nan")
    s = torch.tensor(10.0)
    assert torch.isnan(mmkernels.info_nce(img, txt, s))
    assert torch.isnan(mmkernels.sigmoid_contrastive(img, txt, s, torch.tensor(-1.0)))


BAD = [
    ("batch-mismatch", lambda: mmkernels.info_nce(torch.randn(4, 8), torch.randn(5, 8),
                                                  torch.tensor(1.0)), ValueError, "same"),
    ("dim-mismatch", lambda: mmkernels.info_nce(torch.randn(4, 8), torch.randn(4, 9),
                                                torch.tensor(1.0)), ValueError, "same"),
    ("scale-not-scalar", lambda: mmkernels.info_nce(torch.randn(4, 8), torch.randn(4, 8),
                                                    torch.ones(2)), ValueError, "logit_scale"),
    ("scale-float", lambda: mmkernels.info_nce(torch.randn(4, 8), torch.randn(4, 8), 1.0),
     TypeError, "logit_scale"),
    ("bias-not-scalar", lambda: mmkernels.sigmoid_contrastive(
        torch.randn(4, 8), torch.randn(4, 8), torch.tensor(1.0), torch.ones(3)), ValueError,
     "logit_bias"),
    ("features-1d", lambda: mmkernels.info_nce(torch.randn(8), torch.randn(8), torch.tensor(1.0)),
     ValueError, r"\(B, D\)"),
    ("dim-too-big", lambda: mmkernels.info_nce(torch.randn(2, 5000), torch.randn(2, 5000),
                                               torch.tensor(1.0)), ValueError, "4096"),
    ("empty-batch", lambda: mmkernels.info_nce(torch.randn(0, 8), torch.randn(0, 8),
                                               torch.tensor(1.0)), ValueError, "B >= 1"),
    ("empty-batch-siglip", lambda: mmkernels.sigmoid_contrastive(
        torch.randn(0, 8), torch.randn(0, 8), torch.tensor(1.0), torch.tensor(0.0)), ValueError,
     "B >= 1"),
    ("chunk-zero", lambda: mmkernels.info_nce(torch.randn(2, 8), torch.randn(2, 8),
                                              torch.tensor(1.0), chunk_size=0), ValueError,
     "chunk_size"),
]


@pytest.mark.parametrize("name,call,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_opcheck_and_compile(backend, layout):
    """Fake kernels match the real ops in shape and strides, also for transposed
    (dense, column-major) features: the gradients come back contiguous."""
    img, txt = features(13, 8, torch.float32)
    if layout == "transposed":
        img, txt = img.T.contiguous().T, txt.T.contiguous().T
    img.requires_grad_()
    txt.requires_grad_()
    s = torch.tensor(4.0, requires_grad=True)
    b = torch.tensor(-2.0, requires_grad=True)
    torch.library.opcheck(torch.ops.mmkernels.info_nce_fwd.default, (img, txt, s, 5))
    loss, lse_r, lse_c, pos_w = torch.ops.mmkernels.info_nce_fwd(img, txt, s, 5)
    torch.library.opcheck(torch.ops.mmkernels.info_nce_bwd.default,
                          (torch.tensor(1.0), img.detach(), txt.detach(), s.detach(), lse_r,
                           lse_c, pos_w, 5))
    torch.library.opcheck(torch.ops.mmkernels.sigmoid_contrastive_fwd.default,
                          (img, txt, s, b, 5, True))
    fn = torch.compile(lambda i, t, s, b: mmkernels.info_nce(i, t, s, chunk_size=5)
                       + mmkernels.sigmoid_contrastive(i, t, s, b, chunk_size=5), fullgraph=True)
    assert_close_to_reference(fn(img, txt, s, b),
                              mmkernels.info_nce(img, txt, s, chunk_size=5)
                              + mmkernels.sigmoid_contrastive(img, txt, s, b, chunk_size=5),
                              tol="float32_reordered")


def test_backend_choice(monkeypatch):
    x64 = torch.zeros(2, 4, dtype=torch.float64)
    assert ops._path(x64) is ops._CPU_PATH  # float64: the chunked path (no Triton)
    assert (ops._path(torch.zeros(2, 4)) is ops._TRITON_PATH) == interpreting()
    # the interpreter's bf16 tl.dot is wrong: bf16 CPU tensors never take it
    assert ops._path(torch.zeros(2, 4, dtype=torch.bfloat16)) is ops._CPU_PATH
    monkeypatch.setenv("MMKERNELS_BACKEND", "reference")
    assert ops._path(x64) is ops._EAGER_PATH


# ---------------------------------------------------------------------------------
# GPU (skipped without one)
# ---------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["info_nce", "sigmoid"])
def test_cuda_within_twice_eager_error(kind, dtype):
    img, txt = (t.cuda() for t in features(1000, 768))
    scale = torch.tensor(50.0, dtype=torch.float64, device="cuda")
    bias = torch.tensor(-10.0, dtype=torch.float64, device="cuda")
    if kind == "info_nce":
        ours_fn, ref_fn, args = mmkernels.info_nce, reference.info_nce, (img, txt, scale)
    else:
        ours_fn, ref_fn = mmkernels.sigmoid_contrastive, reference.sigmoid_contrastive
        args = (img, txt, scale, bias)
    ref, g_ref = grads(ref_fn, *args)
    low = [a.to(dtype) for a in args[:2]] + [a.float() for a in args[2:]]
    ours, g_ours = grads(ours_fn, *low)
    eager, g_eager = grads(ref_fn, *low)
    assert_close_to_reference(ours, ref, eager_lowp=eager if dtype != torch.float32 else None,
                              what="loss")
    for a, b, e in zip(g_ours, g_ref, g_eager):
        assert_close_to_reference(a, b, eager_lowp=e if dtype != torch.float32 else None,
                                  what="grad")


@pytest.mark.cuda
def test_cuda_memory_is_linear_in_batch():
    """B=65536: the B x B float32 logits alone would take 16 GiB; the loss and its
    gradients must stay within a small multiple of the features."""
    B, D = 65536, 512
    img = torch.nn.functional.normalize(torch.randn(B, D, device="cuda"), dim=-1).bfloat16()
    txt = torch.nn.functional.normalize(torch.randn(B, D, device="cuda"), dim=-1).bfloat16()
    img.requires_grad_()
    txt.requires_grad_()
    scale = torch.tensor(100.0, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    mmkernels.info_nce(img, txt, scale).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 32 * B * D, f"peak extra {extra / 2**20:.0f} MiB"
    assert torch.isfinite(img.grad).all() and torch.isfinite(scale.grad)


@pytest.mark.cuda
def test_cuda_cpu_scalar_scale():
    img, txt = (t.float().cuda() for t in features(100, 64))
    s = torch.tensor(10.0)  # on the CPU, as a Python-side constant often is
    assert_close_to_reference(mmkernels.info_nce(img, txt, s).cpu(),
                              mmkernels.info_nce(img.cpu(), txt.cpu(), s), tol="float32_cuda_vs_cpu")


# ---------------------------------------------------------------------------------
# regressions (issue 10, defects 12-14) and the determinism contract
# ---------------------------------------------------------------------------------


@pytest.fixture
def tf32_via_new_api():
    """torch.backends.cuda.matmul.fp32_precision = "tf32" (the new API), restored after."""
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    yield
    matmul.fp32_precision = old


def test_tf32_new_api(tf32_via_new_api):
    """Defect 13: with the new TF32 API set, reading the legacy flag raises; the ops read
    the setting through fp32_precision (Triton path under the interpreter)."""
    assert ops._precision(torch.float32) == "tf32"
    assert ops._precision(torch.float16) == "ieee"
    img, txt = features(20, 16)
    s = torch.tensor(5.0, dtype=torch.float64)
    b = torch.tensor(-2.0, dtype=torch.float64)
    # float32: the Triton kernels under the interpreter (the chunked path otherwise)
    ours, g = grads(mmkernels.info_nce, img.float(), txt.float(), s.float())
    ref, g_ref = grads(reference.info_nce, img, txt, s)
    assert_close_to_reference(ours, ref, what="loss")
    ours = mmkernels.sigmoid_contrastive(img.float(), txt.float(), s.float(), b.float())
    assert_close_to_reference(ours, reference.sigmoid_contrastive(img, txt, s, b), what="loss")


def test_tf32_legacy_api():
    matmul = torch.backends.cuda.matmul
    old = matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        assert ops._precision(torch.float32) == "tf32"
        matmul.allow_tf32 = False
        assert ops._precision(torch.float32) == "ieee"
    finally:
        matmul.allow_tf32 = old


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_siglip_without_bias(backend):
    """Defect 14: logit_bias=None adds no bias (open_clip), module and functional."""
    img, txt = features(12, 16)
    s = torch.tensor(7.0, dtype=torch.float64)
    theirs, g_theirs = grads(lambda i, t, s: open_clip.loss.SigLipLoss()(i, t, s, None),
                             img, txt, s)
    for fn in (lambda i, t, s: mmkernels.nn.SigLipLoss()(i, t, s, logit_bias=None),
               lambda i, t, s: mmkernels.sigmoid_contrastive(i, t, s, None)):
        ours, g_ours = grads(fn, img, txt, s)
        assert_close_to_reference(ours, theirs, tol="float64_vs_open_clip", what="loss")
        for a, b in zip(g_ours, g_theirs):
            assert_close_to_reference(a, b, tol="float64_vs_open_clip", what="grad")


def _neg_inf_features(dtype=torch.float32):
    """Features whose logits hold an all -inf column (text 2) and an all -inf row
    (image 3): -inf times positive numbers plus finite terms (no 0 * inf)."""
    img = torch.rand(6, 8, dtype=torch.float64) + 0.1
    txt = torch.rand(6, 8, dtype=torch.float64) + 0.1
    txt[2, 0] = float("-inf")
    img[3] = 0.0
    img[3, 0] = 1.0
    img[3, 1] = float("-inf")
    return img.to(dtype), txt.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_all_neg_inf_rows_and_columns_give_neg_inf(backend):
    """Defect 14: an all -inf column (and row) of logits has log-sum-exp -inf, as
    torch.logsumexp, on every backend (the C++ column sums gave NaN)."""
    img, txt = _neg_inf_features()
    s = torch.tensor(2.0)
    path = ops._path(img)
    lse_r, lse_c, *_ = path.lse_rows_and_cols(img, txt, s, 4, with_cols=True)
    S = s.double() * img.double() @ txt.double().T
    assert torch.isneginf(S[:, 2]).all() and torch.isneginf(S[3]).all()
    assert_close_to_reference(lse_r, torch.logsumexp(S, 1), what="row lse")
    assert_close_to_reference(lse_c, torch.logsumexp(S, 0), what="column lse")


def _with_threads(n, fn):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,m", [(32, 300), (300, 301), (1024, 77)])
def test_fused_column_sums_do_not_depend_on_thread_count(k, m, dtype):
    """Defect 14: the column statistics are merged in a fixed slot order, so 1 and 2
    threads give the same bits (they were merged per thread)."""
    # CLIP-like logits: s = 30 times cosines
    a = torch.nn.functional.normalize(torch.randn(k, 64, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(m, 64, dtype=torch.float64), dim=1)
    S = (30 * a @ b.T).to(dtype)

    def run():
        rm, rs = torch.full((k,), float("-inf"), dtype=dtype), torch.zeros(k, dtype=dtype)
        cm, cs = torch.full((m,), float("-inf"), dtype=dtype), torch.zeros(m, dtype=dtype)
        ops.FusedCpuPasses().lse_panel(S, rm, rs, cm, cs)
        return rm, rs, cm, cs

    one, two = _with_threads(1, run), _with_threads(2, run)
    for x, y in zip(one, two):
        assert torch.equal(x, y)


DETERMINISM_OPS = {
    "info_nce": lambda i, t, s, b: mmkernels.info_nce(i, t, s, chunk_size=64),
    "sigmoid_contrastive": lambda i, t, s, b: mmkernels.sigmoid_contrastive(i, t, s, b,
                                                                           chunk_size=64),
    "ClipLoss": lambda i, t, s, b: mmkernels.nn.ClipLoss(chunk_size=64)(i, t, s),
    "SigLipLoss": lambda i, t, s, b: mmkernels.nn.SigLipLoss(chunk_size=64)(i, t, s, b),
}


def _same_bits(x, y):
    return (x is None and y is None) or torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("op", list(DETERMINISM_OPS))
def test_deterministic_run_to_run_and_across_thread_counts(op, backend):
    """Under use_deterministic_algorithms(True) the loss and every gradient are
    bit-identical run to run and on 1 and 2 CPU threads. (B, D) = (300, 160), or
    (130, 256) in the slow interpreter: B * D passes torch's 32768-element split of a
    full sum, and the tiles its split of elementwise passes."""
    if backend == "triton" and op in ("ClipLoss", "SigLipLoss"):
        pytest.skip("the modules call the functional ops: covered there (interpreter time)")
    B, D = (130, 256) if backend == "triton" else (300, 160)
    img, txt = features(B, D, torch.float32)
    s, b = torch.tensor(30.0), torch.tensor(-5.0)
    fn = DETERMINISM_OPS[op]

    def run():
        return grads(fn, img, txt, s, b)

    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        results = [_with_threads(2, run), _with_threads(2, run), _with_threads(1, run)]
    finally:
        torch.use_deterministic_algorithms(prev)
    first = results[0]
    for other in results[1:]:
        assert torch.equal(other[0], first[0])
        for x, y in zip(other[1], first[1]):
            assert _same_bits(x, y)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("op", ["info_nce", "sigmoid_contrastive"])
def test_cuda_deterministic_run_to_run(op, dtype):
    """The Triton kernels use no atomics: two runs give the same bits under
    use_deterministic_algorithms(True) (index_add_ with unique rows is allowed)."""
    img, txt = (t.to("cuda", dtype) for t in features(1000, 256))
    s, b = torch.tensor(30.0, device="cuda"), torch.tensor(-5.0, device="cuda")
    fn = DETERMINISM_OPS[op]
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        one, two = grads(fn, img, txt, s, b), grads(fn, img, txt, s, b)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(one[0], two[0])
    for x, y in zip(one[1], two[1]):
        assert _same_bits(x, y)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_siglip_float64_positive_logit_past_20(backend):
    """Found by fuzzing: the positives' correction softplus(-d) - softplus(d) used torch's
    softplus, which returns x itself past x = 20 (dropping e^-x); with one pair at
    logit 21 the float64 loss came out twice the true 7.6e-10. Now -d, exactly."""
    img = torch.ones(1, 1, dtype=torch.float64)
    txt = torch.ones(1, 1, dtype=torch.float64)
    s, b = torch.tensor(21.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    expect = reference.sigmoid_contrastive(img, txt, s, b)
    assert_close_to_reference(mmkernels.sigmoid_contrastive(img, txt, s, b), expect, what="loss")
    # negatives at logits in (20, 23), in the eager pass as well
    img = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    txt = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    s, b = torch.tensor(1.0, dtype=torch.float64), torch.tensor(-22.0, dtype=torch.float64)
    expect = reference.sigmoid_contrastive(img, txt, -s, -b)
    assert_close_to_reference(mmkernels.sigmoid_contrastive(img, txt, -s, -b), expect,
                              what="loss")
