"""ContrastiveLoss on CPU against open_clip's ClipLoss and an fp64 reference; the parity
tests run on both CPU implementations (the C++ ops and the torch code: `cpu_backend`)."""
import math

import pytest
import torch

from clip_fast import ContrastiveLoss
from clip_fast.contrastive_ops import lse_stats, logit_grads
from tests.support.loss_reference import assert_matches, blockwise_floor, loss_and_grads, make_inputs, max_err, open_clip_loss, term_magnitudes

SCALE_BIAS_NORM = [
    (scale, bias, normalized)
    for scale in (1.0, 14.3, 100.0)
    for bias in (None, -10.0)
    for normalized in (True, False)
]


@pytest.mark.parametrize("B", [1, 2, 3, 17, 128, 1000])
@pytest.mark.parametrize("D", [1, 7, 64, 512, 1152])
def test_fp32_matches_open_clip_and_fp64(B, D, cpu_backend):
    ours_fn = ContrastiveLoss()
    for scale, bias, normalized in SCALE_BIAS_NORM:
        image, text = make_inputs(B, D, torch.float32, normalized)
        loss, grads = loss_and_grads(ours_fn, image, text, scale, bias)
        oc_loss, oc_grads = loss_and_grads(open_clip_loss, image, text, scale, bias)
        ref_loss, ref_grads = loss_and_grads(open_clip_loss, image, text, scale, bias, dtype=torch.float64)
        case = f"B={B} D={D} scale={scale} bias={bias} normalized={normalized}"
        mags = term_magnitudes(image, text, scale)
        # fp32: ~1e-5 relative to the terms (the logsumexp is rounded to fp32 at the
        # logits' magnitude, up to 100 here, before exp(S - lse) is taken).
        assert_matches(loss, oc_loss, ref_loss, 1e-5, f"loss {case}", mags[0])
        grad_floor = blockwise_floor(1e-5, mags[0])
        for name, g, oc, ref, mag in zip(("d_image", "d_text", "d_scale"), grads, oc_grads, ref_grads, mags[1:]):
            assert_matches(g, oc, ref, grad_floor, f"{name} {case}", mag)
        if bias is not None:
            assert grads[3] is not None and torch.equal(grads[3], torch.zeros_like(grads[3]))


@pytest.mark.parametrize("B,D", [(3, 7), (128, 64), (257, 512)])
@pytest.mark.parametrize("bias", [None, 3.0])
def test_bf16_by_the_two_x_rule(B, D, bias, cpu_backend):
    image, text = make_inputs(B, D, torch.bfloat16, normalized=True)
    loss, grads = loss_and_grads(ContrastiveLoss(), image, text, 50.0, bias)
    oc_loss, oc_grads = loss_and_grads(open_clip_loss, image, text, 50.0, bias)
    ref_loss, ref_grads = loss_and_grads(open_clip_loss, image, text, 50.0, bias, dtype=torch.float64)
    mags = term_magnitudes(image, text, 50.0)
    assert_matches(loss, oc_loss, ref_loss, 1e-6, "loss", mags[0])
    grad_floor = blockwise_floor(1e-6, mags[0])
    for name, g, oc, ref, mag in zip(("d_image", "d_text", "d_scale"), grads, oc_grads, ref_grads, mags[1:]):
        assert_matches(g, oc, ref, grad_floor, name, mag)


def test_fp64_gradcheck():
    image, text = make_inputs(5, 6, torch.float64, normalized=False)
    scale = torch.tensor(3.0, dtype=torch.float64)
    bias = torch.tensor(-1.0, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (image, text, scale, bias)]
    assert torch.autograd.gradcheck(lambda i, t, s, b: ContrastiveLoss()(i, t, s, b), leaves)


def test_blockwise_chunking_is_exact(monkeypatch):
    """Many small row chunks give the same statistics as one chunk."""
    image, text = make_inputs(70, 33, torch.float64, normalized=False)
    scale, bias = torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    row_full, col_full = lse_stats(image, text, scale, bias)
    g_text_full, g_image_full, _ = logit_grads(image, text, scale, bias, row_full, col_full)
    monkeypatch.setattr("clip_fast.contrastive_ops.CPU_BLOCK_ELEMENTS", 3 * 70)  # 3-row chunks
    row, col = lse_stats(image, text, scale, bias)
    g_text, g_image, _ = logit_grads(image, text, scale, bias, row, col)
    logits = scale * image @ text.T + bias
    torch.testing.assert_close(row, logits.logsumexp(1))
    torch.testing.assert_close(col, logits.logsumexp(0))
    torch.testing.assert_close(row, row_full)
    torch.testing.assert_close(g_text, g_text_full)
    torch.testing.assert_close(g_image, g_image_full)


def test_rectangular_blocks_match_dense_math():
    """lse_stats/logit_grads on an M x N block (the distributed loss's row shard)."""
    g = torch.Generator().manual_seed(3)
    image = torch.randn(13, 20, generator=g, dtype=torch.float64)
    text = torch.randn(40, 20, generator=g, dtype=torch.float64)
    scale, bias = torch.tensor(4.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    logits = scale * image @ text.T + bias
    row, col = lse_stats(image, text, scale, bias)
    torch.testing.assert_close(row, logits.logsumexp(1))
    torch.testing.assert_close(col, logits.logsumexp(0))
    labels = torch.zeros_like(logits)
    labels[torch.arange(13), torch.arange(13) + 20] = 1.0  # this shard's labels start at column 20
    g = (logits - row[:, None]).exp() + (logits - col[None, :]).exp() - 2 * labels
    g_text, g_image, g_dot = logit_grads(image, text, scale, bias, row, col, diag_offset=20)
    torch.testing.assert_close(g_dot, (g * (image @ text.T)).sum())
    torch.testing.assert_close(g_text, g @ text)
    torch.testing.assert_close(g_image, g.T @ image)
    # split mode: each softmax with its own side (open_clip's local loss without gathered grads)
    g_row = (logits - row[:, None]).exp() - labels
    g_col = (logits - col[None, :]).exp() - labels
    g_text, g_image, g_dot = logit_grads(image, text, scale, bias, row, col, diag_offset=20, split=True)
    torch.testing.assert_close(g_dot, (g_row * (image @ text.T)).sum())
    torch.testing.assert_close(g_text, g_row @ text)
    torch.testing.assert_close(g_image, g_col.T @ image)


@pytest.mark.parametrize("spread", [1.0, 200.0], ids=["shared-shift", "per-direction-shift"])
def test_split_mode_fp32_blocks_match_fp64(monkeypatch, spread):
    """Split mode on fp32 over several row chunks, in both exponentiation branches (a
    block whose logits span more than _SHARED_SHIFT_RANGE takes the second)."""
    monkeypatch.setattr("clip_fast.contrastive_ops.CPU_BLOCK_ELEMENTS", 7 * 50)  # 7-row chunks of a 33 x 50 block
    g = torch.Generator().manual_seed(5)
    image = torch.randn(33, 16, generator=g, dtype=torch.float64)
    image = image * torch.linspace(0.1, spread, 33, dtype=torch.float64)[:, None] / image.norm(dim=1, keepdim=True)
    text = torch.nn.functional.normalize(torch.randn(50, 16, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(3.0, dtype=torch.float64)
    logits = scale * image @ text.T
    row, col = logits.logsumexp(1), logits.logsumexp(0)
    labels = torch.zeros_like(logits)
    labels[torch.arange(33), torch.arange(33) + 4] = 1.0
    g_row = (logits - row[:, None]).exp() - labels
    g_col = (logits - col[None, :]).exp() - labels
    g_text, g_image, g_dot = logit_grads(
        image.float(), text.float(), scale.float(), None, row.float(), col.float(), diag_offset=4, split=True
    )
    # each softmax entry is good to ~2^-24 * max|S| relative (blockwise_floor), so each
    # result to that times the sum of its terms' magnitudes
    rel = blockwise_floor(1e-6, logits.abs().max().item())
    dots = image @ text.T
    torch.testing.assert_close(g_text.double(), g_row @ text, rtol=0, atol=rel * (g_row.abs() @ text.abs()).max().item())
    torch.testing.assert_close(g_image.double(), g_col.T @ image, rtol=0, atol=rel * (g_col.abs().T @ image.abs()).max().item())
    torch.testing.assert_close(g_dot.double(), (g_row * dots).sum(), rtol=0, atol=rel * (g_row.abs() * dots.abs()).sum().item())


def test_output_dict_and_python_float_scale():
    image, text = make_inputs(9, 8, torch.float32, normalized=True)
    out = ContrastiveLoss()(image, text, 10.0, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    expected = open_clip_loss(image, text, torch.tensor(10.0))
    assert math.isclose(out["contrastive_loss"].item(), expected.item(), rel_tol=1e-5)


def test_logit_bias_gradient_is_exactly_zero_not_none():
    image, text = make_inputs(6, 4, torch.float32, normalized=True)
    bias = torch.tensor(-5.0, requires_grad=True)
    ContrastiveLoss()(image, text, torch.tensor(7.0), bias).backward()
    assert bias.grad is not None and bias.grad.item() == 0.0


def test_loss_dtype_and_deterministic_flag():
    image, text = make_inputs(33, 16, torch.bfloat16, normalized=True)
    a = ContrastiveLoss()(image, text, torch.tensor(20.0))
    b = ContrastiveLoss(deterministic=True)(image, text, torch.tensor(20.0))
    assert a.dtype == torch.float32  # reduced in fp32 even for half inputs
    assert torch.equal(a, b)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["image", "text"])
def test_non_finite_inputs_give_nan_loss(poison, where, cpu_backend):
    image, text = make_inputs(8, 5, torch.float32, normalized=True)
    target = image if where == "image" else text
    target[3, 2] = poison
    loss = ContrastiveLoss()(image, text, torch.tensor(10.0))
    assert math.isnan(loss.item())


def test_nan_scale_gives_nan_loss(cpu_backend):
    image, text = make_inputs(8, 5, torch.float32, normalized=True)
    assert math.isnan(ContrastiveLoss()(image, text, torch.tensor(float("nan"))).item())


@pytest.mark.parametrize(
    "image_shape,text_shape,match",
    [
        ((4, 8), (5, 8), "same shape"),
        ((4, 8), (4, 7), "same shape"),
        ((4, 8, 1), (4, 8, 1), "2-D"),
        ((8,), (8,), "2-D"),
        ((4, 0), (4, 0), "dim >= 1"),  # B = 0 is allowed: NaN, as open_clip (test_loss_open_clip_differences)
    ],
)
def test_bad_shapes_raise(image_shape, text_shape, match):
    with pytest.raises(ValueError, match=match):
        ContrastiveLoss()(torch.randn(image_shape), torch.randn(text_shape), torch.tensor(1.0))


def test_bad_dtypes_and_scale_raise():
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="the same dtype"):
        ContrastiveLoss()(image, text.double(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="image_features must be fp16, bf16, fp32 or fp64"):
        ContrastiveLoss()(image.int(), text.int(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        ContrastiveLoss()(image, text, torch.ones(2))
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        ContrastiveLoss()(image, text, torch.tensor(1.0), torch.ones(3))
    with pytest.raises(TypeError, match="image_features must be a torch.Tensor"):
        ContrastiveLoss()(image.numpy(), text, torch.tensor(1.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_mixed_devices_raise():
    with pytest.raises(ValueError, match="the same device"):
        ContrastiveLoss()(torch.randn(4, 8), torch.randn(4, 8, device="cuda"), torch.tensor(1.0))


def test_mixed_devices_raise_on_meta():
    with pytest.raises(ValueError, match="the same device"):
        ContrastiveLoss()(torch.randn(4, 8), torch.randn(4, 8, device="meta"), torch.tensor(1.0))


def test_open_clip_constructor_signature_is_accepted():
    loss_fn = ContrastiveLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1, use_horovod=False)
    image, text = make_inputs(5, 3, torch.float32, normalized=True)
    assert max_err(loss_fn(image, text, torch.tensor(2.0)), open_clip_loss(image, text, torch.tensor(2.0))) < 1e-6


def test_horovod_is_refused_not_ignored():
    image, text = make_inputs(4, 3, torch.float32, normalized=True)
    with pytest.raises(NotImplementedError, match="horovod"):
        ContrastiveLoss(world_size=2, use_horovod=True)(image, text, torch.tensor(2.0))
