"""The command line: open_clip's flags (open_clip_train/params.py) plus clip_fast's own.

Every open_clip flag is either accepted with open_clip's name and meaning, or rejected at
start with one line naming the flag and the reason (REJECTED). A rejected flag given with
open_clip's default value is accepted: it asks for nothing. clip_fast-only flags cover
what open_clip lacks (data backend, tokenizer, stochastic-rounding optimizer, moment
dtype, FSDP2, step limits).

Precision (open_clip's choices -> what clip_fast runs):
  fp32                        fp32 weights and math
  amp                         fp16 autocast + GradScaler (open_clip's default; CUDA only)
  amp_bf16, amp_bfloat16      bf16 autocast, fp32 weights and AdamW
  bf16, pure_bf16             bf16 weights updated by clip_fast's AdamW with stochastic
                              rounding and bf16 moments (6 bytes per parameter)
  fp16, pure_fp16             rejected: pure fp16 weights diverge without a master copy
Default: amp_bf16 on a GPU, fp32 on CPU.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Sequence

# open_clip's precision names -> clip_fast's internal mode.
PRECISION_MODES = {
    "fp32": "fp32", "amp": "amp_fp16", "amp_bf16": "amp_bf16", "amp_bfloat16": "amp_bf16",
    "bf16": "bf16", "pure_bf16": "bf16", "fp16": None, "pure_fp16": None,
}
LR_SCHEDULERS = ("cosine", "const", "const-cooldown")

# Flags of open_clip that clip_fast does not implement: flag -> (reason, argparse kwargs
# as open_clip declares it). Giving the flag with open_clip's default value is accepted.
REJECTED: dict[str, tuple[str, dict[str, Any]]] = {
    "--train-data-upsampling-factors": ("per-source upsampling is not supported", {}),
    "--pretrained-image": ("needs timm weights from the network; pass --pretrained FILE",
                           {"action": "store_true"}),
    "--image-mean": ("not supported: images are normalised with OpenAI CLIP's mean/std", {"nargs": "+", "type": float}),
    "--image-std": ("not supported: images are normalised with OpenAI CLIP's mean/std", {"nargs": "+", "type": float}),
    "--image-interpolation": ("not supported: the loader resizes bicubic (PIL) or with DALI's resize", {}),
    "--image-resize-mode": ("not supported: the loader resizes the shortest side then centre-crops", {}),
    "--aug-cfg": ("not supported: training uses random-resized-crop only", {"nargs": "*", "default": []}),
    "--force-context-length": ("not supported: the context length is the tokenizer's", {"type": int}),
    "--force-custom-text": ("not supported: clip_fast has one text tower", {"action": "store_true"}),
    "--torchscript": ("not supported (TorchScript is deprecated); use --torchcompile", {"action": "store_true"}),
    "--trace": ("not supported (torch.jit.trace is for inference)", {"action": "store_true"}),
    "--momentum": ("only for timm optimizers; clip_fast supports --opt adamw", {"type": float}),
    "--log-local": ("not supported: global rank 0 writes the logs", {"action": "store_true"}),
    "--copy-codebase": ("not supported: clip_fast runs as an installed package", {"action": "store_true"}),
    "--horovod": ("removed upstream; use torchrun", {"action": "store_true"}),
    "--coca-caption-loss-weight": ("CoCa models are not supported", {"type": float, "default": 2.0}),
    "--coca-contrastive-loss-weight": ("CoCa models are not supported", {"type": float, "default": 1.0}),
    "--remote-sync": ("needs a network; copy LOGS/NAME yourself", {}),
    "--remote-sync-frequency": ("needs a network (--remote-sync)", {"type": int, "default": 300}),
    "--remote-sync-protocol": ("needs a network (--remote-sync)", {"default": "s3"}),
    "--distill-model": ("distillation is not supported", {}),
    "--distill-pretrained": ("distillation is not supported", {}),
    "--use-bnb-linear": ("bitsandbytes layers are not supported", {}),
}
# Flags accepted for compatibility that change nothing here (documented in docs/training.md).
NO_EFFECT = {"--cache-dir": "nothing is downloaded", "--wandb-notes": "used with --report-to wandb",
             "--wandb-project-name": "used with --report-to wandb", "--debug": "logs every step"}

# Demo run (no --train-data): defaults tuned for the built-in dataset (learns in ~1 min).
DEMO_DEFAULTS = {"batch_size": 128, "epochs": 5, "lr": 2e-3, "wd": 0.1, "warmup": 50, "log_every_n_steps": 20,
                 "zeroshot_frequency": 5, "workers": None}
# open_clip's defaults for real data (lr/betas/eps per model family: get_default_params).
OPEN_CLIP_DEFAULTS = {"batch_size": 64, "epochs": 32, "wd": 0.2, "warmup": 10000, "log_every_n_steps": 100,
                      "zeroshot_frequency": 2, "workers": 4}


class ConfigError(ValueError):
    """A bad command line: the message names the flag."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump (the CLI prints it)
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m clip_fast.train", allow_abbrev=False,
                description="Train CLIP with open_clip's command line (no arguments: the built-in demo).")
    _data_flags(p.add_argument_group("data (open_clip)"))
    _train_flags(p.add_argument_group("optimisation (open_clip)"))
    _model_flags(p.add_argument_group("model and fine-tuning (open_clip)"))
    _run_flags(p.add_argument_group("logging, checkpoints, distributed (open_clip)"))
    _clip_fast_flags(p.add_argument_group("clip_fast only"))
    rejected = p.add_argument_group("open_clip flags clip_fast rejects (see docs/training.md)")
    for flag, (_, kwargs) in REJECTED.items():
        rejected.add_argument(flag, help=argparse.SUPPRESS, **kwargs)
    return p


def _data_flags(a) -> None:
    a.add_argument("--train-data", help="shards: files, globs, {a..b} braces, '::'-joined, a make_shards "
                                        "folder, or a csv file with --dataset-type csv (default: the demo)")
    a.add_argument("--val-data", help="validation data, same forms as --train-data")
    a.add_argument("--train-num-samples", type=int, help="samples per epoch (at most the dataset's, any number "
                                                         "with --dataset-resampled)")
    a.add_argument("--val-num-samples", type=int, help="validate on at most this many samples")
    a.add_argument("--dataset-resampled", action="store_true",
                   help="webdataset shards drawn with replacement per rank and epoch; an epoch is "
                        "--train-num-samples samples (default: the dataset's size); torch data backend")
    a.add_argument("--dataset-type", default="auto", choices=("webdataset", "csv", "synthetic", "auto"))
    a.add_argument("--csv-separator", default="\t")
    a.add_argument("--csv-img-key", default="filepath")
    a.add_argument("--csv-caption-key", default="title")
    a.add_argument("--imagenet-val", help="ImageFolder DIR/<class>/<image> for zero-shot (default: the demo's)")
    a.add_argument("--imagenet-v2", help="a second ImageFolder for zero-shot")
    a.add_argument("--cache-dir", help="accepted; nothing is downloaded")
    a.add_argument("--workers", type=int, help="data workers / DALI threads per rank")


def _train_flags(a) -> None:
    a.add_argument("--batch-size", type=int, help="per rank (open_clip: 64; demo: 128)")
    a.add_argument("--accum-freq", type=int, default=1,
                   help="micro-batches of --batch-size per optimizer step: one exact loss and gradient over "
                        "accum-freq x batch-size samples per rank (feature-cached accumulation, clip_fast.GradCache)")
    a.add_argument("--epochs", type=int)
    a.add_argument("--epochs-cooldown", type=int, help="const-cooldown: cool down over the last N epochs")
    a.add_argument("--lr", type=float)
    a.add_argument("--beta1", type=float)
    a.add_argument("--beta2", type=float)
    a.add_argument("--eps", type=float)
    a.add_argument("--wd", type=float)
    a.add_argument("--warmup", type=int, help="linear warmup steps")
    a.add_argument("--opt", default="adamw", help="adamw (clip_fast.optim.AdamW)")
    a.add_argument("--skip-scheduler", action="store_true", help="constant --lr, no warmup or decay")
    a.add_argument("--lr-scheduler", default="cosine", help="cosine, const or const-cooldown")
    a.add_argument("--lr-cooldown-end", type=float, default=0.0)
    a.add_argument("--lr-cooldown-power", type=float, default=1.0)
    a.add_argument("--precision", default=None, help=f"one of {tuple(PRECISION_MODES)} (default: amp_bf16 on GPU, fp32 on CPU)")
    a.add_argument("--grad-clip-norm", type=float)
    a.add_argument("--local-loss", action="store_true")
    a.add_argument("--gather-with-grad", action="store_true")
    a.add_argument("--siglip", action="store_true", help="sigmoid loss (clip_fast.SigLipLoss)")
    a.add_argument("--loss-dist-impl", help="accepted; clip_fast's SigLIP always exchanges features around a ring")
    a.add_argument("--seed", type=int, default=0)


def _model_flags(a) -> None:
    a.add_argument("--model", default="tiny-vit", help="tiny-vit, tiny-rn, ViT-B-32 / ViT-B/32, RN50, ... "
                                                       "(default tiny-vit; open_clip's is RN50)")
    a.add_argument("--pretrained", default="", help="a weights FILE or HF directory (no hub tags)")
    a.add_argument("--lock-image", action="store_true")
    a.add_argument("--lock-image-unlocked-groups", type=int, default=0)
    a.add_argument("--lock-image-freeze-bn-stats", action="store_true")
    a.add_argument("--lock-text", action="store_true")
    a.add_argument("--lock-text-unlocked-layers", type=int, default=0)
    a.add_argument("--lock-text-freeze-layer-norm", action="store_true")
    a.add_argument("--grad-checkpointing", action="store_true")
    a.add_argument("--force-image-size", type=int, nargs="+")
    a.add_argument("--force-quick-gelu", action="store_true")
    a.add_argument("--force-patch-dropout", type=float)
    a.add_argument("--torchcompile", action="store_true")


def _run_flags(a) -> None:
    a.add_argument("--logs", default="./logs/", help="runs go to LOGS/NAME; 'none' writes nothing. "
                                                      "Under torchrun put '--' before the script's flags")
    a.add_argument("--name")
    a.add_argument("--log-every-n-steps", type=int)
    a.add_argument("--save-frequency", type=int, default=1, help="save every N epochs (0: only at the end)")
    a.add_argument("--save-most-recent", action="store_true", help="also write checkpoints/epoch_latest.pt")
    a.add_argument("--delete-previous-checkpoint", action="store_true")
    a.add_argument("--zeroshot-frequency", type=int)
    a.add_argument("--val-frequency", type=int, default=1)
    a.add_argument("--resume", help="a checkpoint file, or 'latest'")
    a.add_argument("--report-to", default="", help="tensorboard, wandb (offline) or both, comma-separated")
    a.add_argument("--wandb-notes", default="")
    a.add_argument("--wandb-project-name", default="open-clip")
    a.add_argument("--debug", action="store_true", help="log every step")
    a.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    a.add_argument("--dist-url", default=None, help="init_method of the process group (default env://)")
    a.add_argument("--dist-backend", default=None, help="nccl / gloo (default: nccl on GPU, gloo on CPU)")
    a.add_argument("--ddp-static-graph", action="store_true")
    a.add_argument("--no-set-device-rank", action="store_true", help="do not pick the GPU from LOCAL_RANK")
    a.add_argument("--use-bn-sync", action="store_true", help="SyncBatchNorm (ResNet towers) under DDP")


def _clip_fast_flags(a) -> None:
    a.add_argument("--data-backend", default="auto", choices=("auto", "dali", "torch"))
    a.add_argument("--tokenizer", help="tokenizer JSON, HF tokenizer directory or OpenAI merges file "
                                       "(default: a BPE trained on the captions)")
    a.add_argument("--vocab-size", type=int, help="size of the trained tokenizer (demo 1024, else 16384)")
    a.add_argument("--demo-root", help="where the demo dataset is generated")
    a.add_argument("--zeroshot-templates", default="auto", choices=("auto", "demo", "simple", "imagenet"))
    a.add_argument("--dist", default="ddp", choices=("ddp", "fsdp2"), help="wrapper under torchrun")
    a.add_argument("--moment-dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="AdamW moments (auto: bf16 with --precision bf16, else fp32)")
    a.add_argument("--max-steps", type=int, help="stop after this many steps (the schedule still spans --epochs)")
    a.add_argument("--save-every-n-steps", type=int, default=0, help="also save step_N.pt every N steps")
    a.add_argument("--max-nonfinite-steps", type=int, default=10,
                   help="steps with a NaN/inf loss or gradient are skipped; stop after this many")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate a command line (ConfigError naming the flag when it is bad)."""
    argv = list(argv) if argv is not None else None
    if argv and argv[0] == "--":  # `torchrun ... -m clip_fast.train -- --logs DIR` (see docs/training.md)
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    check_rejected(args)
    apply_defaults(args)
    validate(args)
    return args


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def check_rejected(args: argparse.Namespace) -> None:
    for flag, (reason, kwargs) in REJECTED.items():
        default = kwargs.get("default", False if kwargs.get("action") == "store_true" else None)
        if getattr(args, _dest(flag)) != default:
            raise ConfigError(f"{flag}: {reason}")


def apply_defaults(args: argparse.Namespace) -> None:
    """Demo defaults without --train-data, open_clip's otherwise (lr/betas/eps per model
    family as open_clip's get_default_params)."""
    table = DEMO_DEFAULTS if args.train_data is None else OPEN_CLIP_DEFAULTS
    for key, value in table.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    vit = "vit" in args.model.lower()
    family = {"lr": 5e-4, "beta1": 0.9, "beta2": 0.98 if vit else 0.999, "eps": 1e-6 if vit else 1e-8}
    for key, value in family.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.debug:
        args.log_every_n_steps = 1


def _positive(args: argparse.Namespace, names: Sequence[str], minimum: int) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def validate(args: argparse.Namespace) -> None:
    """Checks that need no data or device (the rest: validate_paths, at start)."""
    _positive(args, ("batch_size", "accum_freq", "epochs", "log_every_n_steps", "max_steps", "train_num_samples",
                     "val_num_samples", "max_nonfinite_steps", "vocab_size"), 1)
    _positive(args, ("warmup", "save_every_n_steps", "zeroshot_frequency", "val_frequency", "save_frequency",
                     "workers", "epochs_cooldown", "lock_image_unlocked_groups", "lock_text_unlocked_layers"), 0)
    _validate_optimisation(args)
    _validate_model(args)
    _validate_run(args)


def _validate_optimisation(args: argparse.Namespace) -> None:
    if not args.lr > 0 or not args.wd >= 0 or not args.eps > 0:
        raise ConfigError(f"--lr must be > 0, --wd >= 0, --eps > 0; got lr={args.lr}, wd={args.wd}, eps={args.eps}")
    if not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        raise ConfigError(f"--beta1/--beta2 must be in [0, 1), got {args.beta1}, {args.beta2}")
    if args.opt.lower() != "adamw":
        raise ConfigError(f"--opt {args.opt}: only adamw is supported (timm optimizers are not)")
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise ConfigError(f"--lr-scheduler must be one of {LR_SCHEDULERS}, got {args.lr_scheduler!r}")
    if args.lr_scheduler == "const-cooldown" and args.epochs_cooldown is None:
        raise ConfigError("--lr-scheduler const-cooldown needs --epochs-cooldown N")
    if args.epochs_cooldown is not None and args.epochs_cooldown >= args.epochs:
        raise ConfigError(f"--epochs-cooldown {args.epochs_cooldown} must be < --epochs {args.epochs}")
    if args.grad_clip_norm is not None and not args.grad_clip_norm > 0:
        raise ConfigError(f"--grad-clip-norm must be > 0, got {args.grad_clip_norm}")
    if args.precision is not None and args.precision not in PRECISION_MODES:
        raise ConfigError(f"--precision must be one of {tuple(PRECISION_MODES)}, got {args.precision!r}")
    if args.precision is not None and PRECISION_MODES[args.precision] is None:
        raise ConfigError(f"--precision {args.precision}: pure fp16 weights are not supported; use amp or bf16")
    if args.siglip and (args.local_loss or args.gather_with_grad):
        raise ConfigError("--local-loss/--gather-with-grad apply to the CLIP loss; --siglip exchanges features "
                          "around a ring")


def _validate_model(args: argparse.Namespace) -> None:
    from clip_fast.model import get_config

    try:
        get_config(args.model)
    except ValueError as e:
        raise ConfigError(f"--model: {e}") from None
    if args.force_image_size is not None:
        sizes = set(args.force_image_size)
        if len(args.force_image_size) > 2 or len(sizes) != 1 or min(sizes) < 16:
            raise ConfigError(f"--force-image-size: one size >= 16 (square images), got {args.force_image_size}")
    if args.force_patch_dropout is not None and not 0 <= args.force_patch_dropout < 1:
        raise ConfigError(f"--force-patch-dropout must be in [0, 1), got {args.force_patch_dropout}")
    if args.pretrained and not (os.path.isfile(args.pretrained) or os.path.isdir(args.pretrained)):
        raise ConfigError(f"--pretrained {args.pretrained}: no such file or directory (hub tags such as "
                          "'openai' or 'laion2b_s34b_b79k' cannot be downloaded here: pass a weights file)")
    if args.vocab_size is not None and args.tokenizer is not None:
        raise ConfigError("--vocab-size sizes a trained tokenizer; it cannot be combined with --tokenizer")


def _validate_run(args: argparse.Namespace) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if args.dist == "fsdp2" and "WORLD_SIZE" not in os.environ:
        raise ConfigError("--dist fsdp2 needs torchrun (RANK/WORLD_SIZE/MASTER_ADDR in the environment)")
    mode = PRECISION_MODES.get(args.precision) if args.precision else None
    if args.dist == "fsdp2" and mode == "amp_fp16":
        raise ConfigError("--dist fsdp2 supports --precision fp32, amp_bf16 or bf16 (fp16 needs a sharded scaler)")
    if args.dist == "fsdp2" and args.torchcompile:
        raise ConfigError("--torchcompile is supported with --dist ddp or one process, not with fsdp2")
    _validate_device(args.device, world)
    if args.dist_backend is not None and args.dist_backend not in ("nccl", "gloo"):
        raise ConfigError(f"--dist-backend must be nccl or gloo, got {args.dist_backend!r}")
    for target in filter(None, args.report_to.split(",")):
        if target not in ("tensorboard", "wandb"):
            raise ConfigError(f"--report-to: unknown target {target!r} (tensorboard, wandb)")
    if "tensorboard" in args.report_to:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("--report-to tensorboard: the tensorboard package is not installed") from None
    if "wandb" in args.report_to:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--report-to wandb: the wandb package is not installed") from None
    if args.dataset_type == "synthetic":
        raise ConfigError("--dataset-type synthetic: not supported; run without --train-data for the built-in demo")
    if args.resume is not None and args.logs.lower() == "none" and args.resume == "latest":
        raise ConfigError("--resume latest needs --logs (the run folder to look in)")
    _validate_logs(args.logs)


def _validate_device(device: str | None, world: int) -> None:
    import torch

    if device is None:
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and world > 1:
        raise ConfigError(f"--device {device}: an explicit GPU index with {world} ranks would put every rank on "
                          "one GPU; give --device cuda (each rank takes LOCAL_RANK % device_count)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")


def _validate_logs(logs: str) -> None:
    """--logs must be a writable folder (or creatable): checked before any work."""
    if logs.lower() == "none":
        return
    path = Path(logs)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"--logs {logs}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--logs {logs}: {existing} is not writable")


def precision_mode(args: argparse.Namespace, device_type: str) -> str:
    """clip_fast's internal precision mode (fp32, amp_bf16, amp_fp16, bf16) for `args`."""
    if args.precision is None:
        return "amp_bf16" if device_type == "cuda" else "fp32"
    mode = PRECISION_MODES[args.precision]
    if mode == "amp_fp16" and device_type != "cuda":
        raise ConfigError(f"--precision {args.precision} (fp16 autocast) needs a GPU; use fp32 or amp_bf16 on CPU")
    return mode


def open_clip_flag_status() -> dict[str, str]:
    """flag -> 'accepted', 'no effect: ...' or 'rejected: ...' for the flag table of docs/training.md."""
    parser = build_parser()
    status = {}
    for action in parser._actions:
        for flag in action.option_strings:
            if flag in REJECTED:
                status[flag] = f"rejected: {REJECTED[flag][0]}"
            elif flag in NO_EFFECT:
                status[flag] = f"no effect: {NO_EFFECT[flag]}"
            elif flag.startswith("--"):
                status[flag] = "accepted"
    return status
