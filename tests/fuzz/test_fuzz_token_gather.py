"""Property-based fuzzing of the token gathers (random_masking, restore_tokens,
masked_select_rows, scatter_image_features) against the eager references in
mmkernels.reference.

Valid inputs: random shapes (empty and size-1 dimensions included), dtypes and
layouts (non-contiguous, transposed, expanded, permuted storage) with NaN/Inf
sprinkled in; every output and gradient is checked bitwise against the reference in
the same dtype (the ops move whole rows, so they are exact) and with the tolerance
table against the float64 reference. Invalid inputs: each raises the documented
exception naming the argument. Element counts past 2^31 use expanded or meta tensors.
"""

import math

import pytest
import torch
from _fuzz import examples
from hypothesis import given, settings
from hypothesis import strategies as st

import mmkernels
from mmkernels import _extension, reference
from mmkernels.testing import assert_close_to_reference

pytestmark = pytest.mark.skipif(not _extension.is_available(),
                                reason="mmkernels._C is not built")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ROW_LAYOUTS = ["contiguous", "sliced", "transposed", "expanded-N", "expanded-B",
               "permuted-storage"]
INDEX_LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]


def _values(shape, seed, specials):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    if specials and t.numel():
        flat = t.view(-1)
        picks = torch.randint(0, flat.numel(), (3,), generator=gen)
        flat[picks] = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)
    return t


def make_rows(B, N, D, dtype, layout, seed, specials=False):
    """A (B, N, D) tensor of the given dtype in the given memory layout."""
    if layout == "sliced":
        t = _values((B, 2 * N, D + 1), seed, specials)[:, ::2, 1:]
    elif layout == "transposed":
        t = _values((B, D, N), seed, specials).transpose(1, 2)
    elif layout == "expanded-N":
        t = _values((B, 1, D), seed, specials).expand(B, N, D)
    elif layout == "expanded-B":
        t = _values((1, N, D), seed, specials).expand(B, N, D)
    elif layout == "permuted-storage":
        t = _values((N, D, B), seed, specials).permute(2, 0, 1)
    else:
        t = _values((B, N, D), seed, specials)
    return t.to(dtype)


def index_layout(t, layout):
    """The same (B, N) values (any dtype) in another layout; "expanded" keeps row 0."""
    B, N = t.shape
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "sliced":
        big = torch.zeros((B, 2 * N + 1), dtype=t.dtype)
        big[:, 1::2] = t
        return big[:, 1::2]
    if layout == "expanded":
        return t[:1].expand(B, N) if B else t
    return t


def check(out, ref_same_dtype, ref64, what):
    """Exact against the same-dtype reference, and within the table against float64."""
    assert out.dtype == ref_same_dtype.dtype and out.shape == ref_same_dtype.shape, what
    assert torch.equal(out.isnan(), ref_same_dtype.isnan()), what
    assert torch.equal(out.nan_to_num(), ref_same_dtype.nan_to_num()), what
    eager = ref_same_dtype if out.dtype in (torch.float16, torch.bfloat16) else None
    assert_close_to_reference(out, ref64, eager_lowp=eager, what=what)


def random_mask(B, N, density, layout, seed):
    """(mask, the same values in ``layout``): a (B, N) bool mask of the given density
    ("expanded": every row equal to the first, as an expanded mask would be)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, N, generator=gen) < density
    if layout == "expanded" and B:
        mask = mask[:1].expand(B, N).contiguous()
    return mask, index_layout(mask, layout)


def check_input_grad(out, ref, x, seed):
    """The gradient reaching x through out equals the reference's, bitwise."""
    if out.numel():
        g = _values(out.shape, seed + 2, False).to(out.dtype)
        (gx,) = torch.autograd.grad(out, x, g)
        (rx,) = torch.autograd.grad(ref, x, g)
        assert torch.equal(gx, rx)


dims = st.integers(0, 5)
dtypes = st.sampled_from(DTYPES)
seeds = st.integers(0, 2**31 - 1)


# ---------------------------------------------------------------------------------
# valid inputs
# ---------------------------------------------------------------------------------

@settings(max_examples=examples(200))
@given(B=dims, N=st.integers(0, 40), D=dims, dtype=dtypes, layout=st.sampled_from(ROW_LAYOUTS),
       ratio=st.one_of(st.sampled_from([0.0, 0.5, 0.75, 0.999999]),
                       st.floats(0.0, 1.0, exclude_max=True)),
       noise_dtype=dtypes, noise_layout=st.sampled_from(INDEX_LAYOUTS),
       noise_kind=st.sampled_from(["uniform", "ties", "nan"]), specials=st.booleans(),
       seed=seeds)
def test_fuzz_random_masking_valid(B, N, D, dtype, layout, ratio, noise_dtype, noise_layout,
                                   noise_kind, specials, seed):
    x = make_rows(B, N, D, dtype, layout, seed, specials).requires_grad_()
    gen = torch.Generator().manual_seed(seed + 1)
    noise = torch.rand(B, N, generator=gen)
    if noise_kind == "ties":
        noise = (noise * 3).floor()
    elif noise_kind == "nan" and noise.numel():
        noise.view(-1)[torch.randint(0, noise.numel(), (2,), generator=gen)] = math.nan
    noise = index_layout(noise.to(noise_dtype), noise_layout)
    n_keep = int(N * (1 - ratio))
    kept, mask, ids = mmkernels.random_masking(x, ratio, noise=noise)
    r_kept, r_mask, r_ids = reference.random_masking(x, n_keep, noise)
    r64 = reference.random_masking(x.detach().double(), n_keep, noise)
    check(kept, r_kept, r64[0], "x_kept")
    assert torch.equal(mask, r_mask) and torch.equal(ids, r_ids)
    check_input_grad(kept, r_kept, x, seed)


@settings(max_examples=examples(200))
@given(B=dims, N=st.integers(0, 30), keep_frac=st.floats(0.0, 1.0), D=dims, dtype=dtypes,
       layout=st.sampled_from(ROW_LAYOUTS), ids_layout=st.sampled_from(INDEX_LAYOUTS),
       token_shape=st.sampled_from(["D", "11D", "strided"]), specials=st.booleans(),
       seed=seeds)
def test_fuzz_restore_tokens_valid(B, N, keep_frac, D, dtype, layout, ids_layout, token_shape,
                                   specials, seed):
    K = int(N * keep_frac)
    x_kept = make_rows(B, K, D, dtype, layout, seed, specials).requires_grad_()
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.argsort(torch.rand(B, N, generator=gen), 1)
    if ids_layout == "expanded" and B:
        ids = ids[:1].expand(B, N).contiguous()
    ids_odd = index_layout(ids, ids_layout)
    tok = _values((2 * D,), seed + 3, specials).to(dtype)
    token = {"D": tok[:D], "11D": tok[:D].reshape(1, 1, D), "strided": tok[::2]}[token_shape]
    token = token.detach().requires_grad_()
    out = mmkernels.restore_tokens(x_kept, ids_odd, token)
    ref = reference.restore_tokens(x_kept, ids, token)
    ref64 = reference.restore_tokens(x_kept.detach().double(), ids, token.detach().double())
    check(out, ref, ref64, "restore_tokens")
    if out.numel():
        g = _values(out.shape, seed + 4, specials).to(dtype)
        gk, gt = torch.autograd.grad(out, (x_kept, token), g)
        rk, rt = torch.autograd.grad(ref, (x_kept, token), g)
        assert torch.equal(gk.nan_to_num(), rk.nan_to_num())
        assert torch.equal(gk.isnan(), rk.isnan())
        # the mask token's gradient: the sum of the filled rows only (kept rows skipped)
        filled = (ids >= K)[..., None]
        exact = g.double().masked_fill(~filled, 0).sum((0, 1)).view(token.shape)
        eager = rt if dtype in (torch.float16, torch.bfloat16) else None
        assert_close_to_reference(gt, exact, eager_lowp=eager, what="grad mask_token")


@settings(max_examples=examples(200))
@given(B=dims, N=st.integers(0, 30), D=dims, dtype=dtypes, layout=st.sampled_from(ROW_LAYOUTS),
       mask_layout=st.sampled_from(INDEX_LAYOUTS), density=st.sampled_from([0.0, 0.3, 1.0]),
       pad=st.one_of(st.none(), st.integers(0, 5)), specials=st.booleans(), seed=seeds)
def test_fuzz_masked_select_rows_valid(B, N, D, dtype, layout, mask_layout, density, pad,
                                       specials, seed):
    x = make_rows(B, N, D, dtype, layout, seed, specials).requires_grad_()
    mask, mask_odd = random_mask(B, N, density, mask_layout, seed + 1)
    max_rows = None if pad is None else int(mask.sum()) + pad
    rows, index = mmkernels.masked_select_rows(x, mask_odd, max_rows)
    r_rows, r_index = reference.masked_select_rows(x, mask, max_rows)
    r64, _ = reference.masked_select_rows(x.detach().double(), mask, max_rows)
    check(rows, r_rows, r64, "rows")
    assert torch.equal(index, r_index)
    check_input_grad(rows, r_rows, x, seed)


@settings(max_examples=examples(200))
@given(B=dims, L=st.integers(0, 30), D=dims, dtype=dtypes, layout=st.sampled_from(ROW_LAYOUTS),
       mask_layout=st.sampled_from(INDEX_LAYOUTS), density=st.sampled_from([0.0, 0.3, 1.0]),
       feats_form=st.sampled_from(["flat", "per-image", "transposed", "other-dtype"]),
       surplus=st.integers(-3, 3), check_count=st.booleans(), specials=st.booleans(),
       seed=seeds)
def test_fuzz_scatter_image_features_valid(B, L, D, dtype, layout, mask_layout, density,
                                           feats_form, surplus, check_count, specials, seed):
    embeds = make_rows(B, L, D, dtype, layout, seed, specials).requires_grad_()
    mask, mask_odd = random_mask(B, L, density, mask_layout, seed + 1)
    n = int(mask.sum())
    T = n if check_count else max(n + surplus, 0)
    f64 = _values((T, D), seed + 2, specials)
    if feats_form == "per-image" and T % 2 == 0:
        feats = f64.to(dtype).reshape(2, T // 2, D)
    elif feats_form == "transposed":
        feats = f64.t().contiguous().t().to(dtype)
    elif feats_form == "other-dtype":  # cast to inputs_embeds' dtype, as HF does
        feats = f64.to(torch.float64 if dtype != torch.float64 else torch.float32)
    else:
        feats = f64.to(dtype)
    feats = feats.detach().requires_grad_()
    out = mmkernels.scatter_image_features(embeds, mask_odd, feats, check_count=check_count)
    flat_feats = feats.reshape(T, D)
    ref = reference.scatter_image_features(embeds, mask, flat_feats, check_count=check_count)
    ref64 = reference.scatter_image_features(embeds.detach().double(), mask,
                                             flat_feats.detach().to(dtype).double(),
                                             check_count=check_count)
    check(out, ref, ref64, "scatter_image_features")
    if out.numel():
        g = _values(out.shape, seed + 3, False).to(dtype)
        ge, gf = torch.autograd.grad(out, (embeds, feats), g)
        re, rf = torch.autograd.grad(ref, (embeds, feats), g, allow_unused=True)
        assert torch.equal(ge, re)
        assert torch.equal(gf, rf if rf is not None else torch.zeros_like(feats))


# ---------------------------------------------------------------------------------
# element counts past 2^31: expanded inputs (the ops read them through strides) and
# meta tensors (shapes only); nothing large is allocated
# ---------------------------------------------------------------------------------

def test_fuzz_past_int32_expanded_inputs():
    B, N, D = 2, 2**21, 2**10  # 2^32 elements, from one stored row per batch
    base = torch.randn(B, 1, D)
    x = base.expand(B, N, D)
    assert x.numel() > 2**31
    noise = torch.rand(B, N)
    kept, mask, ids = mmkernels.random_masking(x, 1 - 1.5 / N, noise=noise)
    assert kept.shape == (B, 1, D) and torch.equal(kept, base)
    assert torch.equal(ids, torch.argsort(torch.argsort(noise, dim=1, stable=True), dim=1, stable=True))
    sel = torch.zeros(B, N, dtype=torch.bool)
    sel[1, N - 1] = sel[0, 5] = True
    rows, index = mmkernels.masked_select_rows(x, sel)
    assert torch.equal(rows, base[:, 0]) and index.tolist() == [5, 2 * N - 1]
    rows, index = mmkernels.masked_select_rows(x, sel, max_rows=3)
    assert torch.equal(rows[:2], base[:, 0]) and index.tolist() == [5, 2 * N - 1, -1]


@settings(max_examples=examples(10))
@given(scale=st.integers(31, 40))
def test_fuzz_past_int32_meta_shapes(scale):
    ops = torch.ops.mmkernels
    meta = torch.device("meta")
    B, N = 4, 2**(scale - 12)
    D = 2**12 // 4
    x = torch.empty(B, N, D, device=meta)
    kept, mask, ids, keep = ops.random_masking(x, torch.empty(B, N, device=meta), 3)
    assert kept.shape == (B, 3, D) and ids.shape == (B, N) and keep.shape == (B, 3)
    ids = torch.empty(B, N, dtype=torch.long, device=meta)
    assert ops.restore_tokens(kept, ids, None).shape == (B, N, D)
    gk, gt = ops._restore_tokens_backward(x, ids, 3)
    assert gk.shape == (B, 3, D) and gt.shape == (D,)
    m = torch.empty(B, N, dtype=torch.bool, device=meta)
    assert ops.masked_select_rows(x, m, 9)[0].shape == (9, D)
    assert ops.scatter_image_features(x, m, torch.empty(7, D, device=meta), False).shape == x.shape


# ---------------------------------------------------------------------------------
# invalid inputs: the documented exception, naming the argument
# ---------------------------------------------------------------------------------

@settings(max_examples=examples(100))
@given(kind=st.sampled_from(["ratio-range", "ratio-nan", "ratio-type", "x-dims", "x-dtype",
                             "x-type", "noise-shape", "noise-dtype", "noise-type",
                             "noise-device"]),
       bad_ratio=st.one_of(st.floats(1.0, 1e30), st.floats(-1e30, -1e-9),
                           st.sampled_from([math.inf, -math.inf, 1.0])),
       B=st.integers(1, 3), N=st.integers(1, 8), D=st.integers(1, 4))
def test_fuzz_random_masking_invalid(kind, bad_ratio, B, N, D):
    x, ratio, noise = torch.randn(B, N, D), 0.5, None
    exc, match = ValueError, "mask_ratio"
    if kind == "ratio-range":
        ratio = bad_ratio
    elif kind == "ratio-nan":
        ratio = math.nan
    elif kind == "ratio-type":
        ratio, exc = [True, "0.5", torch.tensor(0.5), None][N % 4], TypeError
    elif kind == "x-dims":
        x, match = torch.randn(*([B, N, D, 1][: (N % 2) * 2 + 2])), "x"
    elif kind == "x-dtype":
        x, exc, match = x.to([torch.int64, torch.bool, torch.complex64][N % 3]), TypeError, "x"
    elif kind == "x-type":
        x, exc, match = x.tolist(), TypeError, "x"
    elif kind == "noise-shape":
        noise, match = torch.rand(B, N + 1 + D % 2), "noise"
    elif kind == "noise-dtype":
        noise, exc, match = torch.ones(B, N, dtype=torch.int64), TypeError, "noise"
    elif kind == "noise-device":
        noise, match = torch.empty(B, N, device="meta"), "noise"
    else:
        noise, exc, match = [[0.5] * N] * B, TypeError, "noise"
    with pytest.raises(exc, match=match):
        mmkernels.random_masking(x, ratio, noise=noise)


@settings(max_examples=examples(100))
@given(kind=st.sampled_from(["ids-high", "ids-negative", "ids-dtype", "ids-shape", "ids-batch",
                             "ids-short", "ids-device", "token-size", "token-dtype", "x-dims",
                             "not-permutation-backward"]),
       B=st.integers(1, 3), N=st.integers(2, 10), D=st.integers(1, 4), seed=seeds)
def test_fuzz_restore_tokens_invalid(kind, B, N, D, seed):
    gen = torch.Generator().manual_seed(seed)
    K = N // 2
    x_kept = torch.randn(B, K, D, requires_grad=True)
    ids = torch.argsort(torch.rand(B, N, generator=gen), 1)
    token = torch.randn(D)
    exc, match = ValueError, "ids_restore"
    b, j = seed % B, seed % N
    if kind == "ids-high":
        ids[b, j] = N + seed % 1000
    elif kind == "ids-negative":
        ids[b, j] = -1 - seed % 1000
    elif kind == "ids-dtype":
        ids, exc = ids.to([torch.int32, torch.float32, torch.int16][seed % 3]), TypeError
    elif kind == "ids-shape":
        ids = ids.reshape(-1)
    elif kind == "ids-batch":
        ids = torch.cat([ids, ids])
    elif kind == "ids-short":
        ids = ids[:, : K - 1] if K >= 1 else ids[:, :0]
        x_kept = torch.randn(B, max(K, 1), D)
    elif kind == "ids-device":
        ids = ids.to("meta")
    elif kind == "token-size":
        token, match = torch.randn(D + 1), "mask_token"
    elif kind == "token-dtype":
        token, exc, match = token.double(), TypeError, "mask_token"
    elif kind == "x-dims":
        x_kept, match = torch.randn(B, K), "x_kept"
    else:  # a repeated index is fine for the gather, not for its backward
        ids[b, (j + 1) % N] = ids[b, j]
        with pytest.raises(ValueError, match="ids_restore"):
            mmkernels.restore_tokens(x_kept, ids, token).sum().backward()
        return
    with pytest.raises(exc, match=match):
        mmkernels.restore_tokens(x_kept, ids, token)


@settings(max_examples=examples(100))
@given(kind=st.sampled_from(["mask-shape", "mask-dtype", "mask-type", "x-dims",
                             "max-rows-negative", "max-rows-type", "max-rows-overflow"]),
       B=st.integers(1, 3), N=st.integers(1, 8), D=st.integers(1, 4))
def test_fuzz_masked_select_rows_invalid(kind, B, N, D):
    x = torch.randn(B, N, D)
    mask = torch.ones(B, N, dtype=torch.bool)
    max_rows, exc, match = None, ValueError, "mask"
    if kind == "mask-shape":
        mask = torch.ones(B, N + 1, dtype=torch.bool)
    elif kind == "mask-dtype":
        mask, exc = mask.to([torch.uint8, torch.float32, torch.int64][N % 3]), TypeError
    elif kind == "mask-type":
        mask, exc = mask.tolist(), TypeError
    elif kind == "x-dims":
        x, match = torch.randn(B, N), "x"
    elif kind == "max-rows-negative":
        max_rows, match = -1 - D, "max_rows"
    elif kind == "max-rows-type":
        max_rows, match = [True, 2.0, "3"][N % 3], "max_rows"
    else:
        max_rows, match = B * N - 1, "max_rows"
    with pytest.raises(exc, match=match):
        mmkernels.masked_select_rows(x, mask, max_rows)


@settings(max_examples=examples(100))
@given(kind=st.sampled_from(["count", "count-raw", "feats-dim", "feats-rank", "mask-shape",
                             "mask-dtype", "check-type"]),
       B=st.integers(1, 3), L=st.integers(1, 12), D=st.integers(1, 4),
       off=st.integers(1, 5), sign=st.sampled_from([-1, 1]), seed=seeds)
def test_fuzz_scatter_image_features_invalid(kind, B, L, D, off, sign, seed):
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(B, L, D)
    mask = torch.rand(B, L, generator=gen) < 0.5
    n = int(mask.sum())
    feats = torch.randn(n, D)
    kwargs = {}
    exc, match = ValueError, "image_features"
    if kind in ("count", "count-raw"):  # HF's ValueError, on the functional API and the op
        T = n + off if sign > 0 or n < off else n - off
        feats = torch.randn(T, D)
        match = f"tokens: {n}, features {T} .*image_mask"
        if kind == "count-raw":
            with pytest.raises(ValueError, match=match):
                torch.ops.mmkernels.scatter_image_features(embeds, mask, feats)
            return
    elif kind == "feats-dim":
        feats = torch.randn(n, D + off)
    elif kind == "feats-rank":
        feats = torch.randn(n * D) if off % 2 else torch.randn(1, 1, n, D)
    elif kind == "mask-shape":
        mask, match = torch.ones(B, L + off, dtype=torch.bool), "image_mask"
    elif kind == "mask-dtype":
        mask, exc, match = mask.to(torch.uint8), TypeError, "image_mask"
    else:
        kwargs, exc, match = {"check_count": [1, None, "yes"][off % 3]}, TypeError, "check_count"
    with pytest.raises(exc, match=match):
        mmkernels.scatter_image_features(embeds, mask, feats, **kwargs)
