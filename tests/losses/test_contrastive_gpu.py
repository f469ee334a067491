"""ContrastiveLoss on a CUDA device: the Triton kernels at realistic sizes (skipped without CUDA)."""
import pytest
import torch

from clip_fast import ContrastiveLoss
from tests.support.loss_reference import assert_matches, blockwise_floor, loss_and_grads, make_inputs, open_clip_loss, term_magnitudes

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


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype,backward", [(torch.float32, "fused"), (torch.bfloat16, "fused"), (torch.bfloat16, "strips")])
def test_rectangular_shard_gradients_on_gpu(monkeypatch, split, deterministic, dtype, backward):
    """The distributed loss's (b x B) row block with a label offset, in every backward mode
    (the strip backward over several strips: its cuBLAS GEMMs only run on a GPU)."""
    from clip_fast.kernels import contrastive
    from clip_fast.contrastive_ops import logit_grads, lse_stats

    monkeypatch.setenv("CLIP_FAST_CONTRASTIVE_BACKWARD", backward)
    monkeypatch.setattr(contrastive, "STRIP_MIN_ROWS", 128)
    monkeypatch.setattr(contrastive, "STRIP_ENTRIES", 300 * 4000)  # 384-row strips, ragged last
    monkeypatch.setattr(contrastive, "STRIP_TALL_ROWS", 0)

    M, N, D, offset = 1000, 4000, 512, 2000
    g = torch.Generator(device="cuda").manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(M, D, device="cuda", generator=g), dim=-1).to(dtype)
    text = torch.nn.functional.normalize(torch.randn(N, D, device="cuda", generator=g), dim=-1).to(dtype)
    scale, bias = torch.tensor(50.0, device="cuda"), torch.tensor(-3.0, device="cuda")
    row, col = lse_stats(image, text, scale, bias)
    dots = image.double() @ text.double().T
    logits = 50.0 * dots - 3.0
    torch.testing.assert_close(row.double(), logits.logsumexp(1), rtol=0, atol=1e-4)
    torch.testing.assert_close(col.double(), logits.logsumexp(0), rtol=0, atol=1e-4)
    labels = torch.zeros_like(logits)
    labels[torch.arange(M), torch.arange(M) + offset] = 1.0
    p_row, p_col = (logits - row.double()[:, None]).exp(), (logits - col.double()[None, :]).exp()
    g_row = p_row - labels if split else p_row + p_col - 2 * labels
    g_col = p_col - labels if split else g_row
    g_text, g_image, g_dot = logit_grads(image, text, scale, bias, row, col, offset, deterministic, split=split)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # G is rounded to bf16 before its products
    torch.testing.assert_close(g_text.double(), g_row @ text.double(), rtol=0, atol=tol * (g_row.abs() @ text.double().abs()).max().item())
    torch.testing.assert_close(g_image.double(), g_col.T @ image.double(), rtol=0, atol=tol * (g_col.abs().T @ image.double().abs()).max().item())
    torch.testing.assert_close(g_dot.double(), (g_row * dots).sum(), rtol=0, atol=1e-4 * (g_row.abs() * dots.abs()).sum().item())


def test_strip_backward_is_bitwise_reproducible_and_the_default_at_scale():
    from clip_fast.kernels import contrastive

    image, text = make_inputs(8192, 512, torch.bfloat16, normalized=True, device="cuda")
    assert contrastive.prefer_strips(image, 8192, 8192)
    first = loss_and_grads(ContrastiveLoss(), image, text, 50.0, None)
    second = loss_and_grads(ContrastiveLoss(), image, text, 50.0, None)
    for a, b in zip([first[0]] + first[1][:3], [second[0]] + second[1][:3]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("M,N,D", [(256, 65536, 512), (200, 30001, 100)])
def test_sharded_shape_splits_columns_and_matches_fp64(M, N, D, deterministic):
    """The sharded loss's rank block (M = local batch << N = global batch): the grids split
    the columns over the SMs, and the merged statistics and gradients match fp64 math."""
    from clip_fast.kernels import contrastive
    from clip_fast.contrastive_ops import logit_grads, lse_stats

    g = torch.Generator(device="cuda").manual_seed(1)
    image = torch.nn.functional.normalize(torch.randn(M, D, device="cuda", generator=g), dim=-1).bfloat16()
    text = torch.nn.functional.normalize(torch.randn(N, D, device="cuda", generator=g), dim=-1).bfloat16()
    cfg = contrastive.block_config(torch.bfloat16, D, "fwd", contrastive.is_aligned(image, text))
    splits, _ = contrastive.column_splits(-(-M // cfg["BLOCK_M"]), N, cfg["BLOCK_N"], image.device, programs_per_sm=2)
    assert splits >= 8
    scale = torch.tensor(30.0, device="cuda")
    row, col = lse_stats(image, text, scale, None)
    dots = image.double() @ text.double().T
    logits = 30.0 * dots
    torch.testing.assert_close(row.double(), logits.logsumexp(1), rtol=0, atol=1e-4)
    torch.testing.assert_close(col.double(), logits.logsumexp(0), rtol=0, atol=1e-4)
    offset = N // 2
    labels = torch.zeros_like(logits)
    labels[torch.arange(M), torch.arange(M) + offset] = 1.0
    G = (logits - row.double()[:, None]).exp() + (logits - col.double()[None, :]).exp() - 2 * labels
    g_text, g_image, g_dot = logit_grads(image, text, scale, None, row, col, offset, deterministic)
    # G is rounded to bf16 (relative 2^-9) before its products, accumulated in fp32
    torch.testing.assert_close(g_text.double(), G @ text.double(), rtol=0, atol=1e-2 * (G.abs() @ text.double().abs()).max().item())
    torch.testing.assert_close(g_image.double(), G.T @ image.double(), rtol=0, atol=1e-2 * (G.abs().T @ image.double().abs()).max().item())
    torch.testing.assert_close(g_dot.double(), (G * dots).sum(), rtol=0, atol=1e-4 * (G.abs() * dots.abs()).sum().item())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_every_triton_launcher_runs_on_its_tensors_device_not_the_current_one():
    """Tensors on cuda:1 while cuda:0 is current: Triton launches on the current device
    unless the launcher switches to the tensors' one (an illegal access, or a read not
    ordered with cuda:1's stream). Each launcher must give what it gives with cuda:1
    current (deterministic modes: bitwise), and leave cuda:0 current."""
    from clip_fast.kernels import attention_pool, contrastive, siglip

    def run_all(dev):
        g = torch.Generator(device=dev).manual_seed(3)
        a = torch.nn.functional.normalize(torch.randn(300, 64, device=dev, generator=g), dim=-1).bfloat16()
        b = torch.nn.functional.normalize(torch.randn(500, 64, device=dev, generator=g), dim=-1).bfloat16()
        scale = torch.tensor([20.0], device=dev)
        row, col = contrastive.lse_forward(a, b, scale, None)
        out = [row, col]
        out += contrastive.grad_backward(a, b, scale, None, row, col, deterministic=True, strips=False)
        out += contrastive.grad_backward(a, b, scale, None, row, col, strips=True)
        d_a, d_b = siglip.grad_buffer(300, 64, a.device), siglip.grad_buffer(500, 64, a.device)
        out.append(siglip.siglip_block(a, b, torch.tensor([10.0, -10.0], device=dev), d_a, d_b, False, 1 / 500))
        x = torch.randn(4, 49, 256, device=dev, generator=g).bfloat16()
        t0, pos = torch.randn(4, 256, device=dev, generator=g).bfloat16(), torch.randn(49, 256, device=dev, generator=g).bfloat16()
        u = (torch.randn(4, 8, 256, device=dev, generator=g) / 16).bfloat16()
        z, lse = attention_pool.attention_pool_forward(x, t0, pos, u)
        out += [z, lse, *attention_pool.attention_pool_backward(x, t0, pos, u, lse, torch.ones_like(z))]
        torch.cuda.synchronize(dev)
        return out, (d_a, d_b)

    with torch.cuda.device(1):
        expected, expected_sig = run_all("cuda:1")
    torch.cuda.set_device(0)
    got, got_sig = run_all("cuda:1")
    assert torch.cuda.current_device() == 0
    for a, b in zip(got, expected):
        assert a.device == torch.device("cuda:1") and torch.equal(a, b)
    for a, b in zip(got_sig, expected_sig):  # fp32 atomics: summation order may differ
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
