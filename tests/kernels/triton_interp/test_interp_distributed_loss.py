"""The sharded ContrastiveLoss through the Triton kernels under the interpreter: the
rectangular (b x B) blocks with a diagonal offset, and the split backward (row and
column softmax contracted separately) that local_loss=True, gather_with_grad=False uses."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from clip_fast.distributed_loss import ShardSpec, sharded_contrastive_loss


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


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
