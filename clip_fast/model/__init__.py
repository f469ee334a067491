"""CLIP towers with fast attention and OpenAI/open_clip-compatible weights.

    from clip_fast import model as cf
    clip = cf.create("ViT-B/32")                 # random init; "RN50", "tiny-vit", ...
    clip = cf.load("checkpoint.pt")              # clip_fast / open_clip / OpenAI (TorchScript) files
    clip = cf.from_state_dict(open_clip_model.state_dict(), quick_gelu=True)
"""
from clip_fast.model.attention_pool import AttentionPool2d, attention_pool_reference
from clip_fast.model.backends import attention_backend, set_attention_backend
from clip_fast.model.clip import CLIP, text_length_for, trim_tokens
from clip_fast.model.config import CONFIGS, CLIPConfig, TextConfig, VisionConfig, get_config, list_models
from clip_fast.model.loading import (
    config_from_state_dict,
    create,
    from_checkpoint,
    from_state_dict,
    load,
    load_weights,
    read_checkpoint,
)

__all__ = [
    "CLIP", "CONFIGS", "CLIPConfig", "TextConfig", "VisionConfig", "AttentionPool2d", "attention_backend",
    "attention_pool_reference", "config_from_state_dict", "create", "from_checkpoint", "from_state_dict", "get_config",
    "list_models", "load", "load_weights", "read_checkpoint", "set_attention_backend",
    "text_length_for", "trim_tokens",
]
