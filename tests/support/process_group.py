"""Run a function on every rank of a real CPU process group (spawned processes, gloo)."""
from __future__ import annotations

import faulthandler
import os
import tempfile
import time
import traceback
import warnings
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, fn: Callable[[int, int], None]) -> None:
    faulthandler.enable(all_threads=True)  # a rank that aborts prints where it was
    torch.set_num_threads(1)  # W processes share the 2-core box
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size)
        dist.barrier()
    except BaseException:
        traceback.print_exc()  # before teardown, which can abort the process and hide it
        raise
    finally:
        dist.destroy_process_group()


def _run_once(fn: Callable[[int, int], None], world_size: int, timeout: float) -> None:
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


def run_on_group(fn: Callable[[int, int], None], world_size: int, timeout: float = 120) -> None:
    """Call `fn(rank, world_size)` in `world_size` spawned processes joined in a gloo
    group; an exception on any rank fails the call (mp.spawn re-raises it).

    A rank killed by SIGABRT with no Python exception is retried once, with a warning:
    about 1 run in 10 on the 2-core CI box, a native thread aborts ("terminate called
    without an active exception") while open_clip's reference loss runs the backward of
    torch.distributed.nn.all_gather on gloo; it happens with clip_fast's C++ extension
    disabled too, and never with a Python-level failure, which is never retried."""
    try:
        _run_once(fn, world_size, timeout)
    except mp.ProcessExitedException as exc:
        if exc.signal_name != "SIGABRT":
            raise
        warnings.warn(f"a rank of a {world_size}-rank gloo group aborted natively ({exc}); retrying once")
        _run_once(fn, world_size, timeout)


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
