"""Calls every Triton launcher of clip_fast once at odd shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/gpu_sanitize_driver.py
    compute-sanitizer --tool initcheck python benchmarks/gpu_sanitize_driver.py
    python benchmarks/gpu_sanitize_driver.py --device-guard     # needs 2 GPUs
    TRITON_INTERPRET=1 CLIP_FAST_BACKEND=triton python benchmarks/gpu_sanitize_driver.py --device cpu
                                                                # the same calls under Triton's interpreter

Shapes are odd (ragged tiles, unaligned rows: M=37, N=53, D=67) plus one aligned case
per kernel, so every masked edge and both alignment variants run. Each case prints
"launched NAME" after a device synchronise, so a sanitizer log shows how far it got.

--device-guard (issue 12 item 12): every case runs on cuda:1 twice, once with cuda:1
current and once with cuda:0 current; results must agree. Cases use deterministic modes
where they exist; the atomics left (SigLIP, the fused contrastive backward's text side)
reorder fp32 sums of at most N = 53 terms, so results may differ by ~N * 2^-24 relative
to the largest term: the check allows 1e-4 of the largest magnitude (a wrong device or
stream gives garbage or an illegal access instead).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import torch

Case = Callable[[torch.device], list[torch.Tensor]]


def _features(m: int, d: int, device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=-1)
    return x.to(device=device, dtype=dtype)


def _contrastive(backward: str, dtype: torch.dtype, m: int, n: int, d: int, **kw) -> Case:
    def case(device: torch.device) -> list[torch.Tensor]:
        from clip_fast.contrastive_ops import logit_grads, lse_stats

        os.environ["CLIP_FAST_CONTRASTIVE_BACKWARD"] = backward
        a, b = _features(m, d, device, dtype, 1), _features(n, d, device, dtype, 2)
        scale, bias = torch.tensor([20.0], device=device), torch.tensor([-2.0], device=device)
        row, col = lse_stats(a, b, scale, bias)
        return [row, col, *logit_grads(a, b, scale, bias, row, col, diag_offset=min(3, n - m), **kw)]

    return case


def _siglip(dtype: torch.dtype, b: int, d: int) -> Case:
    def case(device: torch.device) -> list[torch.Tensor]:
        from clip_fast import SigLipLoss

        img = _features(b, d, device, dtype, 3).requires_grad_()
        txt = _features(b, d, device, dtype, 4).requires_grad_()
        scale = torch.tensor(10.0, device=device, requires_grad=True)
        bias = torch.tensor(-10.0, device=device, requires_grad=True)
        loss = SigLipLoss()(img, txt, scale, bias)
        loss.backward()
        return [loss.detach(), img.grad, txt.grad, scale.grad, bias.grad]

    return case


def _attention_pool(dtype: torch.dtype, n: int, side: int, c: int, heads: int) -> Case:
    def case(device: torch.device) -> list[torch.Tensor]:
        from clip_fast.model import AttentionPool2d

        torch.manual_seed(0)
        pool = AttentionPool2d(side, c, heads, 40).to(device)
        g = torch.Generator(device="cpu").manual_seed(5)
        x = torch.randn(n, c, side, side, generator=g).to(device=device, dtype=dtype).requires_grad_()
        y = pool(x)  # the pool casts its weights to x's dtype
        y.float().square().sum().backward()
        return [y.detach(), x.grad, *(p.grad for p in pool.parameters() if p.grad is not None)]

    return case


def _adamw(param_dtype: torch.dtype, state_dtype: torch.dtype | None) -> Case:
    def case(device: torch.device) -> list[torch.Tensor]:
        from clip_fast.optim import AdamW

        g = torch.Generator(device="cpu").manual_seed(6)
        shapes = [(37,), (3, 5, 7), (1000, 3), (), (0,), (4097,)]
        params = [torch.nn.Parameter((0.02 * torch.randn(s, generator=g)).to(device=device, dtype=param_dtype))
                  for s in shapes]
        for p in params:
            p.grad = (1e-3 * torch.randn(p.shape, generator=g)).to(device=device, dtype=param_dtype)
        opt = AdamW(params, lr=1e-3, weight_decay=0.1, state_dtype=state_dtype, seed=0)
        opt.step()
        opt.step()
        return [p.detach() for p in params]

    return case


def _stochastic_round(numel: int) -> Case:
    def case(device: torch.device) -> list[torch.Tensor]:
        import clip_fast

        x = torch.randn(numel, generator=torch.Generator(device="cpu").manual_seed(7)).to(device)
        return [clip_fast.stochastic_round(x, seed=3).float()]

    return case


CASES: dict[str, Case] = {
    "contrastive_fused_bf16_odd": _contrastive("fused", torch.bfloat16, 37, 53, 67),
    "contrastive_fused_fp32_odd": _contrastive("fused", torch.float32, 37, 53, 67),
    "contrastive_fused_deterministic_split": _contrastive("fused", torch.bfloat16, 37, 53, 67, deterministic=True,
                                                          split=True),
    "contrastive_fused_fp16_aligned": _contrastive("fused", torch.float16, 128, 256, 64),
    "contrastive_strips_bf16_odd": _contrastive("strips", torch.bfloat16, 37, 53, 67),
    "contrastive_strips_fp16_aligned": _contrastive("strips", torch.float16, 128, 256, 64),
    "siglip_bf16_odd": _siglip(torch.bfloat16, 37, 67),
    "siglip_fp32_odd": _siglip(torch.float32, 53, 67),
    "attention_pool_bf16_5x5": _attention_pool(torch.bfloat16, 3, 5, 96, 6),
    "attention_pool_fp32_3x3": _attention_pool(torch.float32, 2, 3, 72, 3),
    "adamw_bf16_sr_bf16_moments": _adamw(torch.bfloat16, torch.bfloat16),
    "adamw_bf16_sr_fp16_moments": _adamw(torch.bfloat16, torch.float16),
    "adamw_fp32": _adamw(torch.float32, None),
    "stochastic_round_odd": _stochastic_round(1001),
}


def run_all(device: torch.device) -> None:
    for name, case in CASES.items():
        outputs = case(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if not all(bool(torch.isfinite(t).all()) for t in outputs):
            print(f"NONFINITE {name}", flush=True)
        print(f"launched {name}", flush=True)


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape or not torch.equal(a.isnan(), b.isnan()):
        return True
    scale = max(float(b.nan_to_num().abs().max()) if b.numel() else 0.0, 1e-30)
    return bool(((a - b).nan_to_num().abs() > 1e-4 * scale).any())


def device_guard() -> int:
    """Each case on cuda:1 with cuda:1 current, then with cuda:0 current; 0 if all agree."""
    target = torch.device("cuda", 1)
    bad = 0
    for name, case in CASES.items():
        with torch.cuda.device(1):
            expected = case(target)
            torch.cuda.synchronize(target)
        with torch.cuda.device(0):
            got = case(target)
            torch.cuda.synchronize(target)
        if len(got) != len(expected) or any(_differs(g, e) for g, e in zip(got, expected)):
            print(f"MISMATCH {name}", flush=True)
            bad += 1
        else:
            print(f"launched {name}", flush=True)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device-guard", action="store_true", help="compare cuda:1 runs with cuda:0 / cuda:1 current")
    p.add_argument("--device", default="cuda:0", help="cuda:N, or cpu under TRITON_INTERPRET=1 CLIP_FAST_BACKEND=triton")
    args = p.parse_args(argv)
    if args.device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("CLIP_FAST_BACKEND") != "triton":
            print("gpu_sanitize_driver: error: --device cpu needs TRITON_INTERPRET=1 CLIP_FAST_BACKEND=triton",
                  file=sys.stderr)
            return 2
        run_all(torch.device("cpu"))
        return 0
    if not torch.cuda.is_available():
        print("gpu_sanitize_driver: error: needs a CUDA device", file=sys.stderr)
        return 2
    if args.device_guard:
        if torch.cuda.device_count() < 2:
            print("gpu_sanitize_driver: error: --device-guard needs 2 GPUs", file=sys.stderr)
            return 2
        return device_guard()
    run_all(torch.device(args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
