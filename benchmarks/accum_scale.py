"""Peak memory of one training step at a large global batch, in a fresh process.

    python benchmarks/accum_scale.py --global-batch 32768 --micro-batch 512      # GradCache
    python benchmarks/accum_scale.py --global-batch 2048 --single                # one pass

One step of tiny-vit (fp32, CPU): zero_grad, GradCache.step over global/micro
micro-batches (or, with --single, one forward + ContrastiveLoss + backward over the whole
batch), clip_fast's AdamW step. Prints one JSON line: peak RSS of the process (VmHWM,
everything included: torch, the model, the global batch's images and tokens), RSS before
the step, the step's wall time and the loss. The single-pass peak grows linearly in the
batch (activations), so two --single runs give its per-sample cost and what a single
pass at the large batch would need.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def status_bytes(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS: current RSS, VmHWM: its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def make_batch(batch: int, image_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with normalised-image statistics, captions of 5..40 tokens (EOT = 1023)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    lengths = torch.randint(5, 41, (batch,), generator=g)
    tokens = torch.randint(1, 1023, (batch, 77), generator=g)
    tokens[torch.arange(77)[None, :] >= lengths[:, None]] = 0
    tokens[torch.arange(batch), lengths - 1] = 1023
    return images, tokens


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch", type=int, default=32768)
    parser.add_argument("--micro-batch", type=int, default=512)
    parser.add_argument("--single", action="store_true", help="one pass over the global batch instead")
    args = parser.parse_args(argv)
    if args.global_batch < 1 or args.micro_batch < 1:
        parser.error("--global-batch and --micro-batch must be positive")

    from clip_fast import ContrastiveLoss, GradCache
    from clip_fast import model as cf
    from clip_fast.optim import AdamW, param_groups

    torch.manual_seed(0)
    model = cf.create("tiny-vit", vocab_size=1024, patch_dropout=0.5).train()
    opt = AdamW(param_groups(model, 0.1), lr=1e-4)
    loss_fn = ContrastiveLoss()
    images, tokens = make_batch(args.global_batch, model.config.image_size)
    before = status_bytes("VmRSS")
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    if args.single:
        loss = loss_fn(*model(images, tokens))
        loss.backward()
    else:
        micro = list(zip(images.split(args.micro_batch), tokens.split(args.micro_batch)))
        loss = GradCache(model, loss_fn).step(micro)
    opt.step()
    seconds = time.perf_counter() - t0
    result = {
        "mode": "single" if args.single else "gradcache", "global_batch": args.global_batch,
        "micro_batch": None if args.single else args.micro_batch, "peak_rss_gib": status_bytes("VmHWM") / 2**30,
        "rss_before_step_gib": before / 2**30, "step_s": round(seconds, 2), "loss": float(loss.detach()),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
