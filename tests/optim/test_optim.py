"""clip_fast.optim: the stochastic-rounding cast, the AdamW update (C++ vs torch paths,
bit for bit), the optimizer API, NaN/inf handling, fp16 moments, state_dict round trips.

Training-quality checks (bf16+SR tracks fp32 AdamW) are in tests/optim/test_optim_training.py,
the Triton kernel under the interpreter in tests/kernels/triton_interp/test_interp_adamw.py.
"""
import math

import pytest
import torch

import clip_fast
from clip_fast import adamw_torch as AT  # the torch reference of AdamW and the SR cast
from clip_fast import optim as O
from clip_fast._ext import load_extension

BF16_MAX = 3.3895313892515355e38


@pytest.fixture(scope="module")
def ext():
    if load_extension() is None:
        pytest.skip("C++ extension unavailable (no compiler)")
    return torch.ops.clip_fast


def bits16(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(toward-zero, away-from-zero) bf16 neighbours of fp32 x, computed in fp64."""
    u = x.view(torch.int32).to(torch.int64)
    lo = ((u >> 16) << 16).to(torch.int32).view(torch.float32).double()
    hi = (((u >> 16) + 1) << 16).to(torch.int32).view(torch.float32).double()
    return lo, hi


# --------------------------------------------------------------------------------------
# The SR cast
# --------------------------------------------------------------------------------------
SR_IMPLS = ["public", "torch"]


def sr(impl: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    if impl == "public":  # dispatches to the C++ extension on CPU
        return clip_fast.stochastic_round(x, seed=seed)
    return AT.torch_stochastic_round(x, O.stream_key(seed))


@pytest.mark.parametrize("impl", SR_IMPLS)
def test_sr_is_unbiased_and_picks_a_neighbour(impl):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=gen) * torch.logspace(-30, 30, 64)  # many binades, both signs
    reps = 4000
    y = sr(impl, base.repeat(reps), seed=7).double().reshape(reps, -1)
    lo, hi = bf16_neighbours(base)
    assert bool(((y == lo) | (y == hi)).all()), "SR must return one of the two neighbouring bf16 values"
    x = base.double()
    p = (x - lo) / (hi - lo)
    se = (hi - lo).abs() * torch.sqrt(p * (1 - p) / reps)
    err = (y.mean(0) - x).abs()
    assert bool((err <= 5 * se + 1e-300).all()), (err / se).max()
    # and it is not round-to-nearest: both neighbours occur where p is well inside (0, 1)
    inner = (p > 0.1) & (p < 0.9)
    assert bool(((y == lo).any(0) & (y == hi).any(0))[inner].all())


@pytest.mark.parametrize("impl", SR_IMPLS)
def test_sr_keeps_representable_values_and_specials(impl):
    x = torch.tensor(
        [0.0, -0.0, 1.0, -2.5, 2.0**-133, -(2.0**-126), BF16_MAX, -BF16_MAX, math.inf, -math.inf, 65280.0]
    ).repeat(200)  # 2^-133: smallest bf16 subnormal
    x = torch.cat([x, torch.randn(1000).bfloat16().float()])
    assert torch.equal(x.bfloat16().float(), x)  # all representable
    y = sr(impl, x, seed=3)
    assert torch.equal(bits16(y), bits16(x.bfloat16())), "representable values (incl. +-0, +-inf) must not move"
    nan = sr(impl, torch.tensor([math.nan, -math.nan] * 100), seed=1)
    assert bool(torch.isnan(nan.float()).all())


@pytest.mark.parametrize("impl", SR_IMPLS)
def test_sr_largest_finite_saturates_instead_of_inf(impl):
    fp32_max = torch.finfo(torch.float32).max
    x = torch.tensor([fp32_max, -fp32_max, 3.39e38, -3.39e38]).repeat(500)
    y = sr(impl, x, seed=11).float()
    assert bool(torch.isfinite(y).all()), "a finite value must never round to inf"
    assert bool((y.abs() == BF16_MAX).all())


@pytest.mark.parametrize("impl", SR_IMPLS)
def test_sr_is_sign_symmetric(impl):
    x = torch.randn(5000) * 3
    # Same random bits for x and -x (same seed, same positions): exact mirror images.
    assert torch.equal(sr(impl, -x, seed=5).float(), -sr(impl, x, seed=5).float())


def test_sr_paths_agree_bit_for_bit_with_same_bits(ext):
    x = torch.randn(10_001) * torch.logspace(-20, 20, 10_001)
    x[::97] = math.inf
    x[::101] = math.nan
    rand = torch.randint(-(2**31), 2**31 - 1, (x.numel(),), dtype=torch.int32)
    assert torch.equal(bits16(AT.torch_stochastic_round(x, rand=rand)), bits16(ext.stochastic_round_bf16(x, 0, rand)))
    key = O.stream_key(42)
    assert torch.equal(bits16(AT.torch_stochastic_round(x, key)), bits16(ext.stochastic_round_bf16(x, key, None)))
    assert torch.equal(AT.random_words(key, 777), ext.random_words(key, 777))


def test_philox_matches_the_published_known_answer():
    # Random123 known-answer test for Philox4x32-10, counter = 0, key = 0.
    words = [int(w) for w in AT.philox4x32_10(0, torch.zeros(1, dtype=torch.int64))]
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_sr_seed_reproducible_and_seed_dependent():
    x = torch.randn(4096)
    a, b, c = (clip_fast.stochastic_round(x, seed=s) for s in (1, 1, 2))
    assert torch.equal(bits16(a), bits16(b))
    assert not torch.equal(bits16(a), bits16(c))


def test_sr_bad_input():
    with pytest.raises(ValueError, match="float32"):
        clip_fast.stochastic_round(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be"):
        clip_fast.stochastic_round([1.0])
    with pytest.raises(TypeError, match="seed"):
        clip_fast.stochastic_round(torch.zeros(3), seed=1.5)


def test_repeated_small_increments_stall_with_rne_and_reach_two_with_sr():
    chains = 64
    w_rne = torch.ones(chains, dtype=torch.bfloat16)
    w_sr = torch.ones(chains, dtype=torch.bfloat16)
    for step in range(1000):
        w_rne = (w_rne.float() + 1e-3).bfloat16()
        w_sr = clip_fast.stochastic_round(w_sr.float() + 1e-3, seed=step)
    assert bool((w_rne == 1.0).all()), "round-to-nearest drops every 1e-3 increment at 1.0"
    # Each SR step adds zero-mean noise (std ~2.6e-3): after 1000 steps a chain is within
    # ~0.08 (1 sigma) of 2.0, the mean of 64 chains within ~0.01.
    assert abs(float(w_sr.float().mean()) - 2.0) < 0.05
    assert bool(((w_sr.float() - 2.0).abs() < 0.4).all())


# --------------------------------------------------------------------------------------
# Rounding helpers against torch's own casts
# --------------------------------------------------------------------------------------
def test_nearest_even_helpers_match_torch_casts():
    x = torch.randn(50_000) * torch.logspace(-45, 38, 50_000)
    x = torch.cat([x, torch.tensor([65519.0, 65520.0, 65504.0, 1e6, -1e6, 6e-8, 2.9e-8, 3.0e-8, math.inf, -math.inf])])
    assert torch.equal(bits16(AT.round_to(x, torch.bfloat16, None)), bits16(x.bfloat16()))
    assert torch.equal(bits16(AT.round_to(x, torch.float16, None)), bits16(x.half()))


def test_fp16_sr_neighbours_unbiased_and_saturating():
    gen = torch.Generator().manual_seed(1)
    base = torch.cat([torch.randn(32, generator=gen) * 1e-3, torch.rand(16, generator=gen) * 6e-5])  # normal + subnormal
    reps = 4000
    r16 = torch.randint(0, 65536, (reps * base.numel(),), generator=gen)
    y = AT.round_to(base.repeat(reps), torch.float16, r16).double().reshape(reps, -1)
    near = base.half()
    above = near.float() > base
    lo = torch.where(above, torch.nextafter(near, torch.tensor(-math.inf, dtype=torch.float16)), near).double()
    hi = torch.where(above, near, torch.nextafter(near, torch.tensor(math.inf, dtype=torch.float16))).double()
    assert bool(((y == lo) | (y == hi)).all())
    x = base.double()
    p = (x - lo) / (hi - lo)
    se = (hi - lo) * torch.sqrt(p * (1 - p) / reps)
    assert bool(((y.mean(0) - x).abs() <= 5 * se + 1e-12 * (hi - lo)).all())
    sat = AT.round_to(torch.tensor([70000.0, -1e30, math.inf]), torch.float16, torch.tensor([65535, 65535, 0]))
    assert sat.tolist() == [65504.0, -65504.0, math.inf]


# --------------------------------------------------------------------------------------
# The update: C++ vs torch, bit for bit
# --------------------------------------------------------------------------------------
COMBOS = [
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, torch.float16),
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float32, torch.float32, torch.float32),
    (torch.float16, torch.float16, torch.float16),
]


def _update_inputs(pd, gd, sd, n, seed):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen).to(pd)
    g = (torch.randn(n, generator=gen) * 10 ** torch.empty(n).uniform_(-8, 0, generator=gen)).to(gd)
    g[n // 2] = math.nan
    if n > 17:
        g[17] = -math.inf
    m = (torch.randn(n, generator=gen) * 1e-3).to(sd)
    r = (torch.rand(n, generator=gen) * 1e-2).to(sd)
    return p, g, m, r


@pytest.mark.parametrize("stochastic", [True, False], ids=["sr", "rne"])
@pytest.mark.parametrize("pd,gd,sd", COMBOS, ids=lambda d: str(d).split(".")[-1])
def test_cpp_and_torch_updates_agree_bit_for_bit(ext, pd, gd, sd, stochastic):
    sizes = [70_001, 3, 1]  # odd sizes: Philox pairs split at tensor ends; several OpenMP chunks
    hyper = O.Hyper(0.9, 0.98, 3e-4, 0.2, 1e-6)
    e_old, e_new = (3, 6) if sd == torch.float16 else (0, 0)
    for use_explicit_bits in (True, False):
        ts = O.TensorScalars(3e-4, 0.9, 0.98, 7, e_old, e_new)
        inputs = [_update_inputs(pd, gd, sd, n, i) for i, n in enumerate(sizes)]
        keys = [O.stream_key(99, i, 7) for i in range(len(sizes))]
        words = [AT.random_words(k, n) for k, n in zip(keys, sizes)]
        if use_explicit_bits:  # arbitrary bits, not Philox's
            words = [torch.randint(-(2**31), 2**31 - 1, (n, 2), dtype=torch.int32) for n in sizes]
        ref = [[t.clone() for t in inp] for inp in inputs]
        ref_out = [AT.torch_adamw_update(p, g, m, r, w, hyper, ts, stochastic) for (p, g, m, r), w in zip(ref, words)]
        got = [[t.clone() for t in inp] for inp in inputs]
        counts, maxima = ext.adamw_step(
            [x[0] for x in got], [x[1] for x in got], [x[2] for x in got], [x[3] for x in got],
            words if use_explicit_bits else [], keys, [ts.step_size] * 3, [ts.inv_sqrt_bc2] * 3,
            [ts.decode_scale] * 3, [ts.encode_scale] * 3, *hyper.args(), stochastic,
        )  # fmt: skip
        for a, b in zip(ref, got):
            for j in (0, 2, 3):  # p, m, r (index 1 is the gradient)
                assert torch.equal(a[j].view(torch.uint8), b[j].view(torch.uint8))
        assert counts == [c for c, _ in ref_out] == [2, 1, 1]
        assert maxima == [a for _, a in ref_out]


@pytest.mark.parametrize("use_explicit_bits", [True, False], ids=["explicit", "philox"])
def test_cpp_and_torch_bf16_updates_agree_on_special_and_saturating_values(ext, use_explicit_bits):
    """All-bf16 SR step (the hand-vectorised CPU path): +-0, +-inf, NaN weights and moments,
    and weights pushed past the largest bf16 (decay > 1) that must saturate, not become inf."""
    n = 16 * 40 + 11  # whole 16-element vectors and a scalar tail
    p, g, m, r = _update_inputs(torch.bfloat16, torch.bfloat16, torch.bfloat16, n, 5)
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, BF16_MAX, -BF16_MAX])
    p[: specials.numel()] = specials.bfloat16()
    p[100:300] = (torch.linspace(-1.0, 1.0, 200).sign() * torch.linspace(3.2e38, BF16_MAX, 200)).bfloat16()
    m[40:48] = specials.bfloat16()
    r[60:64] = torch.tensor([0.0, math.inf, math.nan, 1e30]).bfloat16()
    hyper = O.Hyper(0.9, 0.98, 1e-3, -2.0, 1e-6)  # decay 1.002: |p| up to 3.3963e38 > max bf16, < max fp32
    ts = O.TensorScalars(1e-3, 0.9, 0.98, 3)
    key = O.stream_key(5, 0, 3)
    if use_explicit_bits:
        words = torch.randint(-(2**31), 2**31 - 1, (n, 2), dtype=torch.int32, generator=torch.Generator().manual_seed(2))
        words[100:300, 0] |= 0xFFFF  # largest carries into the inf exponent
    else:
        words = AT.random_words(key, n)
    ref = [t.clone() for t in (p, g, m, r)]
    ref_count, _ = AT.torch_adamw_update(*ref, words, hyper, ts, True)
    got = [t.clone() for t in (p, g, m, r)]
    counts, _ = ext.adamw_step(
        [got[0]], [got[1]], [got[2]], [got[3]], [words] if use_explicit_bits else [], [key], [ts.step_size],
        [ts.inv_sqrt_bc2], [ts.decode_scale], [ts.encode_scale], *hyper.args(), True,
    )  # fmt: skip
    for j in (0, 2, 3):
        assert torch.equal(ref[j].view(torch.uint8), got[j].view(torch.uint8)), j
    assert counts == [ref_count] == [2]
    assert not bool(torch.isinf(got[0][100:300].float()).any()), "finite weights must saturate, not overflow"
    assert bool((got[0][100:300].float().abs() == BF16_MAX).any())


def test_update_matches_fp64_adamw_formula():
    """The torch path (hence all paths) is AdamW: compare one step against fp64 math."""
    n = 10_000
    p, g, m, r = _update_inputs(torch.float32, torch.float32, torch.float32, n, 3)
    g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    lr, b1, b2, wd, eps, step = 1e-3, 0.9, 0.999, 0.1, 1e-8, 5
    pd, gd, md, vd = p.double(), g.double(), m.double(), r.double() ** 2
    md = b1 * md + (1 - b1) * gd
    vd = b2 * vd + (1 - b2) * gd * gd
    want = pd * (1 - lr * wd) - lr / (1 - b1**step) * md / (vd.sqrt() / math.sqrt(1 - b2**step) + eps)
    AT.torch_adamw_update(p, g, m, r, None, O.Hyper(b1, b2, lr, wd, eps), O.TensorScalars(lr, b1, b2, step), False)
    torch.testing.assert_close(p.double(), want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(r.double() ** 2, vd, rtol=1e-5, atol=1e-30)


# --------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------
def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4)).to(dtype)


def _train(model, opt, steps, seed=0, sched=None):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 16, generator=gen)
        y = torch.randn(64, 4, generator=gen)
        loss = ((model(x.to(next(model.parameters()).dtype)).float() - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def test_fp32_params_and_state_track_torch_adamw():
    a, b = _model(), _model()
    ours = O.AdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, state_dtype=torch.float32)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    _train(a, ours, 20)
    _train(b, ref, 20)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(ours.state[pa]["exp_avg_rms"] ** 2, ref.state[pb]["exp_avg_sq"], rtol=1e-3, atol=1e-12)


def test_bf16_params_default_to_bf16_state_6_bytes_per_param():
    model = _model(torch.bfloat16)
    opt = O.AdamW(model.parameters(), lr=1e-3)
    _train(model, opt, 2)
    n = sum(p.numel() for p in model.parameters())
    state_bytes = sum(
        s[k].numel() * s[k].element_size() for s in opt.state.values() for k in ("exp_avg", "exp_avg_rms")
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert (state_bytes + weight_bytes) / n == 6
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_torch_backend_and_cpp_give_identical_training(monkeypatch, ext):
    runs = []
    for backend in ("auto", "torch"):
        monkeypatch.setenv("CLIP_FAST_BACKEND", backend)
        model = _model(torch.bfloat16)
        opt = O.AdamW(O.param_groups(model, 0.1), lr=3e-3, seed=5, state_dtype=torch.float16)
        _train(model, opt, 5)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16])
def test_state_dict_round_trip_resumes_identically(state_dtype):
    model = _model(torch.bfloat16)
    opt = O.AdamW(model.parameters(), lr=2e-3, seed=123, state_dtype=state_dtype)
    _train(model, opt, 3)
    model_sd = {k: v.clone() for k, v in model.state_dict().items()}
    opt_sd = opt.state_dict()
    saved = torch.load(_roundtrip(opt_sd), weights_only=False)
    after = _train(model, opt, 4, seed=9)
    final = [p.detach().clone() for p in model.parameters()]

    model2 = _model(torch.bfloat16, seed=1)
    model2.load_state_dict(model_sd)
    opt2 = O.AdamW(model2.parameters(), lr=0.5, seed=0, state_dtype=torch.float32)  # overwritten by the load
    opt2.load_state_dict(saved)
    for s in opt2.state.values():
        assert s["exp_avg"].dtype == state_dtype and s["exp_avg_rms"].dtype == state_dtype
    after2 = _train(model2, opt2, 4, seed=9)
    assert after == after2
    for a, b in zip(final, model2.parameters()):
        assert torch.equal(a.view(torch.int16), b.detach().view(torch.int16))


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_lr_scheduler_drives_the_step():
    model = _model(torch.bfloat16)
    opt = O.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 2 else 1.0)
    _train(model, opt, 2, sched=sched)
    assert opt.param_groups[0]["lr"] == 0.0
    frozen = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["weight_decay"] = 0.0
    _train(model, opt, 2, sched=sched)
    for a, b in zip(frozen, model.parameters()):
        assert torch.equal(a, b), "lr = 0 (from the scheduler) must leave the weights unchanged"


def test_nonfinite_gradients_skip_elements_and_count():
    p = torch.nn.Parameter(torch.randn(1000).bfloat16())
    opt = O.AdamW([p], lr=1e-2, weight_decay=0.1)
    p.grad = torch.randn(1000).bfloat16()
    opt.step()
    before_p = p.detach().clone()
    before_m = opt.state[p]["exp_avg"].clone()
    before_r = opt.state[p]["exp_avg_rms"].clone()
    g = torch.randn(1000).bfloat16()
    bad = torch.zeros(1000, dtype=torch.bool)
    bad[[3, 500, 999]] = True
    g[3], g[500], g[999] = math.nan, math.inf, -math.inf
    p.grad = g
    opt.step()
    assert torch.equal(p.detach()[bad], before_p[bad])
    assert torch.equal(opt.state[p]["exp_avg"][bad], before_m[bad])
    assert torch.equal(opt.state[p]["exp_avg_rms"][bad], before_r[bad])
    assert bool((p.detach()[~bad] != before_p[~bad]).any())
    assert bool(torch.isfinite(p.detach().float()).all() and torch.isfinite(opt.state[p]["exp_avg_rms"].float()).all())
    assert int(opt.state[p]["nonfinite_count"]) == 3 and opt.nonfinite_count() == 3


def test_nonfinite_raise_mode_keeps_state_valid():
    p = torch.nn.Parameter(torch.ones(10).bfloat16())
    opt = O.AdamW([p], lr=1e-2, on_nonfinite="raise")
    p.grad = torch.full((10,), math.nan).bfloat16()
    with pytest.raises(FloatingPointError, match="10 gradient elements"):
        opt.step()
    assert bool((p.detach() == 1).all())
    assert bool((opt.state[p]["exp_avg"] == 0).all())


def test_fp16_moments_survive_tiny_and_huge_gradients():
    """fp16 can't hold g^2 for small g (underflow) or large g (overflow); the scaled
    sqrt(v) storage must track fp32 moments in both regimes."""
    for scale in (1e-7, 1e-5, 3e2):
        torch.manual_seed(0)
        p16 = torch.nn.Parameter(torch.randn(4096).bfloat16())
        p32 = torch.nn.Parameter(p16.detach().clone())
        o16 = O.AdamW([p16], lr=1e-3, state_dtype=torch.float16, seed=1)
        o32 = O.AdamW([p32], lr=1e-3, state_dtype=torch.float32, seed=1)
        for step in range(10):
            g = torch.randn(4096) * scale
            p16.grad, p32.grad = g.bfloat16(), g.bfloat16()
            o16.step()
            o32.step()
        s16, s32 = o16.state[p16], o32.state[p32]
        decode = 2.0 ** -int(s16["moment_exp"])
        m16, r16 = s16["exp_avg"].float() * decode, s16["exp_avg_rms"].float() * decode
        assert bool(torch.isfinite(r16).all()) and bool((r16 > 0).all()), scale
        torch.testing.assert_close(r16, s32["exp_avg_rms"], rtol=5e-3, atol=0)
        torch.testing.assert_close(m16, s32["exp_avg"], rtol=0, atol=5e-3 * float(s32["exp_avg_rms"].max()))
        # naive fp16 v = g^2 would underflow to 0 (small g) or overflow to inf (large g)
        naive_v = (g * g).half()
        assert bool((naive_v == 0).any() | torch.isinf(naive_v).any()), scale
        # the weights moved like the fp32-moment run (same bits, nearly same updates)
        diff = (p16.detach().float() - p32.detach().float()).abs()
        assert float((diff > 0).float().mean()) < 0.05


def test_param_groups_clip_convention():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embedding = torch.nn.Embedding(10, 8)
            self.positional_embedding = torch.nn.Parameter(torch.zeros(5, 8))
            self.class_embedding = torch.nn.Parameter(torch.zeros(8))
            self.ln_final = torch.nn.LayerNorm(8)
            self.proj = torch.nn.Linear(8, 8)
            self.bn1 = torch.nn.BatchNorm2d(8)
            self.conv = torch.nn.Conv2d(8, 8, 3, bias=False)
            self.logit_scale = torch.nn.Parameter(torch.ones([]))
            self.logit_bias = torch.nn.Parameter(torch.zeros([]))
            self.frozen = torch.nn.Parameter(torch.zeros(3, 3), requires_grad=False)

    model = Tiny()
    groups = O.param_groups(model, weight_decay=0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = sorted(names[id(p)] for p in groups[0]["params"])
    no_decay = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[0]["weight_decay"] == 0.2 and groups[1]["weight_decay"] == 0.0
    assert decay == ["conv.weight", "proj.weight"]
    assert no_decay == sorted(
        ["token_embedding.weight", "positional_embedding", "class_embedding", "ln_final.weight", "ln_final.bias",
         "proj.bias", "bn1.weight", "bn1.bias", "logit_scale", "logit_bias"]
    )  # fmt: skip
    O.AdamW(groups, lr=1e-3)  # usable as is
    with pytest.raises(TypeError, match="nn.Module"):
        O.param_groups([torch.zeros(1)], 0.1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(eps=0.0), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(state_dtype=torch.float64), "state_dtype"),
        (dict(on_nonfinite="ignore"), "on_nonfinite"),
    ],
)
def test_bad_hyperparameters_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        O.AdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_bad_parameters_raise_value_error():
    with pytest.raises(ValueError, match="sparse"):
        O.AdamW([torch.zeros(3, 3).to_sparse().requires_grad_()])
    with pytest.raises(ValueError, match="complex"):
        O.AdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        O.AdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))])
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = O.AdamW([p])
    p.grad = torch.eye(4).to_sparse()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()


# --------------------------------------------------------------------------------------
# Memory layouts: dense parameters are updated in place in any layout
# --------------------------------------------------------------------------------------
def _conv_params(memory_format, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 5, 3, 3, generator=gen).to(dtype)
    g = (torch.randn(6, 5, 3, 3, generator=gen) * 1e-2).to(dtype)
    p = torch.nn.Parameter(w.contiguous(memory_format=memory_format))
    p.grad = g.contiguous(memory_format=memory_format)
    return p


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_channels_last_weights_update_in_place_in_memory_order(monkeypatch, backend):
    """A channels_last conv weight keeps its storage and strides; its moments share its layout;
    element e of memory (not of the logical order) takes random words e: the update equals
    the reference update of the flat memory views."""
    monkeypatch.setenv("CLIP_FAST_BACKEND", backend)
    p = _conv_params(torch.channels_last, torch.bfloat16)
    ptr, strides = p.data_ptr(), p.stride()
    flat = lambda t: t.permute(0, 2, 3, 1).reshape(-1)  # channels_last memory order  # noqa: E731
    ref_p, ref_g = flat(p.detach()).clone(), flat(p.grad).clone()
    ref_m, ref_r = torch.zeros_like(ref_p), torch.zeros_like(ref_p)
    opt = O.AdamW([p], lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, seed=11)
    hyper = O.Hyper(0.9, 0.98, 1e-2, 0.1, 1e-6)
    for step in (1, 2):
        opt.step()
        words = AT.random_words(O.stream_key(11, 0, step), ref_p.numel())
        AT.torch_adamw_update(ref_p, ref_g, ref_m, ref_r, words, hyper, O.TensorScalars(1e-2, 0.9, 0.98, step), True)
    assert p.data_ptr() == ptr and p.stride() == strides
    state = opt.state[p]
    assert state["exp_avg"].stride() == strides and state["exp_avg_rms"].stride() == strides
    assert torch.equal(bits16(flat(p.detach())), bits16(ref_p))
    assert torch.equal(bits16(flat(state["exp_avg"])), bits16(ref_m))
    assert torch.equal(bits16(flat(state["exp_avg_rms"])), bits16(ref_r))


@pytest.mark.parametrize("case", ["grad-contiguous", "state-contiguous", "param-strided-view"])
def test_layout_mismatches_give_the_update_of_the_logical_elements(case):
    """Without rounding noise (fp32), the result must not depend on layouts: a gradient or a
    loaded state in another layout, and a non-dense parameter (a strided view)."""
    want = _conv_params(torch.contiguous_format, torch.float32)
    ref = O.AdamW([want], lr=1e-2, weight_decay=0.1)
    if case == "param-strided-view":
        base = torch.zeros(6, 5, 3, 6)
        base[..., ::2] = want.detach()
        got = torch.nn.Parameter(base[..., ::2])
        got.grad = want.grad.clone()
    else:
        got = _conv_params(torch.channels_last, torch.float32)
        if case == "grad-contiguous":
            got.grad = got.grad.contiguous()
    opt = O.AdamW([got], lr=1e-2, weight_decay=0.1)
    for step in range(3):
        ref.step()
        opt.step()
        if case == "state-contiguous" and step == 0:  # e.g. a checkpoint saved from a contiguous model
            opt.load_state_dict(ref.state_dict())
            assert opt.state[got]["exp_avg"].is_contiguous()
    assert torch.equal(got.detach(), want.detach())
    assert torch.equal(opt.state[got]["exp_avg"], ref.state[want]["exp_avg"])
    if case == "param-strided-view":
        assert not got.is_contiguous() and torch.equal(base[..., ::2], want.detach())


def test_sr_cast_kernel_is_not_specialised_on_key_or_size():
    """Triton would otherwise compile a kernel per key value class (1, multiples of 16, ...)."""
    from clip_fast.kernels import adamw as K

    flags = {p.name: p.do_not_specialize for p in K._stochastic_round_kernel.params}
    assert flags["key"] and flags["numel"] and not flags["x_ptr"]
