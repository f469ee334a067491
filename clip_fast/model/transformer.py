"""The Transformer of both CLIP towers: pre-LayerNorm residual attention blocks, and the
ViT image tower built on them.

A block maps (B, L, C) -> (B, L, C): x + attn(ln_1(x)), then + mlp(ln_2(x)), with
nn.MultiheadAttention's parameter names (so OpenAI and open_clip state_dicts load).
Attention goes through clip_fast.model.backends (flash-attn, xformers or SDPA; the text
tower passes the causal flag, never a materialised mask). Only one position of the
last block's output is ever used (the class token of the ViT, the EOT token of the
text), so `Transformer(..., pool_index=...)` runs the last block for that position
only: keys and values for all L positions, the query, output projection and MLP for
one. Gradient checkpointing is per block.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip_fast.model.backends import LayerNorm, attention
from clip_fast.model.config import VisionConfig


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the GELU approximation OpenAI's models were trained with."""

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
    """Pre-LayerNorm block: x + attn(ln_1(x)), then + mlp(ln_2(x)) (OpenAI's names)."""

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
    """`layers` residual attention blocks of one width, optionally checkpointed per block."""

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
    """ViT image tower: (B, 3, S, S) -> (B, output_dim). Patches of P x P pixels -> tokens
    (B, (S/P)^2, C), a class token in front, ln_pre, the Transformer, ln_post and the
    projection of the class token's output."""

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
