"""Gradient accumulation at a fixed global batch: clip_fast.GradCache vs open_clip's
`--accum-freq` algorithm, step time and peak extra memory for accum in {1, 4, 16}.

  - gradcache: GradCache(model, ContrastiveLoss()).step(micro-batches): every
    micro-batch forwarded once without autograd, ONE blockwise loss over the global
    batch, each micro-batch replayed with autograd and backpropagated;
  - openclip: the accumulation branch of open_clip_train's train_one_epoch,
    re-implemented here: micro-batch features cached without autograd, then for every
    micro-batch a forward with autograd, the cached features of the others concatenated
    around it, open_clip's ClipLoss (B x B logits materialised) over the global batch,
    and a backward: accum losses over B per step. accum = 1 is its single-pass branch.

Both use the same clip_fast model, weights, batch and torch AdamW step (zero_grad,
accumulate, optimizer step, logit_scale clamp). CPU: tiny-vit at 64 px, fp32, global
batch 4,096, captions of mixed lengths; GPU (marked gpu): ViT-B/32 at 224 px, amp_bf16,
global batch 32,768 in micro-batches of 512 (GradCache only: open_clip's algorithm
materialises 32k x 32k logits per micro-batch). GradCache's speed-up over openclip at the same
accum goes to the extra_info of whichever of the two runs second.

    pytest benchmarks/test_accum.py --benchmark-only
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

_STEP_SECONDS: dict[tuple[str, int], float] = {}


def _batch(global_batch: int, image_size: int, device: str):
    """Seeded images with normalised-image statistics and captions of 5..40 tokens."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(global_batch, 3, image_size, image_size, generator=g)
    lengths = torch.randint(5, 41, (global_batch,), generator=g)
    tokens = torch.randint(1, 1023, (global_batch, 77), generator=g)
    tokens[torch.arange(77)[None, :] >= lengths[:, None]] = 0
    tokens[torch.arange(global_batch), lengths - 1] = 1023  # EOT: the largest id
    return images.to(device), tokens.to(device)


def open_clip_accumulated_step(model, loss_fn, micro_batches, autocast) -> torch.Tensor:
    """open_clip_train.train.train_one_epoch's accum_freq > 1 branch (without the
    optimizer step): cache features without autograd, then per micro-batch re-forward
    with autograd, splice its live features into the cached ones, loss over all, backward."""
    cached_images, cached_texts = [], []
    with torch.no_grad(), autocast():
        for images, texts in micro_batches:
            image_features, text_features, _ = model(images, texts)[:3]
            cached_images.append(image_features)
            cached_texts.append(text_features)
    for j, (images, texts) in enumerate(micro_batches):
        with autocast():
            image_features, text_features, logit_scale = model(images, texts)[:3]
            all_images = torch.cat(cached_images[:j] + [image_features] + cached_images[j + 1:])
            all_texts = torch.cat(cached_texts[:j] + [text_features] + cached_texts[j + 1:])
            loss = loss_fn(all_images, all_texts, logit_scale)
        loss.backward()
    return loss.detach()


def open_clip_single_step(model, loss_fn, micro_batches, autocast) -> torch.Tensor:
    """open_clip's accum_freq == 1 branch."""
    (images, texts), = micro_batches
    with autocast():
        loss = loss_fn(*model(images, texts)[:3])
    loss.backward()
    return loss.detach()


def _setup(device: str):
    if device == "cuda":
        return "ViT-B/32", 32768, [64], lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return "tiny-vit", 4096, [1, 4, 16], contextlib.nullcontext


@pytest.mark.parametrize("impl", ["openclip", "gradcache"])
@pytest.mark.parametrize("accum", [1, 4, 16, 64])
def test_accumulated_step(measure, benchmark, device, impl, accum):
    from open_clip.loss import ClipLoss

    from clip_fast import ContrastiveLoss, GradCache
    from clip_fast import model as cf

    name, global_batch, accums, autocast = _setup(device)
    if accum not in accums:
        pytest.skip(f"accum {accum} is not measured on {device}")
    if impl == "openclip" and device == "cuda":
        pytest.skip("open_clip's accumulation materialises 32k x 32k logits per micro-batch")
    torch.manual_seed(0)
    model = cf.create(name, vocab_size=1024).to(device).train()
    images, tokens = _batch(global_batch, model.config.image_size, device)
    micro_batches = list(zip(images.chunk(accum), tokens.chunk(accum)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    if impl == "gradcache":
        cache = GradCache(model, ContrastiveLoss(), autocast=autocast)

        def accumulate():
            return cache.step(micro_batches)
    else:
        loss_fn, algo = ClipLoss(), open_clip_accumulated_step if accum > 1 else open_clip_single_step

        def accumulate():
            return algo(model, loss_fn, micro_batches, autocast)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = accumulate()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss

    measure(step, rounds=2 if device == "cpu" else 5, model=name, global_batch=global_batch, accum=accum, impl=impl)
    _STEP_SECONDS[(impl, accum)] = benchmark.stats.stats.mean
    if ("openclip", accum) in _STEP_SECONDS and ("gradcache", accum) in _STEP_SECONDS:
        benchmark.extra_info["gradcache_speedup_vs_openclip"] = round(
            _STEP_SECONDS[("openclip", accum)] / _STEP_SECONDS[("gradcache", accum)], 3)
