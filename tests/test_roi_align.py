"""RoIAlign family: roi_align, region_features, multiscale_roi_align.

Compared with torchvision.ops.roi_align / MultiScaleRoIAlign and with the float64
eager reference in mmkernels.reference; tolerances come from mmkernels.testing.
"""

import math
import time

import pytest
import torch
import torchvision

import mmkernels
from mmkernels import _extension, reference
from mmkernels.ops.roi_align import MAX_SAMPLING_RATIO
from mmkernels.testing import TOLERANCES, assert_close_to_reference

pytestmark = pytest.mark.skipif(not _extension.is_available(),
                                reason="mmkernels._C is not built")

DTYPES_LOWP = [torch.float16, torch.bfloat16]


def make_rois(n_images, height, width, k, scale, dtype=torch.float32, device="cpu",
              awkward=True):
    """Random boxes in image coordinates (feature map = image * scale), with the
    awkward cases mixed in: partly and wholly outside the map, degenerate
    (zero-size and inverted) and sub-pixel boxes."""
    h, w = height / scale, width / scale
    xy = torch.rand(k, 2, dtype=torch.float64) * torch.tensor([w, h]) * 1.2 - 0.1 * torch.tensor([w, h])
    wh = torch.rand(k, 2, dtype=torch.float64) * torch.tensor([w, h]) * 0.6
    boxes = torch.cat([xy, xy + wh], 1)
    if awkward and k >= 6:
        boxes[0] = torch.tensor([-w * 0.5, -h * 0.5, w * 0.3, h * 0.2])   # partly outside
        boxes[1] = torch.tensor([w * 1.5, h * 1.5, w * 2.0, h * 2.0])     # wholly outside
        boxes[2] = torch.tensor([w * 0.4, h * 0.4, w * 0.4, h * 0.4])     # zero size
        boxes[3] = torch.tensor([w * 0.6, h * 0.5, w * 0.2, h * 0.1])     # inverted
        boxes[4] = torch.tensor([w * 0.3, h * 0.3, w * 0.3 + 0.3, h * 0.3 + 0.2])  # sub-pixel
        boxes[5] = torch.tensor([-3.0, -3.0, w + 3.0, h + 3.0])           # covers everything
    idx = torch.randint(0, n_images, (k, 1)).double()
    return torch.cat([idx, boxes], 1).to(dtype=dtype, device=device)


def make_input(shape, dtype=torch.float32, layout="contiguous", device="cpu"):
    n, c, h, w = shape
    if layout == "noncontiguous":
        x = torch.randn(n, c * 2, h, w + 3, dtype=torch.float64)[:, ::2, :, 1:w + 1]
    else:
        x = torch.randn(n, c, h, w, dtype=torch.float64)
    x = x.to(dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


GRID = [
    pytest.param(aligned, sr, scale, id=f"aligned={aligned}-sr={sr}-scale={scale}")
    for aligned in (False, True) for sr in (-1, 0, 2, 3) for scale in (1.0, 0.5, 0.25)
]
LAYOUTS = ["contiguous", "channels_last", "noncontiguous"]


# ---------------------------------------------------------------------------------
# against torchvision (float32/float64): forward and backward
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("aligned,sampling_ratio,spatial_scale", GRID)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_roi_align_matches_torchvision(dtype, aligned, sampling_ratio, spatial_scale, layout):
    x = make_input((2, 5, 13, 17), dtype, layout)
    rois = make_rois(2, 13, 17, 24, spatial_scale, dtype)
    out_size = (3, 4)
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().clone().requires_grad_()
    ours = mmkernels.roi_align(xa, rois, out_size, spatial_scale, sampling_ratio, aligned)
    theirs = torchvision.ops.roi_align(xb, rois, out_size, spatial_scale, sampling_ratio, aligned)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=rtol)
    if layout == "channels_last":
        assert ours.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(ours)
    ours.backward(g)
    theirs.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, atol=atol, rtol=rtol)


def test_roi_align_list_of_boxes_matches_tensor_form():
    x = make_input((3, 4, 12, 12))
    boxes = [make_rois(1, 12, 12, k, 1.0, awkward=False)[:, 1:] for k in (3, 0, 5)]
    ours = mmkernels.roi_align(x, boxes, 2, 1.0, 2, True)
    theirs = torchvision.ops.roi_align(x, boxes, 2, 1.0, 2, True)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=rtol)
    assert ours.shape == (8, 4, 2, 2)


# ---------------------------------------------------------------------------------
# against the float64 eager reference, every dtype
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["roi_align", "region_features"])
@pytest.mark.parametrize("aligned,sampling_ratio", [(False, -1), (True, 2), (True, 0)],
                         ids=["legacy-adaptive", "aligned-sr2", "aligned-adaptive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_against_float64_reference(op, dtype, aligned, sampling_ratio):
    scale = 0.5
    x64 = make_input((2, 6, 11, 15), torch.float64).requires_grad_()
    rois64 = make_rois(2, 11, 15, 16, scale, torch.float64)
    # round the inputs to the tested dtype first, so the reference sees the same data
    x64 = x64.detach().to(dtype).double().requires_grad_()
    rois64 = rois64.to(dtype).double()
    ours_fn = getattr(mmkernels, op)
    ref_fn = getattr(reference, op)
    x = x64.detach().to(dtype).requires_grad_()
    out = ours_fn(x, rois64.to(dtype), (3, 3), scale, sampling_ratio, aligned)
    ref = ref_fn(x64, rois64, (3, 3), scale, sampling_ratio, aligned)
    g64 = torch.randn_like(ref)
    out.backward(g64.to(dtype))
    ref.backward(g64)
    eager_out = eager_grad = None
    if dtype in DTYPES_LOWP:
        xl = x64.detach().to(dtype).requires_grad_()
        eager_out = ref_fn(xl, rois64.to(dtype), (3, 3), scale, sampling_ratio, aligned)
        eager_out.backward(g64.to(dtype))
        eager_grad = xl.grad
    assert out.dtype == dtype and x.grad.dtype == dtype
    assert_close_to_reference(out, ref, eager_lowp=eager_out, what=f"{op} forward")
    assert_close_to_reference(x.grad, x64.grad, eager_lowp=eager_grad, what=f"{op} grad_input")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("aligned,sampling_ratio", [(False, -1), (True, 2)],
                         ids=["legacy-adaptive", "aligned-sr2"])
def test_region_features_equals_roi_align_mean(aligned, sampling_ratio, layout):
    x = make_input((2, 7, 10, 14), torch.float64, layout).requires_grad_()
    rois = make_rois(2, 10, 14, 20, 0.5, torch.float64)
    feats = mmkernels.region_features(x, rois, (4, 3), 0.5, sampling_ratio, aligned)
    pooled = mmkernels.roi_align(x, rois, (4, 3), 0.5, sampling_ratio, aligned).mean((2, 3))
    assert feats.shape == (20, 7)
    assert_close_to_reference(feats, pooled, tol="float64_reordered")
    g = torch.randn_like(feats)
    (ga,) = torch.autograd.grad(feats, x, g)
    (gb,) = torch.autograd.grad(pooled, x, g)
    assert_close_to_reference(ga, gb, tol="float64_reordered")


# ---------------------------------------------------------------------------------
# multi-scale (FPN) against torchvision.ops.MultiScaleRoIAlign
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("num_levels", [1, 4])
def test_multiscale_matches_torchvision(num_levels, sampling_ratio):
    image_sizes = [(120, 100), (128, 96)]
    names = [f"p{i}" for i in range(2, 2 + num_levels)]
    feats = {name: torch.randn(2, 3, 128 // 2 ** (i + 2), 100 // 2 ** (i + 2) + 1,
                               dtype=torch.float64)
             for i, name in enumerate(names)}
    boxes = []
    for h, w in image_sizes:
        xy = torch.rand(9, 2, dtype=torch.float64) * torch.tensor([w, h]) * 0.8
        wh = torch.rand(9, 2, dtype=torch.float64) * torch.tensor([w, h]) * 0.9 + 1
        boxes.append(torch.cat([xy, xy + wh], 1))
    pooler = torchvision.ops.MultiScaleRoIAlign(names, (3, 2), sampling_ratio)
    theirs_in = {k: v.clone().requires_grad_() for k, v in feats.items()}
    ours_in = {k: v.clone().requires_grad_() for k, v in feats.items()}
    theirs = pooler(theirs_in, boxes, image_sizes)
    ours = mmkernels.multiscale_roi_align(ours_in, boxes, image_sizes, (3, 2), sampling_ratio)
    assert_close_to_reference(ours, theirs, tol="float64_vs_torchvision")
    g = torch.randn_like(ours)
    theirs.backward(g)
    ours.backward(g)
    for k in names:
        assert_close_to_reference(ours_in[k].grad, theirs_in[k].grad, tol="float64_vs_torchvision")


# ---------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["roi_align", "region_features"])
@pytest.mark.parametrize("aligned,sampling_ratio", [(False, -1), (True, 2)],
                         ids=["legacy-adaptive", "aligned-sr2"])
def test_gradcheck(op, aligned, sampling_ratio):
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64, requires_grad=True)
    rois = make_rois(2, 7, 9, 7, 1.0, torch.float64)
    fn = getattr(mmkernels, op)
    assert torch.autograd.gradcheck(lambda t: fn(t, rois, (2, 3), 1.0, sampling_ratio, aligned),
                                    (x,))


@pytest.mark.parametrize("op", ["roi_align", "region_features"])
def test_gradgradcheck(op):
    """The ops are linear in the input, so double backward is exact (and cheap)."""
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = make_rois(1, 6, 7, 6, 1.0, torch.float64)
    fn = getattr(mmkernels, op)
    assert torch.autograd.gradgradcheck(lambda t: fn(t, rois, 2, 1.0, 2, True) ** 2, (x,))


def test_gradcheck_multiscale():
    f0 = torch.randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    f1 = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    boxes = [torch.tensor([[1.0, 1.0, 9.0, 12.0], [0.0, 2.0, 30.0, 31.0]], dtype=torch.float64)]
    assert torch.autograd.gradcheck(
        lambda a, b: mmkernels.multiscale_roi_align([a, b], boxes, [(32, 32)], 2, 2,
                                                    canonical_scale=16, canonical_level=3),
        (f0, f1))
    assert torch.autograd.gradgradcheck(
        lambda a, b: mmkernels.multiscale_roi_align([a, b], boxes, [(32, 32)], 2, 2,
                                                    canonical_scale=16, canonical_level=3) ** 2,
        (f0, f1))


def _opcheck_cases():
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    xcl = x.contiguous(memory_format=torch.channels_last)
    rois = make_rois(2, 6, 7, 8, 1.0, torch.float64)
    g4 = torch.randn(8, 3, 2, 3, dtype=torch.float64)
    g2 = torch.randn(8, 3, dtype=torch.float64)
    f1 = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    levels = torch.randint(0, 2, (8,))
    ops = torch.ops.mmkernels
    return [
        pytest.param(ops.roi_align.default, (x, rois, 1.0, 2, 3, 2, True), id="roi_align"),
        pytest.param(ops.roi_align.default, (xcl, rois, 0.5, 2, 3, -1, False),
                     id="roi_align-channels_last"),
        pytest.param(ops._roi_align_backward.default,
                     (g4, rois, 1.0, 2, 3, 2, 3, 6, 7, 2, True, False), id="roi_align_backward"),
        pytest.param(ops.region_features.default, (x, rois, 1.0, 2, 3, 2, True),
                     id="region_features"),
        pytest.param(ops._region_features_backward.default,
                     (g2, rois, 1.0, 2, 3, 2, 3, 6, 7, 2, True, True),
                     id="region_features_backward"),
        pytest.param(ops.multiscale_roi_align.default,
                     ([x, f1], rois, levels, [1.0, 0.5], 2, 3, 2, False), id="multiscale"),
        pytest.param(ops._multiscale_roi_align_backward.default,
                     (g4, rois, levels, [1.0, 0.5], 2, 3, [6, 3], [7, 4], 2, False, False),
                     id="multiscale_backward"),
    ]


@pytest.mark.parametrize("case", range(7), ids=["roi_align", "roi_align-channels_last",
                                                "roi_align_backward", "region_features",
                                                "region_features_backward", "multiscale",
                                                "multiscale_backward"])
def test_opcheck(case):
    # inputs built inside the (seeded) test, not at collection time
    op, args = _opcheck_cases()[case].values
    args = tuple([a.requires_grad_() if isinstance(a, torch.Tensor) and i == 0 else
                  [t.requires_grad_() for t in a] if isinstance(a, list) and i == 0 and
                  isinstance(a[0], torch.Tensor) else a for i, a in enumerate(args)])
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    x = make_input((2, 4, 9, 11))
    rois = make_rois(2, 9, 11, 10, 0.5)

    def fn(x, rois):
        return mmkernels.roi_align(x, rois, (3, 3), 0.5, 2, True).relu().sum((2, 3)) + \
            mmkernels.region_features(x, rois, 2, 0.5, -1, False)

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    assert_close_to_reference(compiled(x, rois), fn(x, rois), tol="float32_reordered")


# ---------------------------------------------------------------------------------
# edge cases: empty, NaN, determinism, bad input
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["roi_align", "region_features"])
def test_empty_boxes(op):
    x = torch.randn(2, 5, 8, 8, requires_grad=True)
    out = getattr(mmkernels, op)(x, torch.zeros(0, 5), (3, 2), 1.0, 2, True)
    assert out.shape == ((0, 5, 3, 2) if op == "roi_align" else (0, 5))
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and not x.grad.any()


def test_zero_channels():
    x = torch.randn(1, 0, 8, 8)
    assert mmkernels.roi_align(x, make_rois(1, 8, 8, 3, 1.0), 2).shape == (3, 0, 2, 2)


def test_nan_propagates():
    x = torch.randn(1, 2, 8, 8)
    x[0, 1, 3, 3] = float("nan")
    rois = torch.tensor([[0, 2.0, 2.0, 5.0, 5.0], [0, 6.0, 6.0, 7.5, 7.5],
                         [0, float("nan"), 1.0, 3.0, 3.0]])
    out = mmkernels.roi_align(x, rois, 2, 1.0, 2, False)
    assert torch.isnan(out[0, 1]).any() and not torch.isnan(out[0, 0]).any()
    assert not torch.isnan(out[1]).any()
    assert torch.isnan(out[2]).all(), "a NaN box must give NaN, not a silent number"
    feats = mmkernels.region_features(x, rois, 2, 1.0, 2, False)
    assert torch.isnan(feats[0, 1]) and torch.isnan(feats[2]).all()


def test_backward_deterministic_and_thread_independent():
    x = torch.randn(2, 70, 16, 16, requires_grad=True)  # > one 64-channel block
    rois = make_rois(2, 16, 16, 64, 1.0)
    g = torch.randn(64, 70, 4, 4)
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            (gx,) = torch.autograd.grad(mmkernels.roi_align(x, rois, 4, 1.0, 2, True), x, g)
            grads.append(gx)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


BAD = [
    ("batch-index-high", lambda x, r: (x, torch.tensor([[2.0, 0, 0, 1, 1]]), 2), RuntimeError,
     r"batch index"),
    ("batch-index-negative", lambda x, r: (x, torch.tensor([[-1.0, 0, 0, 1, 1]]), 2),
     RuntimeError, r"batch index"),
    ("batch-index-nan", lambda x, r: (x, torch.tensor([[float("nan"), 0, 0, 1, 1]]), 2),
     RuntimeError, r"batch index"),
    ("boxes-shape", lambda x, r: (x, r[:, :4], 2), ValueError, r"boxes"),
    ("boxes-list-shape", lambda x, r: (x, [r[:, :3]], 2), ValueError, r"boxes\[0\]"),
    ("boxes-type", lambda x, r: (x, "boxes", 2), TypeError, r"boxes"),
    ("dtype-mismatch", lambda x, r: (x, r.double(), 2), TypeError, r"dtype"),
    ("output-size-zero", lambda x, r: (x, r, 0), ValueError, r"output_size"),
    ("output-size-negative", lambda x, r: (x, r, (2, -1)), ValueError, r"output_size"),
    ("input-3d", lambda x, r: (x[0], r, 2), ValueError, r"4-D"),
    ("input-int", lambda x, r: (x.long(), r, 2), TypeError, r"dtype"),
    ("input-empty-map", lambda x, r: (x[:, :, :0], r, 2), RuntimeError, r"height and width"),
    ("sampling-ratio-negative", lambda x, r: (x, r, 2, 1.0, -2), ValueError, r"sampling_ratio"),
    ("sampling-ratio-huge", lambda x, r: (x, r, 2, 1.0, 2 ** 40), ValueError, r"sampling_ratio"),
    ("sampling-ratio-above-max", lambda x, r: (x, r, 2, 1.0, MAX_SAMPLING_RATIO + 1),
     ValueError, r"sampling_ratio"),
    ("sampling-ratio-float", lambda x, r: (x, r, 2, 1.0, 2.0), TypeError, r"sampling_ratio"),
    ("sampling-ratio-bool", lambda x, r: (x, r, 2, 1.0, True), TypeError, r"sampling_ratio"),
    ("output-size-huge", lambda x, r: (x, r, (2 ** 31, 2)), ValueError, r"output_size"),
]


@pytest.mark.parametrize("op", ["roi_align", "region_features"])
@pytest.mark.parametrize("name,make,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(op, name, make, exc, match):
    x = torch.randn(2, 3, 8, 8)
    rois = make_rois(2, 8, 8, 4, 1.0)
    with pytest.raises(exc, match=match):
        getattr(mmkernels, op)(*make(x, rois))


def test_bad_input_raw_op_never_reads_out_of_bounds():
    """The C++ op checks on its own, for callers that bypass the Python API."""
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="batch index"):
        torch.ops.mmkernels.roi_align(x, torch.tensor([[5.0, 0, 0, 1, 1]]), 1.0, 2, 2, 2, True)
    with pytest.raises(RuntimeError, match="batch index"):
        torch.ops.mmkernels._roi_align_backward(torch.randn(1, 3, 2, 2),
                                                torch.tensor([[5.0, 0, 0, 1, 1]]),
                                                1.0, 2, 2, 2, 3, 8, 8, 2, True, False)
    with pytest.raises(RuntimeError, match="levels must lie"):
        torch.ops.mmkernels.multiscale_roi_align([x], torch.tensor([[0.0, 0, 0, 1, 1]]),
                                                 torch.tensor([3]), [1.0], 2, 2, 2, True)


def test_reference_backend_override(monkeypatch):
    x = make_input((1, 2, 6, 6), torch.float64)
    rois = make_rois(1, 6, 6, 5, 1.0, torch.float64)
    fused = mmkernels.roi_align(x, rois, 2, 1.0, 2, True)
    monkeypatch.setenv("MMKERNELS_BACKEND", "reference")
    ref = mmkernels.roi_align(x, rois, 2, 1.0, 2, True)
    assert_close_to_reference(fused, ref, tol="float64_reordered")


def test_module_wrappers():
    m = mmkernels.nn.RoIAlign((2, 3), 0.5, 2, True)
    x = make_input((2, 4, 8, 8))
    rois = make_rois(2, 8, 8, 5, 0.5)
    torch.testing.assert_close(m(x, rois), torchvision.ops.RoIAlign((2, 3), 0.5, 2, True)(x, rois))
    assert "aligned=True" in repr(m)
    r = mmkernels.nn.RegionFeatures((2, 3), 0.5, 2, True)
    assert_close_to_reference(r(x, rois), m(x, rois).mean((2, 3)), tol="float32_reordered")


# ---------------------------------------------------------------------------------
# regressions of issue 10, defects 1-5
# ---------------------------------------------------------------------------------

def with_strides(values, size1_stride, channels_last=False):
    """``values`` (N, C, H, W) re-laid out dense (NCHW or channels-last) in fresh
    storage, with every size-1 dimension given the stride ``size1_stride``: such a
    tensor is still contiguous in its memory format, whatever that stride is."""
    n, c, h, w = values.shape
    order = (0, 2, 3, 1) if channels_last else (0, 1, 2, 3)
    stride, acc = [0] * 4, 1
    for d in reversed(order):
        stride[d] = acc if values.shape[d] > 1 else size1_stride
        acc *= values.shape[d]
    t = torch.empty(values.numel(), dtype=values.dtype).as_strided(values.shape, stride)
    t.copy_(values)
    return t


def odd_layouts():
    """(name, maker) pairs; each maker returns a float64 (N, C, H, W) tensor with
    awkward strides: size-1 dimensions of every stride, H = 1 and W = 1 maps,
    expanded (stride-0) and broadcast inputs."""
    return [
        # the issue's example: (N, C, H, 1), contiguous, with stride(3) == H
        ("transpose-W1", lambda: torch.randn(2, 5, 1, 9, dtype=torch.float64).transpose(2, 3)),
        ("transpose-H1", lambda: torch.randn(2, 5, 9, 1, dtype=torch.float64).transpose(2, 3)),
        ("W1-stride-7777", lambda: with_strides(torch.randn(2, 5, 9, 1, dtype=torch.float64), 7777)),
        ("H1-stride-0", lambda: with_strides(torch.randn(2, 5, 1, 9, dtype=torch.float64), 0)),
        ("H1W1", lambda: with_strides(torch.randn(2, 5, 1, 1, dtype=torch.float64), 3)),
        ("C1-stride-99", lambda: with_strides(torch.randn(2, 1, 6, 7, dtype=torch.float64), 99)),
        ("N1-stride-5", lambda: with_strides(torch.randn(1, 5, 6, 7, dtype=torch.float64), 5)),
        ("cl-W1-stride-13", lambda: with_strides(torch.randn(2, 5, 8, 1, dtype=torch.float64), 13,
                                                  channels_last=True)),
        ("cl-H1-stride-0", lambda: with_strides(torch.randn(2, 5, 1, 8, dtype=torch.float64), 0,
                                                 channels_last=True)),
        ("cl-C1-stride-4", lambda: with_strides(torch.randn(2, 1, 6, 7, dtype=torch.float64), 4,
                                                 channels_last=True)),
        ("expanded-N", lambda: torch.randn(1, 5, 6, 7, dtype=torch.float64).expand(3, 5, 6, 7)),
        ("expanded-C", lambda: torch.randn(2, 1, 6, 7, dtype=torch.float64).expand(2, 5, 6, 7)),
        ("expanded-HW", lambda: torch.randn(2, 5, 1, 1, dtype=torch.float64).expand(2, 5, 6, 7)),
        ("expanded-W", lambda: torch.randn(2, 5, 6, 1, dtype=torch.float64).expand(2, 5, 6, 7)),
    ]


@pytest.mark.parametrize("op", ["roi_align", "region_features", "multiscale"])
@pytest.mark.parametrize("name,make", odd_layouts(), ids=[n for n, _ in odd_layouts()])
def test_size1_and_expanded_strides_match_reference(op, name, make):
    """Defect 1: the layout is decided by is_contiguous(memory_format), never by one
    stride; every op, forward and backward, with H = 1 / W = 1 maps, size-1
    dimensions of any stride, and expanded inputs."""
    x = make()
    n, c, h, w = x.shape
    rois = make_rois(n, h, w, 12, 1.0, torch.float64)
    dense = x.detach().contiguous().requires_grad_()
    xs = x.detach().requires_grad_() if x.stride().count(0) == 0 else x.requires_grad_()
    for aligned, sr in ((False, -1), (True, 2)):
        if op == "multiscale":
            feats = [xs, dense.detach()[:, :, ::2, ::2].clone().requires_grad_()]
            levels = torch.randint(0, 2, (rois.shape[0],))
            out = torch.ops.mmkernels.multiscale_roi_align(feats, rois, levels, [1.0, 0.5], 3, 2,
                                                           sr, aligned)
            ref = reference.multiscale_roi_align([dense, feats[1]], rois, levels, [1.0, 0.5],
                                                 (3, 2), sr, aligned)
        else:
            out = getattr(mmkernels, op)(xs, rois, (3, 2), 1.0, sr, aligned)
            ref = getattr(reference, op)(dense, rois, (3, 2), 1.0, sr, aligned)
        assert_close_to_reference(out, ref, what=f"{op} {name} forward")
        g = torch.randn_like(ref)
        (gx,) = torch.autograd.grad(out, xs, g)
        (gref,) = torch.autograd.grad(ref, dense, g)
        assert_close_to_reference(gx, gref, what=f"{op} {name} grad")


def test_region_features_issue_example_transposed_map():
    """The reproduction in the issue: channel 1 was -0.1004 instead of -0.7317."""
    x = torch.randn(2, 3, 1, 9).transpose(2, 3)  # (2, 3, 9, 1), stride(3) == 9
    assert x.is_contiguous() and x.stride(3) != 1
    rois = torch.tensor([[0, 0.2, 0.5, 0.9, 7.0], [1, 0.0, 2.0, 1.0, 9.0]])
    feats = mmkernels.region_features(x, rois, 2, 1.0, 2, True)
    pooled = torchvision.ops.roi_align(x, rois, 2, 1.0, 2, True).mean((2, 3))
    assert_close_to_reference(feats, pooled, tol="float32_reordered")


def _nan_cases(bad=math.nan):
    """(input, rois, sampling_ratio, aligned): NaNs (or +-Inf: `bad`) on taps of zero
    weight (samples exactly on a pixel), on pixels inside a box's window that no
    sample reads, and at the border clamp; pixel (0, 0) stays finite (torchvision's
    CPU kernel reads it, with weight 0, for samples off the map)."""
    x = torch.randn(2, 4, 12, 12, dtype=torch.float64)
    x[0, 1, 4, 4] = bad      # a zero-weight tap of the sample at (3.0, 3.0)
    x[0, 2, 7, 7] = bad      # between the samples of a 1-sample-per-bin box
    x[1, 0, 11, 5] = bad     # bottom border (clamped taps)
    x[1, 3, 6, 6] = bad
    rois = torch.tensor([
        [0, 2.0, 2.0, 4.0, 4.0],     # sr=1, output 1, not aligned: one sample at (3, 3)
        [0, 1.0, 1.0, 11.0, 11.0],   # big bins, a sample per bin: (7, 7) is not read
        [0, 6.5, 6.5, 7.5, 7.5],     # reads (7, 7)
        [1, 0.0, 9.0, 11.0, 13.0],   # reaches the bottom border
        [1, -5.0, -5.0, 20.0, 20.0],  # partly off the map
        [1, 8.0, 8.0, 11.0, 11.0],   # finite everywhere
    ], dtype=torch.float64)
    return x, rois


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("aligned,sampling_ratio", [(False, 1), (True, 2), (False, -1)],
                         ids=["sr1", "aligned-sr2", "adaptive"])
def test_nan_propagation_same_on_every_layout_as_torchvision(aligned, sampling_ratio, layout,
                                                             bad):
    """Defect 2: NaN input gives NaN exactly where torchvision gives NaN (a zero
    weight times a NaN tap is NaN; an unread pixel is never read), for roi_align and
    region_features, NCHW and channels-last alike; the NaN set of the backward, too.
    Review of issue 10: the same for +-Inf features and an Inf gradient (0 * Inf is
    NaN, also on a pixel that other samples weight positively)."""
    x, rois = _nan_cases(bad)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "noncontiguous":
        big = torch.zeros(2, 8, 12, 14, dtype=torch.float64)
        big[:, ::2, :, 1:13] = x
        x = big[:, ::2, :, 1:13]
    tv = torchvision.ops.roi_align(x.contiguous(), rois, (2, 2), 1.0, sampling_ratio, aligned)
    out = mmkernels.roi_align(x, rois, (2, 2), 1.0, sampling_ratio, aligned)
    feats = mmkernels.region_features(x, rois, (2, 2), 1.0, sampling_ratio, aligned)
    assert torch.equal(out.isnan(), tv.isnan())
    assert torch.equal(feats.isnan(), tv.mean((2, 3)).isnan())
    assert (~tv.isfinite()).any() and not tv.isnan().all()
    assert_close_to_reference(out, tv, tol="float64_vs_torchvision")
    assert_close_to_reference(feats, tv.mean((2, 3)), tol="float64_vs_torchvision")
    # backward: a NaN gradient reaches the taps it reaches in torchvision's backward
    xg = torch.randn(2, 4, 12, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(rois.shape[0], 4, 2, 2, dtype=torch.float64)
    g[1, 2] = bad
    g[4, 1] = bad
    (tv_grad,) = torch.autograd.grad(
        torchvision.ops.roi_align(xg, rois, (2, 2), 1.0, sampling_ratio, aligned), xg, g)
    (ours,) = torch.autograd.grad(
        mmkernels.roi_align(xg, rois, (2, 2), 1.0, sampling_ratio, aligned), xg, g)
    assert torch.equal(ours.isnan(), tv_grad.isnan()) and (~tv_grad.isfinite()).any()
    assert_close_to_reference(ours, tv_grad, tol="float64_vs_torchvision")
    (tv_mean,) = torch.autograd.grad(
        torchvision.ops.roi_align(xg, rois, (2, 2), 1.0, sampling_ratio, aligned).mean((2, 3)),
        xg, g.mean((2, 3)))
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf = xg.detach().contiguous(memory_format=fmt).requires_grad_()
        (ours,) = torch.autograd.grad(
            mmkernels.region_features(xf, rois, (2, 2), 1.0, sampling_ratio, aligned), xf,
            g.mean((2, 3)))
        assert torch.equal(ours.isnan(), tv_mean.isnan())
        assert_close_to_reference(ours, tv_mean, tol="float64_vs_torchvision")


def test_region_features_inf_gives_nan_like_torchvision():
    """Review of issue 10, finding 2: a sample of weight 0 on an Inf pixel that other
    samples weight positively: torchvision (and roi_align(...).mean) give NaN; the
    profile form used to give Inf. Forward on both layouts, and an Inf gradient."""
    x = torch.ones(1, 1, 4, 4)
    x[0, 0, 1, 1] = math.inf
    rois = torch.tensor([[0, -0.5, -0.5, 1.5, 1.5]])
    for aligned in (False, True):
        tv = torchvision.ops.roi_align(x, rois, 1, 1.0, 2, aligned).mean((2, 3))
        assert mmkernels.roi_align(x, rois, 1, 1.0, 2, aligned).mean((2, 3)).isnan().all()
        for fmt in (torch.contiguous_format, torch.channels_last):
            feats = mmkernels.region_features(x.contiguous(memory_format=fmt), rois, 1, 1.0, 2,
                                              aligned)
            torch.testing.assert_close(feats, tv, equal_nan=True)
    assert tv.isnan().all()
    # backward: an Inf gradient
    xg = torch.zeros(1, 1, 4, 4, requires_grad=True)
    g = torch.full((1, 1), math.inf)
    for aligned in (False, True):
        (want,) = torch.autograd.grad(
            torchvision.ops.roi_align(xg, rois, 1, 1.0, 2, aligned).mean((2, 3)), xg, g)
        assert want.isnan().any()
        for fmt in (torch.contiguous_format, torch.channels_last):
            xf = xg.detach().contiguous(memory_format=fmt).requires_grad_()
            (ours,) = torch.autograd.grad(
                mmkernels.region_features(xf, rois, 1, 1.0, 2, aligned), xf, g)
            torch.testing.assert_close(ours, want, equal_nan=True)


def _pixel_one_case():
    """Review of issue 10, finding 1: every sample of this aligned box lies in
    (-1, -0.5): clamped to 0, it taps row/column 1 with weight 0, so an Inf gradient
    gives NaN on (0, 1), (1, 0) and (1, 1) (0 * Inf), as in torchvision."""
    rois = torch.tensor([[0, -0.5, -0.5, 0.0, 0.0]], dtype=torch.float64)
    return rois, dict(output_size=1, spatial_scale=1.0, sampling_ratio=8, aligned=True)


def test_inf_gradient_reaches_pixel_one_of_clamped_samples():
    rois, kw = _pixel_one_case()
    xg = torch.zeros(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[[[math.inf]], [[1.0]]]], dtype=torch.float64)
    (want,) = torch.autograd.grad(torchvision.ops.roi_align(xg, rois, **kw), xg, g)
    assert want[0, 0, :2, :2].isnan().sum() == 3 and torch.isfinite(want[0, 1]).all()
    (ours,) = torch.autograd.grad(mmkernels.roi_align(xg, rois, **kw), xg, g)
    torch.testing.assert_close(ours, want, equal_nan=True)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf = xg.detach().contiguous(memory_format=fmt).requires_grad_()
        (feats,) = torch.autograd.grad(mmkernels.region_features(xf, rois, **kw), xf, g[:, :, 0, 0])
        torch.testing.assert_close(feats, want, equal_nan=True)


def test_shared_math_host_unit(tmp_path):
    """The per-pixel gathers of roi_align_math.h (tap_window, bin_range,
    bin_weight_at, profile_at, axis_span), used by the CUDA region_features kernels
    and the CUDA deterministic backward, against a brute-force scatter of every
    sample, built by the host compiler (with UBSan where it links): review findings 1
    (pixel 1 is tapped from [-1, 0)) and 5 (axis_tap on a float map of width
    2^31 - 1: no float-to-int overflow; untestable through the ops on CPU without
    copying an 8 GiB map). Issue 13: the deterministic backward's binning (the
    regions' tiles, sort keys, each tile's run, the overflow rule past the fixed pair
    slots, one and two levels) emulated step by step against the scatter, the bin
    plans and slot budgets, and the strided launch geometry (C = 262144 channels once
    asked for gridDim.y = 65536)."""
    from _cpp import run_host_unit

    run_host_unit("roi_align_math_test.cpp", tmp_path)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_region_features_huge_output_size_is_cheap(layout):
    """Review of issue 10, finding 4: output_size (65536, 65536) costs what its
    samples on the map cost (profiles), not PH * PW bins; it equals output_size 8
    with sampling_ratio 8192 (the same sample positions). A hang guard, 5 s."""
    x = make_input((2, 3, 9, 11), torch.float64, layout).requires_grad_()
    rois = torch.tensor([[0, 1.0, 2.0, 5.0, 4.5], [1, -1.0, 0.5, 3.0, 12.0]], dtype=torch.float64)
    t0 = time.perf_counter()
    out = mmkernels.region_features(x, rois, (65536, 65536), 1.0, 1, True)
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert time.perf_counter() - t0 < 5.0
    same = mmkernels.region_features(x, rois, 8, 1.0, 8192, True)
    (gs,) = torch.autograd.grad(same, x, torch.ones_like(same))
    assert_close_to_reference(out, same, tol="float64_reordered")
    assert_close_to_reference(gx, gs, tol="float64_reordered")


@pytest.mark.parametrize("op", ["roi_align", "region_features"])
@pytest.mark.parametrize("box", [
    pytest.param([0, 0.0, 0.0, math.inf, 10.0], id="inf"),
    pytest.param([0, -math.inf, 1.0, 5.0, 6.0], id="minus-inf"),
    pytest.param([0, 1.0, math.nan, 5.0, 6.0], id="nan"),
    pytest.param([0, 0.0, 0.0, 1e30, 10.0], id="1e30-wide"),
    pytest.param([0, -1e30, -1e30, 1e30, 1e30], id="1e30-both-axes"),
    pytest.param([0, -3e38, 0.0, 3e38, 5.0], id="extent-overflows-float32"),
])
def test_non_finite_and_huge_boxes_return_at_once(op, box):
    """Defect 3: a non-finite box gives a NaN row at once; a huge finite box costs
    what its samples on the map cost (the adaptive grid is capped, and samples off
    the map are skipped). A hang guard: 1 s is generous (it takes milliseconds)."""
    x = torch.randn(2, 8, 50, 84, requires_grad=True)
    rois = torch.tensor([box, [1, 8.0, 8.0, 500.0, 300.0]])
    fn = getattr(mmkernels, op)
    t0 = time.perf_counter()
    out = fn(x, rois, 7, 1.0, -1, False)
    out.backward(torch.ones_like(out))
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"{op} took {elapsed:.1f} s for box {box}"
    nonfinite = not all(math.isfinite(v) for v in box) or abs(box[3] - box[1]) > 3.4e38
    assert bool(out[0].isnan().all()) == nonfinite
    assert not out[0].isnan().any() or nonfinite
    assert torch.isfinite(out[1]).all() and torch.isfinite(x.grad).all()
    ref = getattr(reference, op)(x.detach().double(), rois.double()[1:], (7, 7), 1.0, -1, False)
    assert_close_to_reference(out[1:], ref)


def test_sampling_ratio_checked_in_cpp_too():
    """Defect 3: the C++ op validates sampling_ratio for callers that bypass Python,
    and accepts the documented maximum (a box off the map costs nothing)."""
    x = torch.randn(1, 2, 8, 8)
    far = torch.tensor([[0, 1000.0, 1000.0, 1010.0, 1010.0]])
    ops = torch.ops.mmkernels
    for bad in (-2, MAX_SAMPLING_RATIO + 1, 2 ** 40, -(2 ** 40)):
        for call in (lambda sr=bad: ops.roi_align(x, far, 1.0, 2, 2, sr, False),
                     lambda sr=bad: ops.region_features(x, far, 1.0, 2, 2, sr, False),
                     lambda sr=bad: ops._roi_align_backward(torch.randn(1, 2, 2, 2), far, 1.0, 2,
                                                            2, 1, 2, 8, 8, sr, False, False)):
            with pytest.raises(RuntimeError, match="sampling_ratio"):
                call()
    t0 = time.perf_counter()
    out = mmkernels.roi_align(x, far, 7, 1.0, MAX_SAMPLING_RATIO, False)
    assert time.perf_counter() - t0 < 1.0 and not out.any()
    with pytest.raises(ValueError, match="sampling_ratio"):
        mmkernels.nn.RoIAlign(2, 1.0, MAX_SAMPLING_RATIO + 1)
    with pytest.raises(TypeError, match="sampling_ratio"):
        mmkernels.nn.RegionFeatures(2, 1.0, 1.5)


def test_adaptive_grid_cap_changes_no_real_box():
    """The cap (8192 samples per bin and axis) leaves a bin 4000 pixels wide exactly
    as torchvision computes it."""
    x = torch.randn(1, 2, 3, 4100)
    rois = torch.tensor([[0, 10.0, 0.0, 4010.0, 2.0], [0, 0.0, 0.5, 4099.0, 2.5]])
    out = mmkernels.roi_align(x, rois, 1, 1.0, -1, False)
    assert torch.equal(out, torchvision.ops.roi_align(x, rois, 1, 1.0, -1, False))


def _realistic_rois(n, height, width, k, scale, dtype):
    """Detector-like boxes in image coordinates: from a few pixels to most of the image."""
    h, w = height / scale, width / scale
    xy = torch.rand(k, 2, dtype=torch.float64) * torch.tensor([w, h])
    wh = torch.rand(k, 2, dtype=torch.float64) ** 2 * torch.tensor([w, h]) * 0.7 + 2
    idx = torch.randint(0, n, (k, 1)).double()
    return torch.cat([idx, xy, xy + wh], 1).to(dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("aligned,sampling_ratio", [(False, -1), (True, 2), (False, 2)],
                         ids=["legacy-adaptive", "aligned-sr2", "legacy-sr2"])
@pytest.mark.parametrize("height,width,scale", [(200, 336, 0.25), (50, 84, 1 / 16)],
                         ids=["200x336@1/4", "50x84@1/16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_forward_bitwise_equals_torchvision(dtype, height, width, scale, aligned,
                                                sampling_ratio, layout):
    """Defect 5: the documented contract. With the portable build (-ffp-contract=off,
    whatever -march), the CPU forward performs torchvision's operations in its order,
    so float32/float64 results are bitwise equal on realistic FPN map sizes."""
    x = make_input((2, 8, height, width), dtype, layout)
    rois = _realistic_rois(2, height, width, 96, scale, dtype)
    ours = mmkernels.roi_align(x, rois, 7, scale, sampling_ratio, aligned)
    theirs = torchvision.ops.roi_align(x, rois, 7, scale, sampling_ratio, aligned)
    diff = (ours - theirs).abs()
    assert torch.equal(ours, theirs), (
        f"{int((diff > 0).sum())} of {diff.numel()} elements differ, by up to {float(diff.max()):.2e}")


def test_multiscale_inverted_and_non_finite_boxes():
    """Found by fuzzing: an inverted box (negative area) has a NaN FPN level; the old
    code cast it to int64 and the CPU check raised "levels must lie". torchvision's
    pooler assigns it no level, so its row is zero: same here. A non-finite box keeps
    the documented NaN row (torchvision's row would be zero)."""
    feats = {"p2": torch.randn(1, 3, 32, 32, dtype=torch.float64),
             "p3": torch.randn(1, 3, 16, 16, dtype=torch.float64)}
    boxes = [torch.tensor([[10.0, 10.0, 60.0, 70.0], [40.0, 5.0, 20.0, 50.0],
                           [5.0, 5.0, 5.0, 5.0], [1.0, math.nan, 9.0, 9.0]],
                          dtype=torch.float64)]
    ours = mmkernels.multiscale_roi_align(feats, boxes, [(128, 128)], 2, 2)
    theirs = torchvision.ops.MultiScaleRoIAlign(["p2", "p3"], 2, 2)(feats, boxes, [(128, 128)])
    assert_close_to_reference(ours[:3], theirs[:3], tol="float64_vs_torchvision")
    assert not ours[1].any() and ours[3].isnan().all()


OPS_FOR_DETERMINISM = ["roi_align", "region_features-nchw", "region_features-cl", "multiscale"]


@pytest.mark.parametrize("case", OPS_FOR_DETERMINISM)
def test_deterministic_and_thread_count_independent(case):
    """Forward and backward of every op, under torch.use_deterministic_algorithms(True):
    run-to-run bit-identical, and the same with 1 and 2 threads."""
    x = torch.randn(2, 70, 19, 23)  # > one 64-channel block
    if case == "region_features-cl":
        x = x.contiguous(memory_format=torch.channels_last)
    rois = make_rois(2, 19, 23, 80, 0.5)
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    small = torch.randn(2, 70, 10, 12)

    def run():
        xs = [x.detach().clone().requires_grad_(), small.detach().clone().requires_grad_()]
        if case == "roi_align":
            out = mmkernels.roi_align(xs[0], rois, 4, 0.5, -1, True)
        elif case == "multiscale":
            out = mmkernels.multiscale_roi_align(xs, boxes, [(38, 46)] * 2, 4, 2,
                                                 canonical_scale=12, canonical_level=2)
        else:
            out = mmkernels.region_features(xs[0], rois, 4, 0.5, -1, True)
        g = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        grads = torch.autograd.grad(out, xs, g, allow_unused=True)
        return [out] + [gr for gr in grads if gr is not None]

    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two, again = run(), run()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, c)


# ---------------------------------------------------------------------------------
# CUDA (run on a machine with a GPU)
# ---------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("aligned,sampling_ratio", [(False, -1), (True, 2)],
                         ids=["legacy-adaptive", "aligned-sr2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_matches_cpu_and_torchvision(dtype, aligned, sampling_ratio, layout):
    x = make_input((2, 6, 13, 17), dtype, layout)
    rois = make_rois(2, 13, 17, 32, 0.5, dtype)
    xc, rc = x.cuda().requires_grad_(), rois.cuda()
    xg = x.clone().requires_grad_()
    out = mmkernels.roi_align(xc, rc, (3, 4), 0.5, sampling_ratio, aligned)
    cpu = mmkernels.roi_align(xg, rois, (3, 4), 0.5, sampling_ratio, aligned)
    tv = torchvision.ops.roi_align(x.cuda(), rc, (3, 4), 0.5, sampling_ratio, aligned)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.cpu(), cpu, atol=atol, rtol=rtol)
    torch.testing.assert_close(out, tv, atol=atol, rtol=rtol)
    g = torch.randn_like(cpu)
    out.backward(g.cuda())
    cpu.backward(g)
    torch.testing.assert_close(xc.grad.cpu(), xg.grad, atol=atol * 10, rtol=rtol)
    feats = mmkernels.region_features(xc, rc, (3, 4), 0.5, sampling_ratio, aligned)
    torch.testing.assert_close(feats.cpu(), cpu.mean((2, 3)), atol=atol, rtol=rtol)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES_LOWP, ids=str)
def test_cuda_lowp_against_reference(dtype):
    x64 = make_input((2, 6, 11, 15), torch.float64).to(dtype).double().requires_grad_()
    rois64 = make_rois(2, 11, 15, 16, 0.5, torch.float64).to(dtype).double()
    x = x64.detach().to(dtype).cuda().requires_grad_()
    out = mmkernels.roi_align(x, rois64.to(dtype).cuda(), 3, 0.5, 2, True)
    ref = reference.roi_align(x64, rois64, (3, 3), 0.5, 2, True)
    xl = x64.detach().to(dtype).requires_grad_()
    eager = reference.roi_align(xl, rois64.to(dtype), (3, 3), 0.5, 2, True)
    g = torch.randn_like(ref)
    out.backward(g.to(dtype).cuda())
    ref.backward(g)
    eager.backward(g.to(dtype))
    assert_close_to_reference(out.cpu(), ref, eager_lowp=eager)
    assert_close_to_reference(x.grad.cpu(), x64.grad, eager_lowp=xl.grad)


@pytest.mark.cuda
def test_cuda_deterministic_backward():
    x = torch.randn(2, 8, 20, 20, device="cuda", requires_grad=True)
    rois = make_rois(2, 20, 20, 200, 1.0, device="cuda")
    g = torch.randn(200, 8, 5, 5, device="cuda")
    (atomic,) = torch.autograd.grad(mmkernels.roi_align(x, rois, 5, 1.0, 2, True), x, g)
    feats = [x, torch.randn(2, 8, 10, 10, device="cuda", requires_grad=True)]
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    torch.use_deterministic_algorithms(True)
    try:
        runs = [torch.autograd.grad(mmkernels.roi_align(x, rois, 5, 1.0, 2, True), x, g)[0]
                for _ in range(2)]
        mean_runs = [torch.autograd.grad(mmkernels.region_features(x, rois, 5, 1.0, 2, True), x,
                                         g.mean((2, 3)))[0] for _ in range(2)]
        mean_grad = mean_runs[0]
        fpn_runs = [torch.autograd.grad(
            mmkernels.multiscale_roi_align(feats, boxes, [(20, 20)] * 2, 5, 2, canonical_scale=8,
                                           canonical_level=2), feats, g) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(runs[0], runs[1]) and torch.equal(mean_runs[0], mean_runs[1])
    assert all(torch.equal(a, b) for a, b in zip(*fpn_runs))
    torch.testing.assert_close(runs[0], atomic, atol=1e-5, rtol=1e-5)
    (mean_atomic,) = torch.autograd.grad(
        mmkernels.region_features(x, rois, 5, 1.0, 2, True), x, g.mean((2, 3)))
    torch.testing.assert_close(mean_grad, mean_atomic, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
def test_cuda_multiscale_and_bad_index():
    feats = [torch.randn(2, 3, 32, 32, device="cuda"), torch.randn(2, 3, 16, 16, device="cuda")]
    boxes = [torch.tensor([[1.0, 1.0, 20.0, 20.0], [0.0, 0.0, 120.0, 100.0]], device="cuda"),
             torch.tensor([[5.0, 5.0, 60.0, 70.0]], device="cuda")]
    pooler = torchvision.ops.MultiScaleRoIAlign(["a", "b"], 3, 2)
    theirs = pooler({"a": feats[0], "b": feats[1]}, boxes, [(128, 128)] * 2)
    ours = mmkernels.multiscale_roi_align(feats, boxes, [(128, 128)] * 2, 3, 2)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_graph_capture(deterministic):
    """Defect 4: no host sync, so roi_align and region_features (forward and
    backward) can be captured in a CUDA graph and replayed on new data; issue 13:
    also the deterministic backward (binning, sort and gather: every buffer sized by
    the shapes)."""
    torch.use_deterministic_algorithms(deterministic)
    try:
        _graph_capture_case()
    finally:
        torch.use_deterministic_algorithms(False)


def _graph_capture_case():
    x = torch.randn(2, 8, 20, 24, device="cuda", requires_grad=True)
    rois = make_rois(2, 20, 24, 16, 1.0, device="cuda")
    gout = torch.randn(16, 8, 3, 3, device="cuda")

    def step():
        out = mmkernels.roi_align(x, rois, 3, 1.0, 2, True)
        feats = mmkernels.region_features(x, rois, 3, 1.0, -1, False)
        (gx,) = torch.autograd.grad([out, feats], x, [gout, gout.mean((2, 3))])
        return out, feats, gx

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as PyTorch recommends
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        rois.copy_(make_rois(2, 20, 24, 16, 1.0, device="cuda"))
        gout.copy_(torch.randn_like(gout))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(static, step()):
        torch.testing.assert_close(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_no_host_sync_any_op(deterministic):
    """Defect 4: with torch.cuda.set_sync_debug_mode("error"), any synchronising
    call (such as .item() on a CUDA tensor) raises; every op, forward and backward;
    issue 13: the deterministic backward's binning too."""
    feats = [torch.randn(2, 4, 32, 32, device="cuda", requires_grad=True),
             torch.randn(2, 4, 16, 16, device="cuda", requires_grad=True)]
    rois = make_rois(2, 32, 32, 12, 1.0, device="cuda")
    boxes = [torch.tensor([[1.0, 1.0, 20.0, 20.0], [0.0, 0.0, 120.0, 100.0]], device="cuda")] * 2
    torch.cuda.synchronize()
    torch.use_deterministic_algorithms(deterministic)
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [mmkernels.roi_align(feats[0], rois, 3, 1.0, 2, True),
                mmkernels.region_features(feats[0], rois, 3, 1.0, -1, False),
                mmkernels.multiscale_roi_align(feats, boxes, [(128, 128)] * 2, 3, 2)]
        torch.autograd.grad([o.sum() for o in outs], feats)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.use_deterministic_algorithms(False)


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_bad_index_gives_nan_row_and_no_gradient(deterministic):
    """Defect 4: on CUDA an out-of-range batch index (or level) reads nothing: its
    row is NaN and it contributes no gradient; the other rows are unaffected."""
    x = torch.randn(2, 3, 12, 12, device="cuda", requires_grad=True)
    good = make_rois(2, 12, 12, 6, 1.0, device="cuda")
    bad = torch.tensor([[2.0, 0, 0, 4, 4], [-1.0, 0, 0, 4, 4], [math.nan, 0, 0, 4, 4],
                        [1e30, 0, 0, 4, 4], [-1e30, 1, 1, 3, 3]], device="cuda")
    rois = torch.cat([good[:3], bad, good[3:]])
    keep = torch.tensor([True] * 3 + [False] * 5 + [True] * 3, device="cuda")
    torch.use_deterministic_algorithms(deterministic)
    try:
        for op in ("roi_align", "region_features"):
            fn = getattr(mmkernels, op)
            out = fn(x, rois, 2, 1.0, 2, True)
            assert out[~keep].isnan().all() and not out[keep].isnan().any()
            g = torch.randn_like(out)
            (gx,) = torch.autograd.grad(out, x, g)
            ref_out = fn(x, rois[keep], 2, 1.0, 2, True)
            (gref,) = torch.autograd.grad(ref_out, x, g[keep])
            torch.testing.assert_close(out[keep], ref_out)
            torch.testing.assert_close(gx, gref)
        levels = torch.tensor([0, 1, 5, -1, 2 ** 40, 0], device="cuda")
        out = torch.ops.mmkernels.multiscale_roi_align([x, x[:, :, ::2, ::2]], good, levels,
                                                       [1.0, 0.5], 2, 2, 2, False)
        assert out[2:5].isnan().all() and not out[[0, 1, 5]].isnan().any()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.cuda
def test_cuda_nan_propagation_matches_cpu():
    """Defect 2 on CUDA: the same NaN set as the CPU kernels and torchvision."""
    x, rois = _nan_cases()
    for aligned, sr in ((False, 1), (True, 2), (False, -1)):
        tv = torchvision.ops.roi_align(x, rois, (2, 2), 1.0, sr, aligned)
        for fmt in (torch.contiguous_format, torch.channels_last):
            xc = x.cuda().contiguous(memory_format=fmt)
            out = mmkernels.roi_align(xc, rois.cuda(), (2, 2), 1.0, sr, aligned).cpu()
            feats = mmkernels.region_features(xc, rois.cuda(), (2, 2), 1.0, sr, aligned).cpu()
            assert torch.equal(out.isnan(), tv.isnan())
            assert torch.equal(feats.isnan(), tv.mean((2, 3)).isnan())


@pytest.mark.cuda
def test_cuda_offsets_past_2_31():
    """int64 indexing: a batch whose elements pass 2^31 (a real 6 GiB float16 tensor)
    and an expanded one of 2^34 elements (no copy on CUDA)."""
    x = torch.randn(3, 1, 2 ** 15, 2 ** 15, device="cuda", dtype=torch.float16)
    rois = torch.tensor([[2.0, 32000.0, 32000.0, 32700.0, 32760.0],
                         [2.0, 10.0, 32700.0, 200.0, 32767.0]], device="cuda", dtype=torch.float16)
    out = mmkernels.roi_align(x, rois, 3, 1.0, 2, False)
    last = x[2:3].contiguous()  # the same image at offset 0: the same arithmetic
    first = rois.clone()
    first[:, 0] = 0
    assert torch.equal(out, mmkernels.roi_align(last, first, 3, 1.0, 2, False))
    del x, last
    big = torch.randn(1, 4, 64, 64, device="cuda").expand(2 ** 20, 4, 64, 64)  # 2^34 elements
    r = torch.tensor([[2.0 ** 20 - 1, 3.0, 4.0, 50.0, 60.0]], device="cuda")
    torch.testing.assert_close(mmkernels.roi_align(big, r, 2, 1.0, 2, False),
                               mmkernels.roi_align(big[:1].contiguous(),
                                                   torch.tensor([[0.0, 3, 4, 50, 60]], device="cuda"),
                                                   2, 1.0, 2, False))
    torch.testing.assert_close(mmkernels.region_features(big, r, 2, 1.0, 2, False),
                               mmkernels.roi_align(big, r, 2, 1.0, 2, False).mean((2, 3)))


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_inf_gradient_reaches_pixel_one(deterministic):
    """Review of issue 10, finding 1: the deterministic gather visited only samples
    in [h - 1, h + 1] and missed the clamped samples in [-1, 0) that tap row and
    column 1 with weight 0: an Inf gradient gave 0 there instead of NaN."""
    rois, kw = _pixel_one_case()
    xg = torch.zeros(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[[[math.inf]], [[1.0]]]], dtype=torch.float64)
    (want,) = torch.autograd.grad(torchvision.ops.roi_align(xg, rois, **kw), xg, g)
    xc = xg.detach().cuda().requires_grad_()
    torch.use_deterministic_algorithms(deterministic)
    try:
        (ours,) = torch.autograd.grad(mmkernels.roi_align(xc, rois.cuda(), **kw), xc, g.cuda())
        (feats,) = torch.autograd.grad(mmkernels.region_features(xc, rois.cuda(), **kw), xc,
                                       g[:, :, 0, 0].cuda())
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(ours.cpu(), want, equal_nan=True)
    torch.testing.assert_close(feats.cpu(), want, equal_nan=True)


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_cuda_non_finite_sets_match_cpu(bad, deterministic):
    """Review of issue 10, findings 1 and 2 on CUDA: +-Inf/NaN features and gradients
    give the CPU's (torchvision's) values, NaN set included, forward and backward,
    for roi_align and region_features, atomic and deterministic."""
    x, rois = _nan_cases(bad)
    torch.use_deterministic_algorithms(deterministic)
    try:
        for aligned, sr in ((False, 1), (True, 2), (False, -1)):
            for op in ("roi_align", "region_features"):
                fn = getattr(mmkernels, op)
                for fmt in (torch.contiguous_format, torch.channels_last):
                    xc = x.cuda().contiguous(memory_format=fmt)
                    torch.testing.assert_close(fn(xc, rois.cuda(), (2, 2), 1.0, sr, aligned).cpu(),
                                               fn(x, rois, (2, 2), 1.0, sr, aligned),
                                               equal_nan=True)
                    xg = torch.randn(2, 4, 12, 12, dtype=torch.float64)
                    g = torch.randn(rois.shape[0], 4, 2, 2, dtype=torch.float64)
                    g[1, 2] = bad
                    g[4, 1] = bad
                    if op == "region_features":
                        g = g.mean((2, 3))
                    xa = xg.clone().requires_grad_()
                    xb = xg.cuda().contiguous(memory_format=fmt).requires_grad_()
                    (want,) = torch.autograd.grad(fn(xa, rois, (2, 2), 1.0, sr, aligned), xa, g)
                    (got,) = torch.autograd.grad(fn(xb, rois.cuda(), (2, 2), 1.0, sr, aligned),
                                                 xb, g.cuda())
                    torch.testing.assert_close(got.cpu(), want, equal_nan=True)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_region_features_huge_output_size(deterministic):
    """Review of issue 10, finding 4: on CUDA each (k, c) thread used to walk every
    bin (~4e9 for output_size (65536, 65536): a watchdog timeout). Now profiles, as
    on the CPU: fast, and equal to the CPU."""
    x = make_input((2, 3, 9, 11), torch.float64)
    rois = torch.tensor([[0, 1.0, 2.0, 5.0, 4.5], [1, -1.0, 0.5, 3.0, 12.0]], dtype=torch.float64)
    xc = x.cuda().requires_grad_()
    torch.use_deterministic_algorithms(deterministic)
    try:
        t0 = time.perf_counter()
        out = mmkernels.region_features(xc, rois.cuda(), (65536, 65536), 1.0, 1, True)
        (gx,) = torch.autograd.grad(out, xc, torch.ones_like(out))
        torch.cuda.synchronize()
        assert time.perf_counter() - t0 < 5.0
    finally:
        torch.use_deterministic_algorithms(False)
    xr = x.clone().requires_grad_()
    ref = mmkernels.region_features(xr, rois, (65536, 65536), 1.0, 1, True)
    (gr,) = torch.autograd.grad(ref, xr, torch.ones_like(ref))
    assert_close_to_reference(out.cpu(), ref, tol="float64_reordered")
    assert_close_to_reference(gx.cpu(), gr, tol="float64_reordered")


# ---------------------------------------------------------------------------------
# issue 13: channels-last 16-byte channel vectors, coalesced NCHW region_features,
# the tiled deterministic backward
# ---------------------------------------------------------------------------------

def test_cuda_kernels_sass_vectors_and_no_spills(tmp_path):
    """Issue 13: the channels-last roi_align forward loads (and stores) 16-byte channel
    vectors on sm_80 and sm_90 (the kernel report's VECTOR_IO check), and no RoIAlign
    kernel spills (the tiled deterministic backward holds its kTileChannels
    accumulators in registers). The SASS of the .cu alone, built with nvcc."""
    from _sass import cu_source_reports

    for reports in cu_source_reports("roi_align/roi_align_cuda.cu", tmp_path).values():
        vec = [r for r in reports if r.name.startswith("_roi_align_fwd_cl_vec_kernel<")]
        assert len(vec) == 4, [r.name for r in reports]  # one per dtype
        assert all(r.ldg128 >= 4 and r.stg128 >= 1 for r in vec), vec
        assert any(r.name.startswith("_roi_align_bwd_det_kernel<") for r in reports)
        assert all(not r.problems() for r in reports), [(r.name, r.problems()) for r in reports]


@pytest.mark.cuda
@pytest.mark.parametrize("C", [16, 24, 13])  # 13: not a multiple of the vector, scalar kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *DTYPES_LOWP], ids=str)
def test_cuda_channels_last_vector_forward(dtype, C):
    """The 16-byte channel-vector forward (channels-last, C a multiple of 16 / itemsize)
    and its scalar fallback against the float64 reference; fp16/bf16 within the
    eager-in-that-dtype budget; also a sliced map (misaligned base: scalar kernel)."""
    x64 = make_input((2, C, 19, 23), torch.float64).to(dtype).double()
    rois64 = make_rois(2, 19, 23, 40, 0.5, torch.float64).to(dtype).double()
    ref = reference.roi_align(x64, rois64, (3, 4), 0.5, 2, True)
    eager = reference.roi_align(x64.to(dtype), rois64.to(dtype), (3, 4), 0.5, 2, True)
    x = x64.to(dtype).cuda().contiguous(memory_format=torch.channels_last)
    out = mmkernels.roi_align(x, rois64.to(dtype).cuda(), (3, 4), 0.5, 2, True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    lowp = dict(eager_lowp=eager) if dtype in DTYPES_LOWP else {}
    assert_close_to_reference(out.cpu(), ref, **lowp)
    big = torch.zeros(2, C + 1, 19, 23, dtype=dtype, device="cuda").contiguous(
        memory_format=torch.channels_last)
    big[:, 1:] = x
    out2 = mmkernels.roi_align(big[:, 1:], rois64.to(dtype).cuda(), (3, 4), 0.5, 2, True)
    assert_close_to_reference(out2.cpu(), ref, **lowp, what="misaligned channels-last")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *DTYPES_LOWP], ids=str)
def test_cuda_region_features_nchw_rows_kernel(dtype):
    """region_features on NCHW input (one warp per (k, c) along the rows) equals the
    CPU's separable form and the float64 reference (fp16/bf16 within budget)."""
    x64 = make_input((2, 5, 40, 70), torch.float64).to(dtype).double()
    rois64 = make_rois(2, 40, 70, 30, 1.0, torch.float64).to(dtype).double()
    ref = reference.roi_align(x64, rois64, (4, 4), 1.0, -1, False).mean((2, 3))
    eager = reference.roi_align(x64.to(dtype), rois64.to(dtype), (4, 4), 1.0, -1,
                                False).mean((2, 3))
    out = mmkernels.region_features(x64.to(dtype).cuda(), rois64.to(dtype).cuda(), (4, 4),
                                    1.0, -1, False)
    lowp = dict(eager_lowp=eager) if dtype in DTYPES_LOWP else {}
    assert_close_to_reference(out.cpu(), ref, **lowp)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *DTYPES_LOWP], ids=str)
def test_cuda_tiled_deterministic_backward_matches_atomic(dtype, layout):
    """Issue 13: the tiled deterministic backward (regions binned per 8 x 32 tile,
    kTileChannels channels per block) on a map spanning many tiles, C not a multiple
    of the channel group, hundreds of regions (boxes across tile edges, outside the
    map, degenerate) equals the atomic backward and the float64 reference, and is
    bitwise run to run: roi_align, region_features and multiscale_roi_align."""
    C, H, W, K = 13, 45, 77, 300
    x64 = make_input((3, C, H, W), torch.float64, layout).to(dtype).double()
    rois64 = make_rois(3, H, W, K, 0.5, torch.float64).to(dtype).double()
    g64 = torch.randn(K, C, 3, 5, dtype=torch.float64).to(dtype).double()
    x = x64.to(dtype).cuda()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    rois, g = rois64.to(dtype).cuda(), g64.to(dtype).cuda()

    def grads(fn, gout):
        (atomic,) = torch.autograd.grad(fn(), x, gout)
        torch.use_deterministic_algorithms(True)
        try:
            det = [torch.autograd.grad(fn(), x, gout)[0] for _ in range(2)]
        finally:
            torch.use_deterministic_algorithms(False)
        assert torch.equal(det[0], det[1])
        return atomic, det[0]

    xr = x64.clone().requires_grad_()
    (ref,) = torch.autograd.grad(reference.roi_align(xr, rois64, (3, 5), 0.5, 2, True), xr, g64)
    xl = x64.to(dtype).requires_grad_()
    (eager,) = torch.autograd.grad(
        reference.roi_align(xl, rois64.to(dtype), (3, 5), 0.5, 2, True), xl, g64.to(dtype))
    lowp = dict(eager_lowp=eager) if dtype in DTYPES_LOWP else {}
    atomic, det = grads(lambda: mmkernels.roi_align(x, rois, (3, 5), 0.5, 2, True), g)
    assert_close_to_reference(det.cpu(), ref, **lowp, what="deterministic grad")
    assert_close_to_reference(atomic.cpu(), ref, **lowp, what="atomic grad")

    gm64 = g64.mean((2, 3))
    xr = x64.clone().requires_grad_()
    (ref_m,) = torch.autograd.grad(
        reference.roi_align(xr, rois64, (3, 5), 0.5, -1, False).mean((2, 3)), xr, gm64)
    xl = x64.to(dtype).requires_grad_()
    (eager_m,) = torch.autograd.grad(
        reference.roi_align(xl, rois64.to(dtype), (3, 5), 0.5, -1, False).mean((2, 3)), xl,
        gm64.to(dtype))
    lowp = dict(eager_lowp=eager_m) if dtype in DTYPES_LOWP else {}
    atomic_m, det_m = grads(
        lambda: mmkernels.region_features(x, rois, (3, 5), 0.5, -1, False), gm64.to(dtype).cuda())
    assert_close_to_reference(det_m.cpu(), ref_m, **lowp, what="region deterministic grad")
    assert_close_to_reference(atomic_m.cpu(), ref_m, **lowp, what="region atomic grad")

    boxes = [rois[rois[:, 0] == i, 1:] for i in range(3)]
    fine = torch.randn(3, C, 2 * H, 2 * W, device="cuda", dtype=dtype, requires_grad=True)
    feats = [fine, x]

    def fpn():
        return mmkernels.multiscale_roi_align(feats, boxes, [(4 * H, 4 * W)] * 3, (3, 5), 2,
                                              canonical_scale=64, canonical_level=3)
    gf = torch.randn_like(fpn())
    (a0, a1) = torch.autograd.grad(fpn(), feats, gf)
    torch.use_deterministic_algorithms(True)
    try:
        runs = [torch.autograd.grad(fpn(), feats, gf) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    if dtype in (torch.float32, torch.float64):
        atol, rtol = TOLERANCES[dtype]
        torch.testing.assert_close(runs[0][0], a0, atol=atol, rtol=rtol)
        torch.testing.assert_close(runs[0][1], a1, atol=atol, rtol=rtol)


def _det_and_atomic_grads(fn, x, gout, runs=2):
    """(atomic, [deterministic] * runs) gradients of fn() with respect to x."""
    (atomic,) = torch.autograd.grad(fn(), x, gout)
    torch.use_deterministic_algorithms(True)
    try:
        det = [torch.autograd.grad(fn(), x, gout)[0] for _ in range(runs)]
    finally:
        torch.use_deterministic_algorithms(False)
    return atomic, det


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["roi_align", "region_features"])
def test_cuda_more_channels_than_grid_y(op):
    """Issue 13: C = 262148 channels are 65537 groups of kTileChannels, one more than
    gridDim.y allows; the deterministic backward used to fail to launch ("CUDA launch
    failed"). Now the kernels stride over the channel groups: the gradient equals the
    atomic one and the float64 reference, last channels included."""
    C = 262148
    x64 = make_input((1, C, 3, 5), torch.float64).float().double()
    rois64 = torch.tensor([[0, 0.5, 0.25, 3.5, 2.0], [0, 1.0, 0.0, 4.0, 2.5]],
                          dtype=torch.float64)
    x = x64.float().cuda().requires_grad_()
    rois = rois64.float().cuda()
    if op == "roi_align":
        g64 = torch.randn(2, C, 2, 2, dtype=torch.float64).float().double()

        def fn():
            return mmkernels.roi_align(x, rois, 2, 1.0, 2, True)

        xr = x64.clone().requires_grad_()
        (ref,) = torch.autograd.grad(reference.roi_align(xr, rois64, (2, 2), 1.0, 2, True), xr,
                                     g64)
    else:
        g64 = torch.randn(2, C, dtype=torch.float64).float().double()

        def fn():
            return mmkernels.region_features(x, rois, 2, 1.0, 2, True)

        xr = x64.clone().requires_grad_()
        (ref,) = torch.autograd.grad(
            reference.roi_align(xr, rois64, (2, 2), 1.0, 2, True).mean((2, 3)), xr, g64)
    atomic, det = _det_and_atomic_grads(fn, x, g64.float().cuda())
    assert torch.equal(det[0], det[1])
    assert_close_to_reference(det[0].cpu(), ref, what="deterministic grad")
    assert_close_to_reference(atomic.cpu(), ref, what="atomic grad")


def _check_det_against_atomic_and_reference(x64, rois64, layout):
    """roi_align's deterministic backward on (x64, rois64) in float32: bitwise run to
    run, within the tolerance table of the float64 reference and of the atomic one."""
    x64, rois64 = x64.float().double(), rois64.float().double()  # the float32 inputs
    x = x64.float().cuda()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    rois = rois64.float().cuda()
    g64 = torch.randn(rois.shape[0], x.shape[1], 2, 3, dtype=torch.float64).float().double()
    atomic, det = _det_and_atomic_grads(
        lambda: mmkernels.roi_align(x, rois, (2, 3), 1.0, 2, False), x, g64.float().cuda())
    assert torch.equal(det[0], det[1])
    xr = x64.clone().requires_grad_()
    (ref,) = torch.autograd.grad(reference.roi_align(xr, rois64, (2, 3), 1.0, 2, False), xr, g64)
    assert_close_to_reference(det[0].cpu(), ref, what="deterministic grad")
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(det[0], atomic, atol=atol, rtol=rtol)


@pytest.mark.cuda
@pytest.mark.parametrize("overflow", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_deterministic_backward_bins(layout, overflow):
    """Issue 13: the binned deterministic backward on a 256 x 1024 map (32 x 32 tiles of
    8 x 32 per image): 400 small boxes (a few tiles each, every pair in its slot), then
    with overflow also 48 whole-map boxes (1024 tiles each: 48 * 1024 pairs against
    kBinSlotsPerRegion * 448 + 2048 slots), so the regions from k_cut on are tested in
    order by every tile. Bitwise run to run, equal to the atomic backward and the
    float64 reference within the tolerance table."""
    x64 = make_input((2, 3, 256, 1024), torch.float64, layout)
    xy = torch.rand(400, 2, dtype=torch.float64) * torch.tensor([1000.0, 240.0])
    wh = torch.rand(400, 2, dtype=torch.float64) * 24.0
    small = torch.cat([torch.randint(0, 2, (400, 1)).double(), xy, xy + wh], 1)
    rois64 = small
    if overflow:
        big = torch.tensor([[k % 2, 0.3 * k, 0.1 * k, 1023.0 - 0.7 * k, 255.0 - 0.2 * k]
                            for k in range(48)], dtype=torch.float64)
        rois64 = torch.cat([small, big])
    _check_det_against_atomic_and_reference(x64, rois64, layout)


@pytest.mark.cuda
@pytest.mark.parametrize("fill", [True, False], ids=["nan_fill", "no_fill"])
def test_cuda_deterministic_backward_writes_every_element(fill, monkeypatch):
    """Issue 13 review (d): the deterministic backward's accumulation buffers are no
    longer zero-filled (the gather writes every element). Neither the NaN that
    deterministic mode's empty() writes (torch.utils.deterministic.
    fill_uninitialized_memory) nor, with that off, recycled NaN-filled memory (the
    caching allocator hands the freed block back) may show through: pixels that no
    region reaches are exactly 0, on every level."""
    import torch.utils.deterministic

    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", fill)
    feats = [torch.randn(2, 6, 40, 72, device="cuda", requires_grad=True),
             torch.randn(2, 6, 20, 36, device="cuda", requires_grad=True)]
    boxes = [torch.tensor([[4.0, 4.0, 30.0, 40.0]], device="cuda"),
             torch.tensor([[100.0, 50.0, 260.0, 150.0]], device="cuda")]
    out = mmkernels.multiscale_roi_align(feats, boxes, [(160, 288)] * 2, 3, 2,
                                         canonical_scale=64, canonical_level=3)
    g = torch.randn_like(out)
    atomic = torch.autograd.grad(out, feats, g, retain_graph=True)
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(3):
            junk = torch.full((4 * sum(f.numel() for f in feats),), float("nan"), device="cuda")
            del junk
            det = torch.autograd.grad(out, feats, g, retain_graph=True)
            for a, d in zip(atomic, det):
                assert not d.isnan().any()
                assert (d[a == 0] == 0).all()  # pixels no region reaches
                torch.testing.assert_close(d, a, atol=1e-5, rtol=1e-5)
    finally:
        torch.use_deterministic_algorithms(False)
