"""`python -m clip_fast.train`: train CLIP at maximum throughput.

    python -m clip_fast.train                                     # the built-in demo (CPU or GPU)
    torchrun --nproc-per-node 8 -m clip_fast.train --train-data 'shards/{000000..000999}.tar' \\
        --model ViT-B/32 --batch-size 256 --precision amp_bf16 --dist ddp --epochs 32

What one step runs (open_clip's trainer, with clip_fast's parts):

  data      webdataset shards through DALI (JPEG decode on the GPU) or torch + PIL
            (clip_fast.data.loader), captions tokenised by a clip_fast Tokenizer that is
            stored in every checkpoint (trained on the captions when none is given);
  model     clip_fast.model towers (flash attention / SDPA, fused attention pooling,
            text cut to the longest caption), optional gradient checkpointing;
  loss      clip_fast.ContrastiveLoss (blockwise, no B x B logits) or SigLipLoss;
  optimizer clip_fast.optim.AdamW; with --precision bf16 the weights themselves are bf16,
            updated with stochastic rounding, and both moments are bf16 (the paper's
            half-precision setup, 6 bytes per parameter);
  schedule  linear warmup then cosine decay, per step; logit_scale clamped to ln(100)
            after every step, as in the paper.

Distributed: under torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in the
environment) the process group is initialised with NCCL on GPU and gloo on CPU;
--dist ddp wraps the model in DistributedDataParallel, --dist fsdp2 shards it with
torch.distributed.fsdp.fully_shard. --batch-size is per rank (open_clip's convention).

Checkpoints (<save-dir>/<name>/checkpoints/step_<N>.pt, plus latest.pt) are written
atomically and hold {"model", "optimizer", "scaler", "step", "epoch", "config",
"tokenizer", "args", "rng_states"}; they load with clip_fast.model.load and
`python -m clip_fast.zeroshot --checkpoint`. --resume PATH|latest continues the run
exactly: the schedule, the optimizer's stochastic-rounding streams, the RNG states and
the position in the epoch's data order are restored.
"""
from __future__ import annotations

import os

# OpenMP threads that spin while waiting stall every parallel region when the CPU is
# shared (measured on the 2-core CI box under load ~7: 6.3 s per tiny-vit step with
# spinning, 0.54 s with passive waiting). Must be set before torch loads its OpenMP
# runtime, i.e. before `import torch` -- true for `python -m clip_fast.train`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import dataclasses
import datetime
import glob
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

PRECISIONS = ("fp32", "amp_bf16", "bf16", "amp_fp16")
_PRECISION_ALIASES = {"pure_bf16": "bf16"}  # open_clip's name
LOGIT_SCALE_MAX = math.log(100.0)  # the paper: the temperature never exceeds 100

# Prompts in the demo captions' own style ("a red circle on the left.", "there is a ...").
DEMO_TEMPLATES = ("a photo of a {}.", "a {}.", "there is a {}.", "a picture with a {}.")

# Dense (no sparsity) tensor-core peak FLOP/s per GPU for bf16/fp16 inputs with fp32
# accumulation, matched against torch.cuda.get_device_name(). fp32 training is measured
# against the TF32 peak (half of these on Ampere/Hopper).
PEAK_FLOPS_BF16 = (
    ("GB200", 2.5e15), ("B200", 2.25e15), ("H200", 989e12), ("GH200", 989e12),
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
)


# ----------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clip_fast.train",
        description="Train CLIP (with no arguments: the built-in demo dataset, on CPU if there is no GPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument_group("data")
    a.add_argument("--train-data", default=None,
                   help="training shards: paths, a glob or 'dir/shard-{000000..000099}.tar' (default: the demo dataset)")
    a.add_argument("--val-data", default=None, help="validation shards (default: the demo's when training on it)")
    a.add_argument("--zeroshot-data", default=None,
                   help="ImageFolder for zero-shot evaluation, DIR/<class name>/<image> (default: the demo's)")
    a.add_argument("--zeroshot-templates", default="auto", choices=("auto", "demo", "simple", "imagenet"),
                   help="prompt templates (auto: the demo's style on the demo dataset, else 'simple')")
    a.add_argument("--data-backend", default="auto", choices=("auto", "dali", "torch"))
    a.add_argument("--workers", type=int, default=None, help="data workers / DALI threads per rank (default: min(8, cores))")
    a.add_argument("--tokenizer", default=None,
                   help="tokenizer JSON or OpenAI merges file (bpe_simple_vocab_16e6.txt.gz); default: a BPE trained on the captions")
    a.add_argument("--vocab-size", type=int, default=None,
                   help="size of the trained tokenizer's vocabulary (default: 1024 on the demo, 16384 otherwise)")
    a.add_argument("--demo-root", default=None, help="where the demo dataset is generated (default: $CLIP_FAST_CACHE/demo)")

    m = p.add_argument_group("model")
    m.add_argument("--model", default="tiny-vit", help="a clip_fast.model config (tiny-vit, tiny-rn, ViT-B/32, RN50, ...)")
    m.add_argument("--image-size", type=int, default=None, help="override the config's image size")
    m.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in the backward pass")
    m.add_argument("--compile", action="store_true", help="torch.compile the model")

    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=128, help="per rank")
    o.add_argument("--epochs", type=int, default=5)
    o.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps (the schedule still spans --epochs; for tests)")
    o.add_argument("--lr", type=float, default=2e-3)
    o.add_argument("--wd", type=float, default=0.1)
    o.add_argument("--beta1", type=float, default=0.9)
    o.add_argument("--beta2", type=float, default=0.98)
    o.add_argument("--eps", type=float, default=1e-6)
    o.add_argument("--warmup", type=int, default=50, help="linear warmup steps, then cosine decay to 0")
    o.add_argument("--precision", default=None, choices=PRECISIONS + tuple(_PRECISION_ALIASES),
                   help="bf16 = bf16 weights + stochastically rounded AdamW with bf16 moments "
                        "(default: amp_bf16 on GPU, fp32 on CPU)")
    o.add_argument("--loss", default="clip", choices=("clip", "siglip"))
    o.add_argument("--local-loss", action="store_true", help="each rank's rows only (open_clip's flag)")
    o.add_argument("--gather-with-grad", action="store_true", help="all-gather features with gradients (open_clip's flag)")
    o.add_argument("--seed", type=int, default=0)

    r = p.add_argument_group("run")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    r.add_argument("--dist", default="ddp", choices=("ddp", "fsdp2"), help="wrapper under torchrun")
    r.add_argument("--save-dir", default="logs", help="runs are written to SAVE_DIR/NAME; 'none' disables saving")
    r.add_argument("--name", default=None, help="run name (default: date-model-batch-precision)")
    r.add_argument("--resume", default=None, help="checkpoint path, or 'latest' (the newest of this run)")
    r.add_argument("--save-every-n-steps", type=int, default=0, help="also save every N steps (0: epoch ends only)")
    r.add_argument("--keep-checkpoints", type=int, default=2, help="step_<N>.pt files kept (oldest removed first)")
    r.add_argument("--zeroshot-every", type=int, default=0, help="zero-shot eval every N epochs (0: at the end only)")
    r.add_argument("--log-every", type=int, default=20, help="log every N steps")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line (ValueError for inconsistent values)."""
    args = build_parser().parse_args(argv)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    args.precision = _PRECISION_ALIASES.get(args.precision, args.precision)
    for name in ("batch_size", "epochs", "log_every", "keep_checkpoints"):
        value = getattr(args, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    for name in ("warmup", "save_every_n_steps", "zeroshot_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if not args.lr > 0 or not args.wd >= 0 or not args.eps > 0:
        raise ValueError(f"need --lr > 0, --wd >= 0, --eps > 0; got lr={args.lr}, wd={args.wd}, eps={args.eps}")
    if not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        raise ValueError(f"--beta1/--beta2 must be in [0, 1), got {args.beta1}, {args.beta2}")
    if args.image_size is not None and args.image_size < 16:
        raise ValueError(f"--image-size must be >= 16, got {args.image_size}")
    if args.vocab_size is not None and args.tokenizer is not None:
        raise ValueError("--vocab-size sizes a trained tokenizer; it cannot be combined with --tokenizer")
    from clip_fast.model import get_config

    get_config(args.model)  # ValueError naming the available configs
    if args.dist == "fsdp2" and int(os.environ.get("WORLD_SIZE", "0") or 0) < 1:
        raise ValueError("--dist fsdp2 needs torchrun (RANK/WORLD_SIZE/MASTER_ADDR in the environment): "
                         "torchrun --nproc-per-node N -m clip_fast.train --dist fsdp2 ...")
    if args.dist == "fsdp2" and args.precision == "amp_fp16":
        raise ValueError("--dist fsdp2 supports --precision fp32, amp_bf16 or bf16 (fp16 needs a sharded grad scaler)")
    if args.dist == "fsdp2" and args.compile:
        raise ValueError("--compile is supported with --dist ddp or a single process, not with fsdp2")
    if args.loss == "siglip" and (args.local_loss or args.gather_with_grad):
        raise ValueError("--local-loss/--gather-with-grad apply to --loss clip; siglip exchanges features around a ring")


# ----------------------------------------------------------------------------- environment


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


def init_distributed(args: argparse.Namespace) -> DistEnv:
    """Device and process group from torchrun's environment variables (single process
    when they are absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    if args.device is None:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device() if torch.cuda.is_available() else 0)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:i], got {args.device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device} but CUDA is not available")
        torch.cuda.set_device(device)
    env = DistEnv(rank, local_rank, world, device)
    if world > 1:
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(minutes=30))
            env.distributed = True
    return env


# ----------------------------------------------------------------------------- data + tokenizer


@dataclass
class DataSpec:
    train_shards: list[str]
    val_shards: list[str] | None
    zeroshot_dir: str | None
    heldout_classnames: list[str]
    demo_captions: list[str] | None  # the demo's captions (tokenizer training), else None
    is_demo: bool


def resolve_data(args: argparse.Namespace) -> DataSpec:
    if args.train_data is None:
        from clip_fast.data.demo import ensure_demo_dataset

        demo = ensure_demo_dataset(args.demo_root)  # atomic: safe with concurrent ranks
        spec = DataSpec(demo.train_shards, demo.val_shards, demo.zeroshot_dir, demo.heldout_classnames,
                        demo.captions, True)
        if args.val_data is not None:
            spec.val_shards = _expand_existing(args.val_data, "--val-data")
        if args.zeroshot_data is not None:
            spec.zeroshot_dir = args.zeroshot_data
    else:
        spec = DataSpec(_expand_existing(args.train_data, "--train-data"),
                        _expand_existing(args.val_data, "--val-data") if args.val_data else None,
                        args.zeroshot_data, [], None, False)
    if spec.zeroshot_dir is not None:
        if not Path(spec.zeroshot_dir).is_dir():
            raise FileNotFoundError(f"--zeroshot-data: directory not found: {spec.zeroshot_dir}")
        meta = Path(spec.zeroshot_dir).parent / "demo.json"  # the demo's held-out classes
        if not spec.heldout_classnames and meta.is_file():
            spec.heldout_classnames = json.loads(meta.read_text()).get("heldout_classnames", [])
    return spec


def _expand_existing(pattern: str, flag: str) -> list[str]:
    from clip_fast.data.shards import expand_shards

    try:
        paths = expand_shards([part for part in pattern.split("::") if part])  # '::' joins sources, as in open_clip
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{flag}: {e}") from None
    if not paths:
        raise ValueError(f"{flag}: no shards in {pattern!r}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{flag}: {len(missing)} shard(s) not found, e.g. {missing[0]}")
    return paths


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


def build_tokenizer(args: argparse.Namespace, data: DataSpec, env: DistEnv, checkpoint: dict | None):
    """The checkpoint's tokenizer on resume; else --tokenizer; else a BPE trained on the
    captions by rank 0 and broadcast (every rank must share the vocabulary)."""
    from clip_fast.data.tokenizer import Tokenizer

    if checkpoint is not None and isinstance(checkpoint.get("tokenizer"), str):
        return Tokenizer.from_json(checkpoint["tokenizer"])
    if args.tokenizer is not None:
        path = Path(args.tokenizer)
        if not path.is_file():
            raise FileNotFoundError(f"--tokenizer: file not found: {path}")
        return Tokenizer.from_merges(path) if path.name.endswith((".txt", ".gz")) else Tokenizer.load(path)
    payload = [None]
    if env.is_main:
        captions = data.demo_captions if data.demo_captions is not None else _read_captions(data.train_shards)
        vocab = args.vocab_size or (1024 if data.is_demo else 16384)
        payload[0] = Tokenizer.train(captions, vocab_size=vocab).to_json()
    if env.world_size > 1:
        dist.broadcast_object_list(payload, src=0)
    return Tokenizer.from_json(payload[0])


# ----------------------------------------------------------------------------- model, loss, optimizer


def input_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "amp_bf16": torch.bfloat16, "bf16": torch.bfloat16,
            "amp_fp16": torch.float16}[precision]


def autocast_context(precision: str, device: torch.device, fsdp: bool):
    """Autocast for the amp modes (FSDP2 casts parameters itself through its policy)."""
    if precision in ("amp_bf16", "amp_fp16") and not fsdp:
        return torch.autocast(device.type, dtype=input_dtype(precision))
    return contextlib.nullcontext()


def build_model(args: argparse.Namespace, tokenizer, env: DistEnv, config_dict: dict | None = None):
    from clip_fast.model import CLIP, CLIPConfig, get_config

    if config_dict is not None:  # resume: the checkpoint's architecture
        config = CLIPConfig.from_dict(config_dict)
    else:
        overrides: dict[str, Any] = {"vocab_size": tokenizer.vocab_size, "context_length": tokenizer.context_length}
        if args.image_size is not None:
            overrides["image_size"] = args.image_size
        if args.loss == "siglip":  # SigLIP's initialisation: scale 10, bias -10
            overrides.update(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
        config = get_config(args.model, **overrides)
    if config.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"the model's vocab_size {config.vocab_size} differs from the tokenizer's {tokenizer.vocab_size}")
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = CLIP(config)
    # Afterwards every rank draws its own random numbers (patch dropout).
    torch.manual_seed(args.seed + env.rank)
    random.seed(args.seed + env.rank)
    np.random.seed(args.seed + env.rank)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model = model.to(env.device)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    return model


def wrap_model(model: nn.Module, args: argparse.Namespace, env: DistEnv) -> nn.Module:
    """DDP or FSDP2 under torchrun; torch.compile when asked."""
    if env.world_size > 1 and args.dist == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if args.precision == "amp_bf16" else MixedPrecisionPolicy()
        # One FSDP unit per block. The last block of each Transformer is entered through
        # forward_one (class/EOT token only), which bypasses module hooks, so it stays in
        # the root unit, gathered with the root's parameters.
        for tower in [model.transformer] + ([model.visual.transformer] if hasattr(model.visual, "transformer") else []):
            for block in tower.resblocks[:-1]:
                fully_shard(block, mesh=mesh, mp_policy=mp)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            for block in getattr(model.visual, name, []):
                fully_shard(block, mesh=mesh, mp_policy=mp)
        # fully_shard rejects 0-d parameters: the temperature (and bias) stay replicated
        # plain tensors, their gradients averaged by _LocalShardAdamW.
        model = fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=set(_scalar_params(model)))
    elif env.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
            broadcast_buffers=False)
    if args.compile:
        model = torch.compile(model)
    return model


def _scalar_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.dim() == 0]


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


class LossAdapter(nn.Module):
    """The configured loss, called with the model's outputs. With several ranks,
    ContrastiveLoss and SigLipLoss run their sharded versions (each rank computes only
    its own block of the logits)."""

    def __init__(self, args: argparse.Namespace, env: DistEnv) -> None:
        super().__init__()
        from clip_fast import ContrastiveLoss, SigLipLoss

        if args.loss == "siglip":
            self.loss = SigLipLoss(rank=env.rank, world_size=env.world_size)
        else:
            self.loss = ContrastiveLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
                                        cache_labels=True, rank=env.rank, world_size=env.world_size)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None) -> torch.Tensor:
        return self.loss(image_features, text_features, logit_scale, logit_bias)


class _LocalShardAdamW:
    """clip_fast.optim.AdamW over FSDP2's local parameter shards.

    fully_shard turns parameters into DTensors; the fused AdamW works on plain tensors.
    `DTensor.to_local()` is a view of the shard's storage, so the optimizer updates the
    sharded parameters in place; gradients are handed over as local views before each
    step. state_dict/load_state_dict describe this rank's shards (checkpoints keep one
    optimizer file per rank)."""

    def __init__(self, model: nn.Module, make_optimizer) -> None:
        from clip_fast.optim import param_groups

        groups = param_groups(model, 1.0)  # only the split into decay / no-decay matters here
        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        local_groups = []
        for g in groups:
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
            if p.grad is None:
                continue
            if hasattr(p.grad, "to_local"):
                t.grad = p.grad.to_local()
            else:  # a replicated parameter outside FSDP (logit_scale): average like DDP
                dist.all_reduce(p.grad)
                t.grad = p.grad.div_(dist.get_world_size())
        self.inner.step()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, sd) -> None:
        self.inner.load_state_dict(sd)


def build_optimizer(model: nn.Module, args: argparse.Namespace, fsdp: bool):
    from clip_fast.optim import AdamW, param_groups

    state_dtype = torch.bfloat16 if args.precision == "bf16" else None

    def make(groups):
        for g in groups:  # _LocalShardAdamW's groups carry a flag instead of the decay value
            if "no_decay" in g:
                g["weight_decay"] = 0.0 if g.pop("no_decay") else args.wd
        return AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                     stochastic_rounding=True, state_dtype=state_dtype, seed=args.seed)

    if fsdp:
        return _LocalShardAdamW(model, make)
    return make(param_groups(unwrap(model), args.wd))


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """open_clip's schedule: linear warmup over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    e, es = step - warmup, max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(e, es) / es)) * base_lr


# ----------------------------------------------------------------------------- FLOPs / MFU


def _transformer_flops(tokens: float, width: int, layers: int, mlp_ratio: float, causal: bool, pooled: bool) -> float:
    """Forward matmul FLOPs of a Transformer over `tokens` positions. With `pooled` the
    last block runs its query/out/MLP for one position only (as clip_fast's towers do)."""
    hidden = int(width * mlp_ratio)
    per_token = 2 * (3 * width * width + width * width + 2 * width * hidden)  # qkv, out, fc + proj
    attn = 2 * 2 * tokens * tokens * width * (0.5 if causal else 1.0)  # QK^T and AV
    full = layers - (1 if pooled else 0)
    flops = full * (tokens * per_token + attn)
    if pooled:
        kv = tokens * 2 * 2 * width * width  # K and V for every position
        one = 2 * (width * width + width * width + 2 * width * hidden) + 2 * 2 * tokens * width
        flops += kv + one
    return flops


@torch.no_grad()
def image_flops_per_sample(model: nn.Module, device: torch.device) -> float:
    """Forward FLOPs of the image tower for one image: analytic for the ViT (matmuls), a
    torch FlopCounterMode count (convolutions + matmuls) for the ModifiedResNet."""
    cfg = model.config
    v = cfg.vision
    if not v.is_resnet:
        grid = (v.image_size // v.patch_size) ** 2
        tokens = 1 + grid * (1.0 - v.patch_dropout)
        patch = 2 * grid * 3 * v.patch_size**2 * v.width
        return patch + _transformer_flops(tokens, v.width, v.layers, v.mlp_ratio, False, True) + 2 * v.width * cfg.embed_dim
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()  # BatchNorm statistics untouched
    x = torch.zeros(1, 3, v.image_size, v.image_size, device=device, dtype=next(model.parameters()).dtype)
    counter = FlopCounterMode(display=False)
    with counter:
        model.encode_image(x)
    model.train(was_training)
    return float(counter.get_total_flops())


def text_flops_per_sample(config, tokens: float) -> float:
    t = config.text
    return _transformer_flops(tokens, t.width, t.layers, t.mlp_ratio, True, True) + 2 * t.width * config.embed_dim


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device for `precision` (None on CPU or an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS_BF16:
        if key in name:
            return value / 2 if precision == "fp32" else value
    return None


# ----------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: a reader (or a
    crash) never sees a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _link_latest(path: Path) -> None:
    latest = path.with_name("latest.pt")
    tmp = path.with_name(f".latest.pt.tmp-{os.getpid()}")
    try:
        os.link(path, tmp)  # no copy; os.replace keeps the update atomic
    except OSError:
        import shutil

        shutil.copyfile(path, tmp)
    os.replace(tmp, latest)


def find_latest(checkpoint_dir: Path) -> Path | None:
    """The checkpoint with the largest step in `checkpoint_dir` (None when there is none)."""
    best, best_step = None, -1
    for p in glob.glob(str(checkpoint_dir / "step_*.pt")):
        m = re.fullmatch(r"step_(\d+)\.pt", os.path.basename(p))
        if m and int(m.group(1)) > best_step:
            best, best_step = Path(p), int(m.group(1))
    return best


def _prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    """Remove all but the `keep` newest step_<N>.pt (and their FSDP optimizer shards)."""
    steps = sorted(int(m.group(1)) for p in checkpoint_dir.glob("step_*.pt")
                   if (m := re.fullmatch(r"step_(\d+)\.pt", p.name)))
    for old in steps[:-keep]:
        for p in checkpoint_dir.glob(f"step_{old}.*"):
            p.unlink(missing_ok=True)


def _args_dict(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def zeroshot_eval(model: nn.Module, raw: nn.Module, tokenizer, zeroshot_dir: str, templates, heldout: list[str],
                  env: DistEnv, args: argparse.Namespace, fsdp: bool) -> dict[str, Any]:
    """Top-1/top-5 on an ImageFolder, the images split across ranks (padded to equal
    counts, so FSDP's collectives line up), counts summed with all_reduce."""
    from clip_fast.zeroshot import ImageFolder, build_classifier

    dataset = ImageFolder(zeroshot_dir, raw.config.image_size)
    n = len(dataset)
    per_rank = -(-n // env.world_size)
    indices = [min(i, n - 1) for i in range(env.rank * per_rank, (env.rank + 1) * per_rank)]
    valid = torch.tensor([i < n for i in range(env.rank * per_rank, (env.rank + 1) * per_rank)])
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=min(256, args.batch_size * 2),
                                         num_workers=min(2, _workers(args)))
    # FSDP2 needs its forward hooks (all-gathers) on every call: go through the wrapper's
    # module call with text only / images only. Without FSDP the raw model is enough.
    net = model if fsdp else raw
    dtype = input_dtype(args.precision)
    was_training = net.training
    net.eval()
    with autocast_context(args.precision, env.device, fsdp):
        classifier = build_classifier(_TextEncoder(net), tokenizer, dataset.classnames, templates, env.device)
        held = torch.tensor([c in heldout for c in dataset.classnames], device=env.device)
        counts = torch.zeros(3, device=env.device, dtype=torch.float64)  # top-1 hits, top-5 hits, images
        held_counts = torch.zeros(2, device=env.device, dtype=torch.float64)  # top-1 hits, images of held-out classes
        offset = 0
        for images, labels in loader:
            images, labels = images.to(env.device, dtype), labels.to(env.device)
            mask = valid[offset: offset + labels.shape[0]].to(env.device)
            offset += labels.shape[0]
            features = F.normalize(net(image=images)[0].float(), dim=-1)
            topk = (features @ classifier.float()).topk(min(5, classifier.shape[1]), dim=-1).indices
            hits = topk == labels[:, None]
            counts[0] += (hits[:, 0] & mask).sum()
            counts[1] += (hits.any(-1) & mask).sum()
            counts[2] += mask.sum()
            in_held = held[labels] & mask
            held_counts[0] += (hits[:, 0] & in_held).sum()
            held_counts[1] += in_held.sum()
    net.train(was_training)
    if env.world_size > 1:
        dist.all_reduce(counts)
        dist.all_reduce(held_counts)
    result = {"top1": float(counts[0] / counts[2]), "top5": float(counts[1] / counts[2]), "n": int(counts[2]),
              "classes": len(dataset.classnames), "chance_top1": 1.0 / len(dataset.classnames)}
    if held_counts[1] > 0:
        result["heldout_top1"] = float(held_counts[0] / held_counts[1])
        result["heldout_classes"] = [c for c in dataset.classnames if c in heldout]
    return result


class _TextEncoder(nn.Module):
    """What zeroshot.build_classifier needs (encode_text, context_length), computed by a
    call of the (possibly FSDP-wrapped) model with text only."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.context_length = unwrap(net).context_length

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.net(text=tokens)[1]  # already normalised by CLIP.forward


@torch.no_grad()
def val_loss(model: nn.Module, loader, loss_fn: nn.Module, env: DistEnv, args, fsdp: bool) -> dict[str, float]:
    """Mean contrastive loss over the validation shards (each rank its share)."""
    model.eval()
    total = torch.zeros(2, device=env.device, dtype=torch.float64)
    for images, tokens in loader:
        with autocast_context(args.precision, env.device, fsdp):
            out = model(images, tokens)
        total[0] += loss_fn(*out).float() * images.shape[0]
        total[1] += images.shape[0]
    model.train()
    if env.world_size > 1:
        dist.all_reduce(total)
    return {"val_loss": float(total[0] / total[1]), "val_samples": int(total[1])}


# ----------------------------------------------------------------------------- training


def _workers(args: argparse.Namespace) -> int:
    return args.workers if args.workers is not None else min(8, os.cpu_count() or 1)


def _log(env: DistEnv, msg: str) -> None:
    if env.is_main:
        print(msg, flush=True)


def _templates(args: argparse.Namespace, data: DataSpec):
    from clip_fast.zeroshot import IMAGENET_TEMPLATES, SIMPLE_TEMPLATES

    choice = args.zeroshot_templates
    if choice == "auto":
        choice = "demo" if data.heldout_classnames else "simple"
    return {"demo": DEMO_TEMPLATES, "simple": SIMPLE_TEMPLATES, "imagenet": IMAGENET_TEMPLATES}[choice]


def train(argv: list[str] | None = None) -> dict[str, Any]:
    """Run training as the command line describes; returns a summary dict (rank 0's view):
    steps, final loss, last zero-shot result, run directory, last checkpoint path."""
    args = parse_args(argv)
    env = init_distributed(args)
    try:
        summary = _train(args, env)
        if env.distributed:
            # Leave together: rank 0 does extra work at the end (checkpoint, results), and
            # a rank tearing down its gloo group while a peer still holds the connection
            # was seen to abort the peer ("terminate called without an active exception").
            dist.barrier()
        return summary
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(args: argparse.Namespace, env: DistEnv) -> dict[str, Any]:
    from clip_fast.data.loader import build_loader

    if args.precision is None:
        args.precision = "amp_bf16" if env.device.type == "cuda" else "fp32"
    fsdp = env.world_size > 1 and args.dist == "fsdp2"
    if args.precision == "amp_fp16" and env.device.type == "cpu":
        raise ValueError("--precision amp_fp16 needs a GPU (fp16 autocast on CPU is slow and unscaled); use fp32 or amp_bf16")

    # ---- run directory and resume point
    save = args.save_dir.lower() != "none"
    if args.name is None:
        stamp = datetime.datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
        name = [stamp, args.model.replace("/", "-"), f"b{args.batch_size}", args.precision]
        if env.world_size > 1:  # every rank must agree on the name
            payload = [name]
            dist.broadcast_object_list(payload, src=0)
            name = payload[0]
        args.name = "-".join(name)
    run_dir = Path(args.save_dir) / args.name
    ckpt_dir = run_dir / "checkpoints"
    ckpt = None
    if args.resume is not None:
        path = resume_path = find_latest(ckpt_dir) if args.resume == "latest" else Path(args.resume)
        if path is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {ckpt_dir} (give --save-dir/--name of the run)")
        if not path.is_file():
            raise FileNotFoundError(f"--resume: checkpoint not found: {path}")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("model", "optimizer", "step", "config", "tokenizer"):
            if key not in ckpt:
                raise ValueError(f"--resume {path}: not a clip_fast training checkpoint (no {key!r})")
        _log(env, f"resuming from {path} (step {ckpt['step']})")
    if save and env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    # ---- data, tokenizer, model
    data = resolve_data(args)
    tokenizer = build_tokenizer(args, data, env, ckpt)
    raw = build_model(args, tokenizer, env, ckpt["config"] if ckpt else None)
    image_size = raw.config.image_size
    workers = _workers(args)
    dtype = input_dtype(args.precision)
    loader = build_loader(data.train_shards, args.batch_size, image_size, tokenizer, train=True, backend=args.data_backend,
                          rank=env.rank, world_size=env.world_size, device=env.device, dtype=dtype,
                          num_workers=workers, seed=args.seed)
    val_loader = None
    if data.val_shards:
        val_loader = build_loader(data.val_shards, args.batch_size, image_size, tokenizer, train=False,
                                  backend=args.data_backend, rank=env.rank, world_size=env.world_size,
                                  device=env.device, dtype=dtype, num_workers=workers, seed=args.seed,
                                  drop_last=True if env.world_size > 1 else False)
    steps_per_epoch = len(loader)
    total_steps = args.epochs * steps_per_epoch  # the schedule; --max-steps only stops early
    stop_step = min(total_steps, args.max_steps or total_steps)

    if ckpt is not None:
        from clip_fast.model import load_weights

        load_weights(raw, ckpt["model"])
    model = wrap_model(raw, args, env)
    optimizer = build_optimizer(model, args, fsdp)
    scaler = torch.amp.GradScaler(env.device.type, enabled=args.precision == "amp_fp16")
    loss_fn = LossAdapter(args, env)
    step, start_epoch = 0, 0
    if ckpt is not None:
        opt_state = ckpt["optimizer"]
        if fsdp:  # this rank's shard, saved next to step_<N>.pt
            shard = ckpt_path_for_rank(resume_path.with_name(f"step_{ckpt['step']}.pt"), env.rank)
            if not shard.is_file():
                raise FileNotFoundError(f"--resume with fsdp2: optimizer shard {shard} not found (same world size needed)")
            opt_state = torch.load(shard, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(opt_state)
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        start_epoch = step // steps_per_epoch

    n_params = sum(p.numel() for p in raw.parameters())
    img_flops = image_flops_per_sample(raw, env.device)
    peak = peak_flops(env.device, args.precision)
    _log(env, f"clip_fast.train: model {args.model} ({n_params / 1e6:.2f}M params), precision {args.precision}, "
              f"device {env.device}{f' x{env.world_size} ({args.dist})' if env.world_size > 1 else ''}, "
              f"data backend {loader.backend}, {loader.stats.samples} samples, batch {args.batch_size}/rank, "
              f"{steps_per_epoch} steps/epoch x {args.epochs} epochs, tokenizer {tokenizer.kind} (vocab {tokenizer.vocab_size})")
    if save and env.is_main:
        (run_dir / "params.json").write_text(json.dumps(_args_dict(args), indent=2))

    def checkpoint_state(epoch: int) -> dict[str, Any]:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            model_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            model_sd = {k: v.detach().cpu() for k, v in raw.state_dict().items()}
        rng = _rng_state()
        if env.world_size > 1:
            states = [None] * env.world_size
            dist.all_gather_object(states, rng)
        else:
            states = [rng]
        return {
            "model": model_sd, "optimizer": {} if fsdp else optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "step": step, "epoch": epoch, "config": dataclasses.asdict(raw.config),
            "tokenizer": tokenizer.to_json(), "args": _args_dict(args), "rng_states": states,
        }

    last_ckpt: Path | None = None

    def save_checkpoint(epoch: int) -> Path | None:
        nonlocal last_ckpt
        if not save:
            return None
        state = checkpoint_state(epoch)
        path = ckpt_dir / f"step_{step}.pt"
        if fsdp:  # each rank's optimizer shard next to the checkpoint
            atomic_save(optimizer.state_dict(), ckpt_path_for_rank(path, env.rank))
        if env.is_main:
            atomic_save(state, path)
            _link_latest(path)
            _prune_checkpoints(ckpt_dir, args.keep_checkpoints)
        if env.world_size > 1:
            dist.barrier()
        last_ckpt = path
        return path

    templates = _templates(args, data)
    results_path = run_dir / "results.jsonl"

    def run_zeroshot(epoch: int) -> dict[str, Any] | None:
        if data.zeroshot_dir is None:
            return None
        t0 = time.time()
        res = zeroshot_eval(model, raw, tokenizer, data.zeroshot_dir, templates, data.heldout_classnames, env, args, fsdp)
        res.update(epoch=epoch, step=step, seconds=round(time.time() - t0, 2))
        held = f", held-out classes top-1 {100 * res['heldout_top1']:.1f}%" if "heldout_top1" in res else ""
        _log(env, f"Zero-shot (step {step}): top-1 {100 * res['top1']:.2f}%  top-5 {100 * res['top5']:.2f}%  "
                  f"({res['n']} images, {res['classes']} classes, chance {100 * res['chance_top1']:.1f}%{held})")
        if save and env.is_main:
            with open(results_path, "a") as f:
                f.write(json.dumps(res) + "\n")
        return res

    # ---- the loop
    log_path = run_dir / "log.jsonl"
    last_loss = float("nan")
    zs_result = None
    t_log, data_wait, samples_since, steps_since, text_tokens = time.time(), 0.0, 0, 0, 0.0
    epoch = start_epoch
    model.train()
    try:
        while step < stop_step:
            loader.set_epoch(epoch)
            batches = iter(loader)
            skip = step - epoch * steps_per_epoch
            if skip:  # resume mid-epoch: the same data order, from where the run stopped
                _log(env, f"skipping {skip} batches of epoch {epoch} to restore the data position")
                for _ in range(skip):
                    next(batches)
            if ckpt is not None:  # after the loader drew its seeds: the run continues bit for bit
                states = ckpt.get("rng_states") or []
                if len(states) == env.world_size:
                    _set_rng_state(states[env.rank])
                ckpt = None
            while step < min(stop_step, (epoch + 1) * steps_per_epoch):
                t0 = time.time()
                try:
                    images, tokens = next(batches)
                except StopIteration:
                    raise RuntimeError(f"loader ended epoch {epoch} early ({step - epoch * steps_per_epoch} of "
                                       f"{steps_per_epoch} batches)") from None
                data_wait += time.time() - t0
                lr = cosine_lr(step, args.lr, args.warmup, total_steps)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                with autocast_context(args.precision, env.device, fsdp):
                    out = model(images, tokens)
                # The blockwise losses pick their own precision (fp32 softmax statistics,
                # tensor cores for bf16 features): called outside autocast.
                loss = loss_fn(*out)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if scaler.is_enabled():
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                with torch.no_grad():
                    _clamp_logit_scale(raw)
                step += 1
                samples_since += images.shape[0]
                steps_since += 1
                text_tokens += float(tokens.argmax(-1).max()) + 1  # the trimmed length the text tower ran

                if step % args.log_every == 0 or step == stop_step:
                    last_loss = _log_step(env, args, loss, lr, raw, step, epoch, steps_per_epoch, stop_step, t_log,
                                          data_wait, samples_since, steps_since, text_tokens, img_flops, peak, log_path,
                                          save, loader)
                    t_log, data_wait, samples_since, steps_since, text_tokens = time.time(), 0.0, 0, 0, 0.0
                if args.save_every_n_steps and step % args.save_every_n_steps == 0 and step != stop_step:
                    save_checkpoint(epoch)
            epoch_done = step == (epoch + 1) * steps_per_epoch
            if epoch_done:
                epoch += 1
                if val_loader is not None:
                    v = val_loss(model, val_loader, loss_fn, env, args, fsdp)
                    _log(env, f"Eval epoch {epoch}: val loss {v['val_loss']:.4f} ({v['val_samples']} samples)")
                    if save and env.is_main:
                        with open(results_path, "a") as f:
                            f.write(json.dumps({"epoch": epoch, "step": step, **v}) + "\n")
                if step < stop_step:
                    save_checkpoint(epoch)
                    if args.zeroshot_every and epoch % args.zeroshot_every == 0:
                        zs_result = run_zeroshot(epoch)
    except KeyboardInterrupt:
        _log(env, f"interrupted at step {step}" + (": saving a checkpoint" if save else ""))
        if env.world_size == 1:  # a collective save could hang when only some ranks were interrupted
            save_checkpoint(epoch)
        raise
    save_checkpoint(epoch)
    zs_result = run_zeroshot(epoch) or zs_result
    if zs_result is not None and save and env.is_main:
        (run_dir / "zeroshot.json").write_text(json.dumps(zs_result, indent=2))
    if last_ckpt is not None:
        _log(env, f"checkpoint: {last_ckpt}  (python -m clip_fast.zeroshot --checkpoint {last_ckpt} --data DIR)")
    return {"step": step, "epoch": epoch, "loss": last_loss, "zeroshot": zs_result, "run_dir": str(run_dir),
            "checkpoint": str(last_ckpt) if last_ckpt else None, "model": raw}


def ckpt_path_for_rank(path: Path, rank: int) -> Path:
    """FSDP2 optimizer shard of `rank` belonging to checkpoint `path`."""
    return path.with_name(f"{path.stem}.optim.rank{rank}.pt")


def _clamp_logit_scale(raw: nn.Module) -> None:
    scale = raw.logit_scale
    if hasattr(scale, "to_local"):  # FSDP2: a replicated scalar lives on every rank's shard
        scale = scale.to_local()
    scale.clamp_(0, LOGIT_SCALE_MAX)


def _log_step(env, args, loss, lr, raw, step, epoch, steps_per_epoch, stop_step, t_log, data_wait, samples, steps,
              text_tokens, img_flops, peak, log_path, save, loader) -> float:
    loss_value = float(loss.detach().float())
    if env.world_size > 1:
        t = torch.tensor([loss_value], device=env.device)
        dist.all_reduce(t)
        loss_value = float(t) / env.world_size
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    elapsed = max(time.time() - t_log, 1e-9)
    per_gpu = samples / elapsed
    mean_len = text_tokens / max(steps, 1)
    flops = 3 * (img_flops + text_flops_per_sample(raw.config, mean_len))  # forward + backward (2x)
    achieved = flops * per_gpu
    mfu = achieved / peak if peak else None
    scale = raw.logit_scale.full_tensor() if hasattr(raw.logit_scale, "full_tensor") else raw.logit_scale
    in_epoch = step - epoch * steps_per_epoch
    rec = {
        "step": step, "epoch": epoch, "loss": loss_value, "lr": lr, "logit_scale": float(scale.detach().float().exp()),
        "samples_per_s": per_gpu * env.world_size, "samples_per_s_per_gpu": per_gpu,
        "data_wait": data_wait / elapsed, "tflops_per_gpu": achieved / 1e12, "mfu": mfu,
    }
    _log(env, f"Train Epoch: {epoch} [{in_epoch}/{steps_per_epoch} steps ({100 * in_epoch / steps_per_epoch:.0f}%)] "
              f"step {step}/{stop_step}  Loss: {loss_value:.4f}  LR: {lr:.3e}  Logit Scale: {rec['logit_scale']:.2f}  "
              f"{rec['samples_per_s']:.1f} samples/s, {per_gpu:.1f}/s/gpu  data-wait {100 * rec['data_wait']:.0f}%  "
              f"MFU {'n/a (cpu)' if env.device.type == 'cpu' else 'n/a (unknown GPU)' if mfu is None else f'{100 * mfu:.1f}%'} "
              f"({rec['tflops_per_gpu']:.3f} TFLOP/s/gpu)")
    if save and env.is_main:
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return loss_value


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: errors in the arguments or inputs print one clear line."""
    try:
        train(argv)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"clip_fast.train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
