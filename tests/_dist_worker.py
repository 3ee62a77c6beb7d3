"""Worker for the multi-process contrastive tests (gloo, CPU).

mode "global" (default): each rank computes the loss on its slice with mmkernels and
with open_clip, and saves values and gradients.
mode "modes": both distributed modes of the functional ops (ring against all_gather).
mode "passes": the GEMM passes per rank of each mode and loss, counted by the audit's
counters (mmkernels.tools.audit_counters) in the forward and in the backward.
mode "memory": per rank and mode, the bytes kept from forward to backward
(saved_tensors_hooks), the bytes of the collectives' buffers and the largest tensor
any aten op creates (a dispatch mode).
mode "local": under the initialised 2-rank group, rank 0 alone evaluates the default
(world_size=1) ClipLoss / SigLipLoss and open_clip's, with every torch.distributed
collective replaced by one that records its name and raises (so a collective can
neither deadlock nor pass unnoticed); rank 1 only waits at the final barrier.
"""

import os
import sys

import torch
import torch.distributed as dist

COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
               "send", "recv", "isend", "irecv", "batch_isend_irecv", "barrier",
               "all_gather_object", "gather", "scatter")


def run_global(rank: int, world: int, data: dict) -> dict:
    import open_clip

    import mmkernels

    lo, hi = data["bounds"][rank], data["bounds"][rank + 1]
    sizes = [data["bounds"][r + 1] - data["bounds"][r] for r in range(world)]
    chunk = data["chunk"]
    res = {}
    for impl in ("ours", "ours-ring", "open_clip"):
        for kind in ("clip", "siglip"):
            if impl == "ours-ring" and data["uneven"]:
                continue  # the modules (ring mode) need equal local batches, as open_clip
            img = data["image"][lo:hi].clone().requires_grad_()
            txt = data["text"][lo:hi].clone().requires_grad_()
            scale = data["scale"].clone().requires_grad_()
            bias = data["bias"].clone().requires_grad_()
            if impl == "ours" and data["uneven"]:
                # uneven local batches: the functional ops, told every rank's batch
                if kind == "clip":
                    loss = mmkernels.info_nce(img, txt, scale, chunk_size=chunk,
                                              local_batch_sizes=sizes)
                else:
                    loss = mmkernels.sigmoid_contrastive(img, txt, scale, bias, chunk_size=chunk,
                                                         local_batch_sizes=sizes)
            elif impl in ("ours", "ours-ring"):
                mode = "ring" if impl == "ours-ring" else "all_gather"
                if kind == "clip":
                    loss = mmkernels.nn.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank,
                                                 world_size=world, chunk_size=chunk,
                                                 mode=mode)(img, txt, scale)
                else:
                    loss = mmkernels.nn.SigLipLoss(rank=rank, world_size=world, chunk_size=chunk,
                                                   mode=mode)(img, txt, scale, bias)
            else:
                if data["uneven"]:
                    continue  # open_clip's all_gather needs equal local batches
                if kind == "clip":
                    loss = open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank,
                                              world_size=world)(img, txt, scale)
                else:
                    loss = open_clip.loss.SigLipLoss(rank=rank, world_size=world)(img, txt, scale,
                                                                                 bias)
            loss.backward()
            res[f"{impl}-{kind}"] = dict(loss=loss.detach(), image=img.grad, text=txt.grad,
                                         scale=scale.grad,
                                         bias=bias.grad if bias.grad is not None else None)
    return res


def run_modes(rank: int, world: int, data: dict) -> dict:
    """Both distributed modes of the functional ops on this rank's slice (uneven
    batches allowed): values and gradients, to compare ring with all_gather."""
    import mmkernels

    lo, hi = data["bounds"][rank], data["bounds"][rank + 1]
    sizes = [data["bounds"][r + 1] - data["bounds"][r] for r in range(world)]
    res = {}
    for mode in ("all_gather", "ring"):
        for kind in ("clip", "siglip"):
            img = data["image"][lo:hi].clone().requires_grad_()
            txt = data["text"][lo:hi].clone().requires_grad_()
            scale = data["scale"].clone().requires_grad_()
            bias = data["bias"].clone().requires_grad_()
            kw = dict(chunk_size=data["chunk"], local_batch_sizes=sizes, mode=mode)
            if kind == "clip":
                loss = mmkernels.info_nce(img, txt, scale, **kw)
            else:
                loss = mmkernels.sigmoid_contrastive(img, txt, scale, bias, **kw)
            loss.backward()
            with torch.no_grad():  # the loss alone, computing no gradient
                if kind == "clip":
                    plain = mmkernels.info_nce(img, txt, scale, **kw)
                else:
                    plain = mmkernels.sigmoid_contrastive(img, txt, scale, bias, **kw)
            res[f"{mode}-{kind}"] = dict(loss=loss.detach(), no_grad=plain, image=img.grad,
                                         text=txt.grad, scale=scale.grad, bias=bias.grad)
    return res


def _leaves(data: dict, lo: int, hi: int) -> tuple:
    return (data["image"][lo:hi].clone().requires_grad_(),
            data["text"][lo:hi].clone().requires_grad_(),
            data["scale"].clone().requires_grad_(), data["bias"].clone().requires_grad_())


def _loss(kind: str, img, txt, scale, bias, **kw):
    import mmkernels

    if kind == "clip":
        return mmkernels.info_nce(img, txt, scale, **kw)
    return mmkernels.sigmoid_contrastive(img, txt, scale, bias, **kw)


def run_passes(rank: int, world: int, data: dict) -> dict:
    """FLOPs of the Triton kernels' tl.dot and of torch's GEMMs, forward and backward,
    per mode and loss (uneven batches allowed)."""
    from mmkernels.tools.audit_counters import measure

    lo, hi = data["bounds"][rank], data["bounds"][rank + 1]
    sizes = [data["bounds"][r + 1] - data["bounds"][r] for r in range(world)]
    res = {}
    for mode in ("all_gather", "ring"):
        for kind in ("clip", "siglip"):
            leaves = _leaves(data, lo, hi)
            with measure() as fwd:
                loss = _loss(kind, *leaves, local_batch_sizes=sizes, mode=mode)
            with measure() as bwd:
                loss.backward()
            res[f"{mode}-{kind}"] = dict(fwd=fwd.flops, bwd=bwd.flops,
                                         kernels=sorted(fwd.kernels) + sorted(bwd.kernels))
    return res


def run_memory(rank: int, world: int, data: dict) -> dict:
    """Per mode and loss: `saved`, the bytes of the distinct storages saved for the
    backward other than the inputs'; `gathered`, the bytes of the all-gathered and
    reduce-scattered buffers (those larger than a scalar per rank); `in_flight`, the
    largest bytes of one ring step's send and receive buffers; `largest`, the bytes of
    the largest tensor an aten op created."""
    from torch.utils._python_dispatch import TorchDispatchMode

    lo, hi = data["bounds"][rank], data["bounds"][rank + 1]
    sizes = [data["bounds"][r + 1] - data["bounds"][r] for r in range(world)]
    record = {}

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and not func.is_view:
                    record["largest"] = max(record["largest"], t.numel() * t.element_size())
            return out

    def nbytes(t):
        return t.numel() * t.element_size()

    saved_fns = {n: getattr(dist, n) for n in ("all_gather_into_tensor", "reduce_scatter_tensor",
                                                "batch_isend_irecv")}

    def gather(out, inp, *a, **k):
        if out.numel() > world:
            record["gathered"] += nbytes(out)
        return saved_fns["all_gather_into_tensor"](out, inp, *a, **k)

    def scatter(out, inp, *a, **k):
        if inp.numel() > world:
            record["gathered"] += nbytes(inp)
        return saved_fns["reduce_scatter_tensor"](out, inp, *a, **k)

    def p2p(ops):
        record["in_flight"] = max(record["in_flight"], sum(nbytes(op.tensor) for op in ops))
        return saved_fns["batch_isend_irecv"](ops)

    dist.all_gather_into_tensor, dist.reduce_scatter_tensor = gather, scatter
    dist.batch_isend_irecv = p2p
    res = {}
    try:
        for mode in ("all_gather", "ring"):
            for kind in ("clip", "siglip"):
                leaves = _leaves(data, lo, hi)
                inputs = {t.untyped_storage().data_ptr() for t in leaves}
                kept = {}

                def pack(t, inputs=inputs, kept=kept):
                    ptr = t.untyped_storage().data_ptr()
                    if ptr not in inputs:
                        kept[ptr] = t.untyped_storage().nbytes()
                    return t

                record.update(gathered=0, in_flight=0, largest=0)
                with Largest(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = _loss(kind, *leaves, local_batch_sizes=sizes, mode=mode,
                                 chunk_size=data["chunk"])
                    loss.backward()
                res[f"{mode}-{kind}"] = dict(record, saved=sum(kept.values()))
    finally:
        for n, f in saved_fns.items():
            setattr(dist, n, f)
    return res


def run_local(rank: int, data: dict) -> dict:
    """Rank 0 only: the default modules (world_size=1) must not issue any collective."""
    if rank != 0:
        return {}
    import open_clip

    import mmkernels

    issued = []
    saved = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}

    def refuse(name):
        def call(*args, **kwargs):
            issued.append(name)
            raise RuntimeError(f"collective {name} issued by a world_size=1 loss")
        return call

    res = {"issued": issued, "errors": []}
    for n in saved:
        setattr(dist, n, refuse(n))
    try:
        for impl in ("ours", "open_clip"):
            for kind in ("clip", "siglip", "siglip-no-bias"):
                img = data["image"].clone().requires_grad_()
                txt = data["text"].clone().requires_grad_()
                scale = data["scale"].clone().requires_grad_()
                bias = None if kind == "siglip-no-bias" else data["bias"].clone().requires_grad_()
                lib = mmkernels.nn if impl == "ours" else open_clip.loss
                try:
                    if kind == "clip":
                        loss = lib.ClipLoss()(img, txt, scale)
                    else:
                        loss = lib.SigLipLoss()(img, txt, scale, bias)
                    loss.backward()
                except Exception as e:  # noqa: BLE001 (reported to the test)
                    res["errors"].append(f"{impl}-{kind}: {type(e).__name__}: {e}")
                    continue
                res[f"{impl}-{kind}"] = dict(
                    loss=loss.detach(), image=img.grad, text=txt.grad, scale=scale.grad,
                    bias=bias.grad if bias is not None else None)
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)
    return res


def run_ranks(tmp_path, data: dict, world: int, mode: str, interpret: bool = True,
              timeout: int = 600) -> list[dict]:
    """The tests' side: runs this worker on `world` gloo ranks (one process each) in
    `mode` with `data`, and returns every rank's results. interpret: Triton's
    interpreter on (the Triton kernels on CPU tensors), else off (the chunked path)."""
    import subprocess

    import mmkernels

    root = os.path.dirname(os.path.dirname(os.path.abspath(mmkernels.__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    if not interpret:
        env.pop("TRITON_INTERPRET", None)
    torch.save(data, os.path.join(tmp_path, "data.pt"))
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(r), str(world),
                               os.path.join(tmp_path, "init"), os.path.join(tmp_path, "data.pt"),
                               str(tmp_path), mode], env=env, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    errs = [p.communicate(timeout=timeout)[1] for p in procs]
    if any(p.returncode != 0 for p in procs):
        raise RuntimeError("\n".join(errs))
    return [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(world)]


def main(rank: int, world: int, init_file: str, data_file: str, out_dir: str,
         mode: str = "global") -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    data = torch.load(data_file)
    if mode == "modes":
        res = run_modes(rank, world, data)
    elif mode == "passes":
        res = run_passes(rank, world, data)
    elif mode == "memory":
        res = run_memory(rank, world, data)
    else:
        res = run_global(rank, world, data) if mode == "global" else run_local(rank, data)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5],
         *sys.argv[6:])
