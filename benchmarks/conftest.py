"""Benchmark infrastructure shared by every suite in benchmarks/.

- `device` fixture: "cuda" when a GPU is present, else "cpu"; sizes are picked per device
  with `sizes_for(device, cpu=[...], gpu=[...])` so CPU runs finish in minutes and GPU
  runs go up to 256k.
- `measure` fixture: runs a callable under pytest-benchmark and records peak extra memory
  (bytes above what was allocated before the call), the device, and FLOPs per call with
  achieved TFLOP/s in `benchmark.extra_info`, so saved runs can be compared.

Save and compare runs:
    pytest benchmarks --benchmark-only --benchmark-save=baseline
    pytest benchmarks --benchmark-only --benchmark-compare=0001 --benchmark-group-by=param
"""
from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from typing import Any, Callable

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


def sizes_for(device: str, cpu: list[Any], gpu: list[Any]) -> list[Any]:
    return gpu if device == "cuda" else cpu


def materialised_fits(B: int, device: str) -> bool:
    """Whether a baseline that materialises ~6 B x B fp32 buffers (logits, softmax,
    their gradients) fits on `device`."""
    need = 6 * B * B * 4
    if device == "cuda":
        return need < torch.cuda.get_device_properties(0).total_memory
    return need < 12 * 2**30


def unit_features(B: int, D: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded L2-normalised (B, D) image and text features that require grad."""
    g = torch.Generator(device=device).manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(B, D, device=device, generator=g), dim=-1).to(dtype)
    text = torch.nn.functional.normalize(torch.randn(B, D, device=device, generator=g), dim=-1).to(dtype)
    return image.requires_grad_(), text.requires_grad_()


def bench_device() -> str:
    """The device a suite parametrises for at collection time."""
    return "cuda" if HAS_CUDA else "cpu"


def _release_freed_heap() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim), so that RSS measures live
    memory: otherwise memory freed by an earlier benchmark is reused without RSS growth
    and the next one's peak reads as ~0."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples the process RSS in a thread: CPU peak memory of a call (1 ms resolution)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __enter__(self) -> "_PeakRSS":
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def peak_extra_memory(fn: Callable[[], Any], device: str) -> int:
    """Bytes of memory `fn` needs above what is allocated when it starts."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    _release_freed_heap()
    base = _rss_bytes()
    with _PeakRSS() as sampler:
        fn()
    return max(0, sampler.peak - base)


@pytest.fixture
def measure(benchmark, device):
    """measure(fn, flops=None, rounds=None): benchmark `fn`, record memory and FLOP rate."""

    def run(fn: Callable[[], Any], flops: float | None = None, rounds: int | None = None, **extra: Any) -> Any:
        def call() -> Any:
            out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        call()  # warm-up: compilation, autotuning, allocator
        benchmark.extra_info["device"] = torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}"
        benchmark.extra_info["peak_extra_memory_mib"] = round(peak_extra_memory(call, device) / 2**20, 1)
        benchmark.extra_info.update(extra)
        if rounds is None:
            result = benchmark(call)
        else:
            result = benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
        if flops is not None:
            benchmark.extra_info["gflop_per_call"] = round(flops / 1e9, 3)
            mean_s = benchmark.stats.stats.mean
            benchmark.extra_info["tflop_per_s"] = round(flops / mean_s / 1e12, 4)
        return result

    return run
