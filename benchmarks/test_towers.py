"""Forward + backward throughput of the CLIP towers, clip_fast against open_clip with the
same weights, on the same device, in the same run.

- text tower (ViT-B/32's: width 512, 12 layers, context 77) on captions of realistic
  length: lognormal token counts with median 17 (CC3M / LAION captions have medians of
  ~15-20 tokens), clipped to [4, 77]. Variants: open_clip (always 77 positions),
  clip_fast (cut to the longest caption + EOT-only last block), clip_fast_untrimmed
  (trim=False: 77 positions, EOT-only last block) which isolates the trimming gain.
  Second caption set: the same plus one 77-token caption (large batches nearly always
  hold one), where cutting to the batch maximum gains nothing and the length buckets do
  (clip_fast vs clip_fast_one_bucket).
- image towers ViT-B/32 and RN50 (open_clip vs clip_fast).
- ModifiedResNet attention pooling at RN50's shape (C 2048, 32 heads, 7x7): open_clip's
  AttentionPool2d (full K/V projections of all 50 tokens) vs clip_fast's (projections
  moved off the tokens; fused Triton kernels on GPU, batched matmuls on CPU).

CPU runs fp32; GPU runs bf16 autocast. extra_info: samples_per_s, batch, caption lengths.

    pytest benchmarks/test_towers.py --benchmark-only --benchmark-columns=mean,stddev,rounds
"""
from __future__ import annotations

import math

import open_clip
import pytest
import torch
from open_clip.modified_resnet import AttentionPool2d as OpenClipAttentionPool2d

import clip_fast.model as cm

from conftest import bench_device, sizes_for

DEVICE = bench_device()
ROUNDS = 3 if DEVICE == "cpu" else None


def _caption_tokens(batch: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """(batch, 77) rows [SOT, words..., EOT, 0...] with lognormal lengths, median 17."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(17) + 0.45 * torch.randn(batch, generator=g)).round().clamp(4, 77).long()
    tokens = torch.zeros(batch, 77, dtype=torch.long)
    for row, n in zip(tokens, lengths.tolist()):
        row[0] = 49406
        row[1 : n - 1] = torch.randint(1, 49406, (n - 2,), generator=g)
        row[n - 1] = 49407
    return tokens, lengths.tolist()


def _autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=DEVICE == "cuda")


def _step(model, fn):
    def run():
        model.zero_grad(set_to_none=True)
        with _autocast():
            out = fn()
        out.float().square().sum().backward()

    return run


_MODELS: dict[str, tuple] = {}


def _pair(name: str):
    """open_clip's randomly initialised `name` and clip_fast's copy of its weights."""
    if name not in _MODELS:
        torch.manual_seed(0)
        theirs = open_clip.create_model(name, pretrained=None).to(DEVICE).train()
        ours = cm.from_state_dict(theirs.state_dict(), quick_gelu=True).to(DEVICE).train()
        _MODELS.clear()  # keep one pair alive at a time
        _MODELS[name] = (theirs, ours)
    return _MODELS[name]


def _record(benchmark, batch: int) -> None:
    benchmark.extra_info["batch"] = batch
    benchmark.extra_info["samples_per_s"] = round(batch / benchmark.stats.stats.mean, 2)


TEXT_CASES = [
    ("realistic", "open_clip"), ("realistic", "clip_fast"), ("realistic", "clip_fast_untrimmed"),
    ("one_77_token", "open_clip"), ("one_77_token", "clip_fast"), ("one_77_token", "clip_fast_one_bucket"),
]


@pytest.mark.parametrize("batch", sizes_for(DEVICE, cpu=[32], gpu=[256]))
@pytest.mark.parametrize("captions,impl", TEXT_CASES, ids=[f"{c}-{i}" for c, i in TEXT_CASES])
def test_text_tower(benchmark, measure, captions, impl, batch):
    theirs, ours = _pair("ViT-B-32-quickgelu")
    tokens, lengths = _caption_tokens(batch)
    if captions == "one_77_token":  # one caption filling the context: the batch max is 77
        tokens[0, 1:76] = torch.randint(1, 49406, (75,), generator=torch.Generator().manual_seed(1))
        tokens[0, 76] = 49407
        lengths[0] = 77
    tokens = tokens.to(DEVICE)
    ours.text_buckets = 1 if impl == "clip_fast_one_bucket" else 4
    if impl == "open_clip":
        fn = _step(theirs, lambda: theirs.encode_text(tokens))
    else:
        fn = _step(ours, lambda: ours.encode_text(tokens, trim=impl != "clip_fast_untrimmed"))
    measure(fn, rounds=ROUNDS, median_len=sorted(lengths)[len(lengths) // 2], max_len=max(lengths))
    _record(benchmark, batch)


@pytest.mark.parametrize("batch", sizes_for(DEVICE, cpu=[8], gpu=[256]))
@pytest.mark.parametrize("impl", ["open_clip", "clip_fast"])
@pytest.mark.parametrize("model", ["ViT-B-32-quickgelu", "RN50-quickgelu"])
def test_image_tower(benchmark, measure, model, impl, batch):
    theirs, ours = _pair(model)
    images = torch.randn(batch, 3, 224, 224, device=DEVICE)
    m = theirs if impl == "open_clip" else ours
    measure(_step(m, lambda: m.encode_image(images)), rounds=ROUNDS)
    _record(benchmark, batch)


@pytest.mark.parametrize("batch", sizes_for(DEVICE, cpu=[64], gpu=[256, 1024]))
@pytest.mark.parametrize("impl", ["open_clip", "clip_fast"])
def test_attention_pool(benchmark, measure, impl, batch):
    c, heads, side, out = 2048, 32, 7, 1024  # RN50
    torch.manual_seed(0)
    theirs = OpenClipAttentionPool2d(side, c, heads, out).to(DEVICE)
    pool = theirs
    if impl == "clip_fast":
        pool = cm.AttentionPool2d(side, c, heads, out).to(DEVICE)
        pool.load_state_dict(theirs.state_dict())
    x = torch.randn(batch, c, side, side, device=DEVICE).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()

    def run():
        x.grad = None
        pool.zero_grad(set_to_none=True)
        with _autocast():
            y = pool(x)
        y.float().square().sum().backward()

    # multiply-adds of the reference chain: q (C^2), k and v (2 L C^2), attention (2 L C), c_proj
    length = side * side + 1
    ref_flops = 2 * batch * (c * c + 2 * length * c * c + 2 * length * c + c * out) * 3  # fwd + 2x bwd
    measure(run, rounds=None if DEVICE == "cuda" else 5, reference_chain_gflop=round(ref_flops / 1e9, 1))
    _record(benchmark, batch)
