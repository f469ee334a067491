"""Which implementation runs an op: the Triton kernels, the C++ extension or torch.

Every op asks `select_backend(op, *tensors)` once per call and runs the implementation
it names:

  "triton"  the Triton kernels (clip_fast.kernels);
  "cpp"     the C++ extension's CPU ops (torch.ops.clip_fast, csrc/);
  "torch"   the op's pure-torch code, on any device.

`CLIP_FAST_BACKEND` (read at each call, so tests can flip it):
  auto    (default) Triton for CUDA tensors, then the C++ ops for CPU tensors the op's
          C++ twin accepts, torch for everything else;
  triton  the Triton kernels for every tensor of a dtype the kernels support; CPU
          tensors need TRITON_INTERPRET=1 set before triton is imported (this is how
          the kernels are tested on CPU); other dtypes (fp64) fall to C++/torch;
  torch   the torch path on any device.

A backend that is wanted but missing falls back with a one-time warning (triton not
installed under `auto`, the C++ extension not built: clip_fast._ext); forcing
`triton` where it cannot run raises.

`CLIP_FAST_CONTRASTIVE_BACKWARD` picks the contrastive loss's Triton backward:
  auto    (default) the strip backward for bf16/fp16 CUDA features once B x B >= 2^26,
          the fused kernel otherwise (clip_fast.kernels.contrastive.prefer_strips);
  fused   one fused kernel (atomics, or a second launch when deterministic);
  strips  Triton writes G in bf16/fp16 strips, cuBLAS multiplies (bf16/fp16 only).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Literal, Protocol

import torch

from clip_fast import _ext
from clip_fast._warnings import warn_once

BACKENDS = ("auto", "triton", "torch")
CONTRASTIVE_BACKWARDS = ("auto", "fused", "strips")

Backend = Literal["triton", "cpp", "torch"]

_HALF_AND_FP32 = (torch.float16, torch.bfloat16, torch.float32)


class _Operand(Protocol):
    """What the selection reads of an operand (a torch.Tensor has both)."""

    device: torch.device
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class OpSupport:
    """What an op's implementations accept.

    triton_dtypes: operand dtypes the Triton kernels have configurations for (None:
        the kernels take any dtype the op does);
    cpp_dtypes: operand dtypes the C++ twin takes on CPU (empty: the op has no C++
        twin). An op that upcasts to fp32 before its C++ kernel lists bf16/fp16 too.
    """

    name: str
    triton_dtypes: tuple[torch.dtype, ...] | None = _HALF_AND_FP32
    cpp_dtypes: tuple[torch.dtype, ...] = ()


# The ops and what each implementation of them accepts (fp64 exists for gradcheck: no
# kernel has an fp64 configuration, so fp64 always runs the torch code).
CONTRASTIVE = OpSupport("contrastive loss", cpp_dtypes=_HALF_AND_FP32)  # C++ blocks run in fp32
SIGLIP = OpSupport("siglip loss", cpp_dtypes=_HALF_AND_FP32)  # C++ tiles run in fp32
ADAMW = OpSupport("adamw", cpp_dtypes=_HALF_AND_FP32)
STOCHASTIC_ROUND = OpSupport("stochastic rounding", triton_dtypes=(torch.float32,), cpp_dtypes=(torch.float32,))
TRITON_ONLY = OpSupport("triton-only op", triton_dtypes=None)  # a Triton kernel and torch code only


def requested_backend() -> str:
    """CLIP_FAST_BACKEND, validated: 'auto', 'triton' or 'torch'."""
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


def select_backend(op: OpSupport, *tensors: _Operand) -> Backend:
    """The implementation of `op` that runs on these operands under CLIP_FAST_BACKEND:
    Triton when requested (or CUDA operands under `auto`) and the kernels take their
    dtype; else C++ for CPU operands of a dtype the op's C++ twin takes, when the
    extension loads; else torch."""
    requested = requested_backend()
    if requested == "torch":
        return "torch"
    dtypes = {t.dtype for t in tensors}
    triton_takes = op.triton_dtypes is None or dtypes <= set(op.triton_dtypes)
    if triton_takes and _triton_runs(requested, all(t.device.type == "cuda" for t in tensors)):
        return "triton"
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    if on_cpu and dtypes <= set(op.cpp_dtypes) and _ext.load_extension() is not None:
        return "cpp"
    return "torch"


def _triton_runs(requested: str, on_cuda: bool) -> bool:
    """Whether the Triton kernels run, given operands they support (raises when forced
    where they cannot run)."""
    if requested == "auto":
        if on_cuda and not triton_available():
            warn_once("triton is not installed: CUDA tensors use the torch path")
            return False
        return on_cuda
    # requested == "triton"
    if not triton_available():
        raise RuntimeError("CLIP_FAST_BACKEND=triton but triton is not installed")
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            "CLIP_FAST_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 "
            "set before triton is imported (run Triton's interpreter)"
        )
    return True


__all__ = [
    "ADAMW", "CONTRASTIVE", "SIGLIP", "STOCHASTIC_ROUND", "TRITON_ONLY", "Backend", "OpSupport",
    "contrastive_backward", "requested_backend", "select_backend",
]
