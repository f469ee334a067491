"""ContrastiveLoss on a CUDA device: the Triton kernels at realistic sizes (skipped without CUDA)."""
import pytest
import torch

from clip_fast import ContrastiveLoss
from loss_reference import assert_matches, blockwise_floor, loss_and_grads, make_inputs, open_clip_loss, term_magnitudes

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("B", [1, 1000, 4096])
@pytest.mark.parametrize("D", [7, 512, 768, 1152])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_open_clip_on_gpu(B, D, dtype):
    image, text = make_inputs(B, D, dtype, normalized=True, device="cuda")
    loss, grads = loss_and_grads(ContrastiveLoss(), image, text, 100.0, -5.0)
    oc_loss, oc_grads = loss_and_grads(open_clip_loss, image, text, 100.0, -5.0)
    ref_loss, ref_grads = loss_and_grads(open_clip_loss, image, text, 100.0, -5.0, dtype=torch.float64)
    floor = 1e-5 if dtype == torch.float32 else 1e-6
    mags = term_magnitudes(image, text, 100.0)
    assert_matches(loss, oc_loss, ref_loss, floor, "loss", mags[0])
    for name, g, oc, ref, mag in zip(("d_image", "d_text", "d_scale"), grads, oc_grads, ref_grads, mags[1:]):
        assert_matches(g, oc, ref, blockwise_floor(floor, mags[0]), name, mag)
    assert torch.equal(grads[3], torch.zeros_like(grads[3]))


def test_deterministic_mode_is_bitwise_reproducible_on_gpu():
    image, text = make_inputs(8192, 512, torch.bfloat16, normalized=True, device="cuda")
    first = loss_and_grads(ContrastiveLoss(deterministic=True), image, text, 50.0, None)
    second = loss_and_grads(ContrastiveLoss(deterministic=True), image, text, 50.0, None)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1][:3], second[1][:3]):
        assert torch.equal(a, b)


def test_large_batch_memory_is_linear_on_gpu():
    B, D = 65536, 512
    image, text = make_inputs(B, D, torch.bfloat16, normalized=True, device="cuda")
    image.requires_grad_()
    text.requires_grad_()
    scale = torch.tensor(14.3, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ContrastiveLoss()(image, text, scale).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 64 * B * D, f"{extra / 2**20:.0f} MiB extra; one B x B bf16 matrix is {B * B * 2 / 2**30:.0f} GiB"


def test_autocast_features_and_fp32_scale():
    """The trainer's case: bf16 features under autocast, fp32 logit_scale parameter."""
    image, text = make_inputs(1000, 512, torch.bfloat16, normalized=True, device="cuda")
    t = torch.tensor(4.6, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = ContrastiveLoss()(image, text, t.exp())
    loss.backward()
    expected = open_clip_loss(image.double(), text.double(), t.detach().double().exp())
    assert abs(loss.item() - expected.item()) < 1e-3 * expected.item()
    assert t.grad is not None and torch.isfinite(t.grad)
