"""Run a function on every rank of a real CPU process group (spawned processes, gloo)."""
from __future__ import annotations

import os
import tempfile
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, fn: Callable[[int, int], None]) -> None:
    torch.set_num_threads(1)  # W processes share the 2-core box
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_group(fn: Callable[[int, int], None], world_size: int, timeout: float = 120) -> None:
    """Call `fn(rank, world_size)` in `world_size` spawned processes joined in a gloo
    group; an exception on any rank fails the call (mp.spawn re-raises it)."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        ctx = mp.start_processes(_entry, args=(world_size, init_file, fn), nprocs=world_size,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):  # raises ProcessRaisedException if a rank failed
            if time.monotonic() > deadline:
                for process in ctx.processes:
                    process.kill()
                raise TimeoutError(f"process group of {world_size} ranks did not finish in {timeout} s (hang?)")


def open_clip_loss_module():
    """open_clip's loss.py loaded on its own: `import open_clip` pulls in the whole model
    zoo (10-20 s per spawned rank on this box); loss.py itself only needs torch."""
    import importlib.util
    import sys

    name = "_open_clip_loss_reference"
    if name not in sys.modules:
        origin = importlib.util.find_spec("open_clip").submodule_search_locations[0]
        spec = importlib.util.spec_from_file_location(name, os.path.join(origin, "loss.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]
