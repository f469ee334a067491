"""Optimizer step time and memory for a ViT-B/32 CLIP-sized parameter set (151.3M params,
the shapes of open_clip's ViT-B-32: 12+12 residual blocks, 49,408-token embedding).

Variants, all in one run on the same machine:
  - torch_foreach: torch.optim.AdamW(foreach=True), fp32 weights/grads/moments (the usual
    fp32-master-weight setup: 4 + 4 + 4 bytes of weight+state per parameter, +4 grad);
  - torch_fused:   torch.optim.AdamW(fused=True), same memory;
  - clip_fast:     clip_fast.optim.AdamW with bf16 weights, bf16 grads and bf16 moments,
    stochastic rounding (2 + 2 + 2 bytes of weight+state per parameter, +2 grad).
On CPU clip_fast runs the C++ extension (target: faster than torch_fused), on CUDA
the fused Triton kernel. Gradients are filled once; each call is one optimizer step.
extra_info: params, bytes of weight+state (and per parameter), the same with gradients,
the CPU threads, and the memory floor measured in the same run: the bytes one step must
move per parameter (clip_fast bf16 + SR: read w, g, m, v = 8 B, write w, m, v = 6 B, so
14; fp32 AdamW: 16 + 12 = 28), the machine's copy bandwidth (best of a large torch
copy_ timed just before and just after the step, bytes read + written per second), the
floor = params * bytes per param / bandwidth, and mean step time / floor (the target for
clip_fast on CPU: <= 1.25).

    pytest benchmarks/test_optim.py --benchmark-only --benchmark-columns=mean,stddev,rounds

CLIP_FAST_BENCH_OPTIM_SCALE=0.25 shrinks every tensor's first dimension (quick runs).
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from clip_fast.optim import AdamW


def vit_b32_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of CLIP ViT-B/32 (open_clip 'ViT-B-32', OpenAI layout)."""
    shapes: list[tuple[int, ...]] = []

    def tower(width: int, layers: int) -> None:
        for _ in range(layers):
            shapes.extend([(width,), (width,)])  # ln_1
            shapes.extend([(3 * width, width), (3 * width,), (width, width), (width,)])  # attention
            shapes.extend([(width,), (width,)])  # ln_2
            shapes.extend([(4 * width, width), (4 * width,), (width, 4 * width), (width,)])  # mlp

    # vision: conv1, class/positional embedding, ln_pre, blocks, ln_post, proj
    shapes.extend([(768, 3, 32, 32), (768,), (50, 768), (768,), (768,)])
    tower(768, 12)
    shapes.extend([(768,), (768,), (768, 512)])
    # text: token/positional embedding, blocks, ln_final, text_projection, logit_scale
    shapes.extend([(49408, 512), (77, 512)])
    tower(512, 12)
    shapes.extend([(512,), (512,), (512, 512), ()])
    return shapes


def _scaled(shapes, scale: float):
    if scale == 1.0:
        return shapes
    return [(max(1, int(s[0] * scale)), *s[1:]) if s else s for s in shapes]


SHAPES = _scaled(vit_b32_shapes(), float(os.environ.get("CLIP_FAST_BENCH_OPTIM_SCALE", "1")))
N_PARAMS = sum(torch.Size(s).numel() for s in SHAPES)


def _params(dtype: torch.dtype, device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in SHAPES:
        p = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        with torch.no_grad():
            p.normal_(0.0, 0.02, generator=gen)
        p.grad = torch.empty_like(p).normal_(0.0, 1e-3, generator=gen)
        params.append(p)
    return params


def _bytes(opt: torch.optim.Optimizer, params) -> tuple[int, int]:
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    state = sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )
    return weights + state, grads


# Bytes a step must read + write per parameter (weights, gradient, both moments).
BYTES_MOVED_PER_PARAM = {"clip_fast": 2 * 4 + 2 * 3, "torch_foreach": 4 * 4 + 4 * 3, "torch_fused": 4 * 4 + 4 * 3}


def copy_bandwidth(nbytes: int, device: str, repeats: int = 5) -> float:
    """Bytes read + written per second by the best of `repeats` copies of an nbytes buffer."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def _record_floor(benchmark, device: str, variant: str, bandwidth: float) -> None:
    moved = BYTES_MOVED_PER_PARAM[variant]
    floor_s = N_PARAMS * moved / bandwidth
    benchmark.extra_info.update(
        bytes_moved_per_param=moved,
        copy_gb_per_s=round(bandwidth / 1e9, 2),
        floor_ms=round(floor_s * 1e3, 2),
        time_over_floor=round(benchmark.stats.stats.mean / floor_s, 3),
    )


def _run(measure, benchmark, device, variant: str):
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    if variant == "clip_fast":
        params = _params(torch.bfloat16, device)
        opt = AdamW(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, seed=0)
    else:
        params = _params(torch.float32, device)
        flag = {"torch_foreach": dict(foreach=True), "torch_fused": dict(fused=True)}[variant]
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, **flag)
    opt.step()  # creates the state
    weight_state, grads = _bytes(opt, params)
    copy_bytes = N_PARAMS * BYTES_MOVED_PER_PARAM[variant] // 2  # a copy moves twice its size
    bandwidth = copy_bandwidth(copy_bytes, device)
    measure(
        opt.step,
        rounds=5,
        params=N_PARAMS,
        weight_plus_state_bytes=weight_state,
        weight_plus_state_bytes_per_param=round(weight_state / N_PARAMS, 3),
        with_grads_bytes_per_param=round((weight_state + grads) / N_PARAMS, 3),
        threads=torch.get_num_threads(),
    )
    _record_floor(benchmark, device, variant, max(bandwidth, copy_bandwidth(copy_bytes, device)))


@pytest.mark.parametrize("variant", ["torch_foreach", "torch_fused", "clip_fast"])
def test_adamw_step_vit_b32(measure, benchmark, device, variant):
    if variant == "torch_fused" and device == "cpu" and not hasattr(torch._C._VariableFunctions, "_fused_adamw_"):
        pytest.skip("torch has no fused AdamW on CPU")
    _run(measure, benchmark, device, variant)
