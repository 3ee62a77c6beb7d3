"""The distributed contrastive losses against open_clip across 2, 3 and 4 gloo processes
(float64 on the chunked path, float32 on the Triton kernels), both modes through the
nn modules, and the distributed regressions of issue 10 (defects 12-13: local modules
issue no collective, no size is read back from a device)."""

import os
import subprocess
import sys
import types

import pytest
import torch

import mmkernels
from mmkernels.ops import _contrastive_dist as cdist
from mmkernels.ops import contrastive as ops
from mmkernels.testing import assert_close_to_reference

WORKER = os.path.join(os.path.dirname(__file__), "_dist_worker.py")


def features(B, D, dtype=torch.float64):
    f = [torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1)
         for _ in range(2)]
    return [t.to(dtype) for t in f]


def _worker_env() -> dict:
    """The workers import the mmkernels under test (a script's own directory, not the
    working directory, heads sys.path, so without this they would import whichever
    mmkernels is installed)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(mmkernels.__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)


def _emulate_open_clip(img, txt, scale, bias, bounds):
    """open_clip's per-rank losses in one process: rank r's gradients are those of the
    sum of every rank's loss (its features reach the other ranks through all_gather /
    neighbour exchange with grad), logit_scale's of its own loss."""
    out = []
    for r in range(len(bounds) - 1):
        lo, hi = bounds[r], bounds[r + 1]
        i_all = img.detach().clone().requires_grad_()
        t_all = txt.detach().clone().requires_grad_()
        per = {}
        for kind in ("clip", "siglip"):
            s = scale.detach().clone().requires_grad_()
            b = bias.detach().clone().requires_grad_()
            total = 0
            own = None
            for q in range(len(bounds) - 1):
                ql, qh = bounds[q], bounds[q + 1]
                if kind == "clip":
                    li = s * i_all[ql:qh] @ t_all.T
                    lt = s * t_all[ql:qh] @ i_all.T
                    lab = torch.arange(ql, qh)
                    loss = (torch.nn.functional.cross_entropy(li, lab)
                            + torch.nn.functional.cross_entropy(lt, lab)) / 2
                else:
                    logits = s * i_all[ql:qh] @ t_all.T + b
                    z = -torch.ones_like(logits)
                    z[torch.arange(qh - ql), torch.arange(ql, qh)] = 1
                    loss = -torch.nn.functional.logsigmoid(z * logits).sum() / (qh - ql)
                total = total + loss
                if q == r:
                    own = loss
            gi, gt = torch.autograd.grad(total, (i_all, t_all), retain_graph=True)
            gs, gb = torch.autograd.grad(own, (s, b), allow_unused=True)
            per[kind] = dict(loss=own.detach(), image=gi[lo:hi], text=gt[lo:hi], scale=gs,
                             bias=gb)
        out.append(per)
    return out


@pytest.mark.parametrize("world,local_sizes,chunk,dtype", [
    pytest.param(2, [12, 12], 5, torch.float64, id="2-ranks-chunk5"),
    pytest.param(4, [9, 9, 9, 9], 4, torch.float64, id="4-ranks-chunk4"),
    pytest.param(3, [7, 12, 4], 5, torch.float64, id="3-ranks-uneven-batches"),
    # float32: the Triton kernels in every rank (under the interpreter without a GPU)
    pytest.param(2, [21, 19], 5, torch.float32, id="2-ranks-uneven-float32-triton"),
])
def test_distributed_gloo_matches_open_clip(tmp_path, world, local_sizes, chunk, dtype):
    torch.manual_seed(world)
    N, D = sum(local_sizes), 24
    img, txt = features(N, D)
    bounds = [0]
    for n in local_sizes:
        bounds.append(bounds[-1] + n)
    uneven = len(set(local_sizes)) > 1
    scale = torch.tensor(12.0, dtype=torch.float64)
    bias = torch.tensor(-4.0, dtype=torch.float64)
    data = dict(image=img.to(dtype), text=txt.to(dtype), scale=scale.to(dtype),
                bias=bias.to(dtype), bounds=bounds, chunk=chunk, uneven=uneven)
    torch.save(data, tmp_path / "data.pt")
    env = _worker_env()
    if dtype == torch.float64:
        env.pop("TRITON_INTERPRET", None)
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), str(world),
                               str(tmp_path / "init"), str(tmp_path / "data.pt"), str(tmp_path)],
                              env=env, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errs)
    expect = _emulate_open_clip(img, txt, scale, bias, bounds)
    for r in range(world):
        res = torch.load(tmp_path / f"rank{r}.pt")
        for kind, impl in [(k, i) for k in ("clip", "siglip")
                           for i in ("ours", "ours-ring")[:1 if uneven else 2]]:
            # the modules in both modes (mode="ring": equal local batches only)
            ours = res[f"{impl}-{kind}"]
            refs = [expect[r][kind]] + ([] if uneven else [res[f"open_clip-{kind}"]])
            for ref in refs:
                for key in ("loss", "image", "text", "scale", "bias"):
                    if ours[key] is None or ref[key] is None:
                        continue
                    # float64: ours against open_clip; float32: against the float64
                    # emulation, by the per-dtype table
                    tol = "float64_vs_open_clip" if dtype == torch.float64 else None
                    assert_close_to_reference(ours[key], ref[key], tol=tol,
                                              what=f"rank {r} {impl} {kind} {key}")


def test_default_modules_are_local_under_a_process_group(tmp_path):
    """Defect 12: ClipLoss() / SigLipLoss() (world_size=1) under an initialised 2-rank
    group compute the local loss on rank 0 alone, equal to open_clip's, issuing no
    collective (the worker makes every collective raise, so none can deadlock)."""
    img, txt = features(16, 24)
    data = dict(image=img, text=txt, scale=torch.tensor(12.0, dtype=torch.float64),
                bias=torch.tensor(-4.0, dtype=torch.float64))
    torch.save(data, tmp_path / "data.pt")
    env = _worker_env()
    env.pop("TRITON_INTERPRET", None)
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), "2", str(tmp_path / "init"),
                               str(tmp_path / "data.pt"), str(tmp_path), "local"],
                              env=env, stderr=subprocess.PIPE, text=True) for r in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errs)
    res = torch.load(tmp_path / "rank0.pt")
    assert res["errors"] == [] and res["issued"] == [], (res["errors"], res["issued"])
    for kind in ("clip", "siglip", "siglip-no-bias"):
        ours, ref = res[f"ours-{kind}"], res[f"open_clip-{kind}"]
        for key in ("loss", "image", "text", "scale", "bias"):
            if ref[key] is None:
                assert ours[key] is None, f"{kind} {key}"
                continue
            assert_close_to_reference(ours[key], ref[key], tol="float64_vs_open_clip",
                                      what=f"{kind} {key}")


def test_module_world_size_and_rank_must_match_the_group(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a: 1)
    img, txt = features(4, 8)
    s = torch.tensor(2.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="world_size=2"):
        mmkernels.nn.ClipLoss(local_loss=True, gather_with_grad=True, rank=1, world_size=2)(
            img, txt, s)
    with pytest.raises(ValueError, match="rank=0"):
        mmkernels.nn.SigLipLoss(rank=0, world_size=4)(img, txt, s, s)


class _FakeDist:
    """torch.distributed as ops sees it, for one process pretending to be rank 0 of
    `world` ranks that all hold the same features: records every call."""

    def __init__(self, world):
        self.world, self.calls = world, []

    def all_gather_into_tensor(self, out, x, group=None):
        self.calls.append(("all_gather_into_tensor", tuple(x.shape)))
        out.copy_(torch.cat([x] * self.world))

    ReduceOp = types.SimpleNamespace(SUM="sum", MAX="max")

    def all_reduce(self, x, op="sum", group=None):
        self.calls.append(("all_reduce", tuple(x.shape), op))
        if op == "sum":
            x.mul_(self.world)

    def reduce_scatter_tensor(self, out, x, group=None):
        self.calls.append(("reduce_scatter_tensor", tuple(x.shape), x.dtype))
        out.copy_(x[:out.shape[0]] * self.world)

    def __getattr__(self, name):
        raise AssertionError(f"unexpected torch.distributed.{name}")


@pytest.mark.parametrize("kind", ["info_nce", "sigmoid"])
def test_distributed_reads_no_size_from_the_device(monkeypatch, kind):
    """Defect 14: with the batch sizes known on the host (equal batches off the CPU, or
    local_batch_sizes), a distributed forward + backward runs only the listed
    collectives, and reads nothing back from a device (the size exchange and
    its .item() per rank are gone)."""
    fake = _FakeDist(2)
    monkeypatch.setattr(cdist, "dist", fake)
    img, txt = (t.requires_grad_() for t in features(6, 8))
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)

    def no_host_read(*a, **k):
        raise AssertionError("a value was read back from a tensor")

    monkeypatch.setattr(torch.Tensor, "item", no_host_read)
    monkeypatch.setattr(torch.Tensor, "tolist", no_host_read)
    if kind == "info_nce":
        loss = ops._info_nce_on(img, txt, s, None, object(), 2, 0, local_batch_sizes=[6, 6])
    else:
        loss = ops._sigmoid_contrastive_on(img, txt, s, b, None, object(), 2, 0,
                                           local_batch_sizes=[6, 6])
    loss.backward()
    D = 8
    if kind == "info_nce":  # the texts; the column statistics (max, then sums and
        # positives); the incoming gradients; the texts' gradients; the scale's parts
        assert fake.calls == [("all_gather_into_tensor", (6, D)),
                              ("all_reduce", (12,), "max"), ("all_reduce", (24,), "sum"),
                              ("all_gather_into_tensor", (1,)),
                              ("reduce_scatter_tensor", (12, D), torch.float64),
                              ("all_reduce", (2,), "sum")]
    else:
        assert fake.calls == [("all_gather_into_tensor", (6, D)),
                              ("reduce_scatter_tensor", (12, D), torch.float64)]
    # off the CPU, equal batches are taken on trust: no collective to learn the sizes
    fake.calls.clear()
    meta = torch.empty(6, D, device="meta")
    assert ops._local_sizes(meta, object(), 2, 1, None) == (6, 6)
    assert fake.calls == []


def test_cpu_uneven_batches_without_sizes_raise(monkeypatch):
    class Uneven(_FakeDist):
        def all_gather_into_tensor(self, out, x, group=None):
            self.calls.append("sizes")
            out.copy_(torch.tensor([x.item(), x.item() + 1]))

    monkeypatch.setattr(cdist, "dist", Uneven(2))
    img, txt = features(5, 8)
    with pytest.raises(ValueError, match="local_batch_sizes"):
        ops._info_nce_on(img, txt, torch.tensor(1.0), None, object(), 2, 0)
    with pytest.raises(ValueError, match="local_batch_sizes"):
        ops._info_nce_on(img, txt, torch.tensor(1.0), None, object(), 2, 0,
                         local_batch_sizes=[4, 5])
