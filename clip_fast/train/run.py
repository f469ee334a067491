"""Assembling a run from a validated command line: paths, resume point, data, model,
optimizer. Produces the `Run` that loop.py trains."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from clip_fast.grad_cache import GradCache
from clip_fast.train import checkpoint as ckpt_io
from clip_fast.train import setup
from clip_fast.train.config import ConfigError, precision_mode
from clip_fast.train.evaluate import EvalContext, autocast_factory
from clip_fast.train.metrics import RunLog, truncate_jsonl

# Prompts in the demo captions' own style ("a red circle on the left.", "there is a ...").
DEMO_TEMPLATES = ("a photo of a {}.", "a {}.", "there is a {}.", "a picture with a {}.")


@dataclass
class Run:
    """Everything a training loop needs, built once."""

    args: argparse.Namespace
    env: setup.DistEnv
    precision: str
    raw: nn.Module
    model: nn.Module
    optimizer: Any
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    loader: Any
    val_loader: Any
    data: setup.DataSpec
    tokenizer: Any
    log: RunLog
    eval: EvalContext
    run_dir: Path | None
    steps_per_epoch: int
    total_steps: int
    stop_step: int
    templates: tuple
    image_flops: float
    peak_flops: float | None
    resume: dict | None = None  # the checkpoint being resumed (dropped once restored)
    grad_cache: GradCache | None = None  # --accum-freq > 1: one exact step over accum_freq loader batches

    @property
    def fsdp(self) -> bool:
        return self.env.world_size > 1 and self.args.dist == "fsdp2"

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.run_dir / "checkpoints" if self.run_dir is not None else None


def run_name(args: argparse.Namespace, env: setup.DistEnv) -> str:
    """open_clip's default name (date-model-lr-batch-workers-precision), agreed by all ranks."""
    if args.name is not None:
        return args.name
    stamp = datetime.datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
    name = [f"{stamp}-model_{args.model.replace('/', '-')}-lr_{args.lr}-b_{args.batch_size}-j_{'auto' if args.workers is None else args.workers}"
            f"-p_{args.precision or 'auto'}"]
    if env.world_size > 1:
        dist.broadcast_object_list(name, src=0)
    return name[0]


def find_resume(args: argparse.Namespace, run_dir: Path | None) -> tuple[Path, dict] | None:
    """The checkpoint --resume names (`latest`: the newest intact one of this run)."""
    if args.resume is None:
        return None
    if args.resume != "latest":
        path = Path(args.resume)
        return path, ckpt_io.read_training_checkpoint(path)
    found = ckpt_io.find_latest(run_dir / "checkpoints") if run_dir is not None else None
    if found is None:
        raise FileNotFoundError(f"--resume latest: no checkpoint in {run_dir}/checkpoints (give --logs/--name of the run)")
    return found


def prepare_run_dir(args: argparse.Namespace, env: setup.DistEnv) -> Path | None:
    if args.logs.lower() == "none":
        return None
    run_dir = Path(args.logs) / run_name(args, env)
    args.name = run_dir.name
    if env.is_main:
        try:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--logs {args.logs}: cannot create {run_dir}: {e.strerror}") from None
        ckpt_io.remove_stale_temporaries(run_dir / "checkpoints")
    return run_dir


def load_sources(args: argparse.Namespace, resume: dict | None, model_given: bool) -> tuple[Any, dict | None, str | None]:
    """(architecture config or None, initial weights or None, stored tokenizer JSON or
    None) from the resumed checkpoint or --pretrained."""
    from clip_fast.model import CLIPConfig, config_from_state_dict, read_checkpoint

    if resume is not None:
        config = CLIPConfig.from_dict(resume["config"])
        setup.check_same_model(args, config, f"--resume {args.resume}", model_given)
        return config, resume["model"], resume["tokenizer"]
    if not args.pretrained:
        return None, None, None
    try:
        stored = read_checkpoint(args.pretrained)
    except Exception as e:
        raise ConfigError(f"--pretrained {args.pretrained}: cannot read weights ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if "model" in stored and "config" in stored:
        config, weights = CLIPConfig.from_dict(stored["config"]), stored["model"]
    else:
        weights = stored["state_dict"] if isinstance(stored.get("state_dict"), dict) else stored
        weights = {k.removeprefix("module."): v for k, v in weights.items()}
        config = config_from_state_dict(weights, quick_gelu=True)
    setup.check_same_model(args, config, f"--pretrained {args.pretrained}", model_given)
    return config, weights, stored.get("tokenizer") if isinstance(stored.get("tokenizer"), str) else None


def warn_changed_layout(args: argparse.Namespace, env: setup.DistEnv, resume: dict, log: RunLog) -> None:
    saved = resume.get("args", {})
    old = (saved.get("batch_size"), saved.get("accum_freq", 1), saved.get("world_size", 1))
    if old[0] is not None and old != (args.batch_size, args.accum_freq, env.world_size):
        log.info(f"clip_fast.train: warning: --resume: the checkpoint trained with batch {old[0]} x accum {old[1]} x "
                 f"{old[2]} ranks, now {args.batch_size} x {args.accum_freq} x {env.world_size}: the step counter is "
                 "kept, so the schedule and the "
                 "data position map to different samples (the run does not continue exactly)")


def build_run(args: argparse.Namespace, env: setup.DistEnv, model_given: bool) -> Run:
    precision = precision_mode(args, env.device.type)
    if env.device.type == "cuda":  # open_clip's setting; peak_flops then quotes TF32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run_dir = prepare_run_dir(args, env)
    found = find_resume(args, run_dir)
    resume = found[1] if found else None
    if found:
        resume["_path"] = str(found[0])
    data = setup.resolve_data(args)
    config, weights, stored_tok = load_sources(args, resume, model_given)
    tokenizer = setup.build_tokenizer(args, data, env, stored_tok)
    if config is None:
        config = setup.model_config(args, tokenizer.vocab_size, tokenizer.context_length)
    if config.vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"the model's vocab_size {config.vocab_size} differs from the tokenizer's "
                          f"{tokenizer.vocab_size} (--tokenizer must be the one the weights were trained with)")
    if env.device.type == "cuda" and config.vision.is_resnet:
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolutions once
    raw = setup.build_model(args, config, env, precision, weights)
    log = RunLog(run_dir, env.is_main, args.report_to, 0, args.wandb_project_name, args.wandb_notes)
    if found:
        log.info(f"resuming from {found[0]} (step {resume['step']})")
        warn_changed_layout(args, env, resume, log)
    return _assemble(args, env, precision, raw, data, tokenizer, log, run_dir, resume)


def _loaders(args, env, data, tokenizer, raw, precision):
    dtype = {"fp32": torch.float32, "amp_fp16": torch.float16}.get(precision, torch.bfloat16)
    opts = setup.LoaderOptions(args.batch_size, raw.config.image_size, tokenizer, args.data_backend, env.rank,
                               env.world_size, env.device, dtype, setup.workers(args), args.seed)
    loader = setup.build_data_loader(data.train, opts, args, train=True, csv=data.is_csv)
    val = None
    if data.val and args.val_frequency:
        val = setup.build_data_loader(data.val, opts, args, train=False, csv=setup._is_csv(args, args.val_data))
    return loader, val, dtype


def _epoch_steps(args, env, loader) -> int:
    """Optimizer steps per epoch: each takes --accum-freq loader batches (a remainder of
    fewer is not trained on)."""
    steps = len(loader) // args.accum_freq
    if steps < 1:
        raise ConfigError(f"--accum-freq {args.accum_freq}: a step takes {args.accum_freq} batches of "
                          f"{args.batch_size}, the data has {len(loader)} per epoch on each of {env.world_size} ranks")
    if args.train_num_samples is not None:
        wanted = args.train_num_samples // (args.batch_size * args.accum_freq * env.world_size)
        if wanted < 1 or wanted > steps:
            raise ConfigError(f"--train-num-samples {args.train_num_samples}: gives {wanted} steps of "
                              f"{args.batch_size} x {args.accum_freq} x {env.world_size}; the data has {steps} "
                              "per epoch")
        steps = wanted
    return steps


def _assemble(args, env, precision, raw, data, tokenizer, log, run_dir, resume) -> Run:
    from clip_fast.model.flops import image_flops_per_sample, peak_flops
    from clip_fast.model.parallelize import ParallelConfig, parallelize

    loader, val_loader, dtype = _loaders(args, env, data, tokenizer, raw, precision)
    steps_per_epoch = _epoch_steps(args, env, loader)
    total = args.epochs * steps_per_epoch
    fsdp = env.world_size > 1 and args.dist == "fsdp2"
    model = parallelize(raw, ParallelConfig(
        env.world_size, env.device, args.dist, torch.bfloat16 if precision == "amp_bf16" else None,
        args.ddp_static_graph, args.use_bn_sync, args.torchcompile))
    optimizer = setup.build_optimizer(model, args, precision, fsdp)
    autocast = autocast_factory(precision, env.device, fsdp)
    loss_fn = setup.LossAdapter(args, env)
    grad_cache = GradCache(model, loss_fn, autocast=autocast) if args.accum_freq > 1 else None
    ctx = EvalContext(model, raw, env.device, env.rank, env.world_size, autocast, dtype, args.batch_size,
                      setup.workers(args))
    run = Run(args, env, precision, raw, model, optimizer, torch.amp.GradScaler(env.device.type,
              enabled=precision == "amp_fp16"), loss_fn, loader, val_loader, data, tokenizer,
              log, ctx, run_dir, steps_per_epoch, total, min(total, args.max_steps or total),
              _templates(args, data), image_flops_per_sample(raw, env.device), peak_flops(env.device, precision),
              resume, grad_cache)
    _describe(run)
    if run_dir is not None and env.is_main:
        (run_dir / "params.txt").write_text("".join(f"{k}: {v}\n" for k, v in sorted(vars(args).items())))
    return run


def _templates(args, data):
    from clip_fast.zeroshot import IMAGENET_TEMPLATES, SIMPLE_TEMPLATES

    choice = args.zeroshot_templates
    if choice == "auto":
        choice = "demo" if data.heldout_classnames else "simple"
    return {"demo": DEMO_TEMPLATES, "simple": SIMPLE_TEMPLATES, "imagenet": IMAGENET_TEMPLATES}[choice]


def _describe(run: Run) -> None:
    a, env = run.args, run.env
    n = sum(p.numel() for p in run.raw.parameters())
    trainable = sum(p.numel() for p in run.raw.parameters() if p.requires_grad)
    frozen = f", {trainable / 1e6:.2f}M trainable" if trainable != n else ""
    accum = f" x accum {a.accum_freq} (global {a.batch_size * a.accum_freq * env.world_size})" if a.accum_freq > 1 else ""
    run.log.info(f"clip_fast.train: model {a.model} ({n / 1e6:.2f}M params{frozen}), precision {a.precision or 'auto'} "
                 f"-> {run.precision}, device {env.device}{f' x{env.world_size} ({a.dist})' if env.world_size > 1 else ''}, "
                 f"data backend {run.loader.backend}, batch {a.batch_size}/rank{accum}, {run.steps_per_epoch} steps/epoch x "
                 f"{a.epochs} epochs, tokenizer {run.tokenizer.kind} (vocab {run.tokenizer.vocab_size})")


def restore_training_state(run: Run) -> int:
    """Optimizer, scaler and step from the resumed checkpoint (FSDP2: this rank's
    optimizer shard); JSONL records past the step are dropped. Returns the step."""
    ckpt = run.resume
    if ckpt is None:
        return 0
    opt_state = ckpt["optimizer"]
    if run.fsdp:
        shard = ckpt_io.optimizer_shard_path(Path(ckpt["_path"]), run.env.rank)
        if not shard.is_file():
            raise FileNotFoundError(f"--resume with fsdp2: optimizer shard {shard} not found (same world size needed)")
        opt_state = torch.load(shard, map_location="cpu", weights_only=True)
    run.optimizer.load_state_dict(opt_state)
    if ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    step = int(ckpt["step"])
    if run.run_dir is not None and run.env.is_main:
        for name in ("log.jsonl", "results.jsonl"):
            truncate_jsonl(run.run_dir / name, step)
    return step


def checkpoint_state(run: Run, step: int, epoch: int) -> dict[str, Any]:
    """The content of a checkpoint (collective under FSDP2 / several ranks)."""
    if run.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        model_sd = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        model_sd = {k: v.detach().cpu() for k, v in run.raw.state_dict().items()}
    states = [ckpt_io.rng_state()]
    if run.env.world_size > 1:
        states = [None] * run.env.world_size
        dist.all_gather_object(states, ckpt_io.rng_state())
    args = {k: v for k, v in vars(run.args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    return {"model": model_sd, "optimizer": {} if run.fsdp else run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None, "step": step, "epoch": epoch,
            "config": dataclasses.asdict(run.raw.config), "tokenizer": run.tokenizer.to_json(),
            "args": {**args, "world_size": run.env.world_size}, "rng_states": states}


def weights_finite(raw: nn.Module, world_size: int) -> bool:
    """Whether every parameter (every rank's shard) is finite: one pass and a host sync,
    only at checkpoint time."""
    params = [p.to_local() if hasattr(p, "to_local") else p for p in raw.parameters()]
    norms = torch._foreach_norm([p.detach().float() for p in params if p.numel()])
    flag = torch.isfinite(torch.stack(norms).sum()).float()
    if world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)
