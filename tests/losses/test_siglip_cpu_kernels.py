"""The C++ tile kernel of the CPU SigLIP loss (csrc/siglip_cpu.cpp, torch.ops.clip_fast.
siglip_tile) against fp64 math and against the torch tile code it replaces
(clip_fast/siglip_torch.py: block_torch): per-element sigmoid and softplus accuracy over the
whole range (softplus's linear regime, subnormal exponentials), the three sums, tiles
cut across the positive diagonal at every offset, non-finite logits, and the full loss
and gradients vs a materialised fp64 SigLIP."""
import pytest
import torch
import torch.nn.functional as F

from clip_fast import SigLipLoss
from clip_fast import siglip_ops, siglip_torch
from clip_fast._backend import SIGLIP, select_backend
from clip_fast._ext import load_extension

pytestmark = pytest.mark.skipif(load_extension() is None, reason="C++ extension unavailable")

# A power-of-two scale makes scale * x exact, so y = scale * x + bias rounds once on
# every path (FMA or not) and the fp64 reference can start from the same fp32 y.
SCALE, BIAS = 16.0, -5.25


def _ulp32(ref: torch.Tensor) -> torch.Tensor:
    """Spacing of fp32 numbers at |ref| (fp64), 2^-149 in the subnormal range."""
    mag = ref.abs().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(mag)) - 23).clamp_min(2.0**-149)


def _sign(shape, diag, has_pos):
    """-z of the tile: -1 on the positive diagonal at column offset `diag`, else +1."""
    sign = torch.ones(shape, dtype=torch.float64)
    if has_pos:
        sign.diagonal(diag).fill_(-1.0)
    return sign


def _run_tile(x, scale, bias, diag, has_pos):
    g = x.clone()
    sums = torch.zeros(3, dtype=torch.float64)
    torch.ops.clip_fast.siglip_tile(g, sums, scale, bias, diag, has_pos)
    return g, sums


def _reference(x, scale, bias, diag, has_pos):
    """fp64 g, softplus and the three sums from the fp32 y (exact for SCALE)."""
    y32 = x * scale + bias  # fp32, one rounding for a power-of-two scale
    sign = _sign(x.shape, diag, has_pos)
    y = sign * y32.double()
    g = sign * torch.sigmoid(y)
    sp = F.softplus(y, threshold=1e9)  # log1p(exp(y)) in fp64, no linear cut-off
    return g, sp, torch.stack([sp.sum(), (g * x.double()).sum(), g.sum()])


SHAPES = [(1, 1), (1, 37), (29, 1), (3, 7), (5, 33), (16, 16), (17, 531), (64, 1000), (257, 300)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spread", [0.3, 4.0])
def test_tile_matches_fp64(shape, spread):
    M, N = shape
    g0 = torch.Generator().manual_seed(M * 1000 + N)
    x = (torch.randn(shape, generator=g0) * spread).contiguous()
    # diagonal offsets: through the tile from above/below, and missing it entirely
    for diag, has_pos in [(0, True), (2, True), (-3, True), (N + 1, True), (-M - 1, True), (0, False)]:
        g, sums = _run_tile(x, SCALE, BIAS, diag, has_pos)
        g_ref, sp, sums_ref = _reference(x, SCALE, BIAS, diag, has_pos)
        err = ((g.double() - g_ref).abs() / _ulp32(g_ref)).max().item()
        assert err <= 4.0, f"g error {err:.1f} ulp (diag={diag})"
        # sums: fp32 partials per 512 columns, fp64 across blocks and rows
        mass = torch.stack([sp.abs().sum(), (g_ref * x.double()).abs().sum(), g_ref.abs().sum()])
        rel = ((sums - sums_ref).abs() / mass.clamp_min(1e-300)).max().item()
        assert rel < 2e-6, f"sums {sums.tolist()} vs {sums_ref.tolist()} (diag={diag})"


def test_softplus_and_sigmoid_per_element_over_the_whole_range():
    # 1x1 tiles isolate softplus(y) per element: linear regime (y >> 0), log1p near 0,
    # exponentially small values (y << 0) down to subnormal and zero.
    ys = torch.cat([torch.linspace(-120.0, 120.0, 1201), torch.tensor([-1e-7, 0.0, 1e-7, 0.3466, 0.8814, 1e4, -1e4])])
    for y in ys.tolist():
        x = torch.tensor([[y]], dtype=torch.float32)  # scale 1, bias 0: y = x exactly
        for has_pos in (False, True):
            g, sums = _run_tile(x, 1.0, 0.0, 0, has_pos)
            g_ref, sp, sums_ref = _reference(x, 1.0, 0.0, 0, has_pos)
            assert abs(g.item() - g_ref.item()) <= 3 * _ulp32(g_ref).item(), (y, has_pos)
            assert abs(sums[0].item() - sp.item()) <= 3 * _ulp32(sp).item(), (y, has_pos, sums[0].item(), sp.item())


def test_arbitrary_scale_and_bias_agree_with_fp64_sums():
    g0 = torch.Generator().manual_seed(5)
    x = torch.randn(100, 300, generator=g0) * 0.2
    for scale, bias in [(10.0, -10.0), (3.7, 0.0), (100.0, 2.5)]:
        g, sums = _run_tile(x, scale, bias, 7, True)
        sign = _sign(x.shape, 7, True)
        y = sign * (x.double() * scale + bias)
        g_ref = sign * torch.sigmoid(y)
        sp = F.softplus(y, threshold=1e9)
        ref = torch.stack([sp.sum(), (g_ref * x.double()).sum(), g_ref.sum()])
        # y rounds to fp32 here (relative 2^-24 of |y| <= ~70): abs error ~1e-5 per g
        assert (g.double() - g_ref).abs().max().item() < 2e-5
        mass = torch.stack([sp.abs().sum(), (g_ref * x.double()).abs().sum(), g_ref.abs().sum()])
        assert ((sums - ref).abs() / mass).max().item() < 1e-5


def test_non_finite_logits_propagate_like_torch():
    x = torch.tensor([[0.5, float("nan"), -1.0], [float("inf"), 0.25, float("-inf")], [0.0, 1.0, 2.0]])
    for has_pos in (False, True):
        g, sums = _run_tile(x, 2.0, -1.0, 0, has_pos)
        sign = _sign(x.shape, 0, has_pos).float()
        ref = sign * torch.sigmoid(sign * (x * 2.0 - 1.0))
        assert torch.equal(torch.isnan(g), torch.isnan(ref))
        finite = ~torch.isnan(ref)
        assert torch.allclose(g[finite], ref[finite], rtol=1e-6, atol=0)
        assert torch.isnan(sums).all()  # a NaN logit reaches every sum
    # +inf logit alone: softplus inf, dscale inf; -inf alone: 0 * -inf = NaN in dscale
    g, sums = _run_tile(torch.tensor([[float("inf"), 0.0]]), 1.0, 0.0, 0, False)
    assert sums[0] == float("inf") and sums[1] == float("inf") and g[0, 0] == 1.0
    g, sums = _run_tile(torch.tensor([[float("-inf"), 0.0]]), 1.0, 0.0, 0, False)
    assert torch.isfinite(sums[0]) and torch.isnan(sums[1]) and g[0, 0] == 0.0


def test_tile_is_deterministic():
    x = torch.randn(300, 2000, generator=torch.Generator().manual_seed(3))
    a, sa = _run_tile(x, 10.0, -10.0, 5, True)
    b, sb = _run_tile(x, 10.0, -10.0, 5, True)
    assert torch.equal(a, b) and torch.equal(sa, sb)


def test_tile_op_rejects_bad_tensors():
    sums = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="tile must be"):
        torch.ops.clip_fast.siglip_tile(torch.zeros(4, 4, dtype=torch.float64), sums, 1.0, 0.0, 0, True)
    with pytest.raises(RuntimeError, match="tile must be"):
        torch.ops.clip_fast.siglip_tile(torch.zeros(4, 8).t(), sums, 1.0, 0.0, 0, True)
    with pytest.raises(RuntimeError, match="sums must be"):
        torch.ops.clip_fast.siglip_tile(torch.zeros(4, 4), torch.zeros(3), 1.0, 0.0, 0, True)


def test_dispatch(monkeypatch):
    x = torch.zeros(3, 4)
    assert select_backend(SIGLIP, x, x) == "cpp"
    monkeypatch.setenv("CLIP_FAST_BACKEND", "torch")
    assert select_backend(SIGLIP, x, x) == "torch"
    monkeypatch.setenv("CLIP_FAST_BACKEND", "auto")
    # fp64 (gradcheck) keeps the torch tile code
    called = []
    monkeypatch.setattr(siglip_ops, "block_fused", lambda *a, **k: called.append(1))
    SigLipLoss()(torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), 2.0, 1.0)
    assert not called


def _block_both(M, N, D, has_pos, bias, monkeypatch, seed=0):
    g0 = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(M, D, generator=g0), dim=-1)
    text = F.normalize(torch.randn(N, D, generator=g0), dim=-1)
    scale = torch.tensor(12.0)
    bias_t = None if bias is None else torch.tensor(bias)
    out = {}
    for backend in ("auto", "torch"):
        monkeypatch.setenv("CLIP_FAST_BACKEND", backend)
        di, dt = torch.zeros(M, D), torch.zeros(N, D)
        stats = siglip_ops.siglip_block(image, text, scale, bias_t, has_pos=has_pos, inv_n=1.0 / M, d_image=di,
                                        d_text=dt, backend=select_backend(SIGLIP, image, text))
        out[backend] = (stats, di, dt)
    return out


@pytest.mark.parametrize("M,N", [(1, 1), (3, 7), (23, 19), (40, 40)])
@pytest.mark.parametrize("has_pos", [True, False])
def test_fused_block_matches_torch_block_across_small_tiles(M, N, has_pos, monkeypatch):
    # 7 x 5 tiles: the positive diagonal crosses tiles at many offsets
    monkeypatch.setattr(siglip_torch, "CPU_TILE_ROWS", 7)
    monkeypatch.setattr(siglip_torch, "CPU_TILE_ELEMENTS", 35)
    out = _block_both(M, N, 24, has_pos, -4.0, monkeypatch)
    (sf, dif, dtf), (st, dit, dtt) = out["auto"], out["torch"]
    assert sf.dtype == st.dtype == torch.float32
    assert torch.allclose(sf, st, rtol=2e-6, atol=1e-6), (sf, st)
    for a, b in ((dif, dit), (dtf, dtt)):
        assert ((a - b).abs().max() / b.abs().max()).item() < 2e-6


def test_fused_block_without_bias_matches_torch(monkeypatch):
    out = _block_both(64, 50, 16, True, None, monkeypatch)
    assert torch.allclose(out["auto"][0], out["torch"][0], rtol=2e-6, atol=1e-6)
    assert torch.allclose(out["auto"][1], out["torch"][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("B", [1, 3, 37, 300])
@pytest.mark.parametrize("with_bias", [True, False])
def test_loss_and_grads_match_materialised_fp64(B, with_bias, monkeypatch):
    if B == 300:  # several 128 x 100 tiles, and tiles spanning the diagonal off-centre
        monkeypatch.setattr(siglip_torch, "CPU_TILE_ROWS", 128)
        monkeypatch.setattr(siglip_torch, "CPU_TILE_ELEMENTS", 128 * 100)
    D = 33
    g0 = torch.Generator().manual_seed(B)
    image = F.normalize(torch.randn(B, D, generator=g0), dim=-1)
    text = F.normalize(torch.randn(B, D, generator=g0), dim=-1)
    leaves = [image.requires_grad_(), text.requires_grad_(), torch.tensor(10.0, requires_grad=True)]
    if with_bias:
        leaves.append(torch.tensor(-10.0, requires_grad=True))
    loss = SigLipLoss()(*leaves, *([] if with_bias else [None]))
    loss.backward()
    ref = [x.detach().double().requires_grad_() for x in leaves]
    logits = ref[2] * ref[0] @ ref[1].T + (ref[3] if with_bias else 0.0)
    z = 2 * torch.eye(B, dtype=torch.float64) - 1
    ref_loss = -F.logsigmoid(z * logits).sum() / B
    ref_loss.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    for a, b in zip(leaves, ref):
        err = ((a.grad.double() - b.grad).abs().max() / b.grad.abs().max()).item()
        assert err < 1e-5, err
