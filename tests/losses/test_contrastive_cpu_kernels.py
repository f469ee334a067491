"""The C++ block kernels of the CPU contrastive loss (csrc/contrastive_cpu.cpp) against the
torch block functions they replace (clip_fast/contrastive_torch.py) and fp64 math: the vectorised
exponential, the row/column logsumexp of a block and the two backward block forms, on odd
shapes, both shift regimes (shared and per-direction) and non-finite logits."""
import math

import pytest
import torch

from clip_fast import ContrastiveLoss
from clip_fast import contrastive_cpp, contrastive_ops, contrastive_torch
from clip_fast._backend import CONTRASTIVE, select_backend
from clip_fast._ext import load_extension

pytestmark = pytest.mark.skipif(load_extension() is None, reason="C++ extension unavailable")

SHAPES = [(1, 1), (1, 37), (29, 1), (3, 7), (5, 33), (16, 16), (64, 1000), (257, 300)]
# Logit spreads: the first two stay within SHARED_SHIFT_RANGE (one shared exponential),
# the last spans more and takes the per-direction path.
SPREADS = [1.0, 12.0, 40.0]


def _ops():
    return torch.ops.clip_fast


def _block(shape, spread, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * spread).contiguous()


def _ulp32(ref: torch.Tensor) -> torch.Tensor:
    """Spacing of fp32 numbers at |ref| (fp64), 2^-149 in the subnormal range."""
    mag = ref.abs().clamp_min(2.0**-126)
    exponent = torch.floor(torch.log2(mag))
    return torch.exp2(exponent - 23).clamp_min(2.0**-149)


def test_kernels_are_dispatched_for_fp32_and_not_for_fp64_or_torch_backend(monkeypatch):
    x = torch.zeros(4, 4)
    assert select_backend(CONTRASTIVE, x) == "cpp"
    assert select_backend(CONTRASTIVE, x.bfloat16()) == "cpp"  # blocks are computed in fp32
    assert select_backend(CONTRASTIVE, x.double()) == "torch"
    monkeypatch.setenv("CLIP_FAST_BACKEND", "torch")
    assert select_backend(CONTRASTIVE, x) == "torch"


def test_non_contiguous_features_give_the_torch_paths_statistics(monkeypatch):
    # the kernels only ever see the contiguous blocks the host loop allocates
    g = torch.Generator().manual_seed(2)
    image, text = torch.randn(13, 20, generator=g)[:, ::2], torch.randn(10, 11, generator=g).t()  # (13, 10), (11, 10)
    assert not image.is_contiguous() and not text.is_contiguous()
    scale = torch.tensor(3.0)
    kernel = contrastive_ops.lse_stats(image, text, scale, None)
    monkeypatch.setenv("CLIP_FAST_BACKEND", "torch")
    for k, t in zip(kernel, contrastive_ops.lse_stats(image, text, scale, None)):
        torch.testing.assert_close(k, t, rtol=4e-6, atol=4e-6)


def test_exp_is_within_two_ulp_of_fp64_everywhere():
    g = torch.Generator().manual_seed(1)
    grid = torch.linspace(-110.0, 90.0, 400_003)
    rand = (torch.rand(200_000, generator=g) * 200 - 110).float()
    small = torch.randn(100_000, generator=g) * 1e-3
    edges = torch.tensor(
        [0.0, -0.0, 1e-30, -1e-30, 0.34657359, -0.34657359, 88.72, 88.7228, 88.73, -87.33, -87.34, -100.0,
         -103.0, -103.27, -103.28, -103.97, -104.0, -105.0, -1e30, 1e30]
    )
    x = torch.cat([grid, rand, small, edges]).contiguous()
    y = _ops().contrastive_exp(x).double()
    ref = torch.exp(x.double())
    finite = torch.isfinite(ref.float())
    err = ((y - ref).abs() / _ulp32(ref))[finite]
    assert err.max().item() <= 2.0, f"max error {err.max().item():.2f} ulp at x={x[finite][err.argmax()].item()}"
    # Overflow and underflow: inf above ~88.72, exactly 0 below ~-103.97 (as torch.exp).
    over = ~finite & (x > 0)
    assert over.any() and torch.isinf(y[over]).all()
    assert (y[x < -104.0] == 0).all()
    # Subnormal results are produced (gradual underflow, not flushed to zero).
    assert (y[(x > -100) & (x < -90)] > 0).all()


def test_exp_special_values():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1.0])
    y = _ops().contrastive_exp(x)
    assert torch.isnan(y[0]) and y[1] == float("inf") and y[2] == 0.0 and y[3] == 1.0
    assert y[4].item() == pytest.approx(math.e, rel=2**-23)


@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("shape", SHAPES)
def test_block_lse_matches_torch_and_fp64(shape, spread):
    x = _block(shape, spread)
    ref_row, ref_col = torch.logsumexp(x.double(), 1), torch.logsumexp(x.double(), 0)
    t_row, t_col = contrastive_torch.block_lse(x.clone())
    k_row, k_col = contrastive_cpp.block_lse(x.clone())
    for k, t, ref in ((k_row, t_row, ref_row), (k_col, t_col, ref_col)):
        assert k.dtype == torch.float32 and k.shape == ref.shape
        torch.testing.assert_close(k.double(), ref, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(k, t, rtol=4e-6, atol=4e-6)


def test_block_lse_kernel_reports_the_shift_regime_like_the_torch_rule():
    narrow, wide = _block((40, 50), 5.0), _block((40, 50), 5.0)
    wide[3, 7] = 200.0  # row 3 and column 7 fine, every other row more than 64 below the top
    assert _ops().contrastive_block_lse(narrow, contrastive_torch.SHARED_SHIFT_RANGE)[2] is True
    assert _ops().contrastive_block_lse(wide, contrastive_torch.SHARED_SHIFT_RANGE)[2] is False
    # The kernel reads the block only: the per-direction fallback sees intact logits.
    before = wide.clone()
    _ops().contrastive_block_lse(wide, contrastive_torch.SHARED_SHIFT_RANGE)
    assert torch.equal(wide, before)
    k_row, k_col = contrastive_cpp.block_lse(wide.clone())
    torch.testing.assert_close(k_row.double(), torch.logsumexp(wide.double(), 1))
    torch.testing.assert_close(k_col.double(), torch.logsumexp(wide.double(), 0))


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_block_lse_non_finite_logits_propagate_as_in_torch(poison):
    x = _block((9, 21), 3.0)
    x[4, 10] = poison
    t_row, t_col = contrastive_torch.block_lse(x.clone())
    k_row, k_col = contrastive_cpp.block_lse(x.clone())
    torch.testing.assert_close(k_row, t_row, equal_nan=True)
    torch.testing.assert_close(k_col, t_col, equal_nan=True)
    if poison != -float("inf"):
        assert not torch.isfinite(k_row[4]) and not torch.isfinite(k_col[10])
    # A whole row of -inf: its lse is -inf, the others stay finite.
    y = _block((6, 17), 2.0)
    y[2] = -float("inf")
    k_row, k_col = contrastive_cpp.block_lse(y.clone())
    assert k_row[2] == -float("inf") and torch.isfinite(k_row[[0, 1, 3, 4, 5]]).all() and torch.isfinite(k_col).all()


def _lse_pair(x):
    """fp32 row and column lse of the whole block, as the loss passes them."""
    return torch.logsumexp(x.double(), 1).float(), torch.logsumexp(x.double(), 0).float()


@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("shape", SHAPES)
def test_block_grad_matches_torch_and_fp64(shape, spread):
    x = _block(shape, spread, seed=3)
    row, col = _lse_pair(x)
    ref = torch.exp(x.double() - row.double()[:, None]) + torch.exp(x.double() - col.double()[None, :])
    t = contrastive_torch.block_grad(x.clone(), row, col, torch.empty_like(x))
    logits = x.clone()
    k = contrastive_cpp.block_grad(logits, row, col, torch.empty_like(x))
    assert k.data_ptr() == logits.data_ptr()  # G over S: no second block
    torch.testing.assert_close(k.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(k, t, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("shape", SHAPES)
def test_block_softmaxes_match_torch_and_fp64(shape, spread):
    x = _block(shape, spread, seed=4)
    row, col = _lse_pair(x)
    ref_row = torch.exp(x.double() - row.double()[:, None])
    ref_col = torch.exp(x.double() - col.double()[None, :])
    t_row, t_col = contrastive_torch.block_softmaxes(x.clone(), row, col, torch.empty_like(x))
    k_row, k_col = contrastive_cpp.block_softmaxes(x.clone(), row, col, torch.empty_like(x))
    for k, t, ref in ((k_row, t_row, ref_row), (k_col, t_col, ref_col)):
        torch.testing.assert_close(k.double(), ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(k, t, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["logits", "row_lse", "col_lse"])
def test_backward_blocks_non_finite_values_propagate_as_in_torch(poison, where):
    x = _block((7, 19), 3.0, seed=5)
    row, col = _lse_pair(x)
    if where == "logits":
        x[3, 5] = poison
    elif where == "row_lse":
        row[3] = poison
    else:
        col[5] = poison
    t = contrastive_torch.block_grad(x.clone(), row, col, torch.empty_like(x))
    k = contrastive_cpp.block_grad(x.clone(), row, col, torch.empty_like(x))
    torch.testing.assert_close(k, t, equal_nan=True)
    assert torch.equal(torch.isnan(k), torch.isnan(t)) and torch.equal(torch.isinf(k), torch.isinf(t))
    for k_part, t_part in zip(
        contrastive_cpp.block_softmaxes(x.clone(), row, col, torch.empty_like(x)),
        contrastive_torch.block_softmaxes(x.clone(), row, col, torch.empty_like(x)),
    ):
        torch.testing.assert_close(k_part, t_part, equal_nan=True)


def test_kernel_checks_its_arguments():
    x = torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match="float32"):
        _ops().contrastive_block_lse(x.double(), 64.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        _ops().contrastive_block_lse(x.t(), 64.0)
    with pytest.raises(RuntimeError, match="col_lse"):
        _ops().contrastive_block_grad(x, torch.zeros(3), torch.zeros(5), 64.0)


@pytest.mark.parametrize("split", [False, True])
def test_lse_stats_and_logit_grads_match_the_torch_path(monkeypatch, split):
    """Whole forward/backward statistics over several chunks (ragged last chunk)."""
    monkeypatch.setattr(contrastive_ops, "CPU_BLOCK_ELEMENTS", 64 * 150)
    g = torch.Generator().manual_seed(6)
    image = torch.nn.functional.normalize(torch.randn(150, 24, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(150, 24, generator=g), dim=-1)
    scale, bias = torch.tensor(20.0), torch.tensor(-3.0)
    row_k, col_k = contrastive_ops.lse_stats(image, text, scale, bias)
    grads_k = contrastive_ops.logit_grads(image, text, scale, bias, row_k, col_k, 0, split=split)
    monkeypatch.setenv("CLIP_FAST_BACKEND", "torch")
    row_t, col_t = contrastive_ops.lse_stats(image, text, scale, bias)
    grads_t = contrastive_ops.logit_grads(image, text, scale, bias, row_t, col_t, 0, split=split)
    torch.testing.assert_close(row_k, row_t, rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(col_k, col_t, rtol=1e-6, atol=2e-6)
    for a, b in zip(grads_k, grads_t):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_full_loss_with_kernels_matches_open_clip():
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(7)
    feats = [torch.nn.functional.normalize(torch.randn(333, 40, generator=g), dim=-1) for _ in range(2)]
    ours = [f.clone().requires_grad_() for f in feats]
    ref = [f.double().requires_grad_() for f in feats]
    loss = ContrastiveLoss()(ours[0], ours[1], torch.tensor(30.0))
    loss.backward()
    ref_loss = ClipLoss()(ref[0], ref[1], torch.tensor(30.0, dtype=torch.float64))
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-7)
