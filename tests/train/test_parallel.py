"""clip_fast.model.parallelize on gloo: DDP reduces bf16 gradients in fp32 (the comm hook)
and averages them like the fp32 mean of every rank's gradient."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from clip_fast.model import parallelize as P

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    reduced_dtypes = []
    original = dist.all_reduce

    def spy(tensor, *args, **kwargs):
        reduced_dtypes.append(tensor.dtype)
        return original(tensor, *args, **kwargs)

    dist.all_reduce = spy
    try:
        torch.manual_seed(0)
        model = nn.Linear(64, 3, bias=False).to(torch.bfloat16)
        ddp = P.parallelize(model, P.ParallelConfig(world_size=world, mode="ddp"))
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(5, 64, generator=g).to(torch.bfloat16)
        ddp(x).float().square().sum().backward()
        torch.save({"grad": model.weight.grad.clone(), "x": x, "w": model.weight.detach().clone(),
                    "dtypes": [str(d) for d in reduced_dtypes]}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.all_reduce = original
        dist.barrier()
        dist.destroy_process_group()


def test_ddp_reduces_bf16_gradients_in_fp32(tmp_path):
    world = 3
    mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True, start_method="spawn")
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert all(o["dtypes"] and set(o["dtypes"]) == {"torch.float32"} for o in outs), [o["dtypes"] for o in outs]
    # Reference: each rank's local bf16 gradient, averaged in fp64, rounded once to bf16.
    # The local gradients recomputed here may differ from the ranks' by one bf16 rounding
    # (2^-8 relative, other thread counts), the result by one more rounding: 2^-7 of the
    # largest local gradient bounds the difference.
    local = []
    for o in outs:
        w = o["w"].clone().requires_grad_(True)
        (o["x"] @ w.T).float().square().sum().backward()
        local.append(w.grad.double())
    expected = (sum(local) / world).to(torch.bfloat16)
    bound = 2.0**-7 * max(float(g.abs().max()) for g in local)
    for o in outs:
        assert (o["grad"].double() - expected.double()).abs().max() <= bound
