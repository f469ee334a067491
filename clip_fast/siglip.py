"""Blockwise SigLIP loss (Zhai et al. 2023, arXiv 2303.15343): a drop-in for open_clip's
`SigLipLoss` that never stores the B x B logits.

    S = logit_scale * I @ T.T + logit_bias          (logit_scale already exponentiated)
    L = -sum_ij logsigmoid(z_ij * S_ij) / B_local     z = +1 on the diagonal, -1 elsewhere

The sigmoid loss has no normaliser, so dL/dS of a tile is known from that tile alone:
one fused pass over S computes the loss AND dI, dT, dscale, dbias (3 matmul passes in
total against open_clip's 3 plus the B x B logits, labels and their gradients in
memory). The forward keeps the gradients; the backward only multiplies them by
grad_output. Peak extra memory: O(B*D) for the gradients plus, on CPU, one chunk of
rows of S (O(chunk*B)).

Devices (the block pass: clip_fast.siglip_ops, chosen by clip_fast._backend.select_backend):
CUDA tensors run the Triton kernel (clip_fast.kernels.siglip); CPU tensors run the same
blockwise algorithm tile by tile: torch GEMMs around one C++ pass per tile
(clip_fast.siglip_cpp, csrc/siglip_cpu.cpp) in fp32 (bf16/fp16 inputs are upcast), or
torch ops only (clip_fast.siglip_torch) for fp64 (so users can gradcheck),
CLIP_FAST_BACKEND=torch or without the C++ extension.

Distributed (world_size > 1): the same value and gradients as open_clip's ring
implementations ('bidir' by default). Each rank computes its own (b x b) block with
positives on the diagonal, then text blocks travel around the ring with
torch.distributed P2P (batch_isend_irecv), both directions at once for 'bidir', and
every received block is a negative-only (b x b) block fed to the same fused kernel.
The text-gradient contributions of each received block are kept; the backward scales
them by this rank's grad_output and sends them back around the ring, accumulating, to
the rank that owns those text features (exactly what autograd does through open_clip's
NeighbourExchange functions). Memory: O(B*D) per rank for those contributions and no
b x B logits.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.distributed as dist

from clip_fast._backend import SIGLIP, select_backend
from clip_fast._checks import RankedLoss, as_scalar, check_feature_pair, empty_batch_loss, without_autocast
from clip_fast.collectives import check_group
from clip_fast.siglip_ops import new_grad, siglip_block

_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


# ----------------------------------------------------------------------------------
# autograd: one rank, or a ring over ranks


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Schedule of the text-block exchange. The left chain delivers T[rank - j] at step
    j (j = 1..left_steps), the right chain T[rank + j] (j = 1..right_steps)."""

    rank: int
    world_size: int
    left_steps: int
    right_steps: int
    group: Optional[object] = None

    @staticmethod
    def for_impl(dist_impl: str, rank: int, world_size: int) -> "_Ring":
        if dist_impl == "shift":
            return _Ring(rank, world_size, world_size - 1, 0)
        # 'bidir' (and 'reduce'/'gather', which compute the same sums in open_clip):
        # both directions at once, the odd block left over travels from the left
        both, remainder = divmod(world_size - 1, 2)
        return _Ring(rank, world_size, both + remainder, both)

    @property
    def left(self) -> int:
        return (self.rank - 1) % self.world_size

    @property
    def right(self) -> int:
        return (self.rank + 1) % self.world_size

    def exchange(self, to_right: Optional[torch.Tensor], to_left: Optional[torch.Tensor]):
        """Send `to_right` right and `to_left` left (either may be None); returns the
        tensors (from_left, from_right) received in exchange (None where none sent)."""
        ops, from_left, from_right = [], None, None
        if to_right is not None:
            from_left = torch.empty_like(to_right)
            ops += [dist.P2POp(dist.isend, to_right, self.right, self.group),
                    dist.P2POp(dist.irecv, from_left, self.left, self.group)]
        if to_left is not None:
            from_right = torch.empty_like(to_left)
            ops += [dist.P2POp(dist.isend, to_left, self.left, self.group),
                    dist.P2POp(dist.irecv, from_right, self.right, self.group)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        return from_left, from_right


class SigLipFunction(torch.autograd.Function):
    """Fused SigLIP loss of this rank over every rank's text block, exchanged around a
    ring (a single process is a ring of one: no exchange). The forward computes the
    loss and every gradient; the backward scales them by grad_output (and sends the
    received blocks' text gradients back around the ring). Both run with autocast off,
    in the inputs' own dtypes, so the value is the same inside torch.autocast as outside
    and the backward is its exact gradient."""

    @staticmethod
    @without_autocast
    def forward(ctx, image, text, logit_scale, logit_bias, ring: _Ring):
        b, D = image.shape
        inv_n = 1.0 / b
        backend = select_backend(SIGLIP, image, text)
        d_image = new_grad(b, D, image, backend)
        d_text_own = new_grad(b, D, image, backend)
        stats = siglip_block(image, text, logit_scale, logit_bias, has_pos=True, inv_n=inv_n,
                             d_image=d_image, d_text=d_text_own, backend=backend)
        # contributions[(chain, j)]: gradient of this rank's loss w.r.t. the text block
        # received at step j of that chain (owner rank -+ j)
        contributions: dict[tuple[str, int], torch.Tensor] = {}
        to_right = to_left = text.detach().contiguous() if ring.world_size > 1 else None
        for step in range(1, max(ring.left_steps, ring.right_steps) + 1):
            from_left, from_right = ring.exchange(
                to_right if step <= ring.left_steps else None,
                to_left if step <= ring.right_steps else None,
            )
            for chain, block in (("left", from_left), ("right", from_right)):
                if block is not None:
                    d_block = new_grad(b, D, image, backend)
                    stats = stats + siglip_block(image, block, logit_scale, logit_bias, has_pos=False, inv_n=inv_n,
                                                 d_image=d_image, d_text=d_block, backend=backend)
                    contributions[(chain, step)] = d_block
            to_right, to_left = from_left, from_right
        ctx.ring = ring
        ctx.contributions = contributions
        ctx.save_for_backward(d_image, d_text_own, stats)
        ctx.dtypes = (image.dtype, text.dtype, logit_scale.dtype, None if logit_bias is None else logit_bias.dtype)
        return stats[0].clone()  # fp32 (fp64 for fp64 inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    @without_autocast
    def backward(ctx, grad_loss):
        d_image, d_text_own, stats = ctx.saved_tensors
        ring: _Ring = ctx.ring
        contributions = ctx.contributions
        g = grad_loss.to(stats.dtype)
        gd = g.to(d_image.dtype)

        def scaled(chain: str, step: int) -> torch.Tensor:
            return (contributions[(chain, step)] * gd).contiguous()

        # Reverse ring. At reverse step j this rank holds, per chain, the accumulated
        # gradient for the text block it received at step j; it hands it back the way
        # the block came, and receives the neighbour's accumulation for the block it
        # itself received at step j - 1 (step 0 = its own text), adding its share.
        acc_left = scaled("left", ring.left_steps) if ring.left_steps else None
        acc_right = scaled("right", ring.right_steps) if ring.right_steps else None
        d_text = d_text_own * gd
        for step in range(max(ring.left_steps, ring.right_steps), 0, -1):
            from_left, from_right = ring.exchange(
                acc_right if step <= ring.right_steps else None,
                acc_left if step <= ring.left_steps else None,
            )
            if from_right is not None:  # left chain, coming back from the right
                if step == 1:
                    d_text = d_text + from_right
                else:
                    acc_left = scaled("left", step - 1) + from_right
            if from_left is not None:  # right chain, coming back from the left
                if step == 1:
                    d_text = d_text + from_left
                else:
                    acc_right = scaled("right", step - 1) + from_left
        ctx.contributions = None
        image_dtype, text_dtype, scale_dtype, bias_dtype = ctx.dtypes
        return (
            (d_image * gd).to(image_dtype),
            d_text.to(text_dtype),
            (g * stats[1]).to(scale_dtype),
            None if bias_dtype is None else (g * stats[2]).to(bias_dtype),
            None,
        )


# ----------------------------------------------------------------------------------
# module


class SigLipLoss(RankedLoss):
    """Sigmoid loss for language-image pre-training, without B x B logits.

    Same constructor and forward as open_clip 3.x `SigLipLoss`; `logit_scale` is the
    already exponentiated scale (as open_clip's models return it).

    Args:
        cache_labels: accepted for compatibility (no labels are materialised).
        rank, world_size: this process's place in the default process group; with
            world_size > 1 the loss covers every rank's text features.
        dist_impl: 'bidir' (default), 'shift', 'reduce' or 'gather'. All four give the
            same value and gradients in open_clip; here 'shift' runs a one-directional
            ring and the others the bidirectional ring.
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: Optional[str] = None,
    ) -> None:
        super().__init__(cache_labels, rank, world_size)
        dist_impl = dist_impl or "bidir"
        if dist_impl not in _DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {_DIST_IMPLS}, got {dist_impl!r}")
        self.dist_impl = dist_impl

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: Union[torch.Tensor, float],
        logit_bias: Union[torch.Tensor, float, None],
        output_dict: bool = False,
    ):
        """Mean-per-sample sigmoid loss; `{"contrastive_loss": loss}` if output_dict."""
        check_feature_pair(image_features, text_features)
        scale = as_scalar(logit_scale, "logit_scale", image_features)
        bias = as_scalar(logit_bias, "logit_bias", image_features)
        if self.world_size > 1:
            check_group(image_features, self.rank, self.world_size)
        if image_features.shape[0] == 0:  # NaN, as open_clip (on every rank: checked above)
            loss = empty_batch_loss(image_features, text_features, scale, bias)
        else:
            ring = _Ring.for_impl(self.dist_impl, self.rank, self.world_size)
            loss = SigLipFunction.apply(image_features, text_features, scale, bias, ring)
        return {"contrastive_loss": loss} if output_dict else loss
