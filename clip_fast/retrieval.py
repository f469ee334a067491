"""Image-text retrieval metrics of paired features, blockwise (no N x N matrix).

For N pairs with similarities s(i, j) = image_i . text_j, the rank of pair i is
  image_to_text: r_i = #{j : s(i, j) > s(i, i)}      (0 = the paired caption is first)
  text_to_image: r_i = #{j : s(j, i) > s(i, i)}
and open_clip's metrics (open_clip_train.train.get_clip_metrics) are, for each direction,
  mean_rank = mean(r) + 1, median_rank = floor(median(r)) + 1, R@k = mean(r < k), k = 1, 5, 10.
Ties count in the pair's favour (open_clip's argsort leaves their order unspecified).
Rows are processed `block_size` at a time: memory O(block_size * N), and each pair's own
similarity is read from the same block product as the row it is compared with, so
rounding cannot rank a pair against itself.
"""
from __future__ import annotations

import numpy as np
import torch

RECALL_AT = (1, 5, 10)


def _ranks(queries: torch.Tensor, keys: torch.Tensor, block_size: int) -> torch.Tensor:
    """r_i = #{j : q_i . k_j > q_i . k_i}, computed `block_size` query rows at a time."""
    n = queries.shape[0]
    ranks = torch.empty(n, dtype=torch.int64, device=queries.device)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        sims = queries[start:stop] @ keys.T  # (m, N)
        own = torch.diagonal(sims[:, start:stop])  # s(i, i) from this very product
        ranks[start:stop] = (sims > own[:, None]).sum(dim=1)
    return ranks


def _summary(prefix: str, ranks: np.ndarray) -> dict[str, float]:
    out = {f"{prefix}_mean_rank": float(ranks.mean() + 1), f"{prefix}_median_rank": float(np.floor(np.median(ranks)) + 1)}
    for k in RECALL_AT:
        out[f"{prefix}_R@{k}"] = float(np.mean(ranks < k))
    return out


@torch.no_grad()
def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      block_size: int = 4096) -> dict[str, float]:
    """open_clip's retrieval metrics of N paired (image, text) features (N, D), computed in
    fp32 `block_size` rows at a time (see the module docstring)."""
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"image_features and text_features must both be (N, D), got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if image_features.shape[0] == 0:
        raise ValueError("retrieval_metrics needs at least one pair")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    img, txt = image_features.float(), text_features.float()
    i2t = _ranks(img, txt, block_size).cpu().numpy()
    t2i = _ranks(txt, img, block_size).cpu().numpy()
    return {**_summary("image_to_text", i2t), **_summary("text_to_image", t2i)}
