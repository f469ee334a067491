"""Which implementation runs an op: the Triton kernels or the torch/C++ CPU path.

`CLIP_FAST_BACKEND` (read at each call, so tests can flip it):
  auto    (default) Triton for CUDA tensors, the torch/C++ path for everything else;
  triton  the Triton kernels for every tensor; CPU tensors need TRITON_INTERPRET=1
          set before triton is imported (this is how the kernels are tested on CPU);
  torch   the torch path on any device.

`CLIP_FAST_CONTRASTIVE_BACKWARD` picks the contrastive loss's Triton backward:
  auto    (default) the strip backward for bf16/fp16 CUDA features once B x B >= 2^26,
          the fused kernel otherwise (clip_fast.kernels.contrastive.prefer_strips);
  fused   one fused kernel (atomics, or a second launch when deterministic);
  strips  Triton writes G in bf16/fp16 strips, cuBLAS multiplies (bf16/fp16 only).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "torch")
CONTRASTIVE_BACKWARDS = ("auto", "fused", "strips")


def requested_backend() -> str:
    value = os.environ.get("CLIP_FAST_BACKEND", "auto").strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"CLIP_FAST_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def contrastive_backward() -> bool | None:
    """CLIP_FAST_CONTRASTIVE_BACKWARD as the launcher's `strips` argument (None = auto)."""
    value = os.environ.get("CLIP_FAST_CONTRASTIVE_BACKWARD", "auto").strip().lower()
    if value not in CONTRASTIVE_BACKWARDS:
        raise ValueError(f"CLIP_FAST_CONTRASTIVE_BACKWARD must be one of {CONTRASTIVE_BACKWARDS}, got {value!r}")
    return None if value == "auto" else value == "strips"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels should run on these tensors."""
    backend = requested_backend()
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        if on_cuda and not triton_available():
            warn_once("triton is not installed: CUDA tensors use the torch path")
            return False
        return on_cuda
    # backend == "triton"
    if not triton_available():
        raise RuntimeError("CLIP_FAST_BACKEND=triton but triton is not installed")
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            "CLIP_FAST_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 "
            "set before triton is imported (run Triton's interpreter)"
        )
    return True


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """Emit `message` once per process (fallbacks announce themselves, never crash)."""
    warnings.warn(f"clip_fast: {message}", RuntimeWarning, stacklevel=3)
