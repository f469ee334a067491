"""SigLIP loss, forward + backward: clip_fast.SigLipLoss vs open_clip's SigLipLoss
(single process).

    pytest benchmarks/test_siglip.py --benchmark-only --benchmark-group-by=param:B

extra_info records peak extra memory and the FLOP rate, counting 3 passes over S
(6 * B^2 * D FLOPs: the logits, G @ T, G.T @ I) for both implementations, so the rates
compare as inverse times. The distributed versions are in test_distributed_loss.py.
"""
import pytest
import torch
from open_clip.loss import SigLipLoss as OpenClipSigLip

from clip_fast import SigLipLoss
from conftest import bench_device, materialised_fits, sizes_for, unit_features

DEVICE = bench_device()
BATCHES = sizes_for(DEVICE, cpu=[1024, 4096, 16384], gpu=[4096, 32768, 131072])
D = 512
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16
IMPLEMENTATIONS = {"clip_fast": SigLipLoss, "open_clip": OpenClipSigLip}


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("B", BATCHES)
def test_siglip_loss_fwd_bwd(measure, device, impl, B):
    if not (impl.startswith("clip_fast") or materialised_fits(B, device)):
        pytest.skip(f"{impl} would need ~{6 * B * B * 4 / 2**30:.0f} GiB of B x B buffers")
    image, text = unit_features(B, D, device, DTYPE)
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    loss_fn = IMPLEMENTATIONS[impl]()

    def step():
        image.grad = text.grad = scale.grad = bias.grad = None
        loss_fn(image, text, scale, bias).backward()

    rounds = 1 if (device == "cpu" and B >= 16384) else (3 if device == "cpu" else None)
    measure(step, flops=6 * B * B * D, rounds=rounds, B=B, D=D, dtype=str(DTYPE))
