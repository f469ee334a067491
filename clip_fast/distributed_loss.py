"""Distributed ContrastiveLoss: each rank computes only its row block of the logits
("sharded similarities", as in Radford et al. 2021).

Rank r holds b rows, B = W * b. With the text features gathered from all ranks
(O(B*D); the image features never leave their rank), rank r works on S_r = s * I_r @ T.T + bias, a (b x B) block that is never stored:

forward   one pass over S_r (clip_fast.contrastive_ops.lse_stats): row LSE of its b rows (complete,
          the rows are local) and the column LSE over its b rows; the column LSE over
          all B rows is merged with two all-reduces of B floats (max, then sum of
          exp(partial - max)). The scalar loss terms ride along in the second one.
backward  one pass recomputing S_r (clip_fast.contrastive_ops.logit_grads) gives G_r @ T (b x D,
          the local image gradient) and G_r.T @ I_r (B x D, contributions to every
          rank's text gradient), which a reduce-scatter sums and hands to their owners.

Per rank that is 4 matmul-sized passes over b x B (1 forward, 3 backward) and
O(b*D + B*D) extra memory, where open_clip's local loss materialises two b x B logit
matrices plus their softmax gradients.

open_clip's four flag combinations compute different things; each is reproduced:

  local_loss=False  every rank computes the full B x B loss L (same value everywhere).
    gather_with_grad=False: gradients reach only the local features (the own block of
      the gathered tensor is swapped for the local one): dI_r = g_r dL/dI_r.
    gather_with_grad=True: torch.distributed.nn.all_gather sums every rank's gradient
      into the owner: dI_r = (sum_q g_q) dL/dI_r.
    dscale = g_r dL/ds on every rank in both cases.
  local_loss=True   rank r's loss covers its own b images (rows of S) and its own b
    texts (columns of S): loss_r = (sum_{i in r} (row_lse_i - S_ii)
    + sum_{j in r} (col_lse_j - S_jj)) / (2b), labels offset by r*b.
    gather_with_grad=True: gradients of every rank's loss reach every owner; with the
      same grad_output g on every rank (DDP) that is g * W * dL/dI_r, one combined pass.
      open_clip's per-rank dscale differs between ranks; only their average reaches a
      DDP model, and that average, g * dL/ds, is what every rank returns here.
    gather_with_grad=False: nothing flows through the gathered features, so the image
      gradient keeps only the row-softmax part and the text gradient only the
      column-softmax part: logit_grads' split mode contracts each softmax with its own
      side in the same single backward pass; dscale is exact per rank.

Equal local batch sizes are required (open_clip assumes them too); the sizes are
all-gathered first so unequal ones raise the same ValueError on every rank instead of
hanging in a later collective.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

from clip_fast._checks import empty_batch_loss, without_autocast
from clip_fast.collectives import all_gather_rows, check_group, check_same_grad_output, reduce_scatter_rows
from clip_fast.contrastive_ops import logit_grads, lse_stats, rowwise_dot


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """Where this rank sits and which of open_clip's semantics to reproduce."""

    rank: int
    world_size: int
    local_loss: bool
    gather_with_grad: bool
    deterministic: bool = False
    group: Optional[object] = None


# Below this many gathered floats, the column statistics are merged from one all-gather
# of every rank's partials (one collective, W*B floats) instead of a max and a sum
# all-reduce (two collectives, 2*B floats): collectives of a few MB cost their latency.
GATHER_MERGE_LIMIT = 1 << 20


def _merge_column_lse(col_part: torch.Tensor, extra: torch.Tensor, spec: ShardSpec):
    """logsumexp over ranks of per-rank column LSEs (B,), plus a sum of `extra`; the
    same numbers on every rank."""
    B = col_part.shape[0]
    if spec.world_size * (B + extra.numel()) <= GATHER_MERGE_LIMIT:
        gathered = all_gather_rows(torch.cat([col_part, extra])[None], spec.world_size, spec.group)  # (W, B+k)
        return torch.logsumexp(gathered[:, :B], dim=0), gathered[:, B:].sum(dim=0)
    col_max = col_part.clone()
    dist.all_reduce(col_max, op=dist.ReduceOp.MAX, group=spec.group)
    # a column whose max is -inf/NaN stays NaN/-inf below; finite inputs never give one
    summed = torch.cat([torch.exp(col_part - col_max), extra])
    dist.all_reduce(summed, group=spec.group)
    return col_max + torch.log(summed[:B]), summed[B:]


class ShardedContrastiveFunction(torch.autograd.Function):
    """open_clip ClipLoss over a process group, from this rank's (b x B) row block."""

    # forward and backward run with autocast off, as the single-process loss does
    @staticmethod
    @without_autocast
    def forward(ctx, image, text, scale, bias, spec: ShardSpec):
        b = image.shape[0]
        B = b * spec.world_size
        text_all = all_gather_rows(text, spec.world_size, spec.group)  # (B, D); the images never need gathering

        row_lse, col_part = lse_stats(image, text_all, scale, bias)  # (b,), (B,) over my rows
        cd = row_lse.dtype
        diag = rowwise_dot(image.to(cd), text.to(cd)) * scale.to(cd).reshape(())  # (b,) S_ii
        if bias is not None:
            diag = diag + bias.to(cd).reshape(())
        row_term = (row_lse - diag).sum()
        bad = (~(torch.isfinite(image).all() & torch.isfinite(text).all())).to(cd)
        # the scalars ride along in the column all-reduce: sum over ranks of the row
        # terms and of the diagonal logits, and the number of ranks with NaN/inf input
        col_lse, (row_term_sum, diag_sum, bad_ranks) = _merge_column_lse(
            col_part.to(cd), torch.stack([row_term, diag.sum(), bad]), spec
        )
        if spec.local_loss:
            my_cols = slice(spec.rank * b, (spec.rank + 1) * b)
            loss = (row_term + (col_lse[my_cols] - diag).sum()) / (2 * b)
        else:
            loss = (row_term_sum + col_lse.sum() - diag_sum) / (2 * B)
        loss = torch.where(bad_ranks > 0, torch.full_like(loss, float("nan")), loss)

        ctx.spec = spec
        ctx.has_bias = bias is not None
        ctx.save_for_backward(image, text, scale, bias if bias is not None else scale, text_all, row_lse, col_lse)
        return loss.to(torch.promote_types(image.dtype, torch.float32))

    @staticmethod
    @torch.autograd.function.once_differentiable
    @without_autocast
    def backward(ctx, grad_loss):
        image, text, scale, bias, text_all, row_lse, col_lse = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        spec: ShardSpec = ctx.spec
        b, W = image.shape[0], spec.world_size
        B = b * W
        r0 = spec.rank * b
        cd = row_lse.dtype
        s = scale.to(cd).reshape(())
        g = grad_loss.to(cd).reshape(())

        if spec.local_loss and not spec.gather_with_grad:
            d_image, d_text, d_scale = _local_no_grad_backward(
                image, text, scale, bias, text_all, row_lse, col_lse, spec, g
            )
        else:
            # one pass: G_r = P_row + P_col - 2E over this rank's rows
            g_text, g_image, g_dot = logit_grads(image, text_all, scale, bias, row_lse, col_lse, r0, spec.deterministic)
            # [grad_output, sum G.(I.T)] of every rank: sums, and the equality check
            per_rank = all_gather_rows(torch.stack([g, g_dot.to(cd)])[None], spec.world_size, spec.group)  # (W, 2)
            g_all, dot_sum = per_rank[:, 0], per_rank[:, 1].sum()
            if spec.local_loss:  # (and gather_with_grad)
                check_same_grad_output(g_all, image.shape, spec.rank, spec.world_size, spec.group)
                coef = g / (2 * b)  # d(sum_q loss_q)/dfeatures = W dL/dfeatures, L over 2B
            elif spec.gather_with_grad:
                coef = g_all.sum() / (2 * B)
            else:
                coef = g / (2 * B)
            # text gradients: rank q's contributions G_q.T @ I_q summed at their owner,
            # which applies its own coefficient (with local_loss=False, gather_with_grad
            # =False, each rank's replica of L scales only its own features)
            d_text = reduce_scatter_rows(g_image.to(cd), spec.world_size, spec.group)  # (b, D)
            d_image = g_text.to(cd) * (coef * s)
            d_text = d_text * (coef * s)
            d_scale = g * dot_sum / (2 * B)
        grad_bias = torch.zeros_like(bias) if bias is not None else None
        return (
            d_image.to(image.dtype),
            d_text.to(text.dtype),
            d_scale.to(scale.dtype).reshape(scale.shape),
            grad_bias,
            None,
        )


def _local_no_grad_backward(image, text, scale, bias, text_all, row_lse, col_lse, spec, g):
    """local_loss=True, gather_with_grad=False: the image gradient sees only the row
    softmax, the text gradient only the column softmax (gathered features carry no
    gradient in open_clip). One split pass over S_r gives both: (P_row - E) @ T and
    (P_col - E).T @ I_r, the latter summed at the column owners."""
    b = image.shape[0]
    r0 = spec.rank * b
    cd = row_lse.dtype
    s = scale.to(cd).reshape(())
    g_text_row, g_image_col, dot_row = logit_grads(
        image, text_all, scale, bias, row_lse, col_lse, r0, spec.deterministic, split=True
    )
    # per column j: sum_k G_col[k, j] (I_k . T_j) = T_j . (G_col.T @ I)_j rides along as column D
    col_dot = rowwise_dot(g_image_col.to(cd), text_all.to(cd))
    contrib = torch.cat([g_image_col.to(cd), col_dot[:, None]], dim=1)  # (B, D+1)
    summed = reduce_scatter_rows(contrib, spec.world_size, spec.group)  # (b, D+1)
    coef = g / (2 * b)
    d_image = g_text_row.to(cd) * (coef * s)
    d_text = summed[:, :-1] * (coef * s)
    # dL_r/ds = [sum over my rows of G_row . dots + over my columns of G_col . dots] / 2b
    d_scale = coef * (dot_row.to(cd) + summed[:, -1].sum())
    return d_image, d_text, d_scale


def sharded_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: Optional[torch.Tensor],
    spec: ShardSpec,
) -> torch.Tensor:
    """Entry point for ContrastiveLoss.forward when world_size > 1 (inputs already
    validated locally): checks the shapes across ranks, then runs the sharded loss."""
    check_group(image_features, spec.rank, spec.world_size, spec.group)
    if image_features.shape[0] == 0:  # on every rank (check_group): NaN, as open_clip
        return empty_batch_loss(image_features, text_features, logit_scale, logit_bias)
    return ShardedContrastiveFunction.apply(image_features, text_features, logit_scale, logit_bias, spec)
