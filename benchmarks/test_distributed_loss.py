"""Distributed losses on a real gloo group (CPU): per-rank forward+backward time and
peak extra memory, clip_fast vs open_clip, with 2 and 4 ranks.

- contrastive: clip_fast's sharded ContrastiveLoss vs open_clip's ClipLoss local loss
  (local_loss=True, gather_with_grad=True), global batch B split over W ranks;
- contrastive_nograd: the same with gather_with_grad=False (clip_fast's split backward);
- siglip: clip_fast's ring SigLipLoss vs open_clip's SigLipLoss ('bidir' ring).

    pytest benchmarks/test_distributed_loss.py --benchmark-only --benchmark-group-by=param

Times are per step with all ranks in lockstep; memory is rank 0's peak extra RSS
over one step; every rank runs one thread. The CPU
box shares its 2 cores between all ranks, so absolute times grow with W; compare the
two implementations at equal (W, B). Not run on GPU (one device per rank needed).
"""
import pytest
import torch

from dist_group import LossCase, ProcessGroupRunner

GLOBAL_BATCHES = [2048, 8192]
D = 512


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"W={w}")
def group(request):
    runner = ProcessGroupRunner(request.param)
    yield runner
    runner.close()


@pytest.mark.parametrize("impl", ["clip_fast", "open_clip"])
@pytest.mark.parametrize("kind", ["contrastive", "contrastive_nograd", "siglip"])
@pytest.mark.parametrize("B", GLOBAL_BATCHES)
def test_distributed_loss_per_rank(measure, benchmark, group, kind, impl, B):
    if torch.cuda.is_available():
        pytest.skip("CPU gloo benchmark (a GPU run needs one device per rank)")
    nograd = kind == "contrastive_nograd"
    group.setup(LossCase("contrastive" if nograd else kind, impl, B, D, gather_with_grad=not nograd))
    b = B // group.world_size
    # per rank: contrastive 4 passes (clip_fast) over b x B; siglip 3 passes
    flops = (6 if kind == "siglip" else 8) * b * B * D
    measure(group.step, flops=flops, rounds=3, world_size=group.world_size, B=B, b=b, D=D)
    # measure() sampled this (coordinating) process; the per-rank figure is rank 0's
    benchmark.extra_info["peak_extra_memory_mib"] = round(group.peak_memory() / 2**20, 1)
