"""Evaluation during training: validation loss + retrieval metrics, zero-shot top-k.

Both split the work across ranks and combine it with collectives, so FSDP2's
all-gathers line up (every rank makes the same number of forward calls)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clip_fast.model.parallelize import unwrap
from clip_fast.retrieval import retrieval_metrics


@dataclass
class EvalContext:
    """What the evaluations need from the run: the (possibly wrapped) model, the raw
    CLIP, device, ranks, the autocast to run under and the batch size."""

    model: nn.Module
    raw: nn.Module
    device: torch.device
    rank: int
    world_size: int
    autocast: Any  # a callable returning a context manager
    input_dtype: torch.dtype
    batch_size: int
    workers: int

    @property
    def net(self) -> nn.Module:
        # FSDP2 needs its forward hooks (all-gathers) on every call: go through the
        # wrapper's module call with text only / images only. DDP is not needed for eval.
        return self.model if hasattr(self.model, "reshard") else self.raw


def _gather_rows(x: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def validate(ctx: EvalContext, loader, loss_fn: nn.Module, max_samples: int | None = None) -> dict[str, float]:
    """Mean loss over the validation data (per batch, weighted by batch size, as
    open_clip's clip_val_loss) and open_clip's retrieval metrics over all pairs."""
    net = ctx.net
    net.eval()
    total = torch.zeros(2, device=ctx.device, dtype=torch.float64)
    images_f, texts_f = [], []
    per_rank = None if max_samples is None else max(1, max_samples // ctx.world_size)
    seen = 0
    for images, tokens in loader:
        if per_rank is not None and seen >= per_rank:
            break
        with ctx.autocast():
            out = net(images, tokens)
        total[0] += loss_fn(*out).float() * images.shape[0]
        total[1] += images.shape[0]
        seen += images.shape[0]
        images_f.append(out[0].float())
        texts_f.append(out[1].float())
    net.train()
    if ctx.world_size > 1:
        dist.all_reduce(total)
    metrics = retrieval_metrics(_gather_rows(torch.cat(images_f), ctx.world_size),
                                _gather_rows(torch.cat(texts_f), ctx.world_size))
    return {"val_loss": float(total[0] / total[1]), "val_samples": int(total[1]), **metrics}


class _TextEncoder(nn.Module):
    """What zeroshot.build_classifier needs (encode_text, context_length), computed by a
    call of the (possibly FSDP-wrapped) model with text only."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.context_length = unwrap(net).context_length

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.net(text=tokens)[1]  # already normalised by CLIP.forward


def _rank_loader(ctx: EvalContext, dataset):
    """This rank's share of `dataset`, padded (the last image repeated) to equal counts;
    the mask marks the real images."""
    n = len(dataset)
    per_rank = -(-n // ctx.world_size)
    span = range(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
    indices = [min(i, n - 1) for i in span]
    valid = torch.tensor([i < n for i in span])
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices),
                                         batch_size=min(256, ctx.batch_size * 2), num_workers=min(2, ctx.workers))
    return loader, valid


@torch.no_grad()
def zeroshot(ctx: EvalContext, tokenizer, folder: str, templates, heldout: list[str]) -> dict[str, Any]:
    """Top-1/top-5 on an ImageFolder with clip_fast.zeroshot's classifier, images split
    across ranks, hit counts summed with all_reduce."""
    from clip_fast.zeroshot import ImageFolder, build_classifier

    dataset = ImageFolder(folder, ctx.raw.config.image_size)
    loader, valid = _rank_loader(ctx, dataset)
    net = ctx.net
    net.eval()
    counts = torch.zeros(5, device=ctx.device, dtype=torch.float64)  # top1, top5, n, held top1, held n
    with ctx.autocast():
        classifier = build_classifier(_TextEncoder(net), tokenizer, dataset.classnames, templates, ctx.device)
        held = torch.tensor([c in heldout for c in dataset.classnames], device=ctx.device)
        offset = 0
        for images, labels in loader:
            images, labels = images.to(ctx.device, ctx.input_dtype), labels.to(ctx.device)
            mask = valid[offset: offset + labels.shape[0]].to(ctx.device)
            offset += labels.shape[0]
            features = F.normalize(net(image=images)[0].float(), dim=-1)
            hits = (features @ classifier.float()).topk(min(5, classifier.shape[1]), dim=-1).indices == labels[:, None]
            in_held = held[labels] & mask
            counts += torch.stack([(hits[:, 0] & mask).sum(), (hits.any(-1) & mask).sum(), mask.sum(),
                                   (hits[:, 0] & in_held).sum(), in_held.sum()]).double()
    net.train()
    if ctx.world_size > 1:
        dist.all_reduce(counts)
    c = counts.tolist()
    result = {"top1": c[0] / c[2], "top5": c[1] / c[2], "n": int(c[2]), "classes": len(dataset.classnames),
              "chance_top1": 1.0 / len(dataset.classnames)}
    if c[4] > 0:
        result["heldout_top1"] = c[3] / c[4]
        result["heldout_classes"] = [name for name in dataset.classnames if name in heldout]
    return result


def check_imagefolder(folder: str, flag: str) -> None:
    """Fails before training (one line naming the flag) when `folder` is no usable ImageFolder."""
    from clip_fast.zeroshot import ImageFolder

    try:
        ImageFolder(folder, 16)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{flag}: {e}") from None


def autocast_factory(mode: str, device: torch.device, fsdp: bool):
    """A callable returning the autocast context for a clip_fast precision mode (FSDP2
    casts parameters itself through its policy; bf16/fp32 need none)."""
    if mode in ("amp_bf16", "amp_fp16") and not fsdp:
        dtype = torch.bfloat16 if mode == "amp_bf16" else torch.float16
        return lambda: torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext
