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
two implementations at equal (W, B). The gloo benchmark is not run on GPU (one device
per rank needed); on a GPU, `test_sharded_contrastive_rank_work_on_gpu` times one rank's
share of the sharded contrastive loss instead: its (b x B) block, forward and backward.

    pytest benchmarks/test_distributed_loss.py -k sharded --benchmark-only
"""
import pytest
import torch

from conftest import HAS_CUDA
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


# (b, B, D): a rank's local batch against the global batch, e.g. 256 x 65,536 on 256 GPUs
# or 512 x 65,536 on 128; the column-split grids exist for exactly these shapes (a few
# row blocks alone would occupy 2-4 of 132 SMs).
SHARDED_SHAPES = [(256, 65536, 512), (512, 65536, 512), (256, 65536, 1024)]


@pytest.mark.skipif(not HAS_CUDA, reason="the sharded-shape kernels run on a GPU")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("b,B,D", SHARDED_SHAPES)
def test_sharded_contrastive_rank_work_on_gpu(measure, b, B, D, deterministic):
    """One rank's block of the sharded loss on one GPU, bf16: row/column statistics of
    its (b x B) logits, then the block gradients with the label offset of a middle rank
    (lse_stats + logit_grads: the kernels the distributed loss launches per rank; the
    collectives are not included). TFLOP/s in extra_info count 4 passes over the block
    (8 * b * B * D; 5 in deterministic mode are still counted as 4, so the rates compare
    as inverse times)."""
    from clip_fast.contrastive_ops import logit_grads, lse_stats

    g = torch.Generator(device="cuda").manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(b, D, device="cuda", generator=g), dim=-1).bfloat16()
    text = torch.nn.functional.normalize(torch.randn(B, D, device="cuda", generator=g), dim=-1).bfloat16()
    scale = torch.tensor(14.3, device="cuda")

    def step():
        row, col = lse_stats(image, text, scale, None)
        return logit_grads(image, text, scale, None, row, col, diag_offset=B // 2, deterministic=deterministic)

    measure(step, flops=8.0 * b * B * D, b=b, B=B, D=D, dtype="bf16", deterministic=deterministic)
