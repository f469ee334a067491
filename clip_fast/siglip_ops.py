"""SigLIP's one op: loss and gradients of one (M x N) block of
S = scale * image @ text.T + bias in a single fused pass, shared by the single-process
and the ring loss (clip_fast.siglip).

The caller picks the implementation once per loss call
(`select_backend(SIGLIP, image, text)`, clip_fast._backend) and passes it to
`new_grad` and `siglip_block`: the Triton kernel (clip_fast.kernels.siglip), the C++
tile pass (clip_fast.siglip_cpp, fp32; bf16/fp16 inputs are upcast) or its torch
reference (clip_fast.siglip_torch; fp64, CLIP_FAST_BACKEND=torch, no extension).
"""
from __future__ import annotations

from typing import Optional

import torch

from clip_fast._backend import Backend
from clip_fast._checks import compute_dtype
from clip_fast.siglip_cpp import block_fused
from clip_fast.siglip_torch import block_torch


def new_grad(rows: int, dim: int, like: torch.Tensor, backend: Backend) -> torch.Tensor:
    """A zeroed (rows, dim) gradient accumulator for `siglip_block` on `backend`."""
    if backend == "triton":
        from clip_fast.kernels.siglip import grad_buffer

        return grad_buffer(rows, dim, like.device)
    return torch.zeros((rows, dim), device=like.device, dtype=compute_dtype(like.dtype))


def siglip_block(
    image: torch.Tensor,  # (M, D) features in their input dtype
    text: torch.Tensor,  # (N, D)
    scale: torch.Tensor,  # () logit_scale (exponentiated), any float dtype
    bias: Optional[torch.Tensor],  # () or None
    *,
    has_pos: bool,
    inv_n: float,
    d_image: torch.Tensor,  # (M, D) from new_grad, accumulated into
    d_text: torch.Tensor,  # (N, D) from new_grad, accumulated into
    backend: Backend,
) -> torch.Tensor:
    """Loss and gradient contributions of the block S = scale * image @ text.T + bias,
    positives on the diagonal when `has_pos`.

    Adds scale*G@text to d_image and scale*G.T@image to d_text; returns (3,)
    [loss, dscale, dbias] of this block (loss already multiplied by inv_n)."""
    if backend == "triton":
        from clip_fast.kernels.siglip import siglip_block as triton_block

        zero = torch.zeros((), device=scale.device, dtype=torch.float32)
        params = torch.stack([scale.float(), zero if bias is None else bias.float()])  # (2,) no host sync
        return triton_block(image, text, params, d_image, d_text, has_pos, inv_n)
    dtype = compute_dtype(image.dtype)
    bias_c = scale.new_zeros((), dtype=dtype) if bias is None else bias.to(dtype)
    block_fn = block_fused if backend == "cpp" else block_torch
    stats = block_fn(image.to(dtype), text.to(dtype), scale.to(dtype), bias_c, has_pos, inv_n, d_image, d_text)
    # softplus(-inf) = 0 could hide a non-finite input in the loss, but never in all
    # three sums: an infinite S gives an infinite softplus or an inf/NaN g * dots term
    # in dscale (0 * inf = NaN). So a non-finite sum flags it, for free.
    return torch.where(torch.isfinite(stats).all(), stats, torch.full_like(stats, float("nan")))
