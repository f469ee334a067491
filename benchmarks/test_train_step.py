"""End-to-end training step: samples/s of one forward + loss + backward + optimizer step.

  - openclip: open_clip's CLIP (same architecture and weights) + open_clip ClipLoss +
    torch.optim.AdamW (fused on GPU), under the same precision: what an open_clip user
    runs, text padded to 77 tokens;
  - clip_fast: clip_fast.model towers + ContrastiveLoss + clip_fast.optim.AdamW (the
    trainer's step, clip_fast.train).

Both get the same batch: demo images and real demo captions (short: the text tower's
cut to the longest caption is part of what is measured). CPU: tiny-vit at 64 px, fp32,
batch 128. GPU (marked gpu): ViT-B/32 at 224 px, batch 256, amp_bf16, plus clip_fast's
pure-bf16 weights with stochastically rounded AdamW (the paper's half-precision setup).
samples/s and the ratio over openclip (same run) go to extra_info.

    pytest benchmarks/test_train_step.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

_RESULTS: dict[str, float] = {}


def _setup(device: str):
    from clip_fast.data.demo import ensure_demo_dataset
    from clip_fast.data.tokenizer import Tokenizer

    demo = ensure_demo_dataset()
    tok = Tokenizer.train(demo.captions, vocab_size=1024)
    if device == "cuda":
        name, batch = "ViT-B/32", 256
    else:
        name, batch = "tiny-vit", 128
    return demo, tok, name, batch


def _batch(demo, tok, image_size: int, batch: int, device: str):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)  # normalised-image statistics
    tokens = tok(demo.captions[:batch]).to(device)
    return images, tokens


def _open_clip_model(cf_model):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    c = cf_model.config
    v, t = c.vision, c.text
    model = CLIP(
        embed_dim=c.embed_dim,
        vision_cfg=CLIPVisionCfg(layers=v.layers, width=v.width, head_width=v.width // v.num_heads,
                                 patch_size=v.patch_size, image_size=v.image_size, mlp_ratio=v.mlp_ratio),
        text_cfg=CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                             layers=t.layers, mlp_ratio=t.mlp_ratio),
        quick_gelu=c.quick_gelu,
    )
    missing, unexpected = model.load_state_dict(cf_model.state_dict(), strict=False)
    assert not [k for k in missing if "attn_mask" not in k] and not unexpected, (missing, unexpected)
    return model


@pytest.fixture
def measure_step(measure, benchmark):
    """conftest's measure + samples/s and the speed-up over openclip in extra_info."""

    def run(fn, rounds=None, **extra):
        out = measure(fn, rounds=rounds, **extra)
        sps = extra["batch"] / benchmark.stats.stats.mean
        benchmark.extra_info["samples_per_s"] = round(sps, 1)
        _RESULTS[extra["impl"]] = sps
        if "openclip" in _RESULTS and extra["impl"] != "openclip":
            benchmark.extra_info["speedup_vs_openclip"] = round(sps / _RESULTS["openclip"], 3)
        return out

    return run


@pytest.mark.parametrize("impl", ["openclip", "clip_fast", "clip_fast_bf16_sr"])
def test_train_step(measure_step, device, impl):
    from clip_fast import ContrastiveLoss
    from clip_fast import model as cf
    from clip_fast.optim import AdamW, param_groups

    if impl == "clip_fast_bf16_sr" and device != "cuda":
        pytest.skip("pure-bf16 weights are the GPU setup (CPU bf16 matmuls are slow without AMX)")
    demo, tok, name, batch = _setup(device)
    torch.manual_seed(0)
    ours = cf.create(name, vocab_size=tok.vocab_size)
    images, tokens = _batch(demo, tok, ours.config.image_size, batch, device)
    amp = device == "cuda"
    if impl == "openclip":
        import open_clip

        model = _open_clip_model(ours).to(device)
        loss_fn = open_clip.ClipLoss()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1,
                                fused=device == "cuda")
    else:
        model = ours.to(device)
        if impl == "clip_fast_bf16_sr":
            model = model.to(torch.bfloat16)
            images, amp = images.to(torch.bfloat16), False
        loss_fn = ContrastiveLoss()
        opt = AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.98), eps=1e-6,
                    state_dtype=torch.bfloat16 if impl == "clip_fast_bf16_sr" else None)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            out = model(images, tokens)
            loss = loss_fn(*out[:3])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        return loss

    measure_step(step, rounds=5 if device == "cpu" else 20, model=name, batch=batch, impl=impl)
