"""One DDP rank for tests/models/_convergence.ddp_gradients (gloo, CPU).

argv: rank world port "path/to/file.py:function" out_dir. The function returns
(make_model, make_batch(rank), loss_fn(model, batch)). One forward + backward of
DistributedDataParallel(model), eager then patched; the gradients (averaged by DDP)
and losses are saved to out_dir/rank{rank}.pt.
"""

import importlib.util
import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    rank, world, port, case, out = sys.argv[1:6]
    rank, world = int(rank), int(world)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    path, fn = case.rsplit(":", 1)
    spec = importlib.util.spec_from_file_location("ddp_case", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mmkernels.models import patch

    make_model, make_batch, loss_fn = getattr(mod, fn)()
    res = {"loss": {}}
    for variant in ("eager", "patched"):
        torch.manual_seed(0)
        model = make_model()
        if variant == "patched" and not patch(model):
            raise RuntimeError("patch() replaced nothing")
        ddp = DDP(model)
        torch.manual_seed(100 + rank)
        loss = loss_fn(ddp, make_batch(rank))
        loss.backward()
        res["loss"][variant] = float(loss.detach())
        res[variant] = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                        if p.grad is not None}
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
