"""Attention pooling of CLIP's ModifiedResNet: reference, CPU path, fused Triton dispatch.

OpenAI's AttentionPool2d: tokens t_0 = mean(x) + pos_0, t_l = x_l + pos_l (l = 1..HW);
one query per head from t_0 attends over all L = HW + 1 tokens; the heads are
concatenated and projected by c_proj. Parameter names (positional_embedding, q_proj,
k_proj, v_proj, c_proj) are OpenAI's, so their checkpoints load unchanged.

Instead of projecting all L tokens to keys and values (2*L*C^2 multiply-adds per image)
the projections are moved to the query and output side, exactly:

    u_h = Wk_h^T q_h / sqrt(d)      scores_hl = u_h . t_l  (q_h . bk_h is constant over l
                                                            and cancels in the softmax)
    z_h = sum_l p_hl t_l            out_h = Wv_h z_h + bv_h (because sum_l p_hl = 1)

The token-side core (x, t_0, pos, u) -> z is `attention_pool_core`: on CUDA the fused
Triton kernels of clip_fast.kernels.attention_pool (forward and backward), elsewhere the
same contractions as batched matmuls. The weight GEMMs (q, u, Wv z, c_proj) are ordinary
torch ops. `attention_pool_reference` is the unrestructured computation the tests
compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip_fast._backend import TRITON_ONLY, select_backend
from clip_fast._warnings import warn_once


def attention_pool_reference(
    x: torch.Tensor,
    positional_embedding: torch.Tensor,
    q_weight: torch.Tensor, q_bias: torch.Tensor,
    k_weight: torch.Tensor, k_bias: torch.Tensor,
    v_weight: torch.Tensor, v_bias: torch.Tensor,
    c_weight: torch.Tensor, c_bias: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """Plain reference: full K and V projections of every token, softmax attention of
    the mean-token query. x (N, C, H, W) -> (N, output_dim)."""
    n, c, h, w = x.shape
    d = c // num_heads
    tokens = x.flatten(2).transpose(1, 2)  # (N, HW, C)
    tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1) + positional_embedding  # (N, L, C)
    q = F.linear(tokens[:, :1], q_weight, q_bias).view(n, 1, num_heads, d).transpose(1, 2)  # (N, H, 1, d)
    k = F.linear(tokens, k_weight, k_bias).view(n, -1, num_heads, d).transpose(1, 2)  # (N, H, L, d)
    v = F.linear(tokens, v_weight, v_bias).view(n, -1, num_heads, d).transpose(1, 2)  # (N, H, L, d)
    attn = torch.softmax((q @ k.transpose(-1, -2)) / d**0.5, dim=-1)  # (N, H, 1, L)
    out = (attn @ v).reshape(n, c)  # (N, C)
    return F.linear(out, c_weight, c_bias)


def attention_pool_core_torch(x: torch.Tensor, t0: torch.Tensor, pos: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """CPU path of the fused kernels: z_h = softmax_l(u_h . t_l) weighted sum of t_l.

    x (N, HW, C), t0 (N, C), pos (HW, C), u (N, H, C) -> z (N, H, C). Softmax in fp32.
    """
    tokens = torch.cat([t0[:, None], x + pos], dim=1)  # (N, L, C)
    scores = torch.bmm(tokens, u.transpose(1, 2))  # (N, L, H)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    probs = scores.softmax(dim=1).to(tokens.dtype)
    return torch.bmm(probs.transpose(1, 2), tokens)  # (N, H, C)


class _AttentionPoolCore(torch.autograd.Function):
    """Triton forward/backward of attention_pool_core_torch (same inputs, same output)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, t0: torch.Tensor, pos: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        from clip_fast.kernels.attention_pool import attention_pool_forward

        z, lse = attention_pool_forward(x, t0, pos, u)
        ctx.save_for_backward(x, t0, pos, u, lse)
        return z

    @staticmethod
    def backward(ctx, dz: torch.Tensor):
        from clip_fast.kernels.attention_pool import attention_pool_backward

        x, t0, pos, u, lse = ctx.saved_tensors
        dtok, du = attention_pool_backward(x, t0, pos, u, lse, dz)  # fp32 (N, L, C), (N, H, C)
        dx = dtok[:, 1:]
        dpos = dx.sum(0) if ctx.needs_input_grad[2] else None
        return dx.to(x.dtype), dtok[:, 0].to(t0.dtype), None if dpos is None else dpos.to(pos.dtype), du.to(u.dtype)


def attention_pool_core(x: torch.Tensor, t0: torch.Tensor, pos: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """z (N, H, C) = per-head softmax(u_h . t_l)-weighted sum of the tokens t = [t0; x + pos].

    Dispatch (clip_fast._backend): the fused Triton kernels for CUDA tensors (or under
    CLIP_FAST_BACKEND=triton with the interpreter), batched matmuls otherwise.
    """
    if select_backend(TRITON_ONLY, x, t0, pos, u) == "triton":
        from clip_fast.kernels.attention_pool import MAX_BLOCK_L

        if x.shape[1] + 1 <= MAX_BLOCK_L:
            return _AttentionPoolCore.apply(x, t0, pos, u)
        warn_once(f"attention pooling over {x.shape[1]} positions is beyond the Triton kernel: torch path")
    return attention_pool_core_torch(x, t0, pos, u)


class AttentionPool2d(nn.Module):
    """ModifiedResNet's attention pooling: (N, C, S, S) feature map -> (N, output_dim)."""

    def __init__(self, spatial_dim: int, embed_dim: int, num_heads: int, output_dim: int | None = None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.spatial_dim = spatial_dim
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if h * w != self.spatial_dim**2 or c != self.positional_embedding.shape[1]:
            raise ValueError(
                f"AttentionPool2d expects (N, {self.positional_embedding.shape[1]}, {self.spatial_dim}, "
                f"{self.spatial_dim}) feature maps, got {tuple(x.shape)}"
            )
        heads, d = self.num_heads, c // self.num_heads
        x = x.flatten(2).transpose(1, 2)  # (N, HW, C): a view, contiguous for channels_last maps
        # Everything runs in the feature map's dtype (bf16 under autocast): the weights
        # are cast to it explicitly, which is what autocast does for the GEMMs anyway.
        dtype = x.dtype
        pos = self.positional_embedding.to(dtype)  # (L, C)
        t0 = x.mean(dim=1) + pos[0]  # (N, C) mean token
        q = F.linear(t0, self.q_proj.weight.to(dtype), self.q_proj.bias.to(dtype)) * d**-0.5  # (N, C)
        # u_h = Wk_h^T q_h: one batched GEMM over heads, (H, N, d) @ (H, d, C) -> (H, N, C)
        w_k = self.k_proj.weight.to(dtype).view(heads, d, c)
        u = torch.bmm(q.view(n, heads, d).transpose(0, 1), w_k).transpose(0, 1).to(dtype)  # (N, H, C)
        z = attention_pool_core(x, t0, pos[1:], u)  # (N, H, C)
        # out_h = Wv_h z_h + bv_h: (H, N, C) @ (H, C, d) -> (H, N, d)
        w_v = self.v_proj.weight.to(dtype).view(heads, d, c)
        out = torch.bmm(z.transpose(0, 1), w_v.transpose(1, 2)).transpose(0, 1).reshape(n, c)  # (N, C)
        # k_proj.bias cancels in the softmax, so its gradient is exactly zero; it stays in
        # the graph (times 0) so that DDP sees every parameter receive a gradient.
        out = out + (self.v_proj.bias + 0.0 * self.k_proj.bias).to(dtype)
        return F.linear(out, self.c_proj.weight.to(dtype), self.c_proj.bias.to(dtype))
