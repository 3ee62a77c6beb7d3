"""Worker for the multi-process contrastive tests (gloo, CPU): each rank computes the
loss on its slice with mmkernels and with open_clip, and saves values and gradients."""

import os
import sys

import torch
import torch.distributed as dist


def main(rank: int, world: int, init_file: str, data_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    import open_clip

    import mmkernels

    data = torch.load(data_file)
    lo, hi = data["bounds"][rank], data["bounds"][rank + 1]
    chunk = data["chunk"]
    res = {}
    for impl in ("ours", "open_clip"):
        for kind in ("clip", "siglip"):
            img = data["image"][lo:hi].clone().requires_grad_()
            txt = data["text"][lo:hi].clone().requires_grad_()
            scale = data["scale"].clone().requires_grad_()
            bias = data["bias"].clone().requires_grad_()
            if impl == "ours":
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
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
