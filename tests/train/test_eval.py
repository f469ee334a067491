"""Retrieval metrics vs open_clip's materialised get_clip_metrics; LiT locking vs
open_clip's lock_image_tower / lock_text_tower on the same architecture; FLOP counts."""
from __future__ import annotations

import pytest
import torch

from clip_fast import model as cf
from clip_fast.model.flops import image_flops_per_sample, peak_flops, text_flops_per_sample
from clip_fast.model.freeze import FrozenStatsBatchNorm2d, lock_image_tower, lock_text_tower
from clip_fast.retrieval import retrieval_metrics


def _features(n: int, d: int, seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + noise * torch.randn(n, d, generator=g), dim=-1)
    return img, txt


@pytest.mark.parametrize("n, d, block", [(1, 8, 4096), (37, 16, 5), (300, 32, 64), (1000, 24, 999)])
def test_retrieval_matches_open_clip(n, d, block):
    from open_clip_train.train import get_clip_metrics

    img, txt = _features(n, d, n, noise=1.0)
    ours = retrieval_metrics(img, txt, block_size=block)
    ref = get_clip_metrics(img.double(), txt.double(), torch.tensor(100.0, dtype=torch.float64))
    assert set(ours) == set(ref)
    for k, v in ref.items():  # fp64 reference: no ties, the same ranks exactly
        assert ours[k] == pytest.approx(float(v), abs=1e-12), k


def test_retrieval_blockwise_equals_one_block():
    img, txt = _features(5000, 16, 1, noise=2.0)
    assert retrieval_metrics(img, txt, block_size=512) == retrieval_metrics(img, txt, block_size=5000)


def test_retrieval_bad_input():
    with pytest.raises(ValueError, match="image_features and text_features"):
        retrieval_metrics(torch.zeros(3, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="block_size"):
        retrieval_metrics(torch.zeros(3, 4), torch.zeros(3, 4), block_size=0)


def _open_clip_twin(model: cf.CLIP):
    """open_clip's CLIP with the same architecture (parameter names match clip_fast's)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    c = model.config
    v, t = c.vision, c.text
    vision = CLIPVisionCfg(layers=v.layers, width=v.width, patch_size=v.patch_size, image_size=v.image_size,
                           mlp_ratio=v.mlp_ratio, **({} if v.is_resnet else {"head_width": v.width // v.num_heads}))
    text = CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                       layers=t.layers, mlp_ratio=t.mlp_ratio)
    return CLIP(embed_dim=c.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=c.quick_gelu)


def _trainable(module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("groups", [0, 1, 2, 3, 4, 99])
def test_lock_image_tower_matches_open_clip(groups):
    ours = cf.create("tiny-vit")
    ref = _open_clip_twin(ours)
    lock_image_tower(ours, groups)
    ref.lock_image_tower(unlocked_groups=groups)
    assert _trainable(ours) == _trainable(ref) & {n for n, _ in ours.named_parameters()}
    if groups == 0:
        assert not any(n.startswith("visual.") for n in _trainable(ours))
        assert "transformer.resblocks.0.attn.in_proj_weight" in _trainable(ours)


@pytest.mark.parametrize("layers", [0, 1, 2, 3, 99])
def test_lock_text_tower_matches_open_clip(layers):
    ours = cf.create("tiny-vit")
    ref = _open_clip_twin(ours)
    lock_text_tower(ours, layers)
    ref.lock_text_tower(unlocked_layers=layers, freeze_layer_norm=True)
    assert _trainable(ours) == _trainable(ref) & {n for n, _ in ours.named_parameters()}


def test_lock_resnet_with_frozen_batchnorm_stats():
    model = cf.create("tiny-rn").train()
    lock_image_tower(model, 0, freeze_bn_stats=True)
    assert not any(p.requires_grad for p in model.visual.parameters())
    bn = model.visual.bn1
    assert isinstance(bn, FrozenStatsBatchNorm2d)
    before = bn.running_mean.clone()
    model.encode_image(torch.randn(2, 3, 64, 64) * 3 + 1)
    assert torch.equal(bn.running_mean, before)
    assert set(model.state_dict()) == set(cf.create("tiny-rn").state_dict())
    with pytest.raises(ValueError, match="partial locking"):
        lock_image_tower(cf.create("tiny-rn"), 1)


@pytest.mark.parametrize("name", ["tiny-vit", "ViT-B/32", "tiny-rn"])
def test_flop_count_matches_flop_counter(name):
    from torch.utils.flop_counter import FlopCounterMode

    model = cf.create(name).eval()
    v, t = model.config.vision, model.config.text
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.encode_image(torch.zeros(1, 3, v.image_size, v.image_size))
    # FlopCounterMode counts linear/conv/mm but not CPU SDPA: add QK^T and AV by hand
    # (L-1 full blocks over n tokens, the last block for one query).
    attention = 0
    if not v.is_resnet:
        n = (v.image_size // v.patch_size) ** 2 + 1
        attention = (v.layers - 1) * 4 * n * n * v.width + 4 * n * v.width
    assert image_flops_per_sample(model, torch.device("cpu")) == counter.get_total_flops() + attention

    length = 12
    text = torch.zeros(3, length, dtype=torch.long)
    text[:, -1] = model.vocab_size - 1
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.encode_text(text, trim=False)  # one pass over the full width (no length buckets)
    causal = (t.layers - 1) * 2 * length * length * t.width + 4 * length * t.width
    assert text_flops_per_sample(model.config, length) == pytest.approx(counter.get_total_flops() / 3 + causal)


def test_peak_flops_cpu_and_nvl(monkeypatch):
    assert peak_flops(torch.device("cpu"), "bf16") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200 NVL")
    assert peak_flops(torch.device("cuda", 0), "amp_bf16") == 835e12
    from clip_fast.model import flops

    monkeypatch.setattr(flops, "tf32_enabled", lambda: False)
    assert peak_flops(torch.device("cuda", 0), "fp32") == 60e12  # plain fp32 when TF32 is off
    monkeypatch.setattr(flops, "tf32_enabled", lambda: True)
    assert peak_flops(torch.device("cuda", 0), "fp32") == 835e12 / 2
