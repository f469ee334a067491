"""The contrastive Triton kernels under Triton's interpreter (CPU tensors).

Run in its own process with TRITON_INTERPRET=1 CLIP_FAST_BACKEND=triton (see conftest).
"""
import itertools
import math

import pytest
import torch

from clip_fast import ContrastiveLoss
from clip_fast.kernels import contrastive
from loss_reference import assert_matches, blockwise_floor, loss_and_grads, make_inputs, open_clip_loss, term_magnitudes

# (B, D): odd sizes, one and several row/column blocks, masked K and D tails.
SHAPES = [(1, 1), (2, 7), (3, 64), (17, 33), (130, 160)]


@pytest.mark.parametrize("B,D", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale,bias", [(1.0, None), (14.3, -10.0), (100.0, None)])
def test_loss_and_grads_match_open_clip(B, D, dtype, scale, bias):
    image, text = make_inputs(B, D, dtype, normalized=True)
    loss, grads = loss_and_grads(ContrastiveLoss(), image, text, scale, bias)
    oc_loss, oc_grads = loss_and_grads(open_clip_loss, image, text, scale, bias)
    ref_loss, ref_grads = loss_and_grads(open_clip_loss, image, text, scale, bias, dtype=torch.float64)
    # fp32: ~1e-5 relative to the terms; bf16/fp16: twice torch's own error at that dtype
    # (the floor only absorbs fp32-level rounding of the fp32 accumulators).
    floor = 1e-5 if dtype == torch.float32 else 1e-6
    mags = term_magnitudes(image, text, scale)
    assert_matches(loss, oc_loss, ref_loss, floor, "loss", mags[0])
    grad_floor = blockwise_floor(floor, mags[0])
    for name, g, oc, ref, mag in zip(("d_image", "d_text", "d_scale"), grads, oc_grads, ref_grads, mags[1:]):
        assert_matches(g, oc, ref, grad_floor, name, mag)
    if bias is not None:
        assert torch.equal(grads[3], torch.zeros_like(grads[3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unnormalized_features_do_not_overflow(dtype):
    """Logits of several thousand: exp would overflow without the running maxima."""
    image, text = make_inputs(40, 24, dtype, normalized=False)
    loss, grads = loss_and_grads(ContrastiveLoss(), image, text, 100.0, None)
    ref_loss, ref_grads = loss_and_grads(open_clip_loss, image, text, 100.0, None, dtype=torch.float64)
    assert math.isfinite(loss.item())
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * term_magnitudes(image, text, 100.0)[0]
    assert all(torch.isfinite(g).all() for g in grads[:3])


@pytest.mark.parametrize("M,N,D", [(5, 70, 16), (70, 5, 33), (129, 64, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rectangular_statistics_and_gradients(M, N, D, dtype):
    """The (b x B) mode the distributed loss uses, with a label offset."""
    g = torch.Generator().manual_seed(M * N + D)
    image = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=-1).to(dtype)
    text = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1).to(dtype)
    scale, bias = torch.tensor([30.0]), torch.tensor([-3.0])
    logits = 30.0 * image.double() @ text.double().T - 3.0
    row, col = contrastive.lse_forward(image, text, scale, bias)
    torch.testing.assert_close(row.double(), logits.logsumexp(1), rtol=0, atol=2e-5)
    torch.testing.assert_close(col.double(), logits.logsumexp(0), rtol=0, atol=2e-5)
    offset = 2 if N > M else -1
    labels = torch.zeros_like(logits)
    for i in range(M):
        if 0 <= i + offset < N:
            labels[i, i + offset] = 1.0
    p_row = (logits - logits.logsumexp(1, keepdim=True)).exp()
    p_col = (logits - logits.logsumexp(0, keepdim=True)).exp()
    dots = image.double() @ text.double().T
    # G is rounded to the input dtype before its products (as on tensor cores).
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for deterministic, split in itertools.product((False, True), (False, True)):
        # split: G_row = P_row - E for grad_a, G_col = P_col - E for grad_b
        g_row = p_row - labels if split else p_row + p_col - 2 * labels
        g_col = p_col - labels if split else g_row
        g_text, g_image, g_dot = contrastive.grad_backward(
            image, text, scale, bias, row, col, diag_offset=offset, deterministic=deterministic, split=split
        )
        torch.testing.assert_close(g_dot.double(), (g_row * dots).sum(), rtol=0, atol=1e-5 * (g_row.abs() * dots.abs()).sum().item())
        torch.testing.assert_close(g_text.double(), g_row @ text.double(), rtol=0, atol=tol * max(1.0, (g_row.abs() @ text.double().abs()).max().item()))
        torch.testing.assert_close(g_image.double(), g_col.T @ image.double(), rtol=0, atol=tol * max(1.0, (g_col.abs().T @ image.double().abs()).max().item()))


def test_deterministic_mode_is_bitwise_reproducible_and_agrees():
    image, text = make_inputs(70, 40, torch.bfloat16, normalized=True)
    runs = [loss_and_grads(ContrastiveLoss(deterministic=True), image, text, 20.0, None) for _ in range(2)]
    for a, b in zip(runs[0][1][:3], runs[1][1][:3]):
        assert torch.equal(a, b)
    fast_loss, fast_grads = loss_and_grads(ContrastiveLoss(), image, text, 20.0, None)
    assert torch.equal(fast_loss, runs[0][0])
    for a, b in zip(fast_grads[:3], runs[0][1][:3]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_input_gives_nan(poison):
    image, text = make_inputs(20, 9, torch.float32, normalized=True)
    image[4, 1] = poison
    assert math.isnan(ContrastiveLoss()(image, text, torch.tensor(10.0)).item())


def test_triton_backend_is_what_ran(monkeypatch):
    """Guards against the suite silently testing the torch path."""
    calls = []
    original = contrastive.lse_forward
    monkeypatch.setattr(contrastive, "lse_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    image, text = make_inputs(4, 4, torch.float32, normalized=True)
    ContrastiveLoss()(image, text, torch.tensor(2.0))
    assert calls == [1]


@pytest.mark.parametrize("M,N,D,offset", [(70, 150, 40, 3), (150, 70, 24, -60), (1, 1, 1, 0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("split", [False, True])
def test_strip_backward_matches_dense_math_and_fused_kernel(monkeypatch, M, N, D, offset, dtype, split):
    """The strip backward (Triton G strips + GEMMs) over several strips with a ragged last
    one: the same G products as fp64 math, and as the fused kernel to bf16 rounding."""
    monkeypatch.setattr(contrastive, "STRIP_ENTRIES", 1)
    monkeypatch.setattr(contrastive, "STRIP_MIN_ROWS", 1)  # one 64-row tile per strip
    g = torch.Generator().manual_seed(M + N + D)
    image = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=-1).to(dtype)
    text = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1).to(dtype)
    scale, bias = torch.tensor([20.0]), torch.tensor([-2.0])
    row, col = contrastive.lse_forward(image, text, scale, bias)
    logits = 20.0 * image.double() @ text.double().T - 2.0
    labels = torch.zeros_like(logits)
    for i in range(M):
        if 0 <= i + offset < N:
            labels[i, i + offset] = 1.0
    p_row = (logits - row.double()[:, None]).exp()
    p_col = (logits - col.double()[None, :]).exp()
    g_row = p_row - labels if split else p_row + p_col - 2 * labels
    g_col = p_col - labels if split else g_row
    dots = image.double() @ text.double().T
    strips = contrastive.grad_backward(image, text, scale, bias, row, col, offset, split=split, strips=True)
    fused = contrastive.grad_backward(image, text, scale, bias, row, col, offset, split=split, strips=False)
    expected = (g_row @ text.double(), g_col.T @ image.double(), (g_row * dots).sum())
    # G is rounded to the input dtype before the products, in both implementations
    bounds = (
        (g_row.abs() @ text.double().abs()).max().item(),
        (g_col.abs().T @ image.double().abs()).max().item(),
        (g_row.abs() * dots.abs()).sum().item() * 1e-3,  # reduced from fp32 G
    )
    for name, ours, theirs, ref, bound in zip(("G@T", "G.T@I", "g_dot"), strips, fused, expected, bounds):
        torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-2 * max(bound, 1e-3), msg=name)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-2 * max(bound, 1e-3), msg=name)


def test_strip_backward_loss_matches_open_clip(monkeypatch):
    """ContrastiveLoss end to end with CLIP_FAST_CONTRASTIVE_BACKWARD=strips."""
    monkeypatch.setenv("CLIP_FAST_CONTRASTIVE_BACKWARD", "strips")
    monkeypatch.setattr(contrastive, "STRIP_MIN_ROWS", 64)
    monkeypatch.setattr(contrastive, "STRIP_ENTRIES", 64 * 130)  # 3 strips of a 130 x 130 S
    image, text = make_inputs(130, 48, torch.bfloat16, normalized=True)
    loss, grads = loss_and_grads(ContrastiveLoss(), image, text, 30.0, -1.0)
    oc_loss, oc_grads = loss_and_grads(open_clip_loss, image, text, 30.0, -1.0)
    ref_loss, ref_grads = loss_and_grads(open_clip_loss, image, text, 30.0, -1.0, dtype=torch.float64)
    mags = term_magnitudes(image, text, 30.0)
    assert_matches(loss, oc_loss, ref_loss, 1e-6, "loss", mags[0])
    for name, g, oc, ref, mag in zip(("d_image", "d_text", "d_scale"), grads, oc_grads, ref_grads, mags[1:]):
        assert_matches(g, oc, ref, blockwise_floor(1e-6, mags[0]), name, mag)


def test_strip_backward_refuses_fp32():
    image = torch.randn(4, 16)
    row, col = contrastive.lse_forward(image, image, torch.tensor([1.0]), None)
    with pytest.raises(ValueError, match="bf16/fp16"):
        contrastive.grad_backward(image, image, torch.tensor([1.0]), None, row, col, strips=True)


def test_strip_backward_is_not_the_default_without_mm_out_dtype(monkeypatch):
    """torch < 2.8 has no mm(out_dtype=): the CUDA default must fall back to the fused backward."""
    real_mm = torch.mm

    def old_mm(*args, **kwargs):
        if "out_dtype" in kwargs:
            raise TypeError("mm() got an unexpected keyword argument 'out_dtype'")
        return real_mm(*args, **kwargs)

    contrastive.mm_has_out_dtype.cache_clear()
    monkeypatch.setattr(torch, "mm", old_mm)
    try:
        assert not contrastive.mm_has_out_dtype()
    finally:
        contrastive.mm_has_out_dtype.cache_clear()
    monkeypatch.undo()
    assert contrastive.mm_has_out_dtype()
