"""Property-based fuzzing of the RoIAlign family (roi_align, region_features,
multiscale_roi_align, nn.RoIAlign, nn.RegionFeatures).

Valid inputs: random shapes (H = 1, W = 1, C = 0, K = 0 included), dtypes, layouts
(contiguous, channels_last, sliced, permuted storage, expanded with stride 0, size-1
dimensions with arbitrary strides), boxes (inside, partly and wholly off the map,
degenerate, inverted, huge, non-finite), sampling ratios and NaN/Inf features, checked
against the float64 eager reference in mmkernels.reference with the one tolerance table
(mmkernels.testing), forward and backward; multiscale against torchvision's
MultiScaleRoIAlign. Invalid inputs: each raises the documented exception type, and the
message names the argument. Element counts past 2^31: fake and meta tensors only.
"""

import math

import pytest
import torch
import torchvision
from _fuzz import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import mmkernels
from mmkernels import _extension, reference
from mmkernels.ops.roi_align import MAX_SAMPLING_RATIO
from mmkernels.testing import LOWP_DTYPES, assert_close_to_reference

pytestmark = pytest.mark.skipif(not _extension.is_available(),
                                reason="mmkernels._C is not built")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "sliced", "permuted-storage", "expanded-N",
           "expanded-C", "size1-odd-strides"]
SCALES = [1.0, 0.5, 0.25, 1 / 16, 0.3]
SAMPLING = [-1, 0, 1, 2, 3]


def _with_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """The same (N, C, H, W) values in another memory layout; "expanded-*" keeps
    batch element / channel 0 and repeats it with stride 0."""
    n, c, h, w = values.shape
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        big = torch.zeros((n, 2 * c, h, w + 2), dtype=values.dtype)
        big[:, ::2, :, 1:w + 1] = values
        return big[:, ::2, :, 1:w + 1]
    if layout == "permuted-storage":  # (H, N, W, C) memory
        return values.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2)
    if layout == "expanded-N":
        return values[:1].expand(n, c, h, w)
    if layout == "expanded-C":
        return values[:, :1].expand(n, c, h, w)
    if layout == "size1-odd-strides":  # dense NCHW, size-1 dims with stride 12345
        stride, acc = [0] * 4, 1
        for d in (3, 2, 1, 0):
            stride[d] = acc if values.shape[d] > 1 else 12345
            acc *= values.shape[d]
        t = torch.empty(values.numel(), dtype=values.dtype).as_strided(values.shape, stride)
        return t.copy_(values)
    return values


BOX_KINDS = ["inside", "inside", "partly-off", "off", "degenerate", "inverted", "huge",
             "nonfinite"]


@st.composite
def boxes_strategy(draw, n, h, w, scale, kinds=tuple(BOX_KINDS)):
    """(K, 5) float64 boxes in image coordinates (feature map = image * scale)."""
    k = draw(st.integers(0, 6))
    rows = []
    for _ in range(k):
        kind = draw(st.sampled_from(kinds))
        fx = draw(st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4))
        x1, y1 = fx[0] * w, fx[1] * h
        x2, y2 = x1 + fx[2] * w, y1 + fx[3] * h
        if kind == "partly-off":
            x1, y1, x2, y2 = x1 - w, y1 - h / 2, x2 + 0.5, y2 + h
        elif kind == "off":
            x1, y1, x2, y2 = x1 + 2 * w, y1 + 2 * h, x2 + 3 * w, y2 + 3 * h
        elif kind == "degenerate":
            x2, y2 = x1, y1
        elif kind == "inverted":
            x1, x2 = x2 + 1, x1
        elif kind == "huge":
            x1, y1, x2, y2 = -1e6 * w, y1, 1e6 * w, y2 + draw(st.sampled_from([0.0, 1e7]))
        elif kind == "nonfinite":
            bad = draw(st.sampled_from([math.inf, -math.inf, math.nan]))
            coords = [x1, y1, x2, y2]
            coords[draw(st.integers(0, 3))] = bad
            x1, y1, x2, y2 = coords
        rows.append([float(draw(st.integers(0, n - 1))), x1 / scale, y1 / scale, x2 / scale,
                     y2 / scale])
    return torch.tensor(rows, dtype=torch.float64).reshape(k, 5)


def _specials(x: torch.Tensor, which: str, seed: int) -> torch.Tensor:
    """NaN or +-Inf at a few random pixels (never pixel (0, 0) of a plane, which
    torchvision's CPU kernel reads for samples off the map)."""
    if which == "none" or x.numel() == 0:
        return x
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = x.shape
    for _ in range(3):
        i = [int(torch.randint(0, s, (1,), generator=gen)) for s in (n, c, h, w)]
        if i[2] == 0 and i[3] == 0:
            continue
        x[i[0], i[1], i[2], i[3]] = math.nan if which == "nan" else (
            math.inf if int(torch.randint(0, 2, (1,), generator=gen)) else -math.inf)
    return x


def _compare(out, ref64, eager, specials, what):
    if specials == "inf":
        # +-Inf read with a zero weight is NaN in the kernels (torchvision's rule) and
        # +-Inf in the reference: compare which entries are finite, and those values.
        assert torch.equal(torch.isfinite(out), torch.isfinite(ref64)), what
        fin = torch.isfinite(ref64)
        out, ref64 = out[fin], ref64[fin]
        eager = eager[fin] if eager is not None else None
    assert_close_to_reference(out, ref64, eager_lowp=eager, what=what)


def _grad_or_zeros(out, x, g):
    """The reference's gradient (zero when no output depends on x: every box empty)."""
    if not out.requires_grad:
        return torch.zeros_like(x)
    return torch.autograd.grad(out, x, g)[0]


@settings(max_examples=examples(200))
@given(data=st.data(),
       op=st.sampled_from(["roi_align", "region_features", "nn.RoIAlign", "nn.RegionFeatures"]),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       n=st.integers(1, 3), c=st.sampled_from([0, 1, 3, 5]), h=st.integers(1, 11),
       w=st.integers(1, 11), ph=st.integers(1, 4), pw=st.integers(1, 4),
       scale=st.sampled_from(SCALES), sampling_ratio=st.sampled_from(SAMPLING),
       aligned=st.booleans(), specials=st.sampled_from(["none", "none", "nan", "inf"]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_fuzz_valid_inputs_match_reference(data, op, dtype, layout, n, c, h, w, ph, pw, scale,
                                           sampling_ratio, aligned, specials, seed):
    boxes = data.draw(boxes_strategy(n, h, w, scale), label="boxes")
    gen = torch.Generator().manual_seed(seed)
    values = _specials(torch.randn((n, c, h, w), generator=gen, dtype=torch.float64),
                       specials, seed)
    x = _with_layout(values.to(dtype), layout).requires_grad_()
    # the reference sees exactly the values the kernel sees (rounded, expanded)
    x64 = x.detach().double().contiguous()
    rois = boxes.to(dtype)
    rois64 = rois.double()
    if op.startswith("nn."):
        module = getattr(mmkernels.nn, op[3:])((ph, pw), scale, sampling_ratio, aligned)
        out = module(x, rois)
        fn = "roi_align" if op == "nn.RoIAlign" else "region_features"
    else:
        fn = op
        out = getattr(mmkernels, fn)(x, rois, (ph, pw), scale, sampling_ratio, aligned)
    # the geometry in the kernel's accumulation dtype (see reference.roi_align)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def ref_fn(*args):
        return getattr(reference, fn)(*args, geometry_dtype=acc)

    x64 = x64.requires_grad_()
    ref = ref_fn(x64, rois64, (ph, pw), scale, sampling_ratio, aligned)
    assert out.dtype == dtype and out.shape == ref.shape
    eager = xl = None
    if dtype in LOWP_DTYPES:
        xl = x64.detach().to(dtype).requires_grad_()
        eager = ref_fn(xl, rois, (ph, pw), scale, sampling_ratio, aligned)
    _compare(out, ref.detach(), None if eager is None else eager.detach(), specials,
             f"{fn} {dtype} {layout} forward")
    # a non-finite box gives a NaN row at once (and nothing else does, on finite data)
    bad_box = ~torch.isfinite(rois.to(acc)[:, 1:]).all(1)
    if out.numel():
        assert out[bad_box].isnan().all()
    if specials != "none" or not out.numel():
        return
    # backward on finite data: NaN rows carry no gradient
    g64 = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(dtype).double()
    (gx,) = torch.autograd.grad(out, x, g64.to(dtype))
    gref = _grad_or_zeros(ref, x64, g64)
    geager = None if eager is None else _grad_or_zeros(eager, xl, g64.to(dtype))
    assert gx.shape == x.shape and gx.dtype == dtype
    _compare(gx, gref, geager, "none", f"{fn} {dtype} {layout} grad_input")


@settings(max_examples=examples(50))
@given(data=st.data(), num_levels=st.integers(1, 4), dtype=st.sampled_from([torch.float32,
                                                                           torch.float64]),
       layout=st.sampled_from(["contiguous", "channels_last", "sliced"]),
       sampling_ratio=st.sampled_from(SAMPLING), c=st.integers(1, 3),
       seed=st.integers(0, 2 ** 31 - 1))
def test_fuzz_multiscale_matches_torchvision(data, num_levels, dtype, layout, sampling_ratio, c,
                                             seed):
    gen = torch.Generator().manual_seed(seed)
    image_sizes = [(data.draw(st.integers(40, 128)), data.draw(st.integers(40, 128)))
                   for _ in range(2)]
    max_h = max(s[0] for s in image_sizes)
    max_w = max(s[1] for s in image_sizes)
    names = [f"p{i}" for i in range(2, 2 + num_levels)]
    feats = {name: _with_layout(torch.randn(2, c, max(max_h // 2 ** (i + 2), 1),
                                            max(max_w // 2 ** (i + 2), 1), generator=gen,
                                            dtype=torch.float64).to(dtype), layout)
             for i, name in enumerate(names)}
    boxes = []
    for h, w in image_sizes:
        # no huge boxes: torchvision's adaptive grid would take minutes on them
        b = data.draw(boxes_strategy(1, h, w, 1.0, kinds=("inside", "partly-off", "off",
                                                          "degenerate", "inverted")),
                      label="boxes")
        boxes.append(b[:, 1:].to(dtype))
    pooler = torchvision.ops.MultiScaleRoIAlign(names, (3, 2), sampling_ratio)
    theirs_in = {k: v.detach().clone().requires_grad_() for k, v in feats.items()}
    ours_in = {k: v.detach().clone().requires_grad_() for k, v in feats.items()}
    theirs = pooler({k: v.contiguous() for k, v in theirs_in.items()}, boxes, image_sizes)
    ours = mmkernels.multiscale_roi_align(ours_in, boxes, image_sizes, (3, 2), sampling_ratio)
    assert_close_to_reference(ours, theirs.double(), what="multiscale forward")
    if ours.numel():
        g = torch.randn(ours.shape, generator=gen, dtype=torch.float64).to(dtype)
        ours.backward(g)
        theirs.backward(g)
        for k in names:
            assert_close_to_reference(ours_in[k].grad, theirs_in[k].grad.double(),
                                      what=f"multiscale grad {k}")


def _invalid_cases():
    x = torch.randn(2, 3, 8, 8)
    r = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0], [1, 0.0, 0.0, 3.0, 2.0]])
    ra, rf = mmkernels.roi_align, mmkernels.region_features
    ms = mmkernels.multiscale_roi_align
    bad_index = [2.0, -1.0, math.nan, math.inf, 1e30, -0.5]
    cases = []
    for fn in (ra, rf):
        name = fn.__name__
        for v in bad_index:
            rr = r.clone()
            rr[1, 0] = v
            cases.append((f"{name}-batch-index-{v}", lambda fn=fn, rr=rr: fn(x, rr, 2),
                          RuntimeError, r"boxes\[1, 0\].*batch index"))
        for sr, exc in ((-2, ValueError), (MAX_SAMPLING_RATIO + 1, ValueError),
                        (2 ** 63 - 1, ValueError), (1.0, TypeError), (None, TypeError),
                        (False, TypeError)):
            cases.append((f"{name}-sampling_ratio-{sr}",
                          lambda fn=fn, sr=sr: fn(x, r, 2, 1.0, sr), exc, r"sampling_ratio"))
        for size, exc in ((0, ValueError), ((2, 0), ValueError), ((2, -3), ValueError),
                          (2 ** 31, ValueError), ((1, 2, 3), TypeError), (2.5, TypeError),
                          (None, TypeError)):
            cases.append((f"{name}-output_size-{size}",
                          lambda fn=fn, size=size: fn(x, r, size), exc, r"output_size"))
        cases += [
            (f"{name}-boxes-shape", lambda fn=fn: fn(x, r[:, :4], 2), ValueError, r"boxes"),
            (f"{name}-boxes-1d", lambda fn=fn: fn(x, r[0], 2), ValueError, r"boxes"),
            (f"{name}-boxes-list-shape", lambda fn=fn: fn(x, [r[:, :3]], 2), ValueError,
             r"boxes\[0\]"),
            (f"{name}-boxes-list-item", lambda fn=fn: fn(x, [r[:, 1:], "b"], 2), TypeError,
             r"boxes\[1\]"),
            (f"{name}-boxes-type", lambda fn=fn: fn(x, "boxes", 2), TypeError, r"boxes"),
            (f"{name}-boxes-dtype", lambda fn=fn: fn(x, r.double(), 2), TypeError, r"dtype"),
            (f"{name}-input-3d", lambda fn=fn: fn(x[0], r, 2), ValueError, r"input"),
            (f"{name}-input-type", lambda fn=fn: fn(x.numpy(), r, 2), TypeError, r"input"),
            (f"{name}-input-int", lambda fn=fn: fn(x.long(), r, 2), TypeError, r"input dtype"),
            (f"{name}-input-empty-map", lambda fn=fn: fn(x[:, :, :0], r, 2), RuntimeError,
             r"height and width"),
        ]
    feats = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    boxes = [r[:1, 1:], r[1:, 1:]]
    cases += [
        ("multiscale-features-empty", lambda: ms([], boxes, [(32, 32)], 2), TypeError,
         r"features"),
        ("multiscale-features-item", lambda: ms([feats[0], feats[1][0]], boxes, [(32, 32)], 2),
         ValueError, r"features\[1\]"),
        ("multiscale-features-dtype", lambda: ms([feats[0], feats[1].double()], boxes,
                                                 [(32, 32)], 2), TypeError,
         r"features\[1\] dtype"),
        ("multiscale-features-channels", lambda: ms([feats[0], feats[1][:, :2]], boxes,
                                                    [(32, 32)], 2), ValueError, r"features\[1\]"),
        ("multiscale-image_sizes", lambda: ms(feats, boxes, [], 2), ValueError, r"image_sizes"),
        ("multiscale-sampling_ratio", lambda: ms(feats, boxes, [(32, 32)], 2, -7), ValueError,
         r"sampling_ratio"),
        ("multiscale-batch-index", lambda: ms(feats, torch.tensor([[5.0, 0, 0, 4, 4]]),
                                             [(32, 32)], 2), RuntimeError, r"batch index"),
        ("raw-levels-range", lambda: torch.ops.mmkernels.multiscale_roi_align(
            feats, r, torch.tensor([0, 2]), [0.5, 0.25], 2, 2, 2, False), RuntimeError,
         r"levels must lie"),
        ("raw-levels-dtype", lambda: torch.ops.mmkernels.multiscale_roi_align(
            feats, r, torch.tensor([0, 1], dtype=torch.int32), [0.5, 0.25], 2, 2, 2, False),
         RuntimeError, r"levels must be int64"),
        ("raw-sampling_ratio", lambda: torch.ops.mmkernels.region_features(
            x, r, 1.0, 2, 2, -3, False), RuntimeError, r"sampling_ratio"),
        ("raw-output_size", lambda: torch.ops.mmkernels.roi_align(
            x, r, 1.0, 2 ** 31, 2, 2, False), RuntimeError, r"output_size"),
        ("raw-backward-batch-index", lambda: torch.ops.mmkernels._region_features_backward(
            torch.randn(2, 3), r * torch.tensor([9.0, 1, 1, 1, 1]), 1.0, 2, 2, 2, 3, 8, 8, 2,
            False, False), RuntimeError, r"batch index"),
        ("nn-RoIAlign-output_size", lambda: mmkernels.nn.RoIAlign(0), ValueError,
         r"output_size"),
        ("nn-RoIAlign-sampling_ratio", lambda: mmkernels.nn.RoIAlign(2, 1.0, -5), ValueError,
         r"sampling_ratio"),
        ("nn-RegionFeatures-sampling_ratio", lambda: mmkernels.nn.RegionFeatures(2, 1.0, 0.5),
         TypeError, r"sampling_ratio"),
        ("nn-RegionFeatures-batch-index",
         lambda: mmkernels.nn.RegionFeatures(2)(x, r * torch.tensor([4.0, 1, 1, 1, 1])),
         RuntimeError, r"batch index"),
    ]
    return cases


INVALID = _invalid_cases()


@settings(max_examples=examples(100))
@given(case=st.sampled_from(range(len(INVALID))))
def test_fuzz_invalid_inputs_raise_naming_the_argument(case):
    name, call, exc, match = INVALID[case]
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("case", range(len(INVALID)), ids=[c[0] for c in INVALID])
def test_invalid_cases_each_raise(case):
    """Every class the sampled test above draws from, once each."""
    name, call, exc, match = INVALID[case]
    with pytest.raises(exc, match=match):
        call()


@settings(max_examples=examples(25))
@given(op=st.sampled_from(["roi_align", "region_features"]),
       n=st.sampled_from([1, 2 ** 11]), c=st.sampled_from([2 ** 8, 2 ** 12]),
       hw=st.sampled_from([(2 ** 10, 2 ** 10), (1, 2 ** 30), (2 ** 16, 1)]),
       k=st.sampled_from([0, 3, 2 ** 20]), ph=st.sampled_from([7, 2 ** 10]))
def test_fuzz_past_2_31_elements_fake(op, n, c, hw, k, ph):
    """Shapes whose element count passes 2^31, through the functional API and the
    autograd path with fake tensors (nothing is allocated): no overflow in the
    shape logic, the right output and gradient shapes."""
    with FakeTensorMode():
        x = torch.empty(n, c, *hw, requires_grad=True)
        rois = torch.empty(k, 5)
        out = getattr(mmkernels, op)(x, rois, (ph, 3), 0.25, 2, True)
        expect = (k, c, ph, 3) if op == "roi_align" else (k, c)
        assert tuple(out.shape) == expect
        (gx,) = torch.autograd.grad(out, x, torch.empty(expect))
        assert tuple(gx.shape) == (n, c, *hw)


def test_past_2_31_elements_meta_and_expanded():
    """Meta tensors go through the fake kernels; an expanded CPU input is read
    correctly (the CPU backend copies a stride-0 input once; CUDA reads it in place,
    see test_roi_align.py::test_cuda_offsets_past_2_31)."""
    x = torch.empty(2 ** 11, 2 ** 10, 2 ** 10, 2, device="meta")
    rois = torch.empty(5, 5, device="meta")
    assert torch.ops.mmkernels.roi_align(x, rois, 1.0, 7, 7, 2, False).shape == (5, 2 ** 10, 7, 7)
    assert torch.ops.mmkernels.region_features(x, rois, 1.0, 7, 7, 2, False).shape == (5, 2 ** 10)
    feats = [x, torch.empty(2 ** 11, 2 ** 10, 2 ** 9, 1, device="meta")]
    out = torch.ops.mmkernels.multiscale_roi_align(feats, rois, torch.empty(5, dtype=torch.long,
                                                                            device="meta"),
                                                   [1.0, 0.5], 7, 7, 2, False)
    assert out.shape == (5, 2 ** 10, 7, 7)
    small = torch.randn(1, 3, 6, 7)
    big = small.expand(2 ** 12, 3, 6, 7)
    rois = torch.tensor([[2.0 ** 12 - 1, 1.0, 1.0, 5.0, 4.0]])
    torch.testing.assert_close(mmkernels.region_features(big, rois, 2, 1.0, 2, True),
                               mmkernels.region_features(small, rois * torch.tensor(
                                   [0.0, 1, 1, 1, 1]), 2, 1.0, 2, True))
