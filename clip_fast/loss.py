"""ContrastiveLoss: open_clip's ClipLoss computed blockwise, never storing B x B logits.

S = logit_scale * I @ T.T (+ logit_bias), labels on the diagonal,
L = (CE_rows(S) + CE_cols(S)) / 2 = ( mean_i(row_lse[i] - S[i,i]) + mean_j(col_lse[j] - S[j,j]) ) / 2.

With G[i,j] = exp(S[i,j] - row_lse[i]) + exp(S[i,j] - col_lse[j]) - 2*[i == j]:
dI = s/(2B) * G @ T, dT = s/(2B) * G.T @ I, d(logit_scale) = 1/(2B) * sum_ij G[i,j] * (I[i] . T[j]),
d(logit_bias) = 1/(2B) * sum_ij G[i,j] = 0 exactly (returned as a zero tensor, not None).

Two ops carry all the O(B^2 D) work (clip_fast.contrastive_ops, shared with the
sharded loss of clip_fast.distributed_loss): `lse_stats` (one pass over S) and
`logit_grads` (recomputes S; G @ T and G.T @ I). Each picks its implementation
(clip_fast._backend.select_backend): the Triton kernels for CUDA tensors, on CPU the
same blockwise algorithm a chunk of rows at a time (C++ block kernels, or torch), so
extra memory is O(B*D + chunk*B). Everything else here is O(B*D).
"""
from __future__ import annotations

from typing import Union

import torch

from clip_fast._checks import RankedLoss, as_scalar, check_feature_pair, empty_batch_loss, without_autocast
from clip_fast.contrastive_ops import logit_grads, lse_stats, rowwise_dot
from clip_fast.distributed_loss import ShardSpec, sharded_contrastive_loss


# ----------------------------------------------------------------------------- autograd


class _ContrastiveLossFunction(torch.autograd.Function):
    """Forward and backward run with autocast off (in the dtypes the inputs come in),
    so the value is the same inside torch.autocast as outside, and the backward is
    its exact gradient."""

    @staticmethod
    @without_autocast
    def forward(ctx, image, text, scale, bias, deterministic):
        row_lse, col_lse = lse_stats(image, text, scale, bias)
        cd = row_lse.dtype
        diag_dot = rowwise_dot(image.to(cd), text.to(cd))  # (B,) I[i] . T[i]
        diag = diag_dot * scale.to(cd).reshape(())
        if bias is not None:
            diag = diag + bias.to(cd).reshape(())
        loss = ((row_lse - diag).mean() + (col_lse - diag).mean()) / 2
        # A non-finite input must never produce a finite loss (inf - inf cancellations
        # could otherwise hide it). A NaN or inf anywhere in row i of either side makes
        # I[i] . T[i] non-finite (inf * 0 is NaN), so B values tell: no host sync.
        loss = torch.where(torch.isfinite(diag_dot).all(), loss, torch.full_like(loss, float("nan")))
        ctx.save_for_backward(image, text, scale, bias, row_lse, col_lse)
        ctx.deterministic = deterministic
        return loss.to(torch.promote_types(image.dtype, torch.float32))

    @staticmethod
    @without_autocast
    def backward(ctx, grad_loss):
        image, text, scale, bias, row_lse, col_lse = ctx.saved_tensors
        B = image.shape[0]
        cd = row_lse.dtype
        g_text, g_image, g_dot = logit_grads(image, text, scale, bias, row_lse, col_lse, 0, ctx.deterministic)
        coef = grad_loss.to(cd) / (2 * B)
        grad_image = grad_text = grad_scale = grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_scale = (coef * g_dot).to(scale.dtype).reshape(scale.shape)
        s = scale.to(cd).reshape(())
        if ctx.needs_input_grad[0]:
            grad_image = g_text.mul_(coef * s).to(image.dtype)
        if ctx.needs_input_grad[1]:
            grad_text = g_image.mul_(coef * s).to(text.dtype)
        if bias is not None and ctx.needs_input_grad[3]:
            grad_bias = torch.zeros_like(bias)
        return grad_image, grad_text, grad_scale, grad_bias, None


# ----------------------------------------------------------------------------- module


Scalar = Union[torch.Tensor, float]


class ContrastiveLoss(RankedLoss):
    """Drop-in for open_clip's `ClipLoss` that never materialises the B x B logits.

    Same constructor and call as open_clip 3.x; `logit_scale` is the already
    exponentiated scale (as open_clip's models return it). With world_size > 1 (an
    initialised torch.distributed group) each rank computes only its row block of the
    logits (clip_fast.distributed_loss) and reproduces open_clip's local_loss x
    gather_with_grad semantics. Extra keyword:
    `deterministic=True` trades one more pass over S for a bitwise-reproducible
    backward on GPU (no floating-point atomics).

    Example:
        loss_fn = ContrastiveLoss()
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        deterministic: bool = False,
    ) -> None:
        super().__init__(cache_labels, rank, world_size)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.use_horovod = use_horovod
        self.deterministic = deterministic

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: Scalar,
        logit_bias: Scalar | None = None,
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        check_feature_pair(image_features, text_features)
        logit_scale = as_scalar(logit_scale, "logit_scale", image_features)
        logit_bias = as_scalar(logit_bias, "logit_bias", image_features)
        if image_features.shape[0] == 0 and self.world_size == 1:
            loss = empty_batch_loss(image_features, text_features, logit_scale, logit_bias)
        elif self.world_size > 1:
            if self.use_horovod:
                raise NotImplementedError("ContrastiveLoss(use_horovod=True): only torch.distributed is supported")
            spec = ShardSpec(self.rank, self.world_size, self.local_loss, self.gather_with_grad, self.deterministic)
            loss = sharded_contrastive_loss(image_features, text_features, logit_scale, logit_bias, spec)
        else:
            loss = _ContrastiveLossFunction.apply(
                image_features, text_features, logit_scale, logit_bias, self.deterministic
            )
        return {"contrastive_loss": loss} if output_dict else loss


def reference_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The materialised loss in plain torch (B x B logits), for tests and baselines."""
    logits = logit_scale * image_features @ text_features.t()
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (
        torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)
    ) / 2


__all__ = ["ContrastiveLoss", "reference_clip_loss"]
