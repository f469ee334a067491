"""The CUDA version of the AdamW-SR kernel (csrc/adamw_sr_cuda.cu) compiles for sm_80 and
sm_90 without register spills (no GPU needed), and the GPU paths (Triton kernel, CUDA
kernel) agree bit for bit with the torch path on the GPU (marked gpu)."""
import ctypes
import math
import os
import re
import shutil
import subprocess

import pytest
import torch

from clip_fast import optim as O
from clip_fast._ext import csrc_dir

NVCC = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
NVCC_FLAGS = ["-O3", "--fmad=false", "-std=c++17", f"-I{csrc_dir()}"]


def _nvcc_available() -> bool:
    return os.path.exists(NVCC) or shutil.which("nvcc") is not None


@pytest.mark.skipif(not _nvcc_available(), reason="nvcc not found")
@pytest.mark.parametrize("arch", [80, 90], ids=lambda a: f"sm_{a}")
def test_cuda_kernel_compiles_without_spills(arch, tmp_path):
    nvcc = NVCC if os.path.exists(NVCC) else shutil.which("nvcc")
    out = subprocess.run(
        [nvcc, *NVCC_FLAGS, f"-arch=sm_{arch}", "-Xptxas", "-v", "-c", str(csrc_dir() / "adamw_sr_cuda.cu"),
         "-o", str(tmp_path / "k.o")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = out.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)'", report)
    assert len(kernels) == 11, kernels  # 10 (param, grad, moment, SR) variants + the SR cast
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(spills) == len(kernels) and all(s == ("0", "0") for s in spills), report


def _cuda_library(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda") / "libadamw_sr_cuda.so"
    major, minor = torch.cuda.get_device_capability()
    subprocess.run(
        [NVCC, *NVCC_FLAGS, f"-arch=sm_{major}{minor}", "-Xcompiler", "-fPIC", "-shared",
         str(csrc_dir() / "adamw_sr_cuda.cu"), "-o", str(path)],
        check=True, timeout=300,
    )  # fmt: skip
    return ctypes.CDLL(str(path))


def _inputs(pd, gd, sd, sizes, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        p = torch.randn(n, generator=gen).to(pd)
        g = (torch.randn(n, generator=gen) * 1e-3).to(gd)
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
def test_triton_and_cuda_kernels_match_torch_path_on_gpu(pd, gd, sd, tmp_path_factory):
    from clip_fast.kernels import adamw as K

    lib = _cuda_library(tmp_path_factory)
    sizes = [1_000_003, 4097, 1]
    hyper = O.Hyper(0.9, 0.98, 5e-4, 0.1, 1e-6)
    fp16 = sd == torch.float16
    e_new = O.next_moment_exp(1, float(torch.tensor(3e-3)))
    ts = O.TensorScalars(5e-4, 0.9, 0.98, 4, 1 if fp16 else 0, e_new if fp16 else 0)
    keys = [O.stream_key(5, i, 4) for i in range(len(sizes))]
    ref = _inputs(pd, gd, sd, sizes, "cuda")
    for (p, g, m, r), k in zip(ref, keys):
        O.torch_adamw_update(p, g, m, r, O.random_words(k, p.numel(), "cuda"), hyper, ts, True)
    # Triton
    tri = _inputs(pd, gd, sd, sizes, "cuda")
    states = [_state(m, r) for _, _, m, r in tri]
    K.adamw_step([x[0] for x in tri], [x[1] for x in tri], states, keys, [ts] * 3, hyper, True)
    # CUDA (same tables)
    cu = _inputs(pd, gd, sd, sizes, "cuda")
    cu_states = [_state(m, r) for _, _, m, r in cu]
    tables = K.StepTables([x[0] for x in cu], [x[1] for x in cu], cu_states, keys, [ts] * 3)
    f = ctypes.c_float
    err = lib.clip_fast_adamw_sr_cuda(
        ctypes.c_void_p(tables.meta.data_ptr()), ctypes.c_void_p(tables.blocks.data_ptr()),
        ctypes.c_int64(tables.blocks.shape[0]), ctypes.c_void_p(tables.exp_in.data_ptr()),
        ctypes.c_void_p(tables.amax_in.data_ptr()), ctypes.c_void_p(tables.exp_out.data_ptr()),
        ctypes.c_void_p(tables.amax_out.data_ptr()), ctypes.c_void_p(tables.counts.data_ptr()),
        *(f(v) for v in hyper.args()), O.KIND[pd], O.KIND[gd], O.KIND[sd], 1, 0,
        ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
    )  # fmt: skip
    assert err == 0
    tables.write_back(cu_states)
    torch.cuda.synchronize()
    for (p, _, m, r), t, c in zip(ref, tri, cu):
        for want, got_t, got_c in ((p, t[0], c[0]), (m, t[2], c[2]), (r, t[3], c[3])):
            assert torch.equal(want.view(torch.uint8), got_t.view(torch.uint8))
            assert torch.equal(want.view(torch.uint8), got_c.view(torch.uint8))
    assert [int(s["nonfinite_count"]) for s in states] == [1, 1, 1]
    assert [int(s["nonfinite_count"]) for s in cu_states] == [1, 1, 1]


@pytest.mark.gpu
def test_gpu_stochastic_round_matches_cpu_and_is_unbiased():
    import clip_fast

    x = torch.randn(1 << 20) * 3
    gpu = clip_fast.stochastic_round(x.cuda(), seed=9).cpu()
    assert torch.equal(gpu.view(torch.int16), O.torch_stochastic_round(x, O.stream_key(9)).view(torch.int16))
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
