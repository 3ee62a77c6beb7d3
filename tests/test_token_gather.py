"""Token gathers: random_masking, restore_tokens, masked_select_rows,
scatter_image_features, against the eager formulations in mmkernels.reference
(MAE's random_masking, x[mask], HF LLaVA's masked_scatter)."""

import re

import pytest
import torch

import mmkernels
from mmkernels import _extension, reference

pytestmark = pytest.mark.skipif(not _extension.is_available(),
                                reason="mmkernels._C is not built")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [pytest.param((3, 13, 7), id="B3-N13-D7"), pytest.param((2, 50, 33), id="B2-N50-D33"),
          pytest.param((1, 1, 5), id="B1-N1-D5")]


def make_x(shape, dtype, layout="contiguous", device="cpu"):
    B, N, D = shape
    if layout == "noncontiguous":  # strided along D and N
        x = torch.randn(B, N * 2, D * 3, dtype=torch.float64)[:, ::2, ::3]
    elif layout == "transposed":
        x = torch.randn(B, D, N, dtype=torch.float64).transpose(1, 2)
    else:
        x = torch.randn(B, N, D, dtype=torch.float64)
    return x.to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------------
# random_masking
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous", "transposed"])
@pytest.mark.parametrize("mask_ratio", [0.0, 0.25, 0.75, 0.999])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_masking_equals_mae(dtype, shape, mask_ratio, layout):
    x = make_x(shape, dtype, layout).requires_grad_()
    noise = torch.rand(shape[:2])
    ours = mmkernels.random_masking(x, mask_ratio, noise=noise)
    n_keep = int(shape[1] * (1 - mask_ratio))
    xr = x.detach().clone().requires_grad_()
    theirs = reference.random_masking(xr, n_keep, noise)
    for a, b, name in zip(ours, theirs, ("x_kept", "mask", "ids_restore")):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name
    g = torch.randn_like(ours[0])
    ours[0].backward(g)
    theirs[0].backward(g)
    assert torch.equal(x.grad, xr.grad)


def test_random_masking_ties_nan_and_noise_dtypes():
    x = torch.randn(2, 8, 3)
    noise = torch.tensor([[0.5, 0.1, 0.5, float("nan"), 0.1, 0.9, 0.5, 0.0],
                          [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        ours = mmkernels.random_masking(x, 0.5, noise=noise.to(dt))
        theirs = reference.random_masking(x, 4, noise.to(dt))
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), dt
    # ties go to the lower index, NaN last
    assert ours[2][0].tolist() == [3, 1, 4, 7, 2, 6, 5, 0]
    assert ours[2][1].tolist() == list(range(8))


def test_random_masking_generator_reproducible():
    x = torch.randn(4, 20, 6)
    a = mmkernels.random_masking(x, 0.5, generator=torch.Generator().manual_seed(7))
    b = mmkernels.random_masking(x, 0.5, generator=torch.Generator().manual_seed(7))
    c = reference.random_masking(x, 10, torch.rand(4, 20, generator=torch.Generator().manual_seed(7)))
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v) and torch.equal(u, w)


def test_random_masking_empty():
    for shape, ratio in [((0, 5, 3), 0.5), ((2, 0, 3), 0.5), ((2, 3, 0), 0.5), ((2, 3, 4), 0.7)]:
        x = torch.randn(shape, requires_grad=True)
        kept, mask, ids = mmkernels.random_masking(x, ratio)
        n_keep = int(shape[1] * (1 - ratio))
        assert kept.shape == (shape[0], n_keep, shape[2])
        assert mask.shape == shape[:2] and ids.shape == shape[:2]
        kept.sum().backward()
        assert x.grad.shape == x.shape and not x.grad.any()


# ---------------------------------------------------------------------------------
# restore_tokens
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
@pytest.mark.parametrize("mask_ratio", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_restore_tokens_equals_mae(dtype, mask_ratio, layout):
    B, N, D = 3, 17, 9
    n_keep = int(N * (1 - mask_ratio))
    x_kept = make_x((B, n_keep, D), dtype, layout).requires_grad_()
    ids_restore = torch.argsort(torch.rand(B, N), dim=1)
    token = torch.randn(1, 1, D, dtype=dtype, requires_grad=True)  # MAE's parameter shape
    out = mmkernels.restore_tokens(x_kept, ids_restore, token)
    xr = x_kept.detach().clone().requires_grad_()
    tr = token.detach().clone().requires_grad_()
    ref = reference.restore_tokens(xr, ids_restore, tr)
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    assert torch.equal(x_kept.grad, xr.grad)
    # mask_token's gradient is a sum: accumulated in float32 (or float64), so compare
    # against the float64 sum with the table's rule for the low-precision dtypes
    from mmkernels.testing import assert_close_to_reference
    exact = g.double().mul(ids_restore.ge(n_keep)[..., None]).sum((0, 1)).view(1, 1, D)
    eager = tr.grad if dtype in (torch.float16, torch.bfloat16) else None
    assert_close_to_reference(token.grad, exact, eager_lowp=eager, what="grad mask_token")


def test_restore_after_masking_roundtrip():
    x = torch.randn(4, 30, 8)
    kept, mask, ids = mmkernels.random_masking(x, 0.6)
    token = torch.full((8,), float("nan"))
    full = mmkernels.restore_tokens(kept, ids, token)
    keep = mask == 0
    assert torch.equal(full[keep], x[keep])
    assert torch.isnan(full[~keep]).all()


# ---------------------------------------------------------------------------------
# masked_select_rows
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous", "transposed"])
@pytest.mark.parametrize("density", [0.0, 0.15, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_select_rows_equals_boolean_indexing(dtype, density, layout):
    x = make_x((3, 19, 11), dtype, layout).requires_grad_()
    mask = torch.rand(3, 19) < density
    rows, index = mmkernels.masked_select_rows(x, mask)
    assert torch.equal(rows, x[mask])
    assert torch.equal(index, torch.nonzero(mask.reshape(-1)).squeeze(1))
    g = torch.randn_like(rows)
    rows.backward(g)
    expect = torch.zeros_like(x)
    expect[mask] = g
    assert torch.equal(x.grad, expect)


def test_masked_select_rows_max_rows_padding_and_overflow():
    x = torch.randn(2, 6, 4, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    rows, index = mmkernels.masked_select_rows(x, mask, max_rows=6)
    ref_rows, ref_index = reference.masked_select_rows(x, mask, max_rows=6)
    assert torch.equal(rows, ref_rows) and torch.equal(index, ref_index)
    assert index.tolist() == [0, 2, 5, 9, -1, -1] and not rows[4:].any()
    rows.sum().backward()
    assert torch.equal(x.grad, mask[..., None].expand_as(x).float())
    with pytest.raises(ValueError, match="max_rows"):
        mmkernels.masked_select_rows(x, mask, max_rows=3)


@pytest.mark.parametrize("shape", [(0, 4, 3), (2, 0, 3), (2, 5, 3)], ids=["B0", "N0", "none-selected"])
def test_masked_select_rows_double_backward_with_only_padding(shape):
    """Every returned row is padding (an empty x, or a mask selecting nothing): the
    double backward gathers nothing and returns zeros (index_select on an empty dim
    raised before; found in review)."""
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(shape[:2], dtype=torch.bool)
    rows, index = mmkernels.masked_select_rows(x, mask, max_rows=2)
    assert index.tolist() == [-1, -1]
    v = torch.randn_like(rows, requires_grad=True)
    (gx,) = torch.autograd.grad(rows, x, v, create_graph=True)
    (gv,) = torch.autograd.grad(gx.sum(), v, allow_unused=False)
    assert torch.equal(gv, torch.zeros_like(v))
    assert torch.autograd.gradgradcheck(
        lambda t: mmkernels.masked_select_rows(t, mask, max_rows=2)[0], (x,))


# ---------------------------------------------------------------------------------
# scatter_image_features
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("features_layout", ["flat", "per-image"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_image_features_equals_hf_masked_scatter(dtype, features_layout):
    B, L, D, tokens_per_image = 3, 23, 10, 4
    embeds = make_x((B, L, D), dtype, "noncontiguous").requires_grad_()
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, 2:6] = True          # one image in sample 0
    mask[2, 5:9] = True          # two images in sample 2
    mask[2, 15:19] = True
    feats = torch.randn(3, tokens_per_image, D, dtype=dtype)
    if features_layout == "flat":
        feats = feats.reshape(-1, D)
    feats.requires_grad_()
    out = mmkernels.scatter_image_features(embeds, mask, feats)
    er = embeds.detach().clone().requires_grad_()
    fr = feats.detach().clone().requires_grad_()
    ref = reference.scatter_image_features(er, mask, fr.reshape(-1, D))
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    assert torch.equal(embeds.grad, er.grad)
    assert torch.equal(feats.grad, fr.grad)


def test_scatter_image_features_count_mismatch_raises():
    embeds = torch.randn(2, 8, 4)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :3] = True
    with pytest.raises(ValueError, match="do not match: tokens: 3, features 4"):
        mmkernels.scatter_image_features(embeds, mask, torch.randn(4, 4))
    with pytest.raises(ValueError, match="do not match: tokens: 3, features 2"):  # the raw op too
        torch.ops.mmkernels.scatter_image_features(embeds, mask, torch.randn(2, 4))


def test_scatter_image_features_no_image_tokens():
    embeds = torch.randn(2, 5, 3, requires_grad=True)
    out = mmkernels.scatter_image_features(embeds, torch.zeros(2, 5, dtype=torch.bool),
                                           torch.randn(0, 3))
    assert torch.equal(out, embeds)


# ---------------------------------------------------------------------------------
# gradcheck, opcheck, compile, determinism, NaN, bad input
# ---------------------------------------------------------------------------------

def test_gradcheck_all():
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    noise = torch.rand(2, 7)
    assert torch.autograd.gradcheck(lambda t: mmkernels.random_masking(t, 0.4, noise=noise)[0], (x,))
    kept = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.argsort(torch.rand(2, 7), 1)
    tok = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, t: mmkernels.restore_tokens(a, ids, t), (kept, tok))
    mask = torch.rand(2, 7) > 0.5
    assert torch.autograd.gradcheck(lambda t: mmkernels.masked_select_rows(t, mask)[0], (x,))
    assert torch.autograd.gradcheck(lambda t: mmkernels.masked_select_rows(t, mask, 14)[0], (x,))
    feats = torch.randn(int(mask.sum()), 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda e, f: mmkernels.scatter_image_features(e, mask, f), (x, feats))


OPCHECK_CASES = ["random_masking", "restore_tokens", "restore_tokens-no-token",
                 "restore_tokens_backward", "masked_select_rows-max", "masked_select_rows",
                 "scatter_rows", "scatter_image_features", "scatter_image_features-unchecked"]


def _opcheck_case(name):
    """Inputs built inside the test (seeded), with a fixed mask that selects some rows
    and leaves some out, so the data-dependent output size is neither 0 nor 1."""
    x = torch.randn(2, 7, 3, requires_grad=True)
    ids = torch.argsort(torch.rand(2, 7), 1)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1], [0, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    ops = torch.ops.mmkernels
    n = int(mask.sum())
    return {
        "random_masking": (ops.random_masking.default, (x, torch.rand(2, 7), 3)),
        "restore_tokens": (ops.restore_tokens.default,
                           (torch.randn(2, 4, 3, requires_grad=True), ids,
                            torch.randn(3, requires_grad=True))),
        "restore_tokens-no-token": (ops.restore_tokens.default,
                                    (torch.randn(2, 4, 3, requires_grad=True), ids, None)),
        "restore_tokens_backward": (ops._restore_tokens_backward.default,
                                    (torch.randn(2, 7, 3), ids, 4)),
        "masked_select_rows-max": (ops.masked_select_rows.default, (x, mask, 9)),
        "masked_select_rows": (ops.masked_select_rows.default, (x, mask, -1)),
        "scatter_rows": (ops._scatter_rows.default,
                         (torch.randn(4, 3, requires_grad=True), torch.tensor([5, -1, 0, 2]), 7)),
        "scatter_image_features": (ops.scatter_image_features.default,
                                   (x, mask, torch.randn(n, 3, requires_grad=True))),
        "scatter_image_features-unchecked": (ops.scatter_image_features.default,
                                             (x, mask, torch.randn(n - 2, 3, requires_grad=True),
                                              False)),
    }[name]


@pytest.mark.parametrize("name", OPCHECK_CASES)
def test_opcheck(name):
    op, args = _opcheck_case(name)
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    x = torch.randn(2, 12, 5)
    noise = torch.rand(2, 12)
    token = torch.randn(5)
    mask = torch.rand(2, 12) > 0.5

    feats = torch.randn(int(mask.sum()), 5)

    def fn(x, noise, token, mask, feats):
        kept, m, ids = mmkernels.random_masking(x, 0.5, noise=noise)
        full = mmkernels.restore_tokens(kept * 2, ids, token)
        rows, _ = mmkernels.masked_select_rows(full, mask, max_rows=24)
        merged = mmkernels.scatter_image_features(full, mask, feats)  # the count check inside
        return full.sum() + rows.sum() + m.sum() + merged.sum()

    compiled = torch.compile(fn, fullgraph=True)
    args = (x, noise, token, mask, feats)
    torch.testing.assert_close(compiled(*args), fn(*args))
    with pytest.raises(ValueError, match="do not match"):
        compiled(x, noise, token, mask, torch.randn(feats.shape[0] + 1, 5))


def test_run_twice_deterministic():
    x = torch.randn(8, 64, 40, requires_grad=True)
    noise = torch.rand(8, 64)
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (threads, 1):
            torch.set_num_threads(n)
            kept, _, ids = mmkernels.random_masking(x, 0.5, noise=noise)
            token = torch.randn(40, generator=torch.Generator().manual_seed(0), requires_grad=True)
            full = mmkernels.restore_tokens(kept, ids, token)
            gx, gt = torch.autograd.grad(full.pow(2).sum(), (x, token))
            grads.append((gx, gt))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_nan_rows_move_untouched():
    x = torch.randn(2, 6, 3)
    x[0, 2, 1] = float("nan")
    kept, mask, ids = mmkernels.random_masking(x, 0.0, noise=torch.rand(2, 6))
    assert torch.isnan(kept).sum() == 1
    rows, _ = mmkernels.masked_select_rows(x, torch.ones(2, 6, dtype=torch.bool))
    assert torch.isnan(rows).sum() == 1


BAD = [
    ("ratio-one", lambda: mmkernels.random_masking(torch.randn(2, 4, 3), 1.0), ValueError,
     "mask_ratio"),
    ("ratio-negative", lambda: mmkernels.random_masking(torch.randn(2, 4, 3), -0.1), ValueError,
     "mask_ratio"),
    ("x-2d", lambda: mmkernels.random_masking(torch.randn(4, 3), 0.5), ValueError, "3-D"),
    ("noise-shape", lambda: mmkernels.random_masking(torch.randn(2, 4, 3), 0.5,
                                                     noise=torch.rand(2, 5)), ValueError, "noise"),
    ("noise-int", lambda: mmkernels.random_masking(torch.randn(2, 4, 3), 0.5,
                                                   noise=torch.ones(2, 4, dtype=torch.long)),
     TypeError, "noise"),
    ("ids-out-of-range", lambda: mmkernels.restore_tokens(
        torch.randn(1, 2, 3), torch.tensor([[0, 1, 7]]), torch.randn(3)), ValueError,
     "ids_restore values must lie in"),
    ("ids-negative", lambda: mmkernels.restore_tokens(
        torch.randn(1, 2, 3), torch.tensor([[0, -1, 2]]), torch.randn(3)), ValueError,
     "ids_restore values must lie in"),
    ("ids-not-permutation", lambda: mmkernels.restore_tokens(
        torch.randn(1, 2, 3, requires_grad=True), torch.tensor([[0, 0, 1]]),
        torch.randn(3)).sum().backward(), ValueError, "ids_restore must be a permutation"),
    ("ids-int32", lambda: mmkernels.restore_tokens(
        torch.randn(1, 2, 3), torch.tensor([[0, 2, 1]], dtype=torch.int32), torch.randn(3)),
     TypeError, "ids_restore"),
    ("mask-token-size", lambda: mmkernels.restore_tokens(
        torch.randn(1, 2, 3), torch.tensor([[0, 2, 1]]), torch.randn(4)), ValueError,
     "mask_token"),
    ("mask-token-dtype", lambda: mmkernels.restore_tokens(
        torch.randn(1, 2, 3), torch.tensor([[0, 2, 1]]), torch.randn(3).double()), TypeError,
     "mask_token"),
    ("select-mask-shape", lambda: mmkernels.masked_select_rows(
        torch.randn(2, 4, 3), torch.ones(2, 5, dtype=torch.bool)), ValueError, "mask"),
    ("select-mask-dtype", lambda: mmkernels.masked_select_rows(
        torch.randn(2, 4, 3), torch.ones(2, 4)), TypeError, "mask"),
    ("select-max-rows", lambda: mmkernels.masked_select_rows(
        torch.randn(2, 4, 3), torch.ones(2, 4, dtype=torch.bool), max_rows=-2), ValueError,
     "max_rows"),
    ("image-dim", lambda: mmkernels.scatter_image_features(
        torch.randn(2, 4, 3), torch.ones(2, 4, dtype=torch.bool), torch.randn(8, 5)),
     ValueError, "image_features"),
    ("scatter-rows-duplicate", lambda: torch.ops.mmkernels._scatter_rows(
        torch.randn(2, 3), torch.tensor([1, 1]), 4), RuntimeError, "twice"),
    ("scatter-rows-range", lambda: torch.ops.mmkernels._scatter_rows(
        torch.randn(2, 3), torch.tensor([1, 9]), 4), RuntimeError, "outside"),
]


@pytest.mark.parametrize("name,call,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------
# issue 10 regressions (defects 6-8), CPU parts; the CUDA parts are below
# ---------------------------------------------------------------------------------

def ids_in_layout(ids, layout):
    """The same (B, N) values in another memory layout."""
    B, N = ids.shape
    if layout == "transposed":  # column-major storage
        return ids.t().contiguous().t()
    if layout == "sliced":
        big = torch.full((B, 2 * N), -7, dtype=ids.dtype, device=ids.device)
        big[:, ::2] = ids
        return big[:, ::2]
    if layout == "expanded":  # every row the same permutation, row stride 0
        return ids[:1].expand(B, N)
    return ids


IDS_LAYOUTS = ["transposed", "sliced", "expanded"]


def _restore_case(layout, device="cpu", dtype=torch.float32, B=3, N=11, K=5, D=6):
    ids = torch.argsort(torch.rand(B, N, device=device), 1)
    if layout == "expanded":
        ids = ids[:1].expand(B, N).contiguous()
    x_kept = torch.randn(B, K, D, device=device, dtype=dtype, requires_grad=True)
    token = torch.randn(D, device=device, dtype=dtype, requires_grad=True)
    return x_kept, ids, ids_in_layout(ids, layout), token


@pytest.mark.parametrize("layout", IDS_LAYOUTS)
def test_defect6_restore_tokens_ids_restore_any_layout(layout):
    """Defect 6: the map is built by token_gather_maps.h (the CUDA host path's code) and
    must be row-major whatever ids_restore's layout; the row mover reads it flat."""
    x_kept, ids, ids_odd, token = _restore_case(layout)
    assert not ids_odd.is_contiguous()
    out = mmkernels.restore_tokens(x_kept, ids_odd, token)
    assert torch.equal(out, reference.restore_tokens(x_kept.detach(), ids, token.detach()))
    g = torch.randn_like(out)
    gk, gt = torch.autograd.grad(out, (x_kept, token), g)
    rk, rt = torch.autograd.grad(reference.restore_tokens(x_kept, ids, token), (x_kept, token), g)
    assert torch.equal(gk, rk)
    torch.testing.assert_close(gt, rt)


@pytest.mark.parametrize("layout", IDS_LAYOUTS)
def test_defect6_random_masking_backward_with_odd_ids_layout(layout):
    """random_masking's backward is restore_tokens(grad, ids_restore): the same map."""
    x = torch.randn(3, 11, 4)
    _, _, ids = mmkernels.random_masking(x, 0.5)
    if layout == "expanded":
        ids = ids[:1].expand(3, 11).contiguous()
    odd = ids_in_layout(ids, layout)
    grad = torch.randn(3, 5, 4)
    ours, _ = torch.ops.mmkernels._restore_tokens_backward(
        torch.ops.mmkernels.restore_tokens(grad, odd, None), odd, 5)
    assert torch.equal(ours, grad)


def test_defect7_count_mismatch_raises_value_error_like_hf():
    embeds = torch.randn(2, 8, 4)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 1:4] = True
    mask[1, 6] = True  # 4 image tokens
    for T in (3, 5, 0):
        for call in (mmkernels.scatter_image_features,
                     torch.ops.mmkernels.scatter_image_features):
            with pytest.raises(ValueError, match=f"tokens: 4, features {T} .*image_mask.*"
                                                 "image_features"):
                call(embeds, mask, torch.randn(T, 4))


@pytest.mark.parametrize("T", [0, 2, 4, 6], ids=lambda t: f"features{t}")
@pytest.mark.parametrize("op", ["functional", "raw"])
def test_defect7_unchecked_rule_is_defined_and_in_bounds(op, T):
    """check_count=False: no check, no sync; the first min(tokens, T) image positions
    take feature rows, the rest keep their embeddings; surplus features are unused."""
    B, L, D = 2, 9, 5
    embeds = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, 2:4] = True
    mask[1, 5:7] = True  # 4 image tokens
    feats = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    if op == "functional":
        out = mmkernels.scatter_image_features(embeds, mask, feats, check_count=False)
    else:
        out = torch.ops.mmkernels.scatter_image_features(embeds, mask, feats, False)
    ref = reference.scatter_image_features(embeds, mask, feats, check_count=False)
    assert torch.equal(out, ref)
    positions = torch.nonzero(mask.reshape(-1)).squeeze(1)
    flat = out.detach().reshape(-1, D)
    for t, p in enumerate(positions.tolist()):
        expect = feats[t] if t < T else embeds.reshape(-1, D)[p]
        assert torch.equal(flat[p], expect.detach())
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, (embeds, feats), g)
    theirs = torch.autograd.grad(ref, (embeds, feats), g, allow_unused=True)
    assert torch.equal(ours[0], theirs[0])
    expect_gf = theirs[1] if theirs[1] is not None else torch.zeros_like(feats)
    assert torch.equal(ours[1], expect_gf)
    if T > 0 and op == "functional":
        assert torch.autograd.gradcheck(
            lambda e, f: mmkernels.scatter_image_features(e, mask, f, check_count=False),
            (embeds, feats))


def test_defect7_check_count_must_be_bool():
    with pytest.raises(TypeError, match="check_count"):
        mmkernels.scatter_image_features(torch.randn(1, 2, 3), torch.ones(1, 2, dtype=torch.bool),
                                         torch.randn(2, 3), check_count=1)


def _inf_grad_case(device):
    B, N, K, D = 3, 10, 4, 5
    ids = torch.argsort(torch.rand(B, N, device=device), 1)
    grad = torch.randn(B, N, D, device=device)
    kept = ids < K
    grad[kept] = float("inf")  # every kept row: +Inf
    grad[0][kept[0]] = -float("inf")
    return ids, grad, K, kept


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_defect8_mask_token_grad_skips_kept_rows(dtype):
    """Defect 8: Inf in kept rows must not reach the mask token's gradient (CUDA once
    computed sum(grad * masked): Inf * 0 = NaN). The CPU path always skipped them;
    this pins the contract both backends now share (mask_token_rows)."""
    ids, grad, K, kept = _inf_grad_case("cpu")
    grad = grad.to(dtype)
    gk, gt = torch.ops.mmkernels._restore_tokens_backward(grad, ids, K)
    exact = grad.double().masked_fill(kept[..., None], 0).sum((0, 1))
    assert torch.isfinite(gt).all()
    eager = grad.masked_fill(kept[..., None], 0).sum((0, 1)) if dtype in (
        torch.float16, torch.bfloat16) else None
    from mmkernels.testing import assert_close_to_reference
    assert_close_to_reference(gt, exact, eager_lowp=eager, what="grad mask_token")
    assert torch.isinf(gk).all()
    # grad_x_kept is the exact inverse permutation of the kept rows
    inv = torch.argsort(ids, 1)[:, :K]
    assert torch.equal(gk, torch.gather(grad, 1, inv[..., None].expand(-1, -1, 5)))


def test_defect8_backward_rejects_a_non_permutation():
    """The inverse-permutation gather needs a permutation: a repeated id raises (CPU);
    the CUDA map is built in a -1 buffer, so it never reads uninitialised slots."""
    with pytest.raises(ValueError, match="ids_restore"):
        torch.ops.mmkernels._restore_tokens_backward(torch.randn(1, 3, 2),
                                                     torch.tensor([[0, 0, 2]]), 2)
    with pytest.raises(ValueError, match="ids_restore"):
        torch.ops.mmkernels._restore_tokens_backward(torch.randn(1, 3, 2),
                                                     torch.tensor([[0, 3, 1]]), 2)


# ---------------------------------------------------------------------------------
# determinism contract: bitwise run to run and across CPU thread counts, in
# torch.use_deterministic_algorithms(True) (and without it: nothing here changes)
# ---------------------------------------------------------------------------------

def _all_ops_fwd_bwd(device, dtype=torch.float32):
    """Every op forward and backward on fixed seeded inputs; returns all tensors."""
    gen = torch.Generator(device="cpu").manual_seed(1234)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dt)

    B, N, D = 4, 300, 70
    x = rnd(B, N, D).requires_grad_()
    noise = torch.rand(B, N, generator=gen).to(device)
    kept, mask, ids = mmkernels.random_masking(x, 0.75, noise=noise)
    token = rnd(D).requires_grad_()
    full = mmkernels.restore_tokens(kept, ids, token)
    sel = torch.rand(B, N, generator=gen).to(device) < 0.3
    rows, index = mmkernels.masked_select_rows(full, sel)
    rows_p, _ = mmkernels.masked_select_rows(full, sel, max_rows=B * N)
    feats = rnd(int(sel.sum()), D).requires_grad_()
    merged = mmkernels.scatter_image_features(full, sel, feats)
    loss = (full * rnd(B, N, D)).sum() + (rows * rnd(*rows.shape)).sum() + \
        (rows_p * rnd(*rows_p.shape)).sum() + (merged * rnd(B, N, D)).sum()
    grads = torch.autograd.grad(loss, (x, token, feats))
    return [kept, mask, ids, full, rows, index, rows_p, merged, *grads]


def test_deterministic_bitwise_across_runs_and_threads():
    threads = torch.get_num_threads()
    was = torch.are_deterministic_algorithms_enabled()
    results = []
    try:
        torch.use_deterministic_algorithms(True)
        for n in (1, 2, 2, 1):
            torch.set_num_threads(n)
            results.append(_all_ops_fwd_bwd("cpu"))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("N", [13, 196, 7000])  # 7000: ranked from global memory
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_random_masking_and_restore(dtype, N):
    x = make_x((3, N, 24), dtype, "noncontiguous", device="cuda").requires_grad_()
    noise = torch.rand(3, N, device="cuda")
    noise[:, :4] = 0.5  # ties
    ours = mmkernels.random_masking(x, 0.75, noise=noise)
    xr = x.detach().clone().requires_grad_()
    theirs = reference.random_masking(xr, int(N * 0.25), noise)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    g = torch.randn_like(ours[0])
    ours[0].backward(g)
    theirs[0].backward(g)
    assert torch.equal(x.grad, xr.grad)
    token = torch.randn(24, device="cuda", dtype=dtype, requires_grad=True)
    out = mmkernels.restore_tokens(ours[0].detach(), ours[2], token)
    assert torch.equal(out, reference.restore_tokens(ours[0].detach(), ours[2], token))


@pytest.mark.cuda
def test_cuda_select_and_scatter():
    x = torch.randn(4, 50, 16, device="cuda", requires_grad=True)
    mask = torch.rand(4, 50, device="cuda") < 0.3
    rows, index = mmkernels.masked_select_rows(x, mask)
    assert torch.equal(rows, x[mask])
    rows_p, index_p = mmkernels.masked_select_rows(x, mask, max_rows=200)
    assert torch.equal(rows_p[: rows.shape[0]], rows) and (index_p[rows.shape[0]:] == -1).all()
    rows_p.sum().backward()
    assert torch.equal(x.grad, mask[..., None].expand_as(x).float())
    feats = torch.randn(int(mask.sum()), 16, device="cuda")
    out = mmkernels.scatter_image_features(x.detach(), mask, feats)
    assert torch.equal(out, reference.scatter_image_features(x.detach(), mask, feats))


# ---------------------------------------------------------------------------------
# issue 10 regressions and determinism on CUDA
# ---------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("layout", IDS_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_defect6_restore_tokens_ids_restore_any_layout(dtype, layout):
    """Defect 6 on the device: a transposed/sliced/expanded ids_restore once gave a map
    in its own layout, which _move_rows_kernel read as row-major (scrambled rows)."""
    x_kept, ids, ids_odd, token = _restore_case(layout, "cuda", dtype, B=5, N=37, K=9, D=24)
    out = mmkernels.restore_tokens(x_kept, ids_odd, token)
    assert torch.equal(out, reference.restore_tokens(x_kept.detach(), ids, token.detach()))
    g = torch.randn_like(out)
    gk, _ = torch.autograd.grad(out, (x_kept, token), g)
    rk, _ = torch.autograd.grad(reference.restore_tokens(x_kept, ids, token), (x_kept, token), g)
    assert torch.equal(gk, rk)


@pytest.mark.cuda
def test_cuda_defect7_count_mismatch_raises_and_context_survives():
    """Defect 7: a mismatched count raises ValueError (HF's) and the CUDA context stays
    usable; it was a device-side assertion that killed every later CUDA call."""
    embeds = torch.randn(2, 16, 8, device="cuda")
    mask = torch.zeros(2, 16, dtype=torch.bool, device="cuda")
    mask[0, 2:6] = True
    mask[1, 0:3] = True  # 7 image tokens
    for T in (6, 8):
        with pytest.raises(ValueError, match=f"tokens: 7, features {T}"):
            mmkernels.scatter_image_features(embeds, mask, torch.randn(T, 8, device="cuda"))
    torch.cuda.synchronize()  # would raise "device-side assert triggered" on the old code
    feats = torch.randn(7, 8, device="cuda")
    out = mmkernels.scatter_image_features(embeds, mask, feats)
    assert torch.equal(out, reference.scatter_image_features(embeds, mask, feats))


@pytest.mark.cuda
@pytest.mark.parametrize("T", [0, 5, 7, 9], ids=lambda t: f"features{t}")
def test_cuda_defect7_unchecked_rule_matches_cpu(T):
    """check_count=False: no sync, no assertion; the same defined rule as on the CPU."""
    embeds = torch.randn(2, 16, 8)
    mask = torch.rand(2, 16) < 0.4
    mask[0, :7] = True
    feats = torch.randn(T, 8)
    cpu = mmkernels.scatter_image_features(embeds, mask, feats, check_count=False)
    gpu = mmkernels.scatter_image_features(embeds.cuda(), mask.cuda(), feats.cuda(),
                                           check_count=False)
    torch.cuda.synchronize()
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.cuda
def test_cuda_defect7_unchecked_path_captures_in_a_cuda_graph():
    embeds = torch.randn(2, 16, 8, device="cuda")
    mask = torch.zeros(2, 16, dtype=torch.bool, device="cuda")
    mask[:, 3:7] = True
    feats = torch.randn(8, 8, device="cuda")
    mmkernels.scatter_image_features(embeds, mask, feats, check_count=False)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mmkernels.scatter_image_features(embeds, mask, feats, check_count=False)
    feats.copy_(torch.randn_like(feats))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, reference.scatter_image_features(embeds, mask, feats))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_defect8_mask_token_grad_skips_kept_rows(dtype):
    """Defect 8: sum(grad * masked) turned an Inf in a kept row into NaN."""
    ids, grad, K, kept = _inf_grad_case("cuda")
    grad = grad.to(dtype)
    gk, gt = torch.ops.mmkernels._restore_tokens_backward(grad, ids, K)
    assert torch.isfinite(gt).all()
    exact = grad.double().masked_fill(kept[..., None], 0).sum((0, 1))
    eager = grad.masked_fill(kept[..., None], 0).sum((0, 1)) if dtype in (
        torch.float16, torch.bfloat16) else None
    from mmkernels.testing import assert_close_to_reference
    assert_close_to_reference(gt, exact, eager_lowp=eager, what="grad mask_token")
    inv = torch.argsort(ids, 1)[:, :K]
    assert torch.equal(gk, torch.gather(grad, 1, inv[..., None].expand(-1, -1, 5)))
    cpu_k, cpu_t = torch.ops.mmkernels._restore_tokens_backward(grad.cpu(), ids.cpu(), K)
    assert torch.equal(gk.cpu(), cpu_k)


@pytest.mark.cuda
def test_cuda_deterministic_mode_bitwise_and_matches_cpu():
    """Every op runs under torch.use_deterministic_algorithms(True) on CUDA (no op raises:
    the paths are gathers and scatters to distinct rows) and is bitwise run to run;
    the row moves equal the CPU's bitwise."""
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        a = _all_ops_fwd_bwd("cuda")
        b = _all_ops_fwd_bwd("cuda")
    finally:
        torch.use_deterministic_algorithms(was)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    cpu = _all_ops_fwd_bwd("cpu")
    for i in (*range(8), 10):  # the forward outputs and grad features: exact row moves
        assert torch.equal(a[i].cpu(), cpu[i])


# ---------------------------------------------------------------------------------
# issue 13: the CUDA row movers (16-byte vectors, scalar head/tail), the split rank
# count, the mask-token gradient without a float copy, no shared dummy slot
# ---------------------------------------------------------------------------------

def test_shared_math_host_unit(tmp_path):
    """Issue 13: the CUDA row mover's word choice (row_word_bytes: the widest of 16, 8
    and 4 bytes on which source and destination agree, so fp16 rows of 200 bytes that
    agree modulo 8 move in 8-byte words instead of element by element), the rank
    count's launch shape (rank_split: gridDim.y capped, chunks covering the row) and
    its chunked count (rank_count over staged chunks equals the stable sort's rank),
    built by the host compiler and run (tests/cpp/token_gather_math_test.cpp)."""
    from _cpp import run_host_unit

    run_host_unit("token_gather_math_test.cpp", tmp_path)


def test_row_move_sass_has_16_byte_vectors(tmp_path):
    """Issue 13: the row movers load and store 16-byte words (LDG.E.128 / STG.E.128)
    on sm_80 and sm_90, with no spills; checked on the SASS of the .cu alone (the
    kernel report's VECTOR_IO check; the old one-thread-per-element kernel had none)."""
    from _sass import cu_source_reports

    for arch, reports in cu_source_reports("token_gather/token_gather_cuda.cu",
                                           tmp_path).items():
        movers = [r for r in reports if r.name.startswith("_move_rows_kernel<")]
        assert len(movers) == 4, [r.name for r in reports]  # element sizes 1, 2, 4, 8
        for r in movers:
            assert r.needs_vec == (True, True)
            assert r.ldg128 > 0 and r.stg128 > 0 and not r.problems(), (arch, r)
        assert all(not r.problems() for r in reports), [(r.name, r.problems()) for r in reports]
    # Review (b): rows whose source and destination agree modulo 8 (or 4) bytes only move
    # in 8-byte (4-byte) words, not element by element: the movers of 1-, 2- and 4-byte
    # elements hold 8-byte word loads and stores, those of 1- and 2-byte elements 4-byte
    # ones (the old movers had none: 16-byte words or elements).
    from mmkernels.tools import kernel_report

    sass = kernel_report._sass_by_function(str(tmp_path / "token_gather_cuda.cu.sm_90.o"),
                                           kernel_report.find_tool("cuobjdump"))
    for fn, lines in sass.items():
        m = re.search(r"_move_rows_kernelILi(\d)E", fn)
        if m is None:
            continue
        text = "\n".join(lines)
        E = int(m.group(1))
        if E < 8:  # (one 8-byte load is the row map's index: the words add more)
            assert len(re.findall(r"\bLDG\.E\.64\.CONSTANT\b", text)) > 1, (E, "LDG.E.64")
            assert re.search(r"\bSTG\.E\.64\b", text), (E, "STG.E.64")
        if E < 4:  # 4-byte words: read-only cached 32-bit loads, 32-bit stores
            assert re.search(r"\bLDG\.E\.CONSTANT\s", text), (E, "LDG.E.CONSTANT")
            assert re.search(r"\bSTG\.E\s", text), (E, "STG.E")


def _unaligned_rows(dtype, D, offset, device):
    """(B, N, D) rows whose byte size D * itemsize is not a multiple of 16 and whose
    storage starts `offset` elements into the buffer (a misaligned base)."""
    B, N = 3, 37
    buf = torch.randn(B * N * D + offset, dtype=torch.float64).to(dtype=dtype, device=device)
    return buf[offset:].view(B, N, D)


@pytest.mark.cuda
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("D", [1, 3, 7, 12, 100, 257])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_unaligned_rows_match_eager(dtype, D, offset):
    """Every op on rows of D * itemsize % 16 != 0 bytes and on misaligned bases
    (scalar head/tail; rows whose source and destination agree only modulo 8 or 4
    bytes move in 8- or 4-byte words, rows that agree on none element by element),
    fp16/bf16 included, equals eager bitwise (row moves are exact)."""
    x = _unaligned_rows(dtype, D, offset, "cuda")
    noise = torch.rand(x.shape[:2], device="cuda")
    ours = mmkernels.random_masking(x, 0.6, noise=noise)
    theirs = reference.random_masking(x, int(x.shape[1] * 0.4), noise)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    token = _unaligned_rows(dtype, D, offset, "cuda")[0, 0]
    assert torch.equal(mmkernels.restore_tokens(ours[0], ours[2], token),
                       reference.restore_tokens(ours[0], ours[2], token))
    mask = torch.rand(x.shape[:2], device="cuda") < 0.3
    rows, index = mmkernels.masked_select_rows(x, mask, max_rows=int(mask.sum()) + 5)
    ref_rows, _ = reference.masked_select_rows(x, mask, int(mask.sum()) + 5)
    assert torch.equal(rows, ref_rows)
    assert (index[int(mask.sum()):] == -1).all()
    feats = _unaligned_rows(dtype, D, offset, "cuda").reshape(-1, D)[: int(mask.sum())]
    assert torch.equal(mmkernels.scatter_image_features(x, mask, feats),
                       reference.scatter_image_features(x, mask, feats))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_lowp_gradients_match_eager(dtype):
    """fp16/bf16 gradients: the row gathers are exact; the mask-token gradient (fixed
    block sums in float32, straight from the gradient) is within the fp64 reference's
    tolerance."""
    from mmkernels.testing import assert_close_to_reference
    x = make_x((4, 97, 40), dtype, "noncontiguous", device="cuda").requires_grad_()
    noise = torch.rand(4, 97, device="cuda")
    kept, _, ids = mmkernels.random_masking(x, 0.75, noise=noise)
    token = torch.randn(40, device="cuda", dtype=dtype, requires_grad=True)
    out = mmkernels.restore_tokens(kept, ids, token)
    g = torch.randn_like(out)
    out.backward(g)
    x64 = x.detach().double().requires_grad_()
    t64 = token.detach().double().requires_grad_()
    k64, _, ids64 = reference.random_masking(x64, kept.shape[1], noise)
    reference.restore_tokens(k64, ids64, t64).backward(g.double())
    assert torch.equal(x.grad, x64.grad.to(dtype))
    xl = x.detach().clone().requires_grad_()
    tl = token.detach().clone().requires_grad_()
    kl, _, idl = reference.random_masking(xl, kept.shape[1], noise)
    reference.restore_tokens(kl, idl, tl).backward(g)
    assert_close_to_reference(token.grad, t64.grad, eager_lowp=tl.grad)


@pytest.mark.cuda
@pytest.mark.parametrize("B", [1, 2, 7])
@pytest.mark.parametrize("N", [1, 255, 257, 3000, 6144, 7000, 20000])
def test_cuda_random_masking_small_batch_split_rows(B, N):
    """Issue 13: with B < 2 * SMs each noise row is ranked by several blocks (chunks
    of tokens; a row of more than kStageTokens = 6144 is staged in shared memory in
    chunks, 7000 in two, 20000 in four); the ranks equal the CPU's sort-based ones
    exactly, ties and NaN included."""
    x = torch.randn(B, N, 8, device="cuda")
    noise = torch.rand(B, N, device="cuda")
    noise[:, ::5] = 0.25  # ties
    if N > 3:
        noise[:, 3] = float("nan")
    ours = mmkernels.random_masking(x, 0.5, noise=noise)
    cpu = mmkernels.random_masking(x.cpu(), 0.5, noise=noise.cpu())
    for a, b in zip(ours, cpu):
        assert torch.equal(a.cpu(), b)


@pytest.mark.cuda
def test_cuda_mask_token_grad_deterministic_and_matches_cpu():
    """The CUDA mask-token gradient (block partial sums, then torch's sum) is bitwise
    run to run, matches the float64 sum, and leaves an Inf in a kept row out (never
    multiplied by zero)."""
    B, N, D, K = 16, 196, 768, 49
    ids = torch.stack([torch.randperm(N) for _ in range(B)]).cuda()
    grad = torch.randn(B, N, D, device="cuda")
    grad[ids < K] = float("inf")  # kept rows: must not reach the token gradient
    _, t1 = torch.ops.mmkernels._restore_tokens_backward(grad, ids, K)
    _, t2 = torch.ops.mmkernels._restore_tokens_backward(grad, ids, K)
    assert torch.equal(t1, t2) and torch.isfinite(t1).all()
    from mmkernels.testing import assert_close_to_reference
    ref64 = grad.double().masked_fill((ids < K)[..., None], 0).sum((0, 1))
    assert_close_to_reference(t1, ref64, what="mask-token gradient")
