"""What a run reports: the step meter and the writers (console/tqdm, out.log, JSONL,
TensorBoard, wandb offline). Only global rank 0 writes."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN/inf: non-finite floats are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


@dataclass
class StepMeter:
    """Host-side counts between two log lines (the device-side sums -- loss, non-finite
    steps, text lengths -- live in TrainState and are read at the logging sync)."""

    started: float = field(default_factory=time.time)
    data_wait: float = 0.0
    samples: int = 0
    steps: int = 0

    def add(self, batch_size: int, waited: float) -> None:
        self.samples += batch_size
        self.steps += 1
        self.data_wait += waited

    def reset(self) -> None:
        self.started, self.data_wait, self.samples, self.steps = time.time(), 0.0, 0, 0

    @property
    def elapsed(self) -> float:
        return max(time.time() - self.started, 1e-9)


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak allocated / reserved GiB since the last call (CUDA), then reset."""
    if device.type != "cuda":
        return {}
    stats = {"max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
             "max_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    torch.cuda.reset_peak_memory_stats(device)
    return stats


def format_step(rec: dict[str, Any], world_size: int, on_gpu: bool) -> str:
    """One console line for a logged step record (open_clip's wording)."""
    mfu = f"  MFU {100 * rec['mfu']:.1f}%" if rec.get("mfu") is not None else ""
    per_gpu = f", {rec['samples_per_s_per_gpu']:.1f}/s/gpu" if on_gpu else ""
    mem = f"  mem {rec['max_memory_allocated_gib']:.1f}/{rec['max_memory_reserved_gib']:.1f} GiB" \
        if "max_memory_allocated_gib" in rec else ""
    loss = f"{rec['loss']:.4f}" if rec["loss"] is not None and math.isfinite(rec["loss"]) else "non-finite"
    return (f"Train Epoch: {rec['epoch']} [{rec['in_epoch']}/{rec['steps_per_epoch']} steps "
            f"({100 * rec['in_epoch'] / rec['steps_per_epoch']:.0f}%)] step {rec['step']}/{rec['stop_step']}  "
            f"Loss: {loss}  LR: {rec['lr']:.3e}  Logit Scale: {rec['logit_scale']:.2f}  "
            f"{rec['samples_per_s']:.1f} samples/s{per_gpu}  data-wait {100 * rec['data_wait']:.0f}%{mfu}{mem}")


class RunLog:
    """Console (a tqdm bar in a terminal, plain lines otherwise), LOGS/NAME/out.log,
    JSONL files, TensorBoard scalars and wandb (offline) -- on rank 0 only."""

    def __init__(self, run_dir: Path | None, is_main: bool, report_to: str = "", total_steps: int = 0,
                 wandb_project: str = "open-clip", wandb_notes: str = "") -> None:
        self.run_dir, self.is_main = run_dir, is_main
        self.out = None
        self.tb = None
        self.wandb = None
        self.bar = None
        if not is_main:
            return
        if run_dir is not None:
            self.out = open(run_dir / "out.log", "a")
            if "tensorboard" in report_to:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            if "wandb" in report_to:
                self.wandb = _wandb_run(run_dir, wandb_project, wandb_notes)
        if sys.stdout.isatty() and total_steps:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, dynamic_ncols=True, leave=True)

    def info(self, msg: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)
        if self.out is not None:
            self.out.write(msg + "\n")
            self.out.flush()

    def progress(self, step: int, postfix: str) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(postfix, refresh=True)

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in numbers.items()}, step=step)

    def jsonl(self, name: str, record: dict[str, Any]) -> None:
        if self.is_main and self.run_dir is not None:
            with open(self.run_dir / name, "a") as f:
                f.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")

    def close(self) -> None:
        for handle in (self.bar, self.tb, self.out):
            if handle is not None:
                handle.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(run_dir: Path, project: str, notes: str):
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")  # nothing leaves the machine
    return wandb.init(project=project, notes=notes, name=run_dir.name, dir=str(run_dir), mode="offline")


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop records with step > `after_step` (a resumed run rewrites them: no duplicates)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= after_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
