"""The AdamW-SR Triton kernels under Triton's interpreter, against the torch path of the same
algorithm, bit for bit (explicit random words and Philox streams alike)."""
import math

import pytest
import torch
import triton
import triton.language as tl

from clip_fast import adamw_torch as AT  # the torch reference of AdamW and the SR cast
from clip_fast import optim as O
from clip_fast.kernels import adamw as K

COMBOS = [
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32, torch.float16),
    (torch.float32, torch.float32, torch.float32),
    (torch.float16, torch.float16, torch.float16),
]


def test_sr_cast_matches_torch_path():
    x = torch.randn(3001) * torch.logspace(-30, 30, 3001)
    x[::50] = math.inf
    x[::77] = math.nan
    x[5] = torch.finfo(torch.float32).max
    key = O.stream_key(2024)
    assert torch.equal(K.stochastic_round(x, key).view(torch.int16), AT.torch_stochastic_round(x, key).view(torch.int16))
    rand = torch.randint(-(2**31), 2**31 - 1, (x.numel(),), dtype=torch.int32)
    got = K.stochastic_round(x, 0, rand)
    assert torch.equal(got.view(torch.int16), AT.torch_stochastic_round(x, rand=rand).view(torch.int16))


def _state(m, r, exp=0, amax=0.0):
    return {
        "exp_avg": m,
        "exp_avg_rms": r,
        "nonfinite_count": torch.zeros((), dtype=torch.int64),
        "moment_exp": torch.tensor(exp, dtype=torch.int32),
        "rms_amax": torch.tensor(amax, dtype=torch.float32),
    }


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit-bits", "philox"])
@pytest.mark.parametrize("stochastic", [True, False], ids=["sr", "rne"])
@pytest.mark.parametrize("pd,gd,sd", COMBOS, ids=lambda d: str(d).split(".")[-1])
def test_multi_tensor_step_matches_torch_path(pd, gd, sd, stochastic, explicit):
    sizes = [2500, 7, 1]  # several blocks of one tensor, odd tails, a single element
    hyper = O.Hyper(0.9, 0.98, 5e-4, 0.1, 1e-6)
    gen = torch.Generator().manual_seed(0)
    amax_prev = 4e-3
    e_old = 2
    e_new = O.next_moment_exp(e_old, float(torch.tensor(amax_prev)))
    fp16 = sd == torch.float16
    ref, params, grads, states, words, keys = [], [], [], [], [], []
    for i, n in enumerate(sizes):
        p = torch.randn(n, generator=gen).to(pd)
        g = (torch.randn(n, generator=gen) * 1e-3).to(gd)
        g[n // 2] = math.nan
        m = (torch.randn(n, generator=gen) * 1e-4).to(sd)
        r = (torch.rand(n, generator=gen) * 1e-3).to(sd)
        key = O.stream_key(77, i, 4)
        w = (torch.randint(-(2**31), 2**31 - 1, (n, 2), dtype=torch.int32, generator=gen) if explicit
             else AT.random_words(key, n))  # fmt: skip
        ref.append((p.clone(), g, m.clone(), r.clone()))
        params.append(p)
        grads.append(g)
        states.append(_state(m, r, e_old, amax_prev))
        words.append(w)
        keys.append(key)
    ts = O.TensorScalars(5e-4, 0.9, 0.98, 4, e_old if fp16 else 0, e_new if fp16 else 0)
    expected = [AT.torch_adamw_update(p, g, m, r, w, hyper, ts, stochastic) for (p, g, m, r), w in zip(ref, words)]
    count = K.adamw_step(params, grads, states, keys, [ts] * 3, hyper, stochastic, rand=words if explicit else None)
    for (p, _, m, r), got_p, s in zip(ref, params, states):
        assert torch.equal(p.view(torch.uint8), got_p.view(torch.uint8))
        assert torch.equal(m.view(torch.uint8), s["exp_avg"].view(torch.uint8))
        assert torch.equal(r.view(torch.uint8), s["exp_avg_rms"].view(torch.uint8))
    assert int(count) == 3 and [int(s["nonfinite_count"]) for s in states] == [c for c, _ in expected]
    if fp16:
        assert [int(s["moment_exp"]) for s in states] == [e_new] * 3
        assert [float(s["rms_amax"]) for s in states] == [a for _, a in expected]


def test_optimizer_triton_backend_matches_torch_backend(monkeypatch):
    """Whole optimizer steps (step counts, keys, fp16 rescaling, groups) through both backends."""
    runs = []
    for backend in ("triton", "torch"):
        monkeypatch.setenv("CLIP_FAST_BACKEND", backend)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.LayerNorm(24), torch.nn.Linear(24, 3))
        model = model.to(torch.bfloat16)
        opt = O.AdamW(O.param_groups(model, 0.1), lr=1e-2, seed=3, state_dtype=torch.float16)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(16, 12, generator=gen).bfloat16()
            loss = model(x).float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        runs.append(([p.detach().clone() for p in model.parameters()], opt.state_dict()))
    (pa, sa), (pb, sb) = runs
    for a, b in zip(pa, pb):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    for k in sa["state"]:
        for name in ("exp_avg", "exp_avg_rms", "moment_exp", "rms_amax"):
            assert torch.equal(sa["state"][k][name], sb["state"][k][name]), name


@triton.jit
def _philox_probe(counter_ptr, key, out_ptr, N: tl.constexpr):
    counters = tl.load(counter_ptr + tl.arange(0, N))
    w0, w1, w2, w3 = K._philox4x32_10(counters, key)
    offs = 4 * tl.arange(0, N)
    tl.store(out_ptr + offs, w0.to(tl.int32, bitcast=True))
    tl.store(out_ptr + offs + 1, w1.to(tl.int32, bitcast=True))
    tl.store(out_ptr + offs + 2, w2.to(tl.int32, bitcast=True))
    tl.store(out_ptr + offs + 3, w3.to(tl.int32, bitcast=True))


def test_kernel_philox_is_philox4x32_whatever_the_triton_version():
    """The kernel's own 32-bit Philox (not tl.randint4x, whose int64-counter variant is
    Philox4x64 before Triton 3.4) against the torch reference, with counters that use the
    high counter word and keys with the sign bit set, and the published known answer."""
    counters = torch.tensor([0, 1, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3, 2**62 - 1, 12345], dtype=torch.int64)
    for key in (0, O.stream_key(1), O.stream_key(2024, 3, 9), -(2**63)):
        out = torch.empty(4 * counters.numel(), dtype=torch.int32)
        _philox_probe[(1,)](counters, key, out, N=counters.numel())
        want = torch.stack(AT.philox4x32_10(key, counters), dim=1).reshape(-1)
        assert torch.equal(out.to(torch.int64) & 0xFFFFFFFF, want), key
    out = torch.empty(4, dtype=torch.int32)
    _philox_probe[(1,)](torch.zeros(1, dtype=torch.int64), 0, out, N=1)
    assert (out.to(torch.int64) & 0xFFFFFFFF).tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_triton_stream_matches_the_cpp_stream():
    """The SR cast's Philox bits under the interpreter against the C++ extension's."""
    from clip_fast._ext import load_extension

    if load_extension() is None:
        pytest.skip("C++ extension unavailable")
    x = torch.randn(5001) * 7
    for seed in (0, 5, 2**40 + 1):
        key = O.stream_key(seed)
        got = K.stochastic_round(x, key)
        assert torch.equal(got.view(torch.int16), torch.ops.clip_fast.stochastic_round_bf16(x, key).view(torch.int16))
