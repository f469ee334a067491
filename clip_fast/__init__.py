"""clip_fast: fused kernels and a trainer for CLIP at maximum throughput.

Public names are imported lazily so `import clip_fast` stays cheap and never imports
triton (which must see TRITON_INTERPRET before its first import).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ContrastiveLoss": "clip_fast.loss",
    "GradCache": "clip_fast.grad_cache",
    "LossInputError": "clip_fast._checks",
    "SigLipLoss": "clip_fast.siglip",
    "apply_to_open_clip": "clip_fast.open_clip_patch",
    "revert_open_clip_patch": "clip_fast.open_clip_patch",
    "stochastic_round": "clip_fast.optim",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'clip_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
