"""Checkpoints: atomic save, integrity-checked load, `latest`, pruning, RNG state.

Files (open_clip's names): LOGS/NAME/checkpoints/epoch_N.pt after epoch N, step_S.pt for
saves inside an epoch (--save-every-n-steps, --max-steps, an interrupt), epoch_latest.pt
with --save-most-recent; FSDP2 runs add <stem>.optim.rank<R>.pt per rank. Each holds
{"model", "optimizer", "scaler", "step", "epoch", "config", "tokenizer", "args",
"rng_states"} and loads with clip_fast.model.load.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

REQUIRED_KEYS = ("model", "optimizer", "step", "config", "tokenizer")
_CHECKPOINT_NAME = re.compile(r"(epoch_(\d+|latest)|step_(\d+))\.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written: one line naming the file and the cause."""


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: a reader (or a
    crash) never sees a half-written checkpoint. OSError -> CheckpointError naming the
    path and the OS error; the temporary file is removed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        raise CheckpointError(f"cannot write checkpoint {path}: {e}".splitlines()[0]) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(checkpoint_dir: Path) -> list[Path]:
    """Temporary files of saves killed mid-write (".<name>.tmp-<pid>"), removed."""
    removed = []
    for p in checkpoint_dir.glob(".*.tmp-*"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def read_training_checkpoint(path: Path) -> dict[str, Any]:
    """A clip_fast training checkpoint's content, or CheckpointError (missing file, text
    file, truncated archive, another program's checkpoint)."""
    if not path.is_file():
        raise CheckpointError(f"--resume: checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and EOF errors of a damaged file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"--resume {path}: not a readable checkpoint ({type(e).__name__}: {reason[:200]})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise CheckpointError(f"--resume {path}: not a clip_fast training checkpoint (needs keys {REQUIRED_KEYS})")
    return ckpt


def checkpoint_files(checkpoint_dir: Path) -> list[Path]:
    """epoch_N.pt, epoch_latest.pt and step_S.pt in `checkpoint_dir`, newest first (by
    modification time, then name)."""
    files = [p for p in checkpoint_dir.glob("*.pt") if _CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def find_latest(checkpoint_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint and its content; damaged ones are skipped (with a
    warning). None when there is none."""
    for path in checkpoint_files(checkpoint_dir):
        try:
            return path, read_training_checkpoint(path)
        except CheckpointError as e:
            print(f"clip_fast.train: warning: skipping {e}", flush=True)
    return None


def prune_previous(checkpoint_dir: Path, keep: Path) -> None:
    """--delete-previous-checkpoint: remove epoch_N.pt / step_S.pt files (and their FSDP
    optimizer shards) other than `keep` and epoch_latest.pt."""
    for p in checkpoint_files(checkpoint_dir):
        if p != keep and p.name != "epoch_latest.pt":
            for f in checkpoint_dir.glob(f"{p.stem}.*"):
                f.unlink(missing_ok=True)


def optimizer_shard_path(path: Path, rank: int) -> Path:
    """FSDP2 optimizer shard of `rank` belonging to checkpoint `path`."""
    return path.with_name(f"{path.stem}.optim.rank{rank}.pt")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
