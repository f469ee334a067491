"""clip_fast.model against open_clip: the same weights give the same features and the same
gradients (ViT-B/32, RN50, a tiny ViT); loading, configs, options and bad input."""
import copy
import dataclasses
import json
import math
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.loss import ClipLoss

import clip_fast.model as cm
from clip_fast.model import backends
from clip_fast.model.clip import _length_buckets
from clip_fast.model.resnet import Bottleneck
from clip_fast.model.transformer import ResidualAttentionBlock
from tests.support.tiny_clip import assert_text_trim_is_exact

TOKENIZE = open_clip.get_tokenizer("ViT-B-32")
# Captions of very different lengths (3 to 60+ tokens): the batch is cut to the longest.
CAPTIONS = ["dog", "a photo of a cat sitting on a mat", "an old red car " * 4,
            "a diagram showing " + "many small parts and " * 12 + "their labels"]


def _randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """OpenAI's init zeroes bn3 gammas (residual branches start as 0): randomise every
    BatchNorm so the parity tests exercise the whole ResNet."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.5 * torch.rand(m.running_var.shape, generator=g))


def _tiny_open_clip(quick_gelu: bool = False):
    return open_clip.CLIP(
        embed_dim=128,
        vision_cfg=dict(image_size=64, layers=2, width=128, patch_size=16),
        text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2),
        quick_gelu=quick_gelu,
    )


def _assert_features_match(theirs, ours, images, texts):
    """fp32 features of both models for the same inputs (eval mode)."""
    theirs.eval(), ours.eval()
    with torch.no_grad():
        for a, b in ((theirs.encode_image(images), ours.encode_image(images)),
                     (theirs.encode_text(texts), ours.encode_text(texts))):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * a.abs().max().item())


def _assert_grads_match(theirs, ours, images, texts, dtype=torch.float64, train=True):
    """Gradients of open_clip's ClipLoss of the forward outputs, for every parameter. In
    fp64 the two computations agree to ~1e-12, so any difference in the math shows. fp32
    (where fp64 convolutions are too slow for CI) can only be held to rounding-level
    agreement, and only in eval mode: BatchNorm on the statistics of a batch of 2 makes
    fp32 ResNet gradients ill-conditioned (open_clip's own fp32 stem gradient is 2% off
    its fp64 one), so train-mode BatchNorm is checked in fp64 on the tiny ResNet."""
    theirs.to(dtype).train(train), ours.to(dtype).train(train)
    images = images.to(dtype)
    rtol, atol, loss_rtol = (1e-7, 1e-9, 1e-10) if dtype == torch.float64 else (1e-2, 1e-3, 1e-4)
    losses = []
    for model in (theirs, ours):
        model.zero_grad()
        loss = ClipLoss()(*model(images, texts))
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=loss_rtol)
    theirs_params = dict(theirs.named_parameters())
    assert set(theirs_params) == {n for n, _ in ours.named_parameters()}
    for name, p in ours.named_parameters():
        q = theirs_params[name]
        if name.endswith("attnpool.k_proj.bias"):  # true gradient 0 (cancels in the softmax)
            assert torch.count_nonzero(p.grad) == 0 and q.grad.abs().max() < atol
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol * q.grad.abs().max().item() + 1e-15,
                                   msg=lambda m: f"gradient of {name}: {m}")
    theirs_buffers = dict(theirs.named_buffers())
    for name, b in ours.named_buffers():  # BatchNorm running statistics after the step
        torch.testing.assert_close(b, theirs_buffers[name], msg=lambda m: f"buffer {name}: {m}")


def test_vit_b32_matches_open_clip():
    torch.manual_seed(0)
    theirs = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    ours = cm.from_state_dict(theirs.state_dict(), quick_gelu=True)
    images = torch.randn(2, 3, 224, 224)
    _assert_features_match(theirs, ours, images, TOKENIZE(CAPTIONS))
    _assert_features_match(theirs, ours, images[:1], TOKENIZE(["word " * 100]))  # full length: nothing to trim
    _assert_grads_match(theirs, ours, images, TOKENIZE(CAPTIONS[:2]))


def test_rn50_matches_open_clip():
    torch.manual_seed(0)
    theirs = open_clip.create_model("RN50-quickgelu", pretrained=None)
    _randomize_batchnorm(theirs)
    ours = cm.from_state_dict(theirs.state_dict(), quick_gelu=True)
    images = torch.randn(2, 3, 224, 224)
    _assert_features_match(theirs, ours, images, TOKENIZE(CAPTIONS))
    _assert_grads_match(theirs, ours, images, TOKENIZE(CAPTIONS[1:3]), dtype=torch.float32, train=False)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_tiny_rn_matches_open_clip(quick_gelu):
    torch.manual_seed(5)
    theirs = open_clip.CLIP(
        embed_dim=128,
        vision_cfg=dict(image_size=64, layers=[1, 1, 1, 1], width=16, patch_size=None),
        text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2),
        quick_gelu=quick_gelu,
    )
    _randomize_batchnorm(theirs)
    ours = cm.from_state_dict(theirs.state_dict(), quick_gelu=quick_gelu)
    assert ours.config == cm.get_config("tiny-rn", quick_gelu=quick_gelu)
    images = torch.randn(3, 3, 64, 64)
    _assert_features_match(theirs, ours, images, TOKENIZE(CAPTIONS[:3]))
    _assert_grads_match(theirs, ours, images, TOKENIZE(CAPTIONS[:3]))


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_tiny_vit_matches_open_clip(quick_gelu):
    torch.manual_seed(4)
    theirs = _tiny_open_clip(quick_gelu)
    ours = cm.from_state_dict(theirs.state_dict(), quick_gelu=quick_gelu)
    # the inferred architecture is the "tiny-vit" config
    assert ours.config == cm.get_config("tiny-vit", quick_gelu=quick_gelu)
    images = torch.randn(3, 3, 64, 64)
    _assert_features_match(theirs, ours, images, TOKENIZE(CAPTIONS[:3]))
    _assert_grads_match(theirs, ours, images, TOKENIZE(CAPTIONS[:3]))


def test_text_trimming_is_exact():
    # Each caption alone (trimmed to its own length) equals its row in a mixed batch
    # (trimmed to the longest caption) and in a batch padded to the full context.
    # Trimming changes only the GEMM shapes (so their summation order), not the maths:
    # checked in fp64, to rounding of that order. Each of the `layers` blocks' dot
    # products of length <= mlp_ratio * width rounds by ~sqrt(K) eps relative to the
    # activations' magnitude, so the features differ by at most
    # 8 * layers * sqrt(4 * width) * eps64 * max|feature| (~1e-13 here; an error in the
    # trimming itself, e.g. attending to a padding token, moves them by ~1e-2).
    torch.manual_seed(5)
    model = cm.create("tiny-vit").double().eval()
    tokens = TOKENIZE(CAPTIONS)
    with torch.no_grad():
        batch = model.encode_text(tokens)
        singles = torch.cat([model.encode_text(t[None]) for t in tokens])
        short = model.encode_text(tokens[:2, :20])  # a context shorter than 77 is accepted
    text = model.config.text
    atol = 8 * text.layers * math.sqrt(text.mlp_ratio * text.width) * torch.finfo(torch.float64).eps
    atol *= batch.abs().max().item()
    torch.testing.assert_close(batch, singles, rtol=0, atol=atol)
    torch.testing.assert_close(short, batch[:2], rtol=0, atol=atol)


def test_length_buckets_are_exact_with_gradients():
    # 40 captions of 3-12 tokens and one of 77: split into length buckets (each cut to its
    # own longest caption); the features and gradients equal the untrimmed computation.
    torch.manual_seed(12)
    model = cm.create("tiny-vit").double()
    words = ["cat", "on a mat", "photo of a red car", "a dog running in the park at dusk"]
    tokens = TOKENIZE([words[i % 4] for i in range(40)] + ["word " * 100])
    assert_text_trim_is_exact(model, tokens, lambda features: features.square().sum())
    lengths = (tokens.argmax(-1) + 1).tolist()
    groups = _length_buckets(lengths, 4)
    assert len(groups) == 4 and sorted(sum(groups, [])) == list(range(41))
    assert max(lengths[i] for i in groups[0]) < 77  # the short buckets are cut


PAPER_CONFIGS = {"RN50": "RN50", "RN101": "RN101", "RN50x4": "RN50x4", "RN50x16": "RN50x16", "RN50x64": "RN50x64",
                 "ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14", "ViT-L/14@336px": "ViT-L-14-336"}


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_match_open_clip_json(name):
    path = Path(open_clip.__file__).parent / "model_configs" / f"{PAPER_CONFIGS[name]}.json"
    ref = json.loads(path.read_text())
    ours = cm.get_config(name)
    assert ours.embed_dim == ref["embed_dim"]
    v, t = ref["vision_cfg"], ref["text_cfg"]
    assert (ours.vision.image_size, ours.vision.width, ours.vision.patch_size) == (v["image_size"], v["width"], v["patch_size"])
    assert ours.vision.layers == (tuple(v["layers"]) if isinstance(v["layers"], list) else v["layers"])
    assert dataclasses.asdict(ours.text) == {**t, "mlp_ratio": 4.0}
    assert ours.quick_gelu  # OpenAI's weights were trained with QuickGELU
    # the same config under open_clip's and OpenAI's spellings
    assert cm.get_config(PAPER_CONFIGS[name]) == ours


def test_config_names_and_overrides():
    assert cm.get_config("RN50-quickgelu", quick_gelu=False).quick_gelu is False
    assert cm.get_config("tiny-rn-quickgelu").quick_gelu is True
    cfg = cm.get_config("tiny-vit", vocab_size=1000, context_length=32, text_layers=3, patch_dropout=0.25, embed_dim=64)
    assert (cfg.vocab_size, cfg.context_length, cfg.text.layers, cfg.vision.patch_dropout, cfg.embed_dim) == (1000, 32, 3, 0.25, 64)
    assert cfg.vision.layers == 2  # the vision tower is untouched
    model = cm.create("tiny-vit", vocab_size=1000)
    assert model.token_embedding.weight.shape == (1000, 128) and model.config.vocab_size == 1000
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with pytest.raises(ValueError, match="unknown model config"):
        cm.create("ViT-Z/99")
    with pytest.raises(ValueError, match="ambiguous"):
        cm.create("tiny-vit", width=256)  # vision or text width?
    with pytest.raises(ValueError, match="unknown or ambiguous"):
        cm.create("tiny-vit", colour="red")


def test_bad_inputs_are_named():
    model = cm.create("tiny-vit", vocab_size=1000).eval()
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        model.encode_image(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        model.encode_image(torch.randn(2, 1, 64, 64))
    with pytest.raises(TypeError, match="floating-point"):
        model.encode_image(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="vocab_size=1000"):
        model.encode_text(torch.tensor([[5, 1000, 0]]))
    with pytest.raises(ValueError, match="vocab_size"):
        model.encode_text(torch.tensor([[5, -1, 7]]))
    with pytest.raises(ValueError, match="context_length=77"):
        model.encode_text(torch.ones(1, 78, dtype=torch.long))
    with pytest.raises(TypeError, match="token ids"):
        model.encode_text(torch.ones(1, 5))


def test_state_dict_errors_name_the_keys():
    model = cm.create("tiny-vit")
    sd = model.state_dict()
    broken = dict(sd)
    del broken["ln_final.bias"]
    broken["visual.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['ln_final.bias'\].*unexpected keys \['visual.extra.weight'\]"):
        cm.load_weights(cm.create("tiny-vit"), broken)
    with pytest.raises(ValueError, match="token_embedding.weight"):
        cm.load_weights(cm.create("tiny-vit", vocab_size=100), sd)
    with pytest.raises(ValueError, match="not a CLIP state_dict"):
        cm.from_state_dict({"weight": torch.zeros(2)})


def _assert_same_model(a, b):
    torch.manual_seed(6)
    images, tokens = torch.randn(2, 3, 64, 64), TOKENIZE(CAPTIONS[:2])
    with torch.no_grad():
        torch.testing.assert_close(a.eval().encode_image(images), b.eval().encode_image(images))
        torch.testing.assert_close(a.encode_text(tokens), b.encode_text(tokens))


def test_load_every_checkpoint_format(tmp_path):
    torch.manual_seed(7)
    model = cm.create("tiny-rn", quick_gelu=True)
    _randomize_batchnorm(model)
    sd = model.state_dict()
    # the trainer's checkpoint: state_dict + config + tokenizer
    path = tmp_path / "trainer.pt"
    torch.save({"model": sd, "config": dataclasses.asdict(model.config), "tokenizer": "{}", "step": 3}, path)
    loaded = cm.load(str(path))
    assert loaded.config == model.config
    _assert_same_model(model, loaded)
    # a bare state_dict with DDP / torch.compile prefixes; open_clip's {"state_dict": ...}
    torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, tmp_path / "bare.pt")
    _assert_same_model(model, cm.load(str(tmp_path / "bare.pt")))
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "oc.pt")
    _assert_same_model(model, cm.load(str(tmp_path / "oc.pt")))


def test_load_openai_torchscript_archive(tmp_path):
    # OpenAI distributes TorchScript archives: trace an open_clip model into one.
    torch.manual_seed(8)
    theirs = _tiny_open_clip(quick_gelu=True).eval()
    traced = torch.jit.trace_module(theirs, {"encode_image": (torch.randn(1, 3, 64, 64),)}, check_trace=False)
    torch.jit.save(traced, str(tmp_path / "openai.pt"))
    ours = cm.load(str(tmp_path / "openai.pt"))
    assert ours.config.quick_gelu and ours.config.vision.layers == 2
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), theirs.encode_image(images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-rn", "tiny-vit"])
def test_gradient_checkpointing_is_exact_and_batchnorm_updates_once(name):
    torch.manual_seed(9)
    base = cm.create(name)
    _randomize_batchnorm(base)
    images, tokens = torch.randn(4, 3, 64, 64), TOKENIZE(CAPTIONS)
    results = []
    for enable in (False, True):
        model = copy.deepcopy(base).train()
        model.set_grad_checkpointing(enable)
        img, txt, scale = model(images, tokens)
        (img @ txt.T * scale).logsumexp(-1).sum().backward()
        results.append(model)
    plain, ckpt = results
    for (name_, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name_}: {m}")
    for (name_, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(c, b, msg=lambda m: f"buffer {name_}: {m}")


def test_patch_dropout_drops_tokens_in_training_only():
    torch.manual_seed(10)
    model = cm.create("tiny-vit", patch_dropout=0.5)
    reference = cm.create("tiny-vit")
    reference.load_state_dict(model.state_dict())
    seen = []
    hook = model.visual.transformer.resblocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    images = torch.randn(2, 3, 64, 64)
    model.train()(images[:, :, :, :], TOKENIZE(CAPTIONS[:2]))
    assert seen[-1] == 1 + 16 // 2  # class token + half of the 4x4 patches
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.eval().encode_image(images))
    assert seen[-1] == 17
    hook.remove()


def test_forward_output_dict_and_logit_bias():
    model = cm.create("tiny-vit", init_logit_bias=-10.0, output_dict=True)
    out = model(torch.randn(2, 3, 64, 64), TOKENIZE(CAPTIONS[:2]))
    assert set(out) == {"image_features", "text_features", "logit_scale", "logit_bias"}
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(2))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    model.output_dict = False
    assert len(model(torch.randn(2, 3, 64, 64), TOKENIZE(CAPTIONS[:2]))) == 4
    assert cm.from_state_dict(model.state_dict(), quick_gelu=False).logit_bias.item() == -10.0


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(11)
    for name in ("tiny-vit", "tiny-rn"):
        model = cm.create(name).eval()
        images, tokens = torch.randn(2, 3, 64, 64), TOKENIZE(CAPTIONS[:2])
        with torch.no_grad():
            ref = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
        for a, b in zip(got, ref):
            assert torch.nn.functional.cosine_similarity(a.float(), b, dim=-1).min() > 0.99


def test_blocks_trace_without_graph_breaks():
    torch._dynamo.reset()
    block = ResidualAttentionBlock(64, 2, 4.0, torch.nn.GELU)
    x = torch.randn(2, 9, 64)
    for causal in (True, False):
        torch.testing.assert_close(torch.compile(block, fullgraph=True, backend="eager")(x, causal), block(x, causal))
    bottleneck = Bottleneck(32, 8, stride=2)
    y = torch.randn(2, 32, 8, 8)
    torch.testing.assert_close(torch.compile(bottleneck, fullgraph=True, backend="eager")(y), bottleneck(y))
    pool = cm.AttentionPool2d(3, 64, 4, 16)
    z = torch.randn(2, 64, 3, 3)
    torch.testing.assert_close(torch.compile(pool, fullgraph=True, backend="eager")(z), pool(z))


def test_attention_backend_report_and_force(monkeypatch):
    assert cm.attention_backend("cpu", torch.float32, 64) == "sdpa"
    monkeypatch.setenv("CLIP_FAST_ATTENTION", "sdpa")
    assert cm.attention_backend("cuda", torch.bfloat16, 64) == "sdpa"
    monkeypatch.setenv("CLIP_FAST_ATTENTION", "magic")
    with pytest.raises(ValueError, match="CLIP_FAST_ATTENTION"):
        cm.attention_backend()
    monkeypatch.delenv("CLIP_FAST_ATTENTION")
    if not backends.flash_attn_available():
        with pytest.raises(ValueError, match="flash_attn is not importable"):
            cm.set_attention_backend("flash_attn")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        cm.set_attention_backend("fast")
    cm.set_attention_backend("sdpa")
    try:
        assert backends.requested_attention_backend() == "sdpa"
    finally:
        cm.set_attention_backend(None)
    # the SDPA path equals explicit softmax attention
    qkv = torch.randn(2, 5, 3, 2, 8)
    q, k, v = qkv.unbind(2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(2, 5, 16)
    torch.testing.assert_close(backends.attention(qkv, causal=True), want)


def _fake_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("flavour", ["pypi", "nvidia", "nvidia-without-cuda-extension"])
def test_apex_detection(tmp_path, monkeypatch, flavour):
    # PyPI's `apex` (an unrelated web package) must not be taken for NVIDIA apex.
    if flavour == "pypi":
        _fake_package(tmp_path, {"apex/__init__.py": "NAME = 'pypi apex'\n"})
    else:
        _fake_package(tmp_path, {
            "apex/__init__.py": "",
            "apex/normalization/__init__.py": "",
            "apex/normalization/fused_layer_norm.py": "def fused_layer_norm_affine(*a, **k):\n    return 'fused'\n",
        })
        if flavour == "nvidia":
            _fake_package(tmp_path, {"fused_layer_norm_cuda.py": ""})
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in [m for m in sys.modules if m == "apex" or m.startswith("apex.") or m == "fused_layer_norm_cuda"]:
        monkeypatch.delitem(sys.modules, mod)
    fn = backends.detect_apex_layer_norm()
    assert (fn() == "fused") if flavour == "nvidia" else (fn is None)


def _autocast_casting_fused_layer_norm(seen: list):
    """A stand-in for apex's fused_layer_norm_affine with its autocast behaviour: apex casts
    its inputs to the autocast dtype when autocast is on for the input's device. Records the
    dtypes it computes in; computes in fp64 so its own arithmetic adds no error."""

    def fused(x, weight, bias, normalized_shape, eps):
        if torch.is_autocast_enabled(x.device.type):
            cast = torch.get_autocast_dtype(x.device.type)
            x, weight, bias = x.to(cast), weight.to(cast), bias.to(cast)
        seen.append((x.dtype, weight.dtype, bias.dtype))
        return torch.nn.functional.layer_norm(x.double(), normalized_shape, weight.double(), bias.double(), eps).to(x.dtype)

    return fused


@pytest.mark.parametrize("width", [8, 37])
def test_apex_layer_norm_runs_in_fp32_under_autocast(monkeypatch, width):
    # apex's fused function casts to the autocast dtype: the "fp32 LayerNorm" must switch
    # autocast off around it. The fake is routed CPU tensors (APEX_DEVICE_TYPES).
    seen: list = []
    monkeypatch.setattr(backends, "APEX_LAYER_NORM", _autocast_casting_fused_layer_norm(seen))
    monkeypatch.setattr(backends, "APEX_DEVICE_TYPES", ("cpu",))
    ln = backends.LayerNorm(width)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 5, width) * 4 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ln(x)
    assert seen == [(torch.float32,) * 3]
    assert out.dtype == torch.float32
    want = torch.nn.functional.layer_norm(x.double(), (width,), ln.weight.double(), ln.bias.double(), ln.eps)
    # fp32 all the way: errors of a few fp32 ulps of |out| (~3); bf16 would give ~1e-2
    torch.testing.assert_close(out.double(), want, rtol=0, atol=16 * torch.finfo(torch.float32).eps * 4)


@pytest.mark.gpu
def test_apex_layer_norm_runs_in_fp32_under_cuda_autocast(monkeypatch):
    seen: list = []
    monkeypatch.setattr(backends, "APEX_LAYER_NORM", _autocast_casting_fused_layer_norm(seen))
    ln = backends.LayerNorm(64).cuda()
    x = torch.randn(4, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = ln(x)
    assert seen == [(torch.float32,) * 3] and out.dtype == torch.float32
