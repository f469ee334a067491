"""The contrastive Triton kernels under Triton's interpreter (CPU tensors).

Run in its own process with TRITON_INTERPRET=1 CLIP_FAST_BACKEND=triton (see conftest).
"""
import itertools
import math

import pytest
import torch

from clip_fast import ContrastiveLoss
from clip_fast.kernels import contrastive
from tests.support.loss_reference import assert_matches, blockwise_floor, loss_and_grads, make_inputs, open_clip_loss, term_magnitudes

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
    _check_rectangular(image, text, offset=2 if N > M else -1, dtype=dtype)


def _check_rectangular(image, text, offset, dtype):
    """lse_forward and grad_backward (atomic/deterministic x joint/split softmax) of
    S = 30 * image @ text.T - 3 with labels at column i + offset, against fp64 math."""
    M, N = image.shape[0], text.shape[0]
    scale, bias = torch.tensor([30.0]), torch.tensor([-3.0])
    logits = 30.0 * image.double() @ text.double().T - 3.0
    row, col = contrastive.lse_forward(image, text, scale, bias)
    torch.testing.assert_close(row.double(), logits.logsumexp(1), rtol=0, atol=2e-5)
    torch.testing.assert_close(col.double(), logits.logsumexp(0), rtol=0, atol=2e-5)
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
@pytest.mark.parametrize("tall", [False, True])
def test_strip_backward_matches_dense_math_and_fused_kernel(monkeypatch, M, N, D, offset, dtype, split, tall):
    """The strip backward (Triton G strips + GEMMs) over several strips with a ragged last
    one: the same G products as fp64 math, and as the fused kernel to bf16 rounding.
    Strips of one 64-row tile, or (tall) the large-N rule at a small scale: 128-row
    strips, the most whose workspace fits STRIP_MAX_ENTRIES."""
    monkeypatch.setattr(contrastive, "STRIP_ENTRIES", 1)
    monkeypatch.setattr(contrastive, "STRIP_MIN_ROWS", 1)
    monkeypatch.setattr(contrastive, "STRIP_TALL_ROWS", 128 if tall else 0)
    planes = 2 if split else 1
    monkeypatch.setattr(contrastive, "STRIP_MAX_ENTRIES", 128 * N * planes + N - 1)
    assert contrastive.strip_rows(M, N, 64, planes) == (min(128, -(-M // 64) * 64) if tall else 64)
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
    monkeypatch.setattr(contrastive, "STRIP_TALL_ROWS", 0)
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


def test_strip_rows_grow_at_large_n_within_the_workspace_bound():
    """Taller strips at large N (fewer (N, D) accumulations into grad_b), the workspace
    still bounded: rows * N * planes <= STRIP_MAX_ENTRIES unless the minimum rows apply."""
    for N in (1 << 12, 1 << 15, 1 << 18, 1 << 20, 1 << 22):
        for planes in (1, 2):
            rows = contrastive.strip_rows(1 << 20, N, 128, planes)
            assert rows % 128 == 0 and rows >= contrastive.STRIP_MIN_ROWS
            assert rows * N * planes <= max(contrastive.STRIP_MAX_ENTRIES, contrastive.STRIP_ENTRIES, contrastive.STRIP_MIN_ROWS * N * planes)
            if contrastive.STRIP_TALL_ROWS * N * planes <= contrastive.STRIP_MAX_ENTRIES:
                assert rows >= contrastive.STRIP_TALL_ROWS
    # N = 256k (the case): 4096-row strips, 4x fewer than the old 1024
    assert contrastive.strip_rows(1 << 18, 1 << 18, 128) == 4096
    assert contrastive.strip_rows(100, 1 << 18, 128) == 128  # never (much) more than M


@pytest.mark.parametrize("sms,expected", [(132, (128, 512)), (1, (1, 65536))])
def test_column_split_count_follows_the_sm_count(monkeypatch, sms, expected):
    """The sharded shape M = 256, N = 65,536: 2 row blocks of 128 alone would occupy 2
    of 132 SMs; the column splits bring the grid to ~2 programs per SM, splits ending on
    tile boundaries and covering N exactly once."""
    monkeypatch.setattr(contrastive, "_sm_count", lambda device: sms)
    splits, cols = contrastive.column_splits(2, 65536, 128, torch.device("cuda"), programs_per_sm=2)
    assert (splits, cols) == expected
    assert cols % 128 == 0 and (splits - 1) * cols < 65536 <= splits * cols


@pytest.mark.parametrize("M,N,D", [(37, 301, 19), (3, 517, 33), (130, 389, 65)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sms", [1, 3, 7])
def test_column_splits_merge_to_the_fp64_statistics_and_gradients(monkeypatch, M, N, D, dtype, sms):
    """Forward and fused backward with the columns split over programs (odd M, N, D; N
    not a multiple of splits * BLOCK_N, so the last split and its last tile are ragged):
    the per-split row logsumexps and grad_a slices merge to fp64 math, in atomic,
    deterministic and split-softmax modes."""
    monkeypatch.setattr(contrastive, "_sm_count", lambda device: sms)
    g = torch.Generator().manual_seed(M + N + D + sms)
    image = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=-1).to(dtype)
    text = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1).to(dtype)
    fwd = contrastive.block_config(dtype, D, "fwd", contrastive.is_aligned(image, text))
    row_programs = -(-M // fwd["BLOCK_M"])
    splits, cols = contrastive.column_splits(row_programs, N, fwd["BLOCK_N"], image.device, 2)
    if sms > 1:
        assert splits > 1 and N % cols != 0  # the ragged multi-split case runs
    _check_rectangular(image, text, offset=5, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_past_2_to_the_31_elements(dtype):
    """int64 row offsets: feature rows 16,777,232 elements apart, so rows 128.. lie past
    2^31 elements from the base pointer (row * stride wraps in int32) while offsets
    inside a 128-row tile stay below 2^31. The view lives in a 2^31 + ~9M element buffer
    of which only the rows used are ever touched (the rest is never-faulted virtual
    memory). The kernels must read exactly what they read from a contiguous copy: a
    wrapped 32-bit offset would read another address (or fault). Covers lse_forward and
    both backward launches (the deterministic one reads the strided side as columns)."""
    M, N, D, stride = 130, 70, 16, (1 << 24) + 16
    big = torch.empty(stride * (M - 1) + D, dtype=dtype)
    g = torch.Generator().manual_seed(31)
    rows = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=-1).to(dtype)
    image = big.as_strided((M, D), (stride, 1))
    image.copy_(rows)
    text = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1).to(dtype)
    assert image.stride(0) * (M - 1) >= 1 << 31 and contrastive.is_aligned(image, text)
    scale = torch.tensor([20.0])
    strided = contrastive.lse_forward(image, text, scale, None)
    copied = contrastive.lse_forward(rows, text, scale, None)
    for a, b in zip(strided, copied):
        assert torch.equal(a, b)
    for deterministic in (False, True):
        got = contrastive.grad_backward(image, text, scale, None, *copied, deterministic=deterministic)
        want = contrastive.grad_backward(rows, text, scale, None, *copied, deterministic=deterministic)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
