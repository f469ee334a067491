"""The contrastive loss's block functions in torch ops: the reference of the C++ block
kernels (csrc/contrastive_cpu.cpp, wrapped by clip_fast.contrastive_cpp), and what runs
for fp64 blocks (gradcheck), CLIP_FAST_BACKEND=torch or without the C++ extension.

Each function works on one (chunk x N) block of S (without the bias) that the host loop
of clip_fast.contrastive_ops has just computed, and destroys it.
"""
from __future__ import annotations

import torch

# Within this many nats of the block's largest logit, exp(S - max) of every entry that
# matters stays a normal fp32 number (e^-87 is the smallest), so one exponential serves
# both directions' sums. Wider blocks fall back to one exponential per direction.
SHARED_SHIFT_RANGE = 64.0

# block_grad returns G in `work`, not in S's storage (the C++ twin writes S in place).
GRAD_IN_PLACE = False


def block_lse(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column logsumexp of one block, destroying it."""
    row_max, col_max = logits.amax(dim=1), logits.amax(dim=0)
    top = row_max.max()
    if top - row_max.min() < SHARED_SHIFT_RANGE and top - col_max.min() < SHARED_SHIFT_RANGE:
        shifted = logits.sub_(top).exp_()
        return shifted.sum(dim=1).log_().add_(top), shifted.sum(dim=0).log_().add_(top)
    # NaN/inf logits land here too and propagate through logsumexp.
    return torch.logsumexp(logits, dim=1), torch.logsumexp(logits, dim=0)


def block_grad(
    logits: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor, work: torch.Tensor
) -> torch.Tensor:
    """exp(S - row_lse[:, None]) + exp(S - col_lse[None, :]) of one block, in `work` (a
    buffer of S's shape), destroying S.

    Both lse bound the block's logits from above. When they span less than
    SHARED_SHIFT_RANGE, every entry that matters (>= 2^-24 of its softmax) has
    exp(S - top) in fp32's normal range, and the two softmaxes are one exponential
    times (u_i + v_j) with u = exp(top - row_lse), v = exp(top - col_lse)."""
    top = row_lse.max()
    if top - row_lse.min() < SHARED_SHIFT_RANGE and top - col_lse.min() < SHARED_SHIFT_RANGE:
        torch.add((top - row_lse).exp_()[:, None], (top - col_lse).exp_()[None, :], out=work)
        return work.mul_(logits.sub_(top).exp_())
    torch.sub(logits, row_lse[:, None], out=work).exp_()
    return work.add_(logits.sub_(col_lse).exp_())


def block_softmaxes(
    logits: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor, work: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(S - row_lse[:, None]) in S's storage and exp(S - col_lse[None, :]) in `work`,
    with one exponential when the shared shift applies (as above)."""
    top = row_lse.max()
    if top - row_lse.min() < SHARED_SHIFT_RANGE and top - col_lse.min() < SHARED_SHIFT_RANGE:
        shifted = logits.sub_(top).exp_()
        torch.mul(shifted, (top - col_lse).exp_()[None, :], out=work)
        return shifted.mul_((top - row_lse).exp_()[:, None]), work
    torch.sub(logits, col_lse[None, :], out=work).exp_()
    return logits.sub_(row_lse[:, None]).exp_(), work
