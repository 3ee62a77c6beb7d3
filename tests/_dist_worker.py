"""Worker for the multi-process contrastive tests (gloo, CPU).

mode "global" (default): each rank computes the loss on its slice with mmkernels and
with open_clip, and saves values and gradients.
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
    for impl in ("ours", "open_clip"):
        for kind in ("clip", "siglip"):
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
            elif impl == "ours":
                if kind == "clip":
                    loss = mmkernels.nn.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank,
                                                 world_size=world, chunk_size=chunk)(img, txt, scale)
                else:
                    loss = mmkernels.nn.SigLipLoss(rank=rank, world_size=world,
                                                   chunk_size=chunk)(img, txt, scale, bias)
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


def main(rank: int, world: int, init_file: str, data_file: str, out_dir: str,
         mode: str = "global") -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    data = torch.load(data_file)
    if mode == "modes":
        res = run_modes(rank, world, data)
    else:
        res = run_global(rank, world, data) if mode == "global" else run_local(rank, data)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5],
         *sys.argv[6:])
