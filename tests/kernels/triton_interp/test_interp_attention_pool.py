"""The fused attention-pool kernels (forward and both backward kernels) run by Triton's
interpreter on CPU tensors, against an fp64 reference.

bf16 is not covered here: the interpreter multiplies the raw bit patterns of bf16 `tl.dot`
operands (triton-lang/triton#11584, unsupported upstream). fp16 runs the same code path
(same tiles; only the element type differs); bf16 is checked by the AOT compile test and
the GPU tests.
"""
import pytest
import torch

from clip_fast.model.attention_pool import (
    AttentionPool2d,
    _AttentionPoolCore,
    attention_pool_core_torch,
    attention_pool_reference,
)

# (N, HW, C, heads): tiny model (2x2, 2 heads); RN50 (7x7, C 2048, 32 heads); odd sizes;
# RN50x4's 40 heads over 9x9 (three head blocks); a 14x14 map (L = 197 -> 256 rows).
CASES = [
    (2, 4, 64, 2, torch.float32),
    (2, 49, 2048, 32, torch.float32),
    (3, 9, 100, 5, torch.float16),
    (3, 9, 100, 5, torch.float32),
    (1, 81, 96, 40, torch.float32),
    (1, 196, 48, 17, torch.float16),
]


def _inputs(n, hw, c, heads, dtype, channels_last_strides=True):
    torch.manual_seed(0)
    if channels_last_strides:
        x = torch.randn(n, hw, c)
    else:  # a view of an NCHW map: stride 1 along HW, HW along C
        x = torch.randn(n, c, hw).transpose(1, 2)
    x = x.to(dtype)
    t0 = torch.randn(n, c).to(dtype)
    pos = (0.5 * torch.randn(hw, c)).to(dtype)
    u = (torch.randn(n, heads, c) / c**0.5).to(dtype)
    return x, t0, pos, u


def _errors(dtype, n, hw, c, heads, channels_last_strides=True):
    """Max abs error of the Triton core and of the same-dtype torch path against fp64,
    for Z and for the gradients of x, t0, pos and u."""
    x, t0, pos, u = _inputs(n, hw, c, heads, dtype, channels_last_strides)
    leaves = [a.detach().clone().requires_grad_() for a in (x, t0, pos, u)]
    leaves_t = [a.detach().clone().requires_grad_() for a in (x, t0, pos, u)]
    leaves64 = [a.detach().double().requires_grad_() for a in (x, t0, pos, u)]
    z = _AttentionPoolCore.apply(*leaves)
    z_t = attention_pool_core_torch(*leaves_t)
    z64 = attention_pool_core_torch(*leaves64)
    assert z.dtype == dtype and z.shape == (n, heads, c)
    g = torch.randn(z64.shape, dtype=torch.float64)
    grads = torch.autograd.grad(z, leaves, g.to(dtype))
    grads_t = torch.autograd.grad(z_t, leaves_t, g.to(dtype))
    grads64 = torch.autograd.grad(z64, leaves64, g)
    out = []
    for name, a, b, ref in zip(["z", "dx", "dt0", "dpos", "du"], (z, *grads), (z_t, *grads_t), (z64, *grads64)):
        assert a.shape == ref.shape, name
        out.append((name, (a.double() - ref).abs().max().item(), (b.double() - ref).abs().max().item(),
                    ref.abs().max().item()))
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-HW{c[1]}-C{c[2]}-h{c[3]}-{str(c[4])[6:]}")
def test_kernels_match_fp64_reference(case):
    n, hw, c, heads, dtype = case
    floor = 1e-6 if dtype == torch.float32 else 2e-3
    for name, err, err_torch, scale in _errors(dtype, n, hw, c, heads):
        assert err <= 2 * err_torch + floor * scale, f"{name}: kernel error {err:.3e} vs torch {err_torch:.3e}"


@pytest.mark.parametrize("n,hw,c,heads", [(3, 9, 100, 5), (2, 49, 256, 8)])
def test_bf16_kernels_under_the_interpreter(n, hw, c, heads):
    """bf16 runs here only because common.dot widens the operands. Triton 3.8's
    interpreter also truncates fp32 -> bf16 casts instead of rounding to nearest
    (biased: P and the tokens all round down), so the bound is a few bf16 ulps of the
    result rather than the 2x rule; it still catches wrong math, which is off by O(1)."""
    for name, err, err_torch, scale in _errors(torch.bfloat16, n, hw, c, heads):
        assert err <= 2 * err_torch + 2.0**-5 * scale, f"{name}: kernel error {err:.3e} vs torch {err_torch:.3e}"


def test_nchw_strided_feature_map():
    for name, err, err_torch, scale in _errors(torch.float32, 2, 9, 40, 4, channels_last_strides=False):
        assert err <= 2 * err_torch + 1e-6 * scale, f"{name}: kernel error {err:.3e} vs torch {err_torch:.3e}"


def test_full_module_through_kernels_matches_reference():
    # The whole AttentionPool2d (weight GEMMs in torch, token core in Triton) against the
    # unrestructured reference, RN50's pooling shape.
    torch.manual_seed(1)
    m = AttentionPool2d(7, 2048, 32, 1024)
    x = torch.randn(2, 2048, 7, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = m(x)
    params = [m.positional_embedding, m.q_proj.weight, m.q_proj.bias, m.k_proj.weight, m.k_proj.bias,
              m.v_proj.weight, m.v_proj.bias, m.c_proj.weight, m.c_proj.bias]
    ref = attention_pool_reference(x, *params, 32)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y)
    gx, gpos = torch.autograd.grad(y, [x, m.positional_embedding], g)
    rx, rpos = torch.autograd.grad(ref, [x, m.positional_embedding], g)
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gpos, rpos, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_images_past_2_to_the_31_elements(dtype):
    """int64 image offsets: images 2^30 + 64 elements apart, so image 2 starts past 2^31
    elements (n * stride_xn wraps in int32, as n * L * C does for ~21k RN50 images). The
    (3, HW, C) view lives in a 2^31 + ~300 element buffer of which only the images' own
    pages are touched (the rest is never-faulted virtual memory). Forward and both
    backward kernels must give exactly what they give on a contiguous copy; a wrapped
    32-bit offset would read another address (or fault). The other per-image products
    (n * H, n * L * H, n * L * C, n * H * C) share the same int64 `n`."""
    n, hw, c, heads = 3, 4, 64, 2
    stride = (1 << 30) + 64
    big = torch.empty(stride * (n - 1) + hw * c, dtype=dtype)
    x_dense, t0, pos, u = _inputs(n, hw, c, heads, dtype)
    x = big.as_strided((n, hw, c), (stride, c, 1))
    x.copy_(x_dense)
    assert x.stride(0) * (n - 1) >= 1 << 31
    from clip_fast.kernels.attention_pool import attention_pool_backward, attention_pool_forward

    z, lse = attention_pool_forward(x, t0, pos, u)
    z_dense, lse_dense = attention_pool_forward(x_dense, t0, pos, u)
    assert torch.equal(z, z_dense) and torch.equal(lse, lse_dense)
    dz = torch.randn(n, heads, c, generator=torch.Generator().manual_seed(2)).to(dtype)
    for got, want in zip(attention_pool_backward(x, t0, pos, u, lse, dz), attention_pool_backward(x_dense, t0, pos, u, lse, dz)):
        assert torch.equal(got, want)
