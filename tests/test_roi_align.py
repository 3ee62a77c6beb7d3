"""RoIAlign family: roi_align, region_features, multiscale_roi_align.

Compared with torchvision.ops.roi_align / MultiScaleRoIAlign and with the float64
eager reference in mmkernels.reference; tolerances come from mmkernels.testing.
"""

import pytest
import torch
import torchvision

import mmkernels
from mmkernels import _extension, reference
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
    torch.testing.assert_close(feats, pooled, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(feats)
    (ga,) = torch.autograd.grad(feats, x, g)
    (gb,) = torch.autograd.grad(pooled, x, g)
    torch.testing.assert_close(ga, gb, atol=1e-12, rtol=1e-12)


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
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(ours)
    theirs.backward(g)
    ours.backward(g)
    for k in names:
        torch.testing.assert_close(ours_in[k].grad, theirs_in[k].grad, atol=1e-12, rtol=1e-12)


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
    torch.testing.assert_close(compiled(x, rois), fn(x, rois), atol=1e-6, rtol=1e-6)


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
    torch.testing.assert_close(fused, ref, atol=1e-12, rtol=1e-12)


def test_module_wrappers():
    m = mmkernels.nn.RoIAlign((2, 3), 0.5, 2, True)
    x = make_input((2, 4, 8, 8))
    rois = make_rois(2, 8, 8, 5, 0.5)
    torch.testing.assert_close(m(x, rois), torchvision.ops.RoIAlign((2, 3), 0.5, 2, True)(x, rois))
    assert "aligned=True" in repr(m)
    r = mmkernels.nn.RegionFeatures((2, 3), 0.5, 2, True)
    torch.testing.assert_close(r(x, rois), m(x, rois).mean((2, 3)), atol=1e-6, rtol=1e-6)


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
    torch.use_deterministic_algorithms(True)
    try:
        runs = [torch.autograd.grad(mmkernels.roi_align(x, rois, 5, 1.0, 2, True), x, g)[0]
                for _ in range(2)]
        (mean_grad,) = torch.autograd.grad(
            mmkernels.region_features(x, rois, 5, 1.0, 2, True), x, g.mean((2, 3)))
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(runs[0], runs[1])
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
    with pytest.raises(RuntimeError, match="batch index"):
        mmkernels.roi_align(feats[0], torch.tensor([[7.0, 0, 0, 1, 1]], device="cuda"), 2)
