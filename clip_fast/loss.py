"""ContrastiveLoss: open_clip's ClipLoss computed blockwise, never storing B x B logits.

S = logit_scale * I @ T.T (+ logit_bias), labels on the diagonal,
L = (CE_rows(S) + CE_cols(S)) / 2 = ( mean_i(row_lse[i] - S[i,i]) + mean_j(col_lse[j] - S[j,j]) ) / 2.

With G[i,j] = exp(S[i,j] - row_lse[i]) + exp(S[i,j] - col_lse[j]) - 2*[i == j]:
dI = s/(2B) * G @ T, dT = s/(2B) * G.T @ I, d(logit_scale) = 1/(2B) * sum_ij G[i,j] * (I[i] . T[j]),
d(logit_bias) = 1/(2B) * sum_ij G[i,j] = 0 exactly (returned as a zero tensor, not None).

Two ops carry all the O(B^2 D) work and dispatch on the device (clip_fast._backend):
`lse_stats` (one pass over S) and `logit_grads` (recomputes S; G @ T and G.T @ I).
CUDA tensors run the Triton kernels of clip_fast.kernels.contrastive; CPU tensors run
the same blockwise algorithm in torch, a chunk of rows at a time, so extra memory is
O(B*D + chunk*B). Everything else here is O(B*D).
"""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from clip_fast._backend import contrastive_backward, requested_backend, use_triton
from clip_fast._checks import as_scalar, autocast_off, check_feature_pair, empty_batch_loss

# Elements of one (chunk x N) block of S on the CPU path: 2^23 fp32 = 32 MiB. Forward holds
# one such block; backward one with the C++ kernels (two in split mode and on the torch
# path, plus logsumexp's temporary when the per-direction fallback runs).
CPU_BLOCK_ELEMENTS = 1 << 23


# ----------------------------------------------------------------------------- CPU path


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a * b).sum(-1) for (n, D) tensors without an (n, D) temporary (n 1 x D x 1
    batched products; einsum and mul+sum both materialise one)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _row_chunk(n_cols: int) -> int:
    return max(1, CPU_BLOCK_ELEMENTS // max(n_cols, 1))


# Within this many nats of the block's largest logit, exp(S - max) of every entry that
# matters stays a normal fp32 number (e^-87 is the smallest), so one exponential serves
# both directions' sums. Wider blocks fall back to one exponential per direction.
_SHARED_SHIFT_RANGE = 64.0


def _torch_block_lse(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column logsumexp of one block, destroying it."""
    row_max, col_max = logits.amax(dim=1), logits.amax(dim=0)
    top = row_max.max()
    if top - row_max.min() < _SHARED_SHIFT_RANGE and top - col_max.min() < _SHARED_SHIFT_RANGE:
        shifted = logits.sub_(top).exp_()
        return shifted.sum(dim=1).log_().add_(top), shifted.sum(dim=0).log_().add_(top)
    # NaN/inf logits land here too and propagate through logsumexp.
    return torch.logsumexp(logits, dim=1), torch.logsumexp(logits, dim=0)


def _torch_block_grad(
    logits: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor, work: torch.Tensor
) -> torch.Tensor:
    """exp(S - row_lse[:, None]) + exp(S - col_lse[None, :]) of one block, in `work` (a
    buffer of S's shape), destroying S.

    Both lse bound the block's logits from above. When they span less than
    _SHARED_SHIFT_RANGE, every entry that matters (>= 2^-24 of its softmax) has
    exp(S - top) in fp32's normal range, and the two softmaxes are one exponential
    times (u_i + v_j) with u = exp(top - row_lse), v = exp(top - col_lse)."""
    top = row_lse.max()
    if top - row_lse.min() < _SHARED_SHIFT_RANGE and top - col_lse.min() < _SHARED_SHIFT_RANGE:
        torch.add((top - row_lse).exp_()[:, None], (top - col_lse).exp_()[None, :], out=work)
        return work.mul_(logits.sub_(top).exp_())
    torch.sub(logits, row_lse[:, None], out=work).exp_()
    return work.add_(logits.sub_(col_lse).exp_())


def _torch_block_softmaxes(
    logits: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor, work: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(S - row_lse[:, None]) in S's storage and exp(S - col_lse[None, :]) in `work`,
    with one exponential when the shared shift applies (as above)."""
    top = row_lse.max()
    if top - row_lse.min() < _SHARED_SHIFT_RANGE and top - col_lse.min() < _SHARED_SHIFT_RANGE:
        shifted = logits.sub_(top).exp_()
        torch.mul(shifted, (top - col_lse).exp_()[None, :], out=work)
        return shifted.mul_((top - row_lse).exp_()[:, None]), work
    torch.sub(logits, col_lse[None, :], out=work).exp_()
    return logits.sub_(row_lse[:, None]).exp_(), work


def _cpu_kernels(*tensors: torch.Tensor):
    """torch.ops.clip_fast (the fused block kernels of csrc/contrastive_cpu.cpp) when they
    apply to these tensors: fp32 CPU, contiguous blocks, extension built, and
    CLIP_FAST_BACKEND not forcing the torch path. None otherwise (fp64 blocks, e.g.
    gradcheck, always take the torch functions below)."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        return None
    if requested_backend() == "torch":
        return None
    from clip_fast._ext import load_extension

    return None if load_extension() is None else torch.ops.clip_fast


# Each block function runs the C++ kernel when _cpu_kernels allows (one read of the block
# for the maxima and one for exp with both sums forward, one read + write backward,
# instead of ~6 and ~4 torch passes), else the torch function it mirrors: same shift
# rule, same results up to fp32 rounding (tests/losses/test_contrastive_cpu_kernels.py).


def _block_lse(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column logsumexp of one block, destroying it."""
    ops = _cpu_kernels(logits)
    if ops is None:
        return _torch_block_lse(logits)
    row_lse, col_lse, shared = ops.contrastive_block_lse(logits, _SHARED_SHIFT_RANGE)
    if shared:
        return row_lse, col_lse
    # Wide range, NaN or inf (the kernel left the block intact): per-direction logsumexp.
    return torch.logsumexp(logits, dim=1), torch.logsumexp(logits, dim=0)


def _block_grad(
    logits: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor, work: torch.Tensor
) -> torch.Tensor:
    """exp(S - row_lse[:, None]) + exp(S - col_lse[None, :]) of one block, destroying S;
    in `work` (a buffer of S's shape) on the torch path, in S's own storage (returned)
    with the kernel."""
    ops = _cpu_kernels(logits, row_lse, col_lse)
    if ops is None:
        return _torch_block_grad(logits, row_lse, col_lse, work)
    ops.contrastive_block_grad(logits, row_lse, col_lse, _SHARED_SHIFT_RANGE)
    return logits


def _block_softmaxes(
    logits: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor, work: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(S - row_lse[:, None]) in S's storage and exp(S - col_lse[None, :]) in `work`."""
    ops = _cpu_kernels(logits, row_lse, col_lse, work)
    if ops is None:
        return _torch_block_softmaxes(logits, row_lse, col_lse, work)
    ops.contrastive_block_softmaxes(logits, work, row_lse, col_lse, _SHARED_SHIFT_RANGE)
    return logits, work


def _torch_lse_stats(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    cd = _compute_dtype(image.dtype)
    image, text = image.to(cd), text.to(cd)
    # The scale multiplies each chunk's (chunk, D) rows, not its (chunk, N) block; the
    # bias shifts every logit equally, so it is added to the statistics instead.
    s = scale.to(cd)
    M, N = image.shape[0], text.shape[0]
    row_lse = torch.empty(M, dtype=cd, device=image.device)
    col_lse = torch.full((N,), float("-inf"), dtype=cd, device=image.device)
    text_t = text.t()
    chunk = min(_row_chunk(N), M)
    # One block buffer for every chunk: a fresh 32 MB tensor per chunk costs its page
    # faults (measured: a 1024 x 16384 matmul takes 76 ms into new memory, 58 ms reused).
    block = torch.empty(chunk, N, dtype=cd, device=image.device)
    for start in range(0, M, chunk):
        rows = image[start : start + chunk] * s  # (chunk, D): the scale on the small operand
        logits = torch.mm(rows, text_t, out=block[: rows.shape[0]])  # (chunk, N) S - bias
        row_block, col_block = _block_lse(logits)
        row_lse[start : start + chunk] = row_block
        col_lse = torch.logaddexp(col_lse, col_block)
    if bias is not None:
        row_lse += bias.to(cd)
        col_lse += bias.to(cd)
    return row_lse, col_lse


def _torch_logit_grads(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    diag_offset: int,
    split: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cd = _compute_dtype(image.dtype)
    image, text = image.to(cd), text.to(cd)
    s = scale.to(cd)
    # exp(S - lse) = exp((S - bias) - (lse - bias)): blocks are computed without the bias.
    row_lse, col_lse = row_lse.to(cd), col_lse.to(cd)
    if bias is not None:
        row_lse, col_lse = row_lse - bias.to(cd), col_lse - bias.to(cd)
    M, N = image.shape[0], text.shape[0]
    g_text = torch.empty(M, text.shape[1], dtype=cd, device=image.device)
    g_image = torch.zeros(N, image.shape[1], dtype=cd, device=image.device)
    text_t = text.t()
    chunk = min(_row_chunk(N), M)
    block = torch.empty(chunk, N, dtype=cd, device=image.device)  # reused by every chunk
    # The C++ kernel writes the non-split G over S itself; a second block is needed only
    # by split mode and the torch functions.
    in_place = not split and _cpu_kernels(block, row_lse, col_lse) is not None
    work = block if in_place else torch.empty_like(block)
    for start in range(0, M, chunk):
        rows = slice(start, start + chunk)
        n = min(chunk, M - start)
        logits = torch.mm(image[rows] * s, text_t, out=block[:n])  # (chunk, N)
        if split:
            g_row, g_col = _block_softmaxes(logits, row_lse[rows], col_lse, work[:n])
            g_row.diagonal(start + diag_offset).sub_(1.0)
            g_col.diagonal(start + diag_offset).sub_(1.0)
        else:
            g_row = g_col = _block_grad(logits, row_lse[rows], col_lse, work[:n])
            g_row.diagonal(start + diag_offset).sub_(2.0)  # labels (empty view when off this chunk)
        torch.mm(g_row, text, out=g_text[rows])
        g_image.addmm_(g_col.t(), image[rows])
    # sum_ij G[i,j] (I[i] . T[j]) = sum_i I[i] . (G @ T)[i]: O(M*D), no pass over S.
    return g_text, g_image, rowwise_dot(image, g_text).sum()


# ----------------------------------------------------------------------------- dispatch


def _as_triton_operand(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def lse_stats(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column logsumexp of S = scale * image @ text.T + bias, one pass over S.

    image (M, D), text (N, D) of one dtype; scale and bias one-element tensors.
    Returns (row_lse (M,), col_lse (N,)) in fp32 (fp64 for fp64 inputs); col_lse is
    over the M given rows only (the distributed loss merges it across ranks).
    """
    if use_triton(image, text) and image.dtype != torch.float64:
        from clip_fast.kernels import contrastive

        return contrastive.lse_forward(
            _as_triton_operand(image), _as_triton_operand(text), _scalar32(scale), _scalar32(bias)
        )
    return _torch_lse_stats(image, text, scale.reshape(()), None if bias is None else bias.reshape(()))


def logit_grads(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    diag_offset: int = 0,
    deterministic: bool = False,
    split: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G @ text (M, D), G.T @ image (N, D) and sum_ij G[i,j] (image[i] . text[j]) for
    G = exp(S - row_lse[:, None]) + exp(S - col_lse[None, :]) - 2E, E[i, j] = [j == i + diag_offset].

    No 1/(2B) factor: the caller applies it. The label term is subtracted, and the
    last sum reduced, before G is rounded to the input dtype. fp32 results (fp64 for
    fp64 inputs).
    `deterministic` avoids floating-point atomics on GPU (one more pass over S).
    `split` contracts each softmax with one side only, still in one pass over S:
    G_row @ text, G_col.T @ image and sum G_row * (image . text), where
    G_row = exp(S - row_lse[:, None]) - E and G_col = exp(S - col_lse[None, :]) - E.
    """
    if use_triton(image, text) and image.dtype != torch.float64:
        from clip_fast.kernels import contrastive

        return contrastive.grad_backward(
            _as_triton_operand(image), _as_triton_operand(text), _scalar32(scale), _scalar32(bias),
            row_lse.float().contiguous(), col_lse.float().contiguous(),
            diag_offset=diag_offset, deterministic=deterministic, split=split, strips=contrastive_backward(),
        )
    return _torch_logit_grads(
        image, text, scale.reshape(()), None if bias is None else bias.reshape(()), row_lse, col_lse, diag_offset,
        split,
    )


def _scalar32(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().reshape(1).to(torch.float32)


# ----------------------------------------------------------------------------- autograd


class _ContrastiveLossFunction(torch.autograd.Function):
    """Forward and backward run with autocast off (in the dtypes the inputs come in),
    so the value is the same inside torch.autocast as outside, and the backward is
    its exact gradient."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, deterministic):
        with autocast_off(image):
            return _ContrastiveLossFunction._forward(ctx, image, text, scale, bias, deterministic)

    @staticmethod
    def _forward(ctx, image, text, scale, bias, deterministic):
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
    def backward(ctx, grad_loss):
        with autocast_off(grad_loss):
            return _ContrastiveLossFunction._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
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


class ContrastiveLoss(nn.Module):
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
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # no label tensor exists here; kept for API parity
        self.rank = rank
        self.world_size = world_size
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
            from clip_fast.distributed_loss import ShardSpec, sharded_contrastive_loss

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


__all__ = ["ContrastiveLoss", "lse_stats", "logit_grads", "reference_clip_loss", "rowwise_dot"]
