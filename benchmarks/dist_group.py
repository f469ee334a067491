"""A gloo process group of W spawned worker processes for benchmarks. Every call of
`ProcessGroupRunner.step()` makes all ranks run one forward+backward of the configured
loss and waits until all are done: the collectives keep the ranks in lockstep, so the
time of one call is the per-rank step time (plus a queue round trip, ~0.1 ms).
`peak_memory()` has rank 0 sample its own peak extra RSS over one step. (The pytest
process itself stays out of the group: re-initialising process groups of different
sizes in one process leaves stale group handles in torch.distributed.nn.)"""
from __future__ import annotations

import dataclasses
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclasses.dataclass(frozen=True)
class LossCase:
    kind: str  # "contrastive" | "siglip"
    impl: str  # "clip_fast" | "open_clip"
    global_batch: int
    dim: int
    gather_with_grad: bool = True  # contrastive only; local_loss is always True


def make_step(case: LossCase, rank: int, world_size: int):
    """Inputs of this rank and a closure running one forward + backward."""
    b = case.global_batch // world_size
    g = torch.Generator().manual_seed(rank)
    image = torch.nn.functional.normalize(torch.randn(b, case.dim, generator=g), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(b, case.dim, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    if case.kind == "contrastive":
        # open_clip's recommended multi-GPU setting is --local-loss --gather-with-grad
        gwg = case.gather_with_grad
        if case.impl == "clip_fast":
            from clip_fast.distributed_loss import ShardSpec, sharded_contrastive_loss

            spec = ShardSpec(rank, world_size, local_loss=True, gather_with_grad=gwg)
            loss_fn = lambda i, t, s, bb: sharded_contrastive_loss(i, t, s, None, spec)  # noqa: E731
        else:
            from open_clip.loss import ClipLoss

            clip = ClipLoss(local_loss=True, gather_with_grad=gwg, rank=rank, world_size=world_size)
            loss_fn = lambda i, t, s, bb: clip(i, t, s)  # noqa: E731
    else:
        if case.impl == "clip_fast":
            from clip_fast import SigLipLoss
        else:
            from open_clip.loss import SigLipLoss
        loss_fn = SigLipLoss(rank=rank, world_size=world_size)

    def step():
        image.grad = text.grad = scale.grad = bias.grad = None
        loss_fn(image, text, scale, bias).backward()

    return step


def _worker(rank: int, world_size: int, init_file: str, commands, done) -> None:
    torch.set_num_threads(1)  # W single-threaded ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    step = None
    while True:
        cmd, arg = commands.get()
        if cmd == "stop":
            break
        result = None
        if cmd == "setup":
            step = make_step(arg, rank, world_size)
            step()  # warm-up
        elif cmd == "step":
            step()
        elif cmd == "memory":
            from conftest import peak_extra_memory

            result = peak_extra_memory(step, "cpu")
        done.put((rank, result))
    dist.destroy_process_group()


class ProcessGroupRunner:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._tmp = tempfile.TemporaryDirectory()
        init_file = os.path.join(self._tmp.name, "rendezvous")
        ctx = mp.get_context("spawn")
        self._queues = [ctx.Queue() for _ in range(world_size)]
        self._done = ctx.Queue()
        self._procs = [
            ctx.Process(target=_worker, args=(rank, world_size, init_file, q, self._done), daemon=True)
            for rank, q in enumerate(self._queues)
        ]
        for p in self._procs:
            p.start()

    def _all(self, cmd: str, arg=None) -> dict:
        for q in self._queues:
            q.put((cmd, arg))
        results = {}
        for _ in range(self.world_size):
            rank, result = self._done.get(timeout=600)
            results[rank] = result
        return results

    def setup(self, case: LossCase) -> None:
        self._all("setup", case)

    def step(self) -> None:
        self._all("step")

    def peak_memory(self) -> int:
        """Rank 0's peak extra memory (bytes) over one step."""
        return self._all("memory")[0]

    def close(self) -> None:
        for q in self._queues:
            q.put(("stop", None))
        for p in self._procs:
            p.join(timeout=60)
        self._tmp.cleanup()
