"""SigLIP's fused block pass on the C++ tile kernel (torch.ops.clip_fast.siglip_tile,
csrc/siglip_cpu.cpp), fp32 CPU: the tiles, matmul and two GEMMs of its torch reference
(clip_fast.siglip_torch.block_torch), with a tile's elementwise sweeps in one C++ pass.
Used only when clip_fast._backend.select_backend chose "cpp"."""
from __future__ import annotations

import torch

from clip_fast import siglip_torch


def block_fused(
    image: torch.Tensor,  # (M, D) fp32
    text: torch.Tensor,  # (N, D) fp32
    scale: torch.Tensor,  # () fp32
    bias: torch.Tensor,  # () fp32
    has_pos: bool,
    inv_n: float,
    d_image: torch.Tensor,  # (M, D) accumulated into
    d_text: torch.Tensor,  # (N, D) accumulated into
) -> torch.Tensor:
    """block_torch with the C++ tile kernel: the same tiles, matmul and two GEMMs, but
    the elementwise sweeps of a tile (S, softplus and its sum, sigmoid, the dscale and
    dbias sums) are one read and write of it in C++. Sums accumulate in fp64."""
    tile_op = torch.ops.clip_fast.siglip_tile
    tile_rows, tile_cols = siglip_torch.tile_shape(image.shape[0], text.shape[0])
    s, b = float(scale), float(bias)
    alpha = s * inv_n  # GEMM alpha: dL/dfeatures = scale/n * g @ features
    sums = torch.zeros(3, dtype=torch.float64)  # [loss, dscale, dbias] * n
    # One buffer for every tile: a fresh tensor per tile pays its page faults again.
    buffer = torch.empty(tile_rows * tile_cols, dtype=torch.float32)
    for r0 in range(0, image.shape[0], tile_rows):
        rows = image[r0 : r0 + tile_rows]  # (tr, D)
        for c0 in range(0, text.shape[0], tile_cols):
            cols = text[c0 : c0 + tile_cols]  # (tc, D)
            tr, tc = rows.shape[0], cols.shape[0]
            g = torch.mm(rows, cols.T, out=buffer[: tr * tc].view(tr, tc))  # (tr, tc) dots
            # positives: global (i, i) = tile entry (i - r0, i - c0), column offset r0 - c0
            tile_op(g, sums, s, b, r0 - c0, has_pos)  # g <- n * dL/dS in place
            d_image[r0 : r0 + tile_rows].addmm_(g, cols, alpha=alpha)
            d_text[c0 : c0 + tile_cols].addmm_(g.T, rows, alpha=alpha)
    return (sums * inv_n).to(torch.float32)
