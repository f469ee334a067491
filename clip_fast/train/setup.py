"""Building a run: devices and process group, data, tokenizer, model, optimizer, loss,
learning-rate schedule. Everything here runs once, before the first step."""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from clip_fast.train.config import ConfigError


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    distributed: bool = False  # a process group was initialised (by us)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_device(args: argparse.Namespace, local_rank: int, world: int) -> torch.device:
    """--device, else cuda when available. Under torchrun each rank takes GPU
    LOCAL_RANK % device_count() (one visible GPU per process works too);
    --no-set-device-rank keeps the current device."""
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        if world > 1 and not args.no_set_device_rank:
            index = local_rank % torch.cuda.device_count()
        else:
            index = torch.cuda.current_device()
        device = torch.device("cuda", index)
    return device


def init_distributed(args: argparse.Namespace) -> DistEnv:
    """Device and process group from torchrun's environment (single process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    device = select_device(args, local_rank, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    env = DistEnv(rank, local_rank, world, device)
    if world > 1 and not dist.is_initialized():
        backend = args.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, init_method=args.dist_url or "env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
        env.distributed = True
    return env


# ----------------------------------------------------------------------------- data


@dataclass
class DataSpec:
    train: list[str]
    val: list[str] | None
    zeroshot: dict[str, str] = field(default_factory=dict)  # result prefix -> ImageFolder
    heldout_classnames: list[str] = field(default_factory=list)
    demo_captions: list[str] | None = None  # the demo's captions (tokenizer training)
    is_csv: bool = False

    @property
    def is_demo(self) -> bool:
        return self.demo_captions is not None


def expand_data(spec: str, flag: str) -> list[str]:
    """Files, globs, {a..b} braces, '::'-joined sources, a make_shards folder -> paths
    (clip_fast.data.sources.expand_urls; FileNotFoundError / ValueError naming `flag`)."""
    try:
        from clip_fast.data.sources import expand_urls
    except ImportError:  # before the data-sources module lands: shard specs only
        return _expand_shards(spec, flag)
    return expand_urls(spec, flag)


def _expand_shards(spec: str, flag: str) -> list[str]:
    from clip_fast.data.shards import expand_shards

    try:
        paths = expand_shards([part for part in spec.split("::") if part])
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{flag}: {e}") from None
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or missing:
        raise FileNotFoundError(f"{flag}: no shards in {spec!r}" if not paths else
                                f"{flag}: {len(missing)} shard(s) not found, e.g. {missing[0]}")
    return paths


def _is_csv(args: argparse.Namespace, spec: str | None) -> bool:
    if spec is None:
        return False
    if args.dataset_type == "csv":
        return True
    return args.dataset_type == "auto" and spec.split("::")[0].endswith((".csv", ".tsv"))


def resolve_data(args: argparse.Namespace) -> DataSpec:
    """The run's data; FileNotFoundError / ValueError naming the flag when a path is bad."""
    csv = _is_csv(args, args.train_data)
    if args.train_data is None:
        from clip_fast.data.demo import ensure_demo_dataset

        demo = ensure_demo_dataset(args.demo_root)  # atomic: safe with concurrent ranks
        spec = DataSpec(demo.train_shards, demo.val_shards, {"imagenet": demo.zeroshot_dir},
                        list(demo.heldout_classnames), list(demo.captions))
    else:
        spec = DataSpec([args.train_data] if csv else expand_data(args.train_data, "--train-data"), None, is_csv=csv)
    if args.val_data is not None:
        spec.val = [args.val_data] if _is_csv(args, args.val_data) else expand_data(args.val_data, "--val-data")
    for flag, prefix in (("imagenet_val", "imagenet"), ("imagenet_v2", "imagenetv2")):
        if getattr(args, flag) is not None:
            spec.zeroshot[prefix] = getattr(args, flag)
    from clip_fast.train.evaluate import check_imagefolder

    for prefix, folder in spec.zeroshot.items():
        check_imagefolder(folder, "--imagenet-v2" if prefix == "imagenetv2" else "--imagenet-val")
        meta = Path(folder).parent / "demo.json"  # the demo's held-out classes
        if not spec.heldout_classnames and meta.is_file():
            spec.heldout_classnames = json.loads(meta.read_text()).get("heldout_classnames", [])
    return spec


@dataclass
class LoaderOptions:
    """The arguments every loader of the run shares."""

    batch_size: int
    image_size: int
    tokenizer: Any
    backend: str
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    workers: int
    seed: int


def build_data_loader(paths: list[str], opts: LoaderOptions, args: argparse.Namespace, train: bool, csv: bool):
    common = dict(train=train, backend=opts.backend, rank=opts.rank, world_size=opts.world_size, device=opts.device,
                  dtype=opts.dtype, num_workers=opts.workers, seed=opts.seed)
    if not train:
        common["drop_last"] = opts.world_size > 1  # equal batch counts: collectives line up
    if train and args.dataset_resampled:
        if csv:
            raise ConfigError("--dataset-resampled: needs webdataset shards (--dataset-type webdataset), not a csv file")
        if opts.backend == "dali":
            raise ConfigError("--dataset-resampled: needs --data-backend torch or auto (DALI's reader samples "
                              "without replacement)")
        return _build_resampled_loader(paths, opts, args, common)
    from clip_fast.data.csv_dataset import CsvColumns
    from clip_fast.data.loader import build_loader

    if csv:
        columns = CsvColumns(args.csv_img_key, args.csv_caption_key, args.csv_separator)
        return build_loader(paths[0], opts.batch_size, opts.image_size, opts.tokenizer, csv=columns, **common)
    return build_loader(paths, opts.batch_size, opts.image_size, opts.tokenizer, **common)


def _build_resampled_loader(paths: list[str], opts: LoaderOptions, args: argparse.Namespace, common: dict):
    """--dataset-resampled: an epoch of --train-num-samples samples (default: as many as the
    shards hold) drawn per rank by whole shards with replacement (clip_fast.data.loader)."""
    from clip_fast.data.loader import build_loader
    from clip_fast.data.shards import load_shard_indexes

    samples = args.train_num_samples
    if samples is None:
        samples = sum(len(s) for s in load_shard_indexes(paths, num_threads=max(1, opts.workers)))
    if samples // opts.world_size < opts.batch_size:
        raise ConfigError(f"--train-num-samples {samples}: fewer than one batch of {opts.batch_size} x "
                          f"{opts.world_size} ranks per epoch with --dataset-resampled")
    return build_loader(paths, opts.batch_size, opts.image_size, opts.tokenizer, resampled_samples=samples,
                        **{**common, "backend": "torch"})


def _read_captions(shards: list[str], limit: int = 200_000) -> list[str]:
    """Captions of the first `limit` samples (tokenizer training on user data)."""
    from clip_fast.data.shards import load_shard_indexes

    captions: list[str] = []
    for index in load_shard_indexes(shards):
        with open(index.path, "rb") as f:
            for _, _, off, size in index.offsets:
                f.seek(int(off))
                captions.append(f.read(int(size)).decode("utf-8", errors="replace"))
                if len(captions) >= limit:
                    return captions
    return captions


def _read_csv_captions(path: str, args: argparse.Namespace, limit: int = 200_000) -> list[str]:
    import pandas as pd

    frame = pd.read_csv(path, sep=args.csv_separator, nrows=limit)
    if args.csv_caption_key not in frame:
        raise ValueError(f"--csv-caption-key {args.csv_caption_key!r}: no such column in {path} "
                         f"(columns: {list(frame.columns)})")
    return [str(c) for c in frame[args.csv_caption_key]]


def build_tokenizer(args: argparse.Namespace, data: DataSpec, env: DistEnv, stored: str | None):
    """A tokenizer stored in the checkpoint (resume, --pretrained); else --tokenizer; else
    a BPE trained on the captions by rank 0 and broadcast (every rank shares it)."""
    from clip_fast.data.tokenizer import Tokenizer

    if stored is not None:
        return Tokenizer.from_json(stored)
    if args.tokenizer is not None:
        path = Path(args.tokenizer)
        if not path.exists():
            raise FileNotFoundError(f"--tokenizer: file not found: {path}")
        return Tokenizer.from_merges(path) if path.name.endswith((".txt", ".gz")) else Tokenizer.load(path)
    payload = [None]
    if env.is_main:
        if data.is_demo:
            captions = data.demo_captions
        else:
            captions = _read_csv_captions(data.train[0], args) if data.is_csv else _read_captions(data.train)
        payload[0] = Tokenizer.train(captions, vocab_size=args.vocab_size or (1024 if data.is_demo else 16384)).to_json()
    if env.world_size > 1:
        dist.broadcast_object_list(payload, src=0)
    return Tokenizer.from_json(payload[0])


# ----------------------------------------------------------------------------- model


def model_config(args: argparse.Namespace, vocab_size: int, context_length: int):
    """The CLIPConfig the flags ask for (--model and the --force-* overrides)."""
    from clip_fast.model import get_config

    overrides: dict[str, Any] = {"vocab_size": vocab_size, "context_length": context_length}
    if args.force_image_size is not None:
        overrides["image_size"] = args.force_image_size[0]
    if args.force_patch_dropout is not None:
        overrides["patch_dropout"] = args.force_patch_dropout
    if args.siglip:  # SigLIP's initialisation: scale 10, bias -10
        overrides.update(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    return get_config(args.model, quick_gelu=True if args.force_quick_gelu else None, **overrides)


def _architecture(config) -> tuple:
    return (config.embed_dim, tuple(sorted(vars(config.vision).items())), config.text.width, config.text.heads,
            config.text.layers, config.text.mlp_ratio)


def check_same_model(args: argparse.Namespace, stored_config, source: str, model_given: bool) -> None:
    """--resume / --pretrained: the checkpoint's architecture is used; a different
    --model is an error naming both, no --model a warning."""
    wanted = model_config(args, stored_config.vocab_size, stored_config.context_length)
    if not model_given:
        warnings.warn(f"{source}: no --model given; using the checkpoint's architecture", stacklevel=2)
        return
    if _architecture(wanted) != _architecture(stored_config):
        v = stored_config.vision
        raise ConfigError(f"{source}: the checkpoint holds a different model (embed_dim {stored_config.embed_dim}, "
                          f"vision layers {v.layers} width {v.width} patch {v.patch_size}, text layers "
                          f"{stored_config.text.layers} width {stored_config.text.width}) than --model {args.model} "
                          f"(vision layers {wanted.vision.layers} width {wanted.vision.width}); drop --model or "
                          "give the checkpoint's")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def build_model(args: argparse.Namespace, config, env: DistEnv, precision: str, weights: dict | None = None):
    """A CLIP on env.device: identical initial weights on every rank (seeded), `weights`
    loaded when given, --lock-* applied, bf16 parameters for --precision bf16."""
    from clip_fast.model import CLIP, load_weights
    from clip_fast.model.freeze import lock_image_tower, lock_text_tower

    seed_everything(args.seed)
    model = CLIP(config)
    seed_everything(args.seed + env.rank)  # then every rank draws its own numbers (patch dropout)
    if weights is not None:
        load_weights(model, weights)
    if args.lock_image:
        lock_image_tower(model, args.lock_image_unlocked_groups, args.lock_image_freeze_bn_stats)
    if args.lock_text:
        lock_text_tower(model, args.lock_text_unlocked_layers, args.lock_text_freeze_layer_norm)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model = model.to(env.device)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    return model


# ----------------------------------------------------------------------------- loss, optimizer, schedule


class LossAdapter(nn.Module):
    """The configured loss, called with the model's outputs. With several ranks,
    ContrastiveLoss and SigLipLoss run their sharded versions."""

    def __init__(self, args: argparse.Namespace, env: DistEnv) -> None:
        super().__init__()
        from clip_fast import ContrastiveLoss, SigLipLoss

        if args.siglip:
            self.loss = SigLipLoss(rank=env.rank, world_size=env.world_size)
        else:
            self.loss = ContrastiveLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
                                        cache_labels=True, rank=env.rank, world_size=env.world_size)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None) -> torch.Tensor:
        return self.loss(image_features, text_features, logit_scale, logit_bias)


class LocalShardAdamW:
    """clip_fast.optim.AdamW over FSDP2's local parameter shards.

    fully_shard turns parameters into DTensors; the fused AdamW works on plain tensors.
    `DTensor.to_local()` is a view of the shard's storage, so the optimizer updates the
    sharded parameters in place; gradients are handed over as local views before each
    step (replicated 0-d parameters are averaged by parallelize's hook). state_dict /
    load_state_dict describe this rank's shards (one optimizer file per rank)."""

    def __init__(self, model: nn.Module, make_optimizer) -> None:
        from clip_fast.optim import param_groups

        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        local_groups = []
        for g in param_groups(model, 1.0):  # only the split into decay / no-decay matters here
            local = []
            for p in g["params"]:
                t = p.to_local().detach() if hasattr(p, "to_local") else p  # a leaf view of the shard
                self.pairs.append((p, t))
                local.append(t)
            local_groups.append({"params": local, "no_decay": g["weight_decay"] == 0.0})
        self.inner = make_optimizer(local_groups)

    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, t in self.pairs:
            p.grad = None
            t.grad = None

    def step(self) -> None:
        for p, t in self.pairs:
            if p.grad is not None:
                t.grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        self.inner.step()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, sd) -> None:
        self.inner.load_state_dict(sd)


MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_optimizer(model: nn.Module, args: argparse.Namespace, precision: str, fsdp: bool):
    """clip_fast.optim.AdamW (stochastic rounding for bf16 weights) over the trainable
    parameters: weight decay on matrices only (clip_fast.optim.param_groups)."""
    from clip_fast.model.parallelize import unwrap
    from clip_fast.optim import AdamW, param_groups

    if args.moment_dtype == "auto":
        state_dtype = torch.bfloat16 if precision == "bf16" else None
    else:
        state_dtype = MOMENT_DTYPES[args.moment_dtype]

    def make(groups):
        for g in groups:  # LocalShardAdamW's groups carry a flag instead of the decay value
            if "no_decay" in g:
                g["weight_decay"] = 0.0 if g.pop("no_decay") else args.wd
        return AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                     stochastic_rounding=True, state_dtype=state_dtype, seed=args.seed)

    if fsdp:
        return LocalShardAdamW(model, make)
    return make(param_groups(unwrap(model), args.wd))


def learning_rate(step: int, args: argparse.Namespace, total_steps: int, steps_per_epoch: int) -> float:
    """open_clip's schedules (open_clip_train.scheduler): linear warmup over --warmup
    steps, then cosine to 0 at `total_steps`, constant, or constant then a polynomial
    cooldown to --lr-cooldown-end over the last --epochs-cooldown epochs.
    --skip-scheduler: --lr throughout."""
    base, warmup = args.lr, args.warmup
    if args.skip_scheduler:
        return base
    if step < warmup:
        return base * (step + 1) / warmup
    if args.lr_scheduler == "cosine":
        e, es = step - warmup, max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(e, es) / es)) * base
    if args.lr_scheduler == "const":
        return base
    start = total_steps - steps_per_epoch * args.epochs_cooldown
    if step < start:
        return base
    decay = (1 - (step - start) / max(1, total_steps - start)) ** args.lr_cooldown_power
    return decay * (base - args.lr_cooldown_end) + args.lr_cooldown_end


def workers(args: argparse.Namespace) -> int:
    return args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
