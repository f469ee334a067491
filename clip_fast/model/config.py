"""The architecture of a CLIP model as plain data, and the registry of named configs.

`VisionConfig` describes the image tower (a ViT when `layers` is an int, OpenAI's
ModifiedResNet when it is 4 ints), `TextConfig` the causal text Transformer, and
`CLIPConfig` both plus the shared embedding width and the logit scale/bias init.
`CONFIGS` holds OpenAI's released architectures and two tiny test models; `get_config`
resolves a name (OpenAI's "ViT-B/32" or open_clip's "ViT-B-32", "-quickgelu" suffix)
and applies overrides. Checkpoints store `dataclasses.asdict(config)`;
`CLIPConfig.from_dict` reads it back.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class VisionConfig:
    image_size: int = 224
    layers: int | tuple[int, int, int, int] = 12  # int: ViT depth; 4-tuple: ModifiedResNet blocks per stage
    width: int = 768  # ViT width, or the ResNet's base channel count (stage 1 has 4x this)
    patch_size: int | None = 32  # ViT only
    heads: int | None = None  # default: width // 64 (ViT), width * 32 // 64 (ResNet attention pool)
    mlp_ratio: float = 4.0
    patch_dropout: float = 0.0  # FLIP: fraction of patch tokens dropped in training (ViT only)

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):  # from JSON / dataclasses.asdict
            self.layers = tuple(self.layers)
        if self.is_resnet and len(self.layers) != 4:
            raise ValueError(f"vision layers must be an int (ViT) or 4 ints (ResNet), got {self.layers}")
        if not self.is_resnet and (self.patch_size is None or self.image_size % self.patch_size):
            raise ValueError(f"ViT image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.is_resnet and self.image_size % 32:
            raise ValueError(f"ModifiedResNet image_size must be a multiple of 32, got {self.image_size}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {self.patch_dropout}")

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, tuple)

    @property
    def num_heads(self) -> int:
        return self.heads or (self.width * 32 // 64 if self.is_resnet else self.width // 64)


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = True  # OpenAI's models use QuickGELU, x * sigmoid(1.702 x)
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # a learnable logit bias (SigLIP) when set

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def context_length(self) -> int:
        return self.text.context_length

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        """Inverse of dataclasses.asdict (the form checkpoints store)."""
        d = dict(d)
        vision, text = VisionConfig(**d.pop("vision", {})), TextConfig(**d.pop("text", {}))
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown CLIPConfig fields: {sorted(unknown)}")
        return cls(vision=vision, text=text, **d)


def _text(width: int, heads: int) -> TextConfig:
    return TextConfig(width=width, heads=heads)


CONFIGS: dict[str, CLIPConfig] = {
    "RN50": CLIPConfig(1024, VisionConfig(224, (3, 4, 6, 3), 64, None), _text(512, 8)),
    "RN101": CLIPConfig(512, VisionConfig(224, (3, 4, 23, 3), 64, None), _text(512, 8)),
    "RN50x4": CLIPConfig(640, VisionConfig(288, (4, 6, 10, 6), 80, None), _text(640, 10)),
    "RN50x16": CLIPConfig(768, VisionConfig(384, (6, 8, 18, 8), 96, None), _text(768, 12)),
    "RN50x64": CLIPConfig(1024, VisionConfig(448, (3, 15, 36, 10), 128, None), _text(1024, 16)),
    "ViT-B/32": CLIPConfig(512, VisionConfig(224, 12, 768, 32), _text(512, 8)),
    "ViT-B/16": CLIPConfig(512, VisionConfig(224, 12, 768, 16), _text(512, 8)),
    "ViT-L/14": CLIPConfig(768, VisionConfig(224, 24, 1024, 14), _text(768, 12)),
    "ViT-L/14@336px": CLIPConfig(768, VisionConfig(336, 24, 1024, 14), _text(768, 12)),
    # Tiny models for tests and the demo (64x64 images, GELU).
    "tiny-vit": CLIPConfig(
        128, VisionConfig(64, 2, 128, 16), TextConfig(width=128, heads=2, layers=2), quick_gelu=False
    ),
    "tiny-rn": CLIPConfig(
        128, VisionConfig(64, (1, 1, 1, 1), 16, None), TextConfig(width=128, heads=2, layers=2), quick_gelu=False
    ),
}


def _canonical(name: str) -> str:
    return name.lower().replace("/", "-").replace("@336px", "-336").replace("_", "-")


_ALIASES = {_canonical(k): k for k in CONFIGS}


def list_models() -> list[str]:
    return list(CONFIGS)


def get_config(name: str, quick_gelu: bool | None = None, **overrides: Any) -> CLIPConfig:
    """The config `name` ("ViT-B/32", open_clip's "ViT-B-32", "RN50-quickgelu", "tiny-vit", ...)
    with `overrides` applied: CLIPConfig fields, or vision/text fields by name
    (`image_size`, `vocab_size`, `context_length`, `patch_dropout`, ...) or with a
    `vision_` / `text_` prefix (`text_layers=6`)."""
    key = _canonical(name)
    if key.endswith("-quickgelu"):
        key = key[: -len("-quickgelu")]
        quick_gelu = True if quick_gelu is None else quick_gelu
    if key not in _ALIASES:
        raise ValueError(f"unknown model config {name!r}; available: {list_models()}")
    config = dataclasses.replace(CONFIGS[_ALIASES[key]])
    vision, text = dataclasses.asdict(config.vision), dataclasses.asdict(config.text)
    top = {f.name for f in dataclasses.fields(CLIPConfig)} - {"vision", "text"}
    top_values: dict[str, Any] = {}
    for k, v in overrides.items():
        if k in top:
            top_values[k] = v
        elif k.startswith("vision_") and k[7:] in vision:
            vision[k[7:]] = v
        elif k.startswith("text_") and k[5:] in text:
            text[k[5:]] = v
        elif k in vision and k not in text:
            vision[k] = v
        elif k in text and k not in vision:
            text[k] = v
        else:
            valid = sorted(top | {f"vision_{f}" for f in vision} | {f"text_{f}" for f in text}
                           | set(vision) ^ set(text))
            raise ValueError(f"unknown or ambiguous config override {k!r}; valid: {valid}")
    if quick_gelu is not None:
        top_values["quick_gelu"] = quick_gelu
    return dataclasses.replace(config, vision=VisionConfig(**vision), text=TextConfig(**text), **top_values)
