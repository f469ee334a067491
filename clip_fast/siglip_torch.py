"""SigLIP's fused block pass in torch ops: the reference of the C++ tile pass
(clip_fast.siglip_cpp), and what runs for fp64 (gradcheck), CLIP_FAST_BACKEND=torch or
without the C++ extension. Also the tiling both host paths share."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Host-path tiles of S: up to CPU_TILE_ROWS rows x (CPU_TILE_ELEMENTS / rows) columns
# (~4 MiB per fp32 temporary, a few alive at a time): memory O(tile), not O(B^2).
# Square-ish tiles rather than full rows: the text-gradient GEMM G.T @ I sums over the
# tile's rows and read-modify-writes only the tile's columns of dT, where row chunks
# of 64 rows (2^20 / 16k) made it a K=64 GEMM rewriting all of dT (32 MiB) per chunk.
CPU_TILE_ELEMENTS = 1 << 20
CPU_TILE_ROWS = 1024


def tile_shape(n_rows: int, n_cols: int) -> tuple[int, int]:
    """(rows, columns) of the host paths' tiles of an (n_rows x n_cols) block."""
    tile_rows = max(1, min(n_rows, CPU_TILE_ROWS))
    return tile_rows, max(1, min(n_cols, CPU_TILE_ELEMENTS // tile_rows))


def block_torch(
    image: torch.Tensor,  # (M, D) compute dtype
    text: torch.Tensor,  # (N, D) compute dtype
    scale: torch.Tensor,  # () compute dtype
    bias: torch.Tensor,  # () compute dtype
    has_pos: bool,
    inv_n: float,
    d_image: torch.Tensor,  # (M, D) accumulated into
    d_text: torch.Tensor,  # (N, D) accumulated into
) -> torch.Tensor:
    """Loss, dscale and dbias (3,) of the block in torch ops, adding the feature
    gradients to d_image and d_text: the same single pass over S as the kernels, tile by
    tile.

    Works with y = -z * S (= S for negatives, -S on the diagonal), so that the loss is
    softplus(y) and dL/dS = -z * sigmoid(y) / n: per tile one matmul, four elementwise
    sweeps (y, softplus+sum, in-place sigmoid, the dscale product+sum) and two GEMMs that apply
    scale/n through `alpha` instead of extra sweeps. Eager torch makes every op a pass
    over the tile, so their number sets the CPU time beside the matmuls.
    """
    tile_rows, tile_cols = tile_shape(image.shape[0], text.shape[0])
    alpha = float(scale) * inv_n  # GEMM alpha: dL/dfeatures = scale/n * g @ features
    loss = image.new_zeros(())
    ds = image.new_zeros(())
    db = image.new_zeros(())
    for r0 in range(0, image.shape[0], tile_rows):
        rows = image[r0 : r0 + tile_rows]  # (tr, D)
        for c0 in range(0, text.shape[0], tile_cols):
            cols = text[c0 : c0 + tile_cols]  # (tc, D)
            dots = rows @ cols.T  # (tr, tc)
            y = torch.addcmul(bias, dots, scale)  # S: every pair a negative ...
            # ... except global (i, i) = tile entry (i - r0, i - c0): the tile's diagonal
            # at offset r0 - c0 (an empty view when the tile misses it)
            if has_pos:
                y.diagonal(r0 - c0).neg_()
            loss = loss + F.softplus(y).sum()  # softplus(-zS) = -logsigmoid(zS)
            g = torch.sigmoid(y, out=y)  # sigmoid(-zS) = -z * n * dL/dS
            if has_pos:
                g.diagonal(r0 - c0).neg_()  # g = n * dL/dS
            # sum(g * S_dots) by torch's cascade sum (error ~eps log n), not a BLAS dot,
            # whose running fp32 sums lose ~1e-5 relative over a 1024 x 1024 tile
            ds = ds + dots.mul_(g).sum()
            db = db + g.sum()
            d_image[r0 : r0 + tile_rows].addmm_(g, cols, alpha=alpha)
            d_text[c0 : c0 + tile_cols].addmm_(g.T, rows, alpha=alpha)
    return torch.stack([loss, ds, db]) * inv_n
