"""The contrastive loss's block functions on the C++ kernels of csrc/contrastive_cpu.cpp
(torch.ops.clip_fast, fp32 CPU blocks): the same contract and shift rule as their torch
reference in clip_fast.contrastive_torch, the same results up to fp32 rounding
(tests/losses/test_contrastive_cpu_kernels.py). One read of the block for the maxima and one for exp
with both sums forward, one read + write backward, instead of ~6 and ~4 torch passes.

Callers (clip_fast.contrastive_ops) use these only when
clip_fast._backend.select_backend chose "cpp", i.e. the extension is loaded.
"""
from __future__ import annotations

import torch

from clip_fast.contrastive_torch import SHARED_SHIFT_RANGE

# block_grad writes G over S itself (no second block buffer needed).
GRAD_IN_PLACE = True


def _ops():
    return torch.ops.clip_fast


def block_lse(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column logsumexp of one contiguous fp32 block, destroying it."""
    row_lse, col_lse, shared = _ops().contrastive_block_lse(logits, SHARED_SHIFT_RANGE)
    if shared:
        return row_lse, col_lse
    # Wide range, NaN or inf (the kernel left the block intact): per-direction logsumexp.
    return torch.logsumexp(logits, dim=1), torch.logsumexp(logits, dim=0)


def block_grad(
    logits: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor, work: torch.Tensor
) -> torch.Tensor:
    """exp(S - row_lse[:, None]) + exp(S - col_lse[None, :]) of one block, written over S
    (returned); `work` is not touched."""
    _ops().contrastive_block_grad(logits, row_lse, col_lse, SHARED_SHIFT_RANGE)
    return logits


def block_softmaxes(
    logits: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor, work: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(S - row_lse[:, None]) in S's storage and exp(S - col_lse[None, :]) in `work`."""
    _ops().contrastive_block_softmaxes(logits, work, row_lse, col_lse, SHARED_SHIFT_RANGE)
    return logits, work
