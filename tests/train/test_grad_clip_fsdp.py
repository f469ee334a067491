"""--grad-clip-norm under FSDP2 (2 gloo ranks): loop._grad_multiplier's norm is the norm
of the full (unsharded, rank-averaged) gradient, not a per-shard norm, checked against
one process on the union batch in fp64."""
import json
import math
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp


def _model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))


def _batch(rank):
    torch.manual_seed(100 + rank)
    return torch.randn(4, 6)


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from clip_fast.train.loop import _grad_multiplier

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _model()
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        loss = model(_batch(rank)).pow(2).mean()
        loss.backward()
        run = SimpleNamespace(raw=model, env=SimpleNamespace(world_size=2), args=SimpleNamespace(grad_clip_norm=0.01))
        factor, norm = _grad_multiplier(run, loss)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"norm": float(norm), "factor": float(factor)}))
    finally:
        dist.destroy_process_group()


def test_fsdp2_clip_norm_is_the_full_gradient_norm(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    model = _model().double()
    # FSDP averages the ranks' gradients: the reference is the mean of both ranks' losses.
    loss = sum(model(_batch(r).double()).pow(2).mean() for r in range(2)) / 2
    loss.backward()
    ref = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    n_params = sum(p.numel() for p in model.parameters())
    tol = 16 * torch.finfo(torch.float32).eps * math.sqrt(n_params) * ref
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert abs(got["norm"] - ref) <= tol, (r, got, ref)
        assert abs(got["factor"] - 0.01 / (ref + 1e-6)) <= tol / ref * got["factor"] + 1e-9
