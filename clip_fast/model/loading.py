"""Building a CLIP and loading weights into it: random init from a named config, or
pretrained weights from a clip_fast, open_clip or OpenAI (TorchScript) checkpoint, a bare
state_dict, or a Hugging Face CLIPModel folder (converted by hf_convert).

For a bare state_dict the architecture is inferred from the parameter shapes, as
OpenAI's build_model does (`config_from_state_dict`); loading is strict: every missing
or unexpected key and every shape mismatch is named. Nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Any

import torch

from clip_fast.model import hf_convert
from clip_fast.model.clip import CLIP
from clip_fast.model.config import CLIPConfig, TextConfig, VisionConfig, get_config
from clip_fast.model.resnet import ModifiedResNet


def create(name: str, quick_gelu: bool | None = None, output_dict: bool = False, **overrides: Any) -> CLIP:
    """A randomly initialised CLIP of config `name` (see `list_models()`), e.g.
    create("ViT-B/32"), create("RN50", quick_gelu=False), create("tiny-vit", vocab_size=8192)."""
    return CLIP(get_config(name, quick_gelu, **overrides), output_dict=output_dict)


_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


def _clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):  # DDP and torch.compile wrappers
            while k.startswith(prefix):
                k = k[len(prefix):]
        if k not in _NON_PARAMETER_KEYS:
            out[k] = v
    return out


def config_from_state_dict(state_dict: dict[str, torch.Tensor], quick_gelu: bool = True) -> CLIPConfig:
    """Infer the architecture from parameter shapes, as OpenAI's build_model does."""
    sd = _clean_state_dict(state_dict)
    required = ("text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight")
    missing = [k for k in required if k not in sd]
    if missing or not any(k.startswith("visual.") for k in sd):
        raise ValueError(f"not a CLIP state_dict: missing {missing or ['visual.*']}")
    if "visual.proj" in sd:
        width = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
        mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width
        vision = VisionConfig(image_size=patch * grid, layers=layers, width=width, patch_size=patch, mlp_ratio=mlp)
    else:
        counts = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{i}.")}) for i in (1, 2, 3, 4))
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        spatial = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionConfig(image_size=spatial * 32, layers=counts, width=width, patch_size=None)
    text_width = sd["ln_final.weight"].shape[0]
    text = TextConfig(
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        width=text_width,
        heads=text_width // 64,
        layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
        mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
    )
    bias = float(sd["logit_bias"]) if "logit_bias" in sd else None
    return CLIPConfig(embed_dim=sd["text_projection"].shape[1], vision=vision, text=text, quick_gelu=quick_gelu,
                      init_logit_bias=bias)


def load_weights(model: CLIP, state_dict: dict[str, torch.Tensor]) -> CLIP:
    """Copy `state_dict` into `model`, strictly: every missing or unexpected key is named
    (BatchNorm's num_batches_tracked counters may be absent)."""
    sd = _clean_state_dict(state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(f"state_dict does not fit {type(model).__name__}: missing keys {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''}, unexpected keys {unexpected[:20]}"
                         f"{' ...' if len(unexpected) > 20 else ''}")
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if bad:
        raise ValueError(f"state_dict shapes do not fit the model: {bad[:20]}")
    model.load_state_dict(sd, strict=False)
    return model


def _build_uninitialized(config: CLIPConfig, **kwargs: Any) -> CLIP:
    """A CLIP whose parameters are allocated but not initialised (they are about to be
    overwritten by a state_dict: random init of a large model costs seconds)."""
    with torch.device("meta"):
        model = CLIP(config, **kwargs)
    model = model.to_empty(device="cpu")
    for name, buf in model.named_buffers():
        if name.endswith("num_batches_tracked"):  # may be absent from OpenAI's state_dicts
            buf.zero_()
    if isinstance(model.visual, ModifiedResNet) and model.visual.channels_last:
        model.visual.to(memory_format=torch.channels_last)
    return model


def from_state_dict(state_dict: dict[str, torch.Tensor], quick_gelu: bool = True, **kwargs: Any) -> CLIP:
    """A CLIP built from an OpenAI / open_clip / clip_fast state_dict (config inferred)."""
    model = _build_uninitialized(config_from_state_dict(state_dict, quick_gelu), **kwargs)
    return load_weights(model, state_dict).eval()


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist())


def read_checkpoint(path: str) -> dict[str, Any]:
    """The raw content of a checkpoint file as a dict: clip_fast's trainer checkpoints as
    saved ({"model", "config", "tokenizer", ...}); open_clip's ({"state_dict", ...}); a bare
    state_dict; OpenAI's TorchScript archives (as {"state_dict": ...})."""
    if _is_torchscript(path):
        return {"state_dict": torch.jit.load(path, map_location="cpu").state_dict()}
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint or state_dict, got {type(obj).__name__}")
    return obj


def from_checkpoint(ckpt: dict[str, Any], quick_gelu: bool | None = None) -> CLIP:
    """A CLIP from the content of a checkpoint (see read_checkpoint), in eval mode.

    clip_fast checkpoints carry their config; for bare state_dicts the config is inferred
    and the activation is QuickGELU unless `quick_gelu=False` (state_dicts do not record it).
    """
    if "model" in ckpt and "config" in ckpt:
        config = CLIPConfig.from_dict(ckpt["config"])
        if quick_gelu is not None:
            config = dataclasses.replace(config, quick_gelu=quick_gelu)
        return load_weights(_build_uninitialized(config), ckpt["model"]).eval()
    sd = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else ckpt
    return from_state_dict(sd, quick_gelu=True if quick_gelu is None else quick_gelu)


def load(path: str, device: torch.device | str = "cpu", quick_gelu: bool | None = None) -> CLIP:
    """Load pretrained weights into a CLIP in eval mode on `device`: a checkpoint file
    (clip_fast, open_clip, bare state_dict or OpenAI TorchScript), or a Hugging Face
    CLIPModel folder / weights file with its config.json (see hf_convert; the config
    fixes the activation, so `quick_gelu` must be None or match it).

    Nothing is downloaded: a path that does not exist (such as the hub names "openai",
    "laion2b_s34b_b79k", "openai/clip-vit-base-patch32") is a ValueError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"pretrained weights {path!r}: no such file or folder (nothing is downloaded: "
                         "hub names do not work; pass a checkpoint file or a Hugging Face CLIPModel folder)")
    hf_files = hf_convert.find_hf_files(path)
    if hf_files is None:
        return from_checkpoint(read_checkpoint(path), quick_gelu).to(device)
    config, state_dict = hf_convert.read_hf_clip(*hf_files)
    if quick_gelu is not None and quick_gelu != config["quick_gelu"]:
        raise ValueError(f"quick_gelu={quick_gelu} contradicts {hf_files[0]} (hidden_act gives quick_gelu={config['quick_gelu']})")
    model = _build_uninitialized(CLIPConfig.from_dict(config))
    return load_weights(model, state_dict).eval().to(device)
