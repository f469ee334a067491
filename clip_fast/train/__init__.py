"""`python -m clip_fast.train`: train CLIP at maximum throughput with open_clip's command line.

    python -m clip_fast.train                                     # the built-in demo (CPU or GPU)
    torchrun --nproc-per-node 8 -m clip_fast.train -- --train-data 'shards/{000000..000999}.tar' \\
        --model ViT-B-32 --batch-size 256 --precision amp_bf16 --logs=/runs --epochs 32

(torchrun's own --logs-specs flag takes `--logs` as an ambiguous abbreviation: put `--`
before the script's flags.)

Modules:
  config      the command line: open_clip's flags (accepted or rejected with a reason)
              and clip_fast's own, validated before any work;
  setup       process group and devices, data, tokenizer, model (+ --pretrained, LiT
              locks), optimizer, loss, learning-rate schedules;
  run         a `Run` assembled from them (run folder, resume point, wrapping);
  loop        steps, logging interval, epoch ends, checkpoints;
  evaluate    validation loss + retrieval metrics, zero-shot (clip_fast.zeroshot);
  metrics     step meter, console/tqdm, out.log, JSONL, TensorBoard, wandb;
  checkpoint  atomic save, integrity-checked load, latest, RNG state.

A run writes LOGS/NAME/{out.log, params.txt, log.jsonl, results.jsonl, zeroshot.json,
checkpoints/epoch_N.pt, tensorboard/} (open_clip's names where open_clip has them).
"""
from __future__ import annotations

import os

# OpenMP threads that spin while waiting stall every parallel region when the CPU is
# shared: a step can take an order of magnitude longer (docs/benchmarks.md has the
# measurement). Must be set before torch loads its OpenMP runtime, i.e. before
# `import torch` -- true for `python -m clip_fast.train`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import sys  # noqa: E402
from typing import Any, Sequence  # noqa: E402

from clip_fast.train.checkpoint import CheckpointError  # noqa: E402
from clip_fast.train.config import ConfigError, build_parser, parse_args  # noqa: E402
from clip_fast.train.loop import TrainingDiverged, train_loop  # noqa: E402
from clip_fast.train.run import DEMO_TEMPLATES, build_run  # noqa: E402
from clip_fast.train.setup import DistEnv, init_distributed, learning_rate  # noqa: E402

__all__ = ["main", "train", "parse_args", "build_parser", "ConfigError", "CheckpointError", "TrainingDiverged",
           "DEMO_TEMPLATES", "DistEnv", "learning_rate"]


def _given(argv: Sequence[str] | None, flag: str) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def train(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run training as the command line describes; returns a summary dict (rank 0's view):
    step, epoch, final logged loss, last zero-shot result, run folder, last checkpoint
    path and the trained (unwrapped) model."""
    import torch.distributed as dist

    args = parse_args(argv)
    env = init_distributed(args)
    run = None
    try:
        run = build_run(args, env, model_given=_given(argv, "--model"))
        state = train_loop(run)
        if state.zeroshot is not None and run.run_dir is not None and env.is_main:
            (run.run_dir / "zeroshot.json").write_text(json.dumps(state.zeroshot, indent=2))
        if state.last_checkpoint is not None:
            run.log.info(f"checkpoint: {state.last_checkpoint}  (python -m clip_fast.zeroshot --checkpoint "
                         f"{state.last_checkpoint} --data DIR)")
        if env.distributed:
            # Leave together: rank 0 does extra work at the end, and a rank tearing down
            # its gloo group while a peer still holds the connection can abort the peer.
            dist.barrier()
        return {"step": state.step, "epoch": state.epoch, "loss": state.loss, "zeroshot": state.zeroshot,
                "run_dir": str(run.run_dir) if run.run_dir else None,
                "checkpoint": str(state.last_checkpoint) if state.last_checkpoint else None, "model": run.raw}
    finally:
        if run is not None:
            run.log.close()
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: a bad flag, input or checkpoint prints one line and exits 2; a
    diverged run or an unwritable checkpoint exits 1."""
    try:
        train(argv)
    except (ValueError, FileNotFoundError, PermissionError) as e:  # ConfigError, CheckpointError included
        print(f"clip_fast.train: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1 if isinstance(e, CheckpointError) and "cannot write" in str(e) else 2
    except TrainingDiverged as e:
        print(f"clip_fast.train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
