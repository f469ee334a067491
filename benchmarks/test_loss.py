"""Contrastive loss, forward + backward: clip_fast vs open_clip's ClipLoss vs naive torch.

    pytest benchmarks/test_loss.py --benchmark-only --benchmark-group-by=param:B,param:D

extra_info records peak extra memory and achieved TFLOP/s, counting the blockwise
algorithm's 4 passes over S (8 * B^2 * D FLOPs) for every implementation, so the
rates compare as inverse times. CPU sizes finish in minutes; GPU sizes go to 256k.
"""
import pytest
import torch
from open_clip.loss import ClipLoss

from clip_fast import ContrastiveLoss
from clip_fast.loss import reference_clip_loss
from conftest import bench_device, materialised_fits, sizes_for, unit_features

DEVICE = bench_device()
BATCHES = sizes_for(DEVICE, cpu=[1024, 4096, 16384], gpu=[4096, 32768, 131072, 262144])
DIMS = [512, 768]
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16

IMPLEMENTATIONS = {
    "clip_fast": ContrastiveLoss(),
    "clip_fast_deterministic": ContrastiveLoss(deterministic=True),
    # the two Triton backwards forced (CLIP_FAST_CONTRASTIVE_BACKWARD), to re-tune
    # kernels.contrastive.STRIP_MIN_ENTRIES from a GPU run
    "clip_fast_fused_bwd": ContrastiveLoss(),
    "clip_fast_strip_bwd": ContrastiveLoss(),
    "open_clip": ClipLoss(),
    "naive_torch": reference_clip_loss,
}
BACKWARD_OVERRIDE = {"clip_fast_fused_bwd": "fused", "clip_fast_strip_bwd": "strips"}


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("B", BATCHES)
def test_contrastive_loss_fwd_bwd(measure, device, monkeypatch, impl, B, D):
    if (impl == "clip_fast_deterministic" or impl in BACKWARD_OVERRIDE) and device == "cpu":
        pytest.skip("deterministic mode and the backward choice only change the GPU kernels")
    if impl in BACKWARD_OVERRIDE:
        monkeypatch.setenv("CLIP_FAST_CONTRASTIVE_BACKWARD", BACKWARD_OVERRIDE[impl])
    if not (impl.startswith("clip_fast") or materialised_fits(B, device)):
        pytest.skip(f"{impl} would need {6 * B * B * 4 / 2**30:.0f} GiB of B x B buffers")
    image, text = unit_features(B, D, device, DTYPE)
    scale = torch.tensor(14.3, device=device, requires_grad=True)
    loss_fn = IMPLEMENTATIONS[impl]

    def step():
        image.grad = text.grad = scale.grad = None
        loss_fn(image, text, scale).backward()

    rounds = 1 if (device == "cpu" and B >= 16384) else None
    measure(step, flops=8.0 * B * B * D, rounds=rounds, impl=impl, B=B, D=D, dtype=str(DTYPE))
