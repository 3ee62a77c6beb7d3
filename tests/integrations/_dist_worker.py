"""One gloo rank for test_transformers.test_distributed_loss_two_processes.

argv: rank world port out_dir. For CLIP and SigLIP (tiny, the test's configs): the
eager HF model on the global batch (loss, gradients: the reference, computed on every
rank without collectives); apply_to_clip(model, process_group=WORLD) on this rank's
half (loss, gradients averaged over the ranks by all_reduce, as DDP); and
apply_to_clip(model) without a group under the initialised world (must stay local,
equal to HF's local loss). Saved to out_dir/rank{rank}.pt.
"""

import copy
import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    rank, world, port, out = sys.argv[1:5]
    rank, world = int(rank), int(world)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    import mmkernels.integrations.transformers as mmhf
    from integrations.test_transformers import clip_batch, tiny_clip

    res = {}
    for kind in ("clip", "siglip"):
        siglip = kind == "siglip"
        batch = clip_batch(7, B=2 * world)
        if siglip:
            batch["attention_mask"] = None
        local = {k: (v[rank * 2:(rank + 1) * 2] if torch.is_tensor(v) else v) for k, v in batch.items()}
        eager = tiny_clip(siglip=siglip)
        ours = copy.deepcopy(eager)
        alone = copy.deepcopy(eager)
        loss = eager(**batch).loss
        loss.backward()
        ref = {"loss": float(loss), "grads": {n: p.grad.clone() for n, p in eager.named_parameters()
                                               if p.grad is not None}}
        eager.zero_grad(set_to_none=True)
        mmhf.apply_to_clip(ours, process_group=dist.group.WORLD)
        loss = ours(**local).loss
        loss.backward()
        grads = {}
        for n, p in ours.named_parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                grads[n] = p.grad / world
        mmhf.apply_to_clip(alone)
        with torch.no_grad():
            local_loss = {"ours": float(alone(**local).loss), "hf": float(eager(**local).loss)}
        res[kind] = {"global": ref, "loss": float(loss), "grads": grads, "local": local_loss}
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
