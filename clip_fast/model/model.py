"""CLIP (Radford et al. 2021): ViT or ModifiedResNet image tower, causal text Transformer.

Parameter names follow OpenAI's clip/model.py (and therefore open_clip's CLIP class), so
OpenAI and open_clip state_dicts of the same architecture load unchanged, and
`from_state_dict` infers the architecture from a state_dict the way OpenAI's build_model
does. What differs from those implementations is how the towers compute:

- attention goes through clip_fast.model.backends (flash-attn, xformers or SDPA; the
  text tower uses the causal flag, never a materialised mask);
- the text tower cuts each batch to its longest caption (exact: under the causal mask no
  position attends to a later one, so positions after the last EOT cannot change any
  EOT feature): on CUDA in one pass whose length the loader fixes on the CPU (longest
  caption rounded up to a multiple of 16, no host sync), elsewhere in a fixed number of
  length buckets (see CLIP.encode_text); it runs the last block for the pooled position
  only; the ViT likewise runs its last block for the class token only;
- ModifiedResNet's attention pooling is the fused kernel of
  clip_fast.model.attention_pool (projections moved off the L tokens);
- LayerNorm is computed in fp32 under autocast; gradient checkpointing per block (BatchNorm
  running statistics are not updated twice by the recomputation); channels_last ResNet.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip_fast.model import hf_convert
from clip_fast.model.attention_pool import AttentionPool2d
from clip_fast.model.backends import LayerNorm, attention

# ----------------------------------------------------------------------------- configs


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


# ----------------------------------------------------------------------------- blocks


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names
    (in_proj_weight, in_proj_bias, out_proj), batch first."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's default
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, l, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, l, 3, self.heads, c // self.heads)
        return self.out_proj(attention(qkv, causal))  # (B, L, C)

    def forward_one_query(self, x: torch.Tensor, index: torch.Tensor, causal: bool) -> torch.Tensor:
        """Attention output at one position per sequence: x (B, L, C), index (B,) -> (B, C).

        Keys and values are projected for every position, the query only at `index`; under
        `causal` the keys after `index` are masked per row."""
        b, l, c = x.shape
        h, d = self.heads, c // self.heads
        rows = torch.arange(b, device=x.device)
        q = F.linear(x[rows, index], self.in_proj_weight[:c], self.in_proj_bias[:c]).view(b, h, 1, d)
        kv = F.linear(x, self.in_proj_weight[c:], self.in_proj_bias[c:]).view(b, l, 2, h, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, D) each
        mask = None
        if causal:
            mask = (torch.arange(l, device=x.device)[None, :] <= index[:, None]).view(b, 1, 1, l)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, 1, D)
        return self.out_proj(out.reshape(b, c))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, act: type[nn.Module]):
        super().__init__()
        hidden = round(width * mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", act()), ("c_proj", nn.Linear(hidden, width))])
        )

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:  # (B, L, C) -> (B, L, C)
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))

    def forward_one(self, x: torch.Tensor, index: torch.Tensor, causal: bool) -> torch.Tensor:
        """The block's output at position index[b] of each sequence only: (B, L, C) -> (B, C)."""
        out = x[torch.arange(x.shape[0], device=x.device), index] + self.attn.forward_one_query(self.ln_1(x), index, causal)
        return out + self.mlp(self.ln_2(out))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act: type[nn.Module]):
        super().__init__()
        self.width = width
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio, act) for _ in range(layers)])

    def _run(self, fn, *args):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x: torch.Tensor, causal: bool, pool_index: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, C) -> (B, L, C); or, with `pool_index` (B,), the last block's output at
        those positions only, (B, C)."""
        last = len(self.resblocks) - 1 if pool_index is not None else len(self.resblocks)
        for block in self.resblocks[:last]:
            x = self._run(block, x, causal)
        if pool_index is not None:
            x = self._run(self.resblocks[-1].forward_one, x, pool_index, causal)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, output_dim: int, act: type[nn.Module]):
        super().__init__()
        width, self.patch_size, self.image_size = cfg.width, cfg.patch_size, cfg.image_size
        self.grid_size = cfg.image_size // cfg.patch_size
        self.patch_dropout = cfg.patch_dropout
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size**2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.num_heads, cfg.mlp_ratio, act)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def _drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """FLIP: keep a random (1 - p) fraction of the patch tokens of each image (the class
        token always stays, at position 0)."""
        b, l, c = x.shape
        keep = max(1, int((l - 1) * (1.0 - self.patch_dropout)))
        idx = torch.rand(b, l - 1, device=x.device).topk(keep, dim=-1).indices + 1  # (B, keep)
        patches = torch.gather(x, 1, idx[..., None].expand(-1, -1, c))
        return torch.cat([x[:, :1], patches], dim=1)  # (B, 1 + keep, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, output_dim)
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, grid^2, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, L, C)
        if self.training and self.patch_dropout > 0:
            x = self._drop_patches(x)
        x = self.ln_pre(x)
        cls_index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        x = self.transformer(x, causal=False, pool_index=cls_index)  # (B, C): the class token only
        return self.ln_post(x) @ self.proj.to(x.dtype)


@contextlib.contextmanager
def _batchnorm_stats_frozen(module: nn.Module):
    """Recomputation under gradient checkpointing must not update BatchNorm running
    statistics a second time: momentum 0 leaves them unchanged; the counter is restored."""
    saved = [(bn, bn.momentum, bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None)
             for bn in module.modules() if isinstance(bn, nn.modules.batchnorm._BatchNorm)]
    for bn, _, _ in saved:
        bn.momentum = 0.0
    try:
        yield
    finally:
        for bn, momentum, count in saved:
            bn.momentum = momentum
            if count is not None:
                bn.num_batches_tracked.copy_(count)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        # All convolutions have stride 1; a stride > 1 is an avgpool after the 3x3 conv.
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity, inplace=True)


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: 3-conv stem with an avgpool, anti-aliased strided blocks
    (avgpool before the strided convs), attention pooling instead of global average."""

    def __init__(self, cfg: VisionConfig, output_dim: int, channels_last: bool = True):
        super().__init__()
        width, self.image_size = cfg.width, cfg.image_size
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, cfg.layers[0])
        self.layer2 = self._make_layer(width * 2, cfg.layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, cfg.layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, cfg.layers[3], stride=2)
        self.attnpool = AttentionPool2d(cfg.image_size // 32, width * 32, cfg.num_heads, output_dim)
        # NHWC convolutions (tensor cores on GPU); the attention pool reads NHWC maps
        # without a copy. Parameters keep their layout through load_state_dict.
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), _batchnorm_stats_frozen(block)))
        return block(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, output_dim)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = self.avgpool(F.relu(self.bn3(self.conv3(x)), inplace=True))  # (B, W, S/4, S/4)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = self._block(block, x)  # ... -> (B, 32W, S/32, S/32)
        return self.attnpool(x)


# ----------------------------------------------------------------------------- CLIP


class CLIP(nn.Module):
    """Both towers, the learnable temperature (and optional bias). open_clip's API:
    encode_image, encode_text, forward(image, text) -> (image_features, text_features,
    logit_scale.exp()[, logit_bias]) or a dict when `output_dict`."""

    def __init__(self, config: CLIPConfig, output_dict: bool = False):
        super().__init__()
        self.config = config
        self.output_dict = output_dict
        # Length buckets of the text tower (see encode_text): None = 1 on CUDA, 4 elsewhere.
        self.text_buckets: int | None = None
        act = QuickGELU if config.quick_gelu else nn.GELU
        v, t = config.vision, config.text
        self.visual = ModifiedResNet(v, config.embed_dim) if v.is_resnet else VisionTransformer(v, config.embed_dim, act)
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, act)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.ln_final = LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = None
        if config.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias)))
        self.initialize_parameters()

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    @property
    def vocab_size(self) -> int:
        return self.config.text.vocab_size

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation (normal with width-dependent std; zero bn3 gammas)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features**-0.5
            for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(lin.weight, std=std)
            for name, p in self.visual.named_parameters():
                if name.endswith("bn3.weight"):
                    nn.init.zeros_(p)
        towers = [self.transformer] + ([self.visual.transformer] if isinstance(self.visual, VisionTransformer) else [])
        for tower in towers:
            width, layers = tower.width, len(tower.resblocks)
            proj_std, attn_std, fc_std = (width**-0.5) * ((2 * layers) ** -0.5), width**-0.5, (2 * width) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.transformer.grad_checkpointing = enable

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """images (B, 3, S, S), already normalised -> features (B, embed_dim)."""
        s = self.config.vision.image_size
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {getattr(images, 'dtype', type(images))}")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != s or images.shape[3] != s:
            raise ValueError(f"images must have shape (B, 3, {s}, {s}), got {tuple(images.shape)}")
        if not torch.is_autocast_enabled(images.device.type):
            images = images.to(self.visual.conv1.weight.dtype)  # e.g. fp32 images into a bf16 model
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def text_bucket_count(self, device: torch.device) -> int:
        """Text-tower passes per batch: `text_buckets` when set, else 1 on CUDA, 4 elsewhere."""
        if self.text_buckets is not None:
            if not isinstance(self.text_buckets, int) or self.text_buckets < 1:
                raise ValueError(f"text_buckets must be a positive int or None, got {self.text_buckets!r}")
            return self.text_buckets
        return 1 if device.type == "cuda" else 4

    def encode_text(self, text: torch.Tensor, normalize: bool = False, trim: bool | None = None) -> torch.Tensor:
        """text (B, L <= context_length) token ids, EOT = the largest id of each row ->
        features (B, embed_dim) taken at the EOT position after ln_final.

        Trimming is exact: under the causal mask no position attends to a later one, so the
        positions after a row's EOT cannot change its feature. With k = text_bucket_count:
          k = 1 (CUDA default): one pass over the L positions given, token values never read
            on the host (no host sync; fixed shapes for torch.compile / CUDA graphs). The
            loader trims each batch on the CPU to its longest caption rounded up to a
            multiple of 16 (`trim_tokens`) before the transfer.
          k > 1 (CPU default): the lengths are read on the host and the rows are split into
            exactly k equal-count groups of increasing length, each cut to its own longest
            caption (every rank runs each text block k times, which FSDP needs).
        `trim=None` follows k; True reads the lengths on the host in every case (one host
        sync for device tensors) and trims to the longest caption rounded up to a multiple
        of 16 (k = 1) or per bucket (k > 1); False runs all L positions in one pass.
        Token ids are range-checked (ValueError) wherever they are read on the host."""
        if not isinstance(text, torch.Tensor) or text.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"text must be an int64/int32 tensor of token ids, got {getattr(text, 'dtype', type(text))}")
        if text.dim() != 2 or text.shape[0] == 0 or not 0 < text.shape[1] <= self.context_length:
            raise ValueError(
                f"text must have shape (B, L) with 1 <= L <= context_length={self.context_length}, got {tuple(text.shape)}"
            )
        buckets = self.text_bucket_count(text.device)
        eot = text.argmax(dim=-1)  # (B,)
        if trim is False or (trim is None and buckets == 1):
            x = self._encode_tokens(text, eot)
        else:
            lengths = self._host_lengths(text, eot)
            if buckets == 1:
                x = self._encode_tokens(text[:, : text_length_for(max(lengths), text.shape[1])], eot)
            else:
                x = self._encode_buckets(text, eot, lengths, buckets)
        return F.normalize(x, dim=-1) if normalize else x

    def _host_lengths(self, text: torch.Tensor, eot: torch.Tensor) -> list[int]:
        """Caption lengths (EOT index + 1) read on the host, with the token id range check
        (one host sync for device tensors)."""
        stats = torch.cat([torch.stack([text.min(), text.max()]), eot]).tolist()
        (lo, hi), lengths = stats[:2], [i + 1 for i in stats[2:]]
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, vocab_size={self.vocab_size}), got range [{lo}, {hi}]")
        return lengths

    def _encode_buckets(self, text: torch.Tensor, eot: torch.Tensor, lengths: list[int], buckets: int) -> torch.Tensor:
        """Rows are independent in the text tower: each of the `buckets` groups of similar
        lengths is cut to its own longest caption; features go back in input order. An
        empty group (fewer rows than buckets) runs the longest row once more, so every
        rank makes the same number of block calls; its output is dropped (zero gradient)."""
        parts, position, offset = [], [0] * len(lengths), 0
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        for rows in _length_buckets(lengths, buckets):
            run = rows or [longest]
            idx = torch.tensor(run, device=text.device)
            parts.append(self._encode_tokens(text[idx, : max(lengths[r] for r in run)], eot[idx]))
            for j, r in enumerate(rows):
                position[r] = offset + j
            offset += len(run)
        return torch.cat(parts)[torch.tensor(position, device=text.device)]

    def _encode_tokens(self, text: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens with EOT positions (B,) -> projected EOT features (B, embed_dim)."""
        length = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:length]  # (B, L, C)
        x = self.transformer(x, causal=True, pool_index=eot)  # (B, C): the last block at EOT only
        return self.ln_final(x) @ self.text_projection.to(x.dtype)  # (B, embed_dim)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        if self.output_dict:
            out = {"image_features": image_features, "text_features": text_features, "logit_scale": self.logit_scale.exp()}
            if self.logit_bias is not None:
                out["logit_bias"] = self.logit_bias
            return out
        if self.logit_bias is not None:
            return image_features, text_features, self.logit_scale.exp(), self.logit_bias
        return image_features, text_features, self.logit_scale.exp()


def _length_buckets(lengths: list[int], buckets: int) -> list[list[int]]:
    """Row indices in exactly `buckets` groups of increasing caption length, sizes differing
    by at most one; groups are empty when there are fewer rows than buckets. The count never
    depends on the data, so every rank runs the text blocks equally often."""
    n = len(lengths)
    order = sorted(range(n), key=lengths.__getitem__)
    return [order[i * n // buckets : (i + 1) * n // buckets] for i in range(buckets)]


TEXT_LENGTH_MULTIPLE = 16


def text_length_for(longest: int, width: int) -> int:
    """The length a batch whose longest caption has `longest` tokens is cut to: rounded up
    to a multiple of TEXT_LENGTH_MULTIPLE (few distinct shapes: torch.compile and CUDA
    graphs reuse them), at most the batch's own width."""
    return min(width, -(-max(1, longest) // TEXT_LENGTH_MULTIPLE) * TEXT_LENGTH_MULTIPLE)


def trim_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) token ids (EOT = the largest id of each row) cut to `text_length_for` their
    longest caption: the positions after every row's EOT, which cannot change any text
    feature. Meant for CPU tensors (the loader runs it before the transfer); a view."""
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise ValueError(f"tokens must have shape (B, L) with B >= 1, got {tuple(tokens.shape)}")
    longest = int(tokens.argmax(dim=-1).max()) + 1
    return tokens[:, : text_length_for(longest, tokens.shape[1])]


# ----------------------------------------------------------------------------- building and loading


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
