"""A tiny open_clip_train run for tests: a registered tiny model config, a generated
csv dataset, the flags, and a recorder of every loss value the trainer computes.

Run as a script (one process per rank under torch.distributed.run):
    python tests/support/tiny_open_clip_train.py OUT_JSON PATCH(0|1) CONFIG_JSON -- <open_clip_train flags>
writes OUT_JSON.<rank>: {"classes": [...], "losses": [...]}."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TINY_MODEL = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_setup(root: Path, n_samples: int, model_name: str) -> tuple[Path, Path]:
    """(model config json named `model_name`, csv of n_samples generated 32 px images
    with captions) under root."""
    import numpy as np
    from PIL import Image

    config = root / f"{model_name}.json"
    config.write_text(json.dumps(TINY_MODEL))
    rng = np.random.default_rng(0)
    rows = ["filepath,title"]
    for i in range(n_samples):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        rows.append(f"{path},a photo of thing number {i % 7} in colour {i % 5}")
    csv = root / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return config, csv


def train_flags(model_name: str, csv: Path, logs: Path, name: str, batch_size: int) -> list[str]:
    """One epoch of fp32 CPU training on the csv, a loss logged every step, no checkpoints."""
    return [
        "--model", model_name, "--train-data", str(csv), "--dataset-type", "csv",
        "--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key", "title",
        "--batch-size", str(batch_size), "--epochs", "1", "--workers", "0", "--lr", "1e-3",
        "--warmup", "2", "--precision", "fp32", "--device", "cpu", "--seed", "0",
        "--log-every-n-steps", "1", "--save-frequency", "0", "--zeroshot-frequency", "0",
        "--val-frequency", "0", "--logs", str(logs), "--name", name,
    ]


class LossRecorder:
    """Replaces `loss_class.forward` while active; records the class of every loss
    module called and the value it returned."""

    def __init__(self, loss_class: type) -> None:
        self.loss_class = loss_class
        self.original_forward = loss_class.forward
        self.classes: list[str] = []
        self.losses: list[float] = []

    def record(self, module, *args, **kwargs):
        out = self.original_forward(module, *args, **kwargs)
        loss = out["contrastive_loss"] if isinstance(out, dict) else out
        self.classes.append(f"{type(module).__module__}.{type(module).__name__}")
        self.losses.append(loss.item())
        return out

    def __enter__(self) -> "LossRecorder":
        recorder = self
        self.loss_class.forward = lambda module, *args, **kwargs: recorder.record(module, *args, **kwargs)
        return self

    def __exit__(self, *exc) -> None:
        self.loss_class.forward = self.original_forward


def run_recorded(flags: list[str], config: Path, patch: bool) -> LossRecorder:
    """open_clip_train.main.main(flags) with the tiny config registered, clip_fast's
    losses applied when `patch`; the loss class's calls recorded."""
    import open_clip
    from open_clip_train.main import main

    import clip_fast

    open_clip.add_model_config(str(config))
    if patch:
        clip_fast.apply_to_open_clip()
    try:
        loss_class = clip_fast.ContrastiveLoss if patch else open_clip.loss.ClipLoss
        with LossRecorder(loss_class) as recorder:
            main(flags)
    finally:
        if patch:
            clip_fast.revert_open_clip_patch()
    return recorder


def allow_cpu_ddp() -> None:
    """open_clip_train wraps the model in DDP with device_ids=[device] even on CPU, which
    DDP rejects; drop device_ids for CPU devices (what DDP expects there)."""
    import torch

    ddp = torch.nn.parallel.DistributedDataParallel

    class CpuTolerantDDP(ddp):
        def __init__(self, module, device_ids=None, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids=device_ids, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuTolerantDDP


if __name__ == "__main__":
    allow_cpu_ddp()
    out, patch, config_path = sys.argv[1], sys.argv[2] == "1", Path(sys.argv[3])
    result = run_recorded(sys.argv[sys.argv.index("--") + 1:], config_path, patch)
    Path(f"{out}.{os.environ.get('RANK', '0')}").write_text(
        json.dumps({"classes": result.classes, "losses": result.losses}))
