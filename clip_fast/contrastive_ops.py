"""The contrastive loss's two O(B^2 D) ops, shared by the single-process loss
(clip_fast.loss) and the sharded one (clip_fast.distributed_loss).

For S = scale * image @ text.T + bias, image (M, D), text (N, D):
`lse_stats`    row and column logsumexp of S, one pass over S;
`logit_grads`  G @ text, G.T @ image and sum_ij G[i,j] (image[i] . text[j]) for
               G = exp(S - row_lse[:, None]) + exp(S - col_lse[None, :]) - 2E, recomputing S.

Each call picks its implementation once (clip_fast._backend.select_backend): the Triton
kernels of clip_fast.kernels.contrastive, or the host loop below, which runs the same
blockwise algorithm a chunk of rows at a time (extra memory O(B*D + chunk*N)) and hands
each (chunk x N) block to the C++ block kernels (clip_fast.contrastive_cpp) or to their
torch reference (clip_fast.contrastive_torch).
"""
from __future__ import annotations

from types import ModuleType

import torch

from clip_fast import contrastive_cpp, contrastive_torch
from clip_fast._backend import CONTRASTIVE, contrastive_backward, select_backend
from clip_fast._checks import compute_dtype

# Elements of one (chunk x N) block of S on the host path: 2^23 fp32 = 32 MiB. Forward holds
# one such block; backward one with the C++ kernels (two in split mode and on the torch
# path, plus logsumexp's temporary when the per-direction fallback runs).
CPU_BLOCK_ELEMENTS = 1 << 23


def rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a * b).sum(-1) for (n, D) tensors without an (n, D) temporary (n 1 x D x 1
    batched products; einsum and mul+sum both materialise one)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def lse_stats(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column logsumexp of S = scale * image @ text.T + bias, one pass over S.

    image (M, D), text (N, D) of one dtype; scale and bias one-element tensors.
    Returns (row_lse (M,), col_lse (N,)) in fp32 (fp64 for fp64 inputs); col_lse is
    over the M given rows only (the distributed loss merges it across ranks).
    """
    backend = select_backend(CONTRASTIVE, image, text)
    if backend == "triton":
        from clip_fast.kernels import contrastive

        return contrastive.lse_forward(
            _as_triton_operand(image), _as_triton_operand(text), _scalar32(scale), _scalar32(bias)
        )
    blocks = contrastive_cpp if backend == "cpp" else contrastive_torch
    return _host_lse_stats(image, text, scale.reshape(()), None if bias is None else bias.reshape(()), blocks)


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
    backend = select_backend(CONTRASTIVE, image, text)
    if backend == "triton":
        from clip_fast.kernels import contrastive

        return contrastive.grad_backward(
            _as_triton_operand(image), _as_triton_operand(text), _scalar32(scale), _scalar32(bias),
            row_lse.float().contiguous(), col_lse.float().contiguous(),
            diag_offset=diag_offset, deterministic=deterministic, split=split, strips=contrastive_backward(),
        )
    blocks = contrastive_cpp if backend == "cpp" else contrastive_torch
    return _host_logit_grads(
        image, text, scale.reshape(()), None if bias is None else bias.reshape(()), (row_lse, col_lse),
        diag_offset, split, blocks,
    )


def _as_triton_operand(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _scalar32(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().reshape(1).to(torch.float32)


# ----------------------------------------------------------------------------- host loop


def _row_chunk(n_cols: int) -> int:
    return max(1, CPU_BLOCK_ELEMENTS // max(n_cols, 1))


def _host_lse_stats(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, blocks: ModuleType
) -> tuple[torch.Tensor, torch.Tensor]:
    """lse_stats a chunk of rows at a time; `blocks` (contrastive_cpp or contrastive_torch)
    reduces each block."""
    cd = compute_dtype(image.dtype)
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
        row_block, col_block = blocks.block_lse(logits)
        row_lse[start : start + chunk] = row_block
        col_lse = torch.logaddexp(col_lse, col_block)
    if bias is not None:
        row_lse += bias.to(cd)
        col_lse += bias.to(cd)
    return row_lse, col_lse


def _host_logit_grads(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    lse: tuple[torch.Tensor, torch.Tensor],
    diag_offset: int,
    split: bool,
    blocks: ModuleType,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logit_grads a chunk of rows at a time; `blocks` turns each block into G."""
    cd = compute_dtype(image.dtype)
    image, text = image.to(cd), text.to(cd)
    s = scale.to(cd)
    # exp(S - lse) = exp((S - bias) - (lse - bias)): blocks are computed without the bias.
    row_lse, col_lse = (x.to(cd).contiguous() for x in lse)
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
    work = block if blocks.GRAD_IN_PLACE and not split else torch.empty_like(block)
    for start in range(0, M, chunk):
        rows = slice(start, start + chunk)
        n = min(chunk, M - start)
        logits = torch.mm(image[rows] * s, text_t, out=block[:n])  # (chunk, N)
        if split:
            g_row, g_col = blocks.block_softmaxes(logits, row_lse[rows], col_lse, work[:n])
            g_row.diagonal(start + diag_offset).sub_(1.0)
            g_col.diagonal(start + diag_offset).sub_(1.0)
        else:
            g_row = g_col = blocks.block_grad(logits, row_lse[rows], col_lse, work[:n])
            g_row.diagonal(start + diag_offset).sub_(2.0)  # labels (empty view when off this chunk)
        torch.mm(g_row, text, out=g_text[rows])
        g_image.addmm_(g_col.t(), image[rows])
    # sum_ij G[i,j] (I[i] . T[j]) = sum_i I[i] . (G @ T)[i]: O(M*D), no pass over S.
    return g_text, g_image, rowwise_dot(image, g_text).sum()


__all__ = ["CPU_BLOCK_ELEMENTS", "logit_grads", "lse_stats", "rowwise_dot"]
