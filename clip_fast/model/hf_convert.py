"""Hugging Face `CLIPModel` weights -> clip_fast's CLIP (no `transformers` needed).

A HF CLIP directory holds `config.json` and `model.safetensors` or `pytorch_model.bin`.
The two layouts are the same network (OpenAI's ViT and causal text transformer):

  HF                                         clip_fast (OpenAI / open_clip names)
  vision_model.embeddings.patch_embedding    visual.conv1
  vision_model.embeddings.class_embedding    visual.class_embedding
  vision_model.embeddings.position_embedding visual.positional_embedding  (an Embedding's weight)
  vision_model.pre_layrnorm / post_layernorm visual.ln_pre / visual.ln_post
  visual_projection.weight (out, in)         visual.proj = weight^T  (in, out)
  text_model.embeddings.token_embedding      token_embedding
  text_model.embeddings.position_embedding   positional_embedding
  text_model.final_layer_norm                ln_final
  text_projection.weight                     text_projection = weight^T
  *.encoder.layers.i.self_attn.{q,k,v}_proj  *.transformer.resblocks.i.attn.in_proj_{weight,bias} = [q; k; v]
  *.encoder.layers.i.self_attn.out_proj      ....attn.out_proj
  *.encoder.layers.i.layer_norm{1,2}         ....ln_{1,2}
  *.encoder.layers.i.mlp.fc{1,2}             ....mlp.c_fc / mlp.c_proj
  logit_scale                                logit_scale

`hidden_act` "quick_gelu" (OpenAI's) or "gelu" (exact) selects the activation. HF pools
the text at the first `eos_token_id` (or at argmax(ids) for legacy configs with
eos_token_id 2); clip_fast pools at argmax(ids), the same position when the EOT is the
largest id, which is checked here.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any

import torch

CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}
_LAYER_NORM_EPS = 1e-5  # clip_fast's LayerNorm (torch's default)
_LEGACY_EOS_ID = 2  # HF configs saved before the eos fix: pooling at argmax(input_ids)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def is_hf_state_dict(state_dict: dict[str, Any]) -> bool:
    """True for a state_dict in HF CLIPModel's layout."""
    return any(k.startswith(("vision_model.", "text_model.")) for k in state_dict)


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file: u64 little-endian header length, a JSON header of
    {name: {dtype, shape, data_offsets: [begin, end]}} relative to the data after it."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: not a safetensors file (bad header)") from None
    data = memoryview(raw)[8 + n :]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        begin, end = meta["data_offsets"]
        if end > len(data):
            raise ValueError(f"{path}: truncated (tensor {name} ends at byte {end} of {len(data)})")
        flat = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(meta["shape"])
    return out


def find_hf_files(path: str) -> tuple[str, str] | None:
    """(config.json, weights file) of a HF CLIP directory or of a weights file with a
    config.json beside it; None when `path` is not laid out like one."""
    if os.path.isdir(path):
        config = os.path.join(path, CONFIG_NAME)
        weights = next((os.path.join(path, w) for w in WEIGHT_NAMES if os.path.isfile(os.path.join(path, w))), None)
        if not os.path.isfile(config) or weights is None:
            raise ValueError(f"{path}: a folder of weights must be a Hugging Face CLIPModel folder with "
                             f"{CONFIG_NAME} and one of {list(WEIGHT_NAMES)}")
        return config, weights
    config = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_NAME)
    if path.endswith(".safetensors") or (os.path.isfile(config) and _is_clip_config(config)):
        if not os.path.isfile(config):
            raise ValueError(f"{path}: Hugging Face weights need their {CONFIG_NAME} in the same folder")
        return config, path
    return None


def _is_clip_config(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") == "clip"


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """clip_fast's CLIPConfig, as the dict `CLIPConfig.from_dict` takes, of a HF CLIPConfig
    dict (config.json); ValueError for what clip_fast's network cannot express."""
    if hf.get("model_type") != "clip":
        raise ValueError(f"config.json: model_type must be 'clip' (a CLIPModel), got {hf.get('model_type')!r}")
    v, t = hf.get("vision_config") or {}, hf.get("text_config") or {}
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= set(_ACTIVATIONS):
        raise ValueError(f"config.json: hidden_act must be one of {sorted(_ACTIVATIONS)} and the same in both towers, got {sorted(acts)}")
    for tower, cfg in (("vision_config", v), ("text_config", t)):
        eps = cfg.get("layer_norm_eps", _LAYER_NORM_EPS)
        if eps != _LAYER_NORM_EPS:
            raise ValueError(f"config.json: {tower}.layer_norm_eps must be {_LAYER_NORM_EPS} (clip_fast's LayerNorm), got {eps}")
    vocab = t.get("vocab_size", 49408)
    eos = t.get("eos_token_id", _LEGACY_EOS_ID)
    if eos not in (_LEGACY_EOS_ID, vocab - 1):
        raise ValueError(f"config.json: text_config.eos_token_id must be the largest id {vocab - 1} "
                         f"(clip_fast pools the text at argmax(ids)), got {eos}")
    # Defaults: those of transformers' CLIPVisionConfig / CLIPTextConfig / CLIPConfig.
    vision = dict(
        image_size=v.get("image_size", 224), layers=v.get("num_hidden_layers", 12), width=v.get("hidden_size", 768),
        patch_size=v.get("patch_size", 32), heads=v.get("num_attention_heads", 12),
        mlp_ratio=v.get("intermediate_size", 3072) / v.get("hidden_size", 768),
    )
    text = dict(
        context_length=t.get("max_position_embeddings", 77), vocab_size=vocab, width=t.get("hidden_size", 512),
        heads=t.get("num_attention_heads", 8), layers=t.get("num_hidden_layers", 12),
        mlp_ratio=t.get("intermediate_size", 2048) / t.get("hidden_size", 512),
    )
    return dict(embed_dim=hf.get("projection_dim", 512), vision=vision, text=text,
                quick_gelu=_ACTIVATIONS[acts.pop()], init_logit_scale=hf.get("logit_scale_init_value", 2.6592))


def _convert_layer(sd: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """One encoder layer `src` (HF) -> residual block `dst` (clip_fast)."""
    a = f"{src}.self_attn"
    out = {
        f"{dst}.attn.in_proj_weight": torch.cat([sd[f"{a}.{p}_proj.weight"] for p in "qkv"]),
        f"{dst}.attn.in_proj_bias": torch.cat([sd[f"{a}.{p}_proj.bias"] for p in "qkv"]),
    }
    pairs = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))
    for hf_name, name in pairs:
        for p in ("weight", "bias"):
            out[f"{dst}.{name}.{p}"] = sd[f"{src}.{hf_name}.{p}"]
    return out


def _layer_count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def convert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPModel state_dict -> clip_fast (OpenAI layout) state_dict (see the module docstring)."""
    try:
        out = {
            "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
            "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
            "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
            "visual.proj": sd["visual_projection.weight"].t(),
            "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
            "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
            "text_projection": sd["text_projection.weight"].t(),
            "logit_scale": sd["logit_scale"].reshape(()),
        }
        for hf_name, name in (("vision_model.pre_layrnorm", "visual.ln_pre"), ("vision_model.post_layernorm", "visual.ln_post"),
                              ("text_model.final_layer_norm", "ln_final")):
            out[f"{name}.weight"], out[f"{name}.bias"] = sd[f"{hf_name}.weight"], sd[f"{hf_name}.bias"]
        for hf_prefix, prefix in (("vision_model.encoder.layers.", "visual.transformer.resblocks."),
                                  ("text_model.encoder.layers.", "transformer.resblocks.")):
            for i in range(_layer_count(sd, hf_prefix)):
                out.update(_convert_layer(sd, f"{hf_prefix}{i}", f"{prefix}{i}"))
    except KeyError as e:
        raise ValueError(f"not a Hugging Face CLIPModel state_dict: missing {e.args[0]}") from None
    return {k: v.contiguous() for k, v in out.items()}


def read_hf_weights(path: str) -> dict[str, torch.Tensor]:
    """The state_dict of a HF weights file (.safetensors, or a torch pickle such as pytorch_model.bin)."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state_dict, got {type(obj).__name__}")
    return obj


def read_hf_clip(config_path: str, weights_path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(clip_fast config dict, clip_fast state_dict) of HF's config.json and weights file."""
    with open(config_path, encoding="utf-8") as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    config = config_from_hf(hf)
    sd = read_hf_weights(weights_path)
    if not is_hf_state_dict(sd):
        raise ValueError(f"{weights_path}: not Hugging Face CLIPModel weights (no vision_model.* / text_model.* keys)")
    return config, convert_state_dict(sd)
