"""The AdamW-SR Triton kernels on a GPU (marked gpu): bit for bit against the torch path,
launched on the tensors' own device, one compiled SR-cast kernel for every key and size.
(Without a GPU the same kernels run under the interpreter: tests/kernels/triton_interp.)"""
import math

import pytest
import torch

import clip_fast
from clip_fast import adamw_torch as AT  # the torch reference of AdamW and the SR cast
from clip_fast import optim as O

def _inputs(pd, gd, sd, sizes, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        p = torch.randn(n, generator=gen).to(pd)
        g = (torch.randn(n, generator=gen) * 1e-3).to(gd)
        if n:
            g[n // 2] = math.nan
        m = (torch.randn(n, generator=gen) * 1e-4).to(sd)
        r = (torch.rand(n, generator=gen) * 1e-3).to(sd)
        out.append([t.to(device) for t in (p, g, m, r)])
    return out


def _state(m, r):
    return {
        "exp_avg": m,
        "exp_avg_rms": r,
        "nonfinite_count": torch.zeros((), dtype=torch.int64, device=m.device),
        "moment_exp": torch.tensor(1, dtype=torch.int32, device=m.device),
        "rms_amax": torch.tensor(3e-3, dtype=torch.float32, device=m.device),
    }


COMBOS = [
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, torch.float16),
    (torch.float32, torch.float32, torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("pd,gd,sd", COMBOS, ids=lambda d: str(d).split(".")[-1])
def test_triton_kernel_matches_torch_path_on_gpu(pd, gd, sd):
    from clip_fast.kernels import adamw as K

    sizes = [1_000_003, 4097, 1, 0]
    hyper = O.Hyper(0.9, 0.98, 5e-4, 0.1, 1e-6)
    fp16 = sd == torch.float16
    e_new = O.next_moment_exp(1, float(torch.tensor(3e-3)))
    ts = O.TensorScalars(5e-4, 0.9, 0.98, 4, 1 if fp16 else 0, e_new if fp16 else 0)
    keys = [O.stream_key(5, i, 4) for i in range(len(sizes))]
    ref = _inputs(pd, gd, sd, sizes, "cuda")
    for (p, g, m, r), k in zip(ref, keys):
        AT.torch_adamw_update(p, g, m, r, AT.random_words(k, p.numel(), "cuda"), hyper, ts, True)
    tri = _inputs(pd, gd, sd, sizes, "cuda")
    states = [_state(m, r) for _, _, m, r in tri]
    K.adamw_step([x[0] for x in tri], [x[1] for x in tri], states, keys, [ts] * 4, hyper, True)
    torch.cuda.synchronize()
    for (p, _, m, r), t in zip(ref, tri):
        for want, got in ((p, t[0]), (m, t[2]), (r, t[3])):
            assert torch.equal(want.view(torch.uint8), got.view(torch.uint8))
    assert [int(s["nonfinite_count"]) for s in states] == [1, 1, 1, 0]
    if fp16:  # the zero-size tensor keeps a defined exponent
        assert [int(s["moment_exp"]) for s in states] == [e_new, e_new, e_new, 1]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_launch_on_the_tensors_device_not_the_current_one():
    """Parameters on cuda:1 while cuda:0 is current: same bits as on cuda:0."""
    results = []
    for device in ("cuda:0", "cuda:1"):
        with torch.cuda.device(0):
            p = torch.nn.Parameter(torch.randn(100_003, generator=torch.Generator().manual_seed(0)).bfloat16().to(device))
            p.grad = torch.full_like(p, 1e-3)
            opt = O.AdamW([p], lr=1e-3, seed=2)
            for _ in range(2):
                opt.step()
            x = torch.randn(70_001, generator=torch.Generator().manual_seed(1)).to(device)
            results.append((p.detach().cpu(), clip_fast.stochastic_round(x, seed=3).cpu()))
        torch.cuda.synchronize(device)
    (p0, s0), (p1, s1) = results
    assert torch.equal(p0.view(torch.int16), p1.view(torch.int16))
    assert torch.equal(s0.view(torch.int16), s1.view(torch.int16))


@pytest.mark.gpu
def test_sr_cast_compiles_once_for_all_keys_and_sizes():
    from clip_fast.kernels import adamw as K

    def compiled() -> int:
        # device_caches: device -> (kernel cache keyed by specialisation, ...)
        return sum(len(caches[0]) for caches in K._stochastic_round_kernel.device_caches.values())

    clip_fast.stochastic_round(torch.randn(1000, device="cuda"), seed=1)
    before = compiled()
    for seed, n in ((2, 1000), (3, 4096), (2**40 + 5, 12_345)):
        clip_fast.stochastic_round(torch.randn(n, device="cuda"), seed=seed)
    assert compiled() == before >= 1


@pytest.mark.gpu
def test_gpu_stochastic_round_matches_cpu_and_is_unbiased():
    x = torch.randn(1 << 20) * 3
    gpu = clip_fast.stochastic_round(x.cuda(), seed=9).cpu()
    assert torch.equal(gpu.view(torch.int16), AT.torch_stochastic_round(x, O.stream_key(9)).view(torch.int16))
    v = torch.full((1 << 22,), 1.0 + 2**-10, device="cuda")  # 1/8 of the way from 1 to 1 + 2^-7
    mean = clip_fast.stochastic_round(v, seed=1).double().mean().item()
    assert abs(mean - (1 + 2**-10)) < 5 * 2**-7 * math.sqrt(0.125 * 0.875 / v.numel())


@pytest.mark.gpu
def test_gpu_optimizer_matches_cpu_optimizer():
    runs = []
    for device in ("cuda", "cpu"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8))
        model = model.to(device=device, dtype=torch.bfloat16)
        opt = O.AdamW(O.param_groups(model, 0.1), lr=1e-3, seed=4)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            for p in model.parameters():
                p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device=device, dtype=p.dtype)
            opt.step()
        runs.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
