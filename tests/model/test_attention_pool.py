"""Attention pooling of the ModifiedResNet: the restructured computation (projections moved
off the tokens) against the plain reference and open_clip's AttentionPool2d, values and
gradients, on the torch (CPU) path; the fused Triton kernels on a GPU (marked)."""
import copy

import pytest
import torch
from open_clip.modified_resnet import AttentionPool2d as OpenClipAttentionPool2d

from clip_fast.model.attention_pool import (
    AttentionPool2d,
    attention_pool_core,
    attention_pool_core_torch,
    attention_pool_reference,
)

# (channels, heads, spatial side, output dim): RN50 (2048, 32, 7x7), a tiny model, odd sizes.
SHAPES = [(2048, 32, 7, 1024), (512, 8, 2, 128), (96, 3, 3, 40), (60, 5, 5, 7)]


def _params(m: AttentionPool2d):
    return [m.positional_embedding, m.q_proj.weight, m.q_proj.bias, m.k_proj.weight, m.k_proj.bias,
            m.v_proj.weight, m.v_proj.bias, m.c_proj.weight, m.c_proj.bias]


def _module(c, heads, s, out, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = AttentionPool2d(s, c, heads, out).to(dtype)
    with torch.no_grad():  # non-trivial biases (nn.Linear's init is small but not zero)
        for p in _params(m):
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"C{s[0]}-h{s[1]}-{s[2]}x{s[2]}")
def test_restructured_pool_equals_reference_fp64(shape):
    c, heads, s, out = shape
    m = _module(c, heads, s, out)
    x = torch.randn(3, c, s, s, dtype=torch.float64, requires_grad=True)
    y = m(x)
    ref = attention_pool_reference(x, *_params(m), heads)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    inputs = [x, *_params(m)]
    got = torch.autograd.grad(y, inputs, g)
    want = torch.autograd.grad(ref, inputs, g)
    for name, a, b in zip(["x", "pos", "wq", "bq", "wk", "bk", "wv", "bv", "wc", "bc"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"grad {name}: {m}")


def test_key_bias_gradient_is_exactly_zero_but_present():
    # bk cancels in the softmax: its true gradient is 0. It must still receive a gradient
    # tensor (DDP without find_unused_parameters requires every parameter to get one).
    m = _module(64, 4, 3, 16, torch.float32)
    m(torch.randn(2, 64, 3, 3)).square().sum().backward()
    assert m.k_proj.bias.grad is not None
    assert torch.count_nonzero(m.k_proj.bias.grad) == 0
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_open_clip_attention_pool_fp32(channels_last):
    c, heads, s, out = 2048, 32, 7, 1024  # RN50
    theirs = OpenClipAttentionPool2d(s, c, heads, out)
    ours = AttentionPool2d(s, c, heads, out)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, c, s, s)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x1), theirs(x2)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y_ours)
    y_ours.backward(g)
    y_theirs.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
    for (name, p1), p2 in zip(ours.named_parameters(), [dict(theirs.named_parameters())[n] for n, _ in ours.named_parameters()]):
        if name == "k_proj.bias":  # exactly 0 here; open_clip's is rounding noise around 0
            assert p2.grad.abs().max() < 1e-4
            continue
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_bf16_autocast_close_to_fp32():
    m = _module(256, 4, 7, 64, torch.float32)
    x = torch.randn(2, 256, 7, 7)
    ref = m(x.double().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_core_dispatches_to_torch_on_cpu():
    x, t0, pos, u = torch.randn(2, 4, 8), torch.randn(2, 8), torch.randn(4, 8), torch.randn(2, 3, 8)
    torch.testing.assert_close(attention_pool_core(x, t0, pos, u), attention_pool_core_torch(x, t0, pos, u))


def test_bad_feature_map_shape():
    m = AttentionPool2d(7, 64, 4, 16)
    with pytest.raises(ValueError, match="feature maps"):
        m(torch.randn(2, 64, 6, 6))
    with pytest.raises(ValueError, match="divisible"):
        AttentionPool2d(7, 64, 5, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES + [(2560, 40, 9, 640), (4096, 64, 14, 1024)],
                         ids=lambda s: f"C{s[0]}-h{s[1]}-{s[2]}x{s[2]}")
def test_triton_kernels_on_gpu(shape, dtype, monkeypatch):
    # Tolerance rule (DESIGN.md §7): the kernel's error against fp64 must not exceed ~2x
    # the error of the same-dtype torch path (plus a small floor).
    c, heads, s, out = shape
    m64 = _module(c, heads, s, out).cuda()
    m = copy.deepcopy(m64).to(dtype)
    x64 = torch.randn(8, c, s, s, dtype=torch.float64, device="cuda").contiguous(memory_format=torch.channels_last)
    x64.requires_grad_()
    x = x64.detach().to(dtype).requires_grad_()
    x_t = x.detach().clone().requires_grad_()
    ref = attention_pool_reference(x64, *_params(m64), heads)
    y = m(x)  # CUDA tensors: the Triton kernels
    monkeypatch.setenv("CLIP_FAST_BACKEND", "torch")
    y_torch = m(x_t)  # the same computation in torch, same dtype
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    g = torch.randn_like(ref)
    grads = [torch.autograd.grad(out_, [inp], g.to(out_.dtype))[0] for out_, inp in ((y, x), (y_torch, x_t), (ref, x64))]
    for got, same_dtype, want in ((y, y_torch, ref), tuple(grads)):
        err = (got.double() - want).abs().max().item()
        err_torch = (same_dtype.double() - want).abs().max().item()
        assert err <= 2 * err_torch + floor * want.abs().max().item(), (err, err_torch)
