"""The sharded ContrastiveLoss through the Triton kernels under the interpreter: the
rectangular (b x B) blocks with a diagonal offset, and the +inf-LSE calls that
local_loss=True, gather_with_grad=False uses to split the row and column softmax."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from clip_fast.distributed_loss import ShardSpec, sharded_contrastive_loss
from clip_fast.loss import logit_grads, lse_stats


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("which", ["rows_only", "cols_only"])
def test_infinite_lse_removes_one_softmax(which):
    g = torch.Generator().manual_seed(0)
    M, N, D, offset = 9, 27, 13, 9  # rank 1 of 3 with b = 9
    image, text = torch.randn(M, D, generator=g), torch.randn(N, D, generator=g)
    scale, bias = torch.tensor(5.0), torch.tensor(-1.0)
    row_lse, col_lse = lse_stats(image, text, scale, bias)
    S = 5.0 * image.double() @ text.double().T - 1.0
    assert _rel(row_lse, torch.logsumexp(S, 1)) < 1e-6
    assert _rel(col_lse, torch.logsumexp(S, 0)) < 1e-6
    E = torch.zeros(M, N, dtype=torch.float64)
    E[:, offset : offset + M].diagonal().fill_(1.0)
    if which == "rows_only":
        col_lse = torch.full_like(col_lse, float("inf"))
        G = torch.softmax(S, 1) - 2 * E
    else:
        row_lse = torch.full_like(row_lse, float("inf"))
        G = torch.exp(S - torch.logsumexp(S, 0)) - 2 * E
    g_text, g_image, g_dot = logit_grads(image, text, scale, bias, row_lse, col_lse, offset)
    assert _rel(g_text, G @ text.double()) < 1e-5
    assert _rel(g_image, G.T @ image.double()) < 1e-5
    assert _rel(g_dot, (G * (image.double() @ text.double().T)).sum()) < 1e-5


@pytest.mark.parametrize("local_loss,gather_with_grad", [(False, False), (True, False), (True, True)])
def test_single_rank_group_matches_torch_path_in_fp64(local_loss, gather_with_grad):
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=0, world_size=1)
        try:
            g = torch.Generator().manual_seed(1)
            inputs = [torch.randn(37, 24, generator=g), torch.randn(37, 24, generator=g),
                      torch.tensor(10.0), torch.tensor(0.5)]
            spec = ShardSpec(0, 1, local_loss, gather_with_grad)
            results = []
            for dtype, backend in ((torch.float32, "triton"), (torch.float64, "torch")):
                os.environ["CLIP_FAST_BACKEND"] = backend
                leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
                loss = sharded_contrastive_loss(*leaves, spec)
                loss.backward()
                results.append([loss.detach()] + [x.grad for x in leaves[:3]])
            os.environ["CLIP_FAST_BACKEND"] = "triton"
            for ours, ref in zip(*results):
                assert _rel(ours, ref) < 2e-5
        finally:
            dist.destroy_process_group()
