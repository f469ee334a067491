"""Attention and LayerNorm backends of the CLIP towers.

Attention (`attention(qkv, causal)`), first applicable of:
  flash_attn  `flash_attn_qkvpacked_func` (Dao-AILab flash-attention) when the package is
              importable, the tensors are CUDA fp16/bf16 and the head dim is a multiple
              of 8 up to 256;
  xformers    `xformers.ops.memory_efficient_attention` when importable and on CUDA;
  sdpa        `torch.nn.functional.scaled_dot_product_attention`, always applicable (it
              picks its own flash / cuDNN / memory-efficient / math kernel).
Force one with the environment variable CLIP_FAST_ATTENTION=auto|flash_attn|xformers|sdpa
or `set_attention_backend(name)`; `attention_backend(device, dtype, head_dim)` reports the
choice. A forced backend that is not installed is an error; one that cannot run a
particular call (a CPU tensor for flash_attn) falls back to sdpa with a one-time warning.

LayerNorm: NVIDIA apex's fused LayerNorm kernel is used for CUDA tensors when apex is
installed with its CUDA extension. PyPI's unrelated package also called `apex` has no
`apex.normalization`, so detection checks for that module and for the compiled
`fused_layer_norm_cuda` extension, not for the name `apex`.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import nn

from clip_fast._warnings import warn_once

ATTENTION_BACKENDS = ("auto", "flash_attn", "xformers", "sdpa")
_forced: str | None = None


def _import(name: str, attr: str | None = None):
    """The module (or its attribute `attr`), or None when missing or failing to import."""
    try:
        if importlib.util.find_spec(name.split(".")[0]) is None:
            return None
        mod = importlib.import_module(name)
        return getattr(mod, attr) if attr is not None else mod
    except Exception:  # a broken optional install must not break the model
        return None


def detect_apex_layer_norm():
    """NVIDIA apex's fused LayerNorm function, or None (also for PyPI's unrelated `apex`,
    which has no apex.normalization, and for apex built without its CUDA extension)."""
    try:
        if importlib.util.find_spec("apex") is None or importlib.util.find_spec("apex.normalization") is None:
            return None
        if importlib.util.find_spec("fused_layer_norm_cuda") is None:
            return None
    except Exception:  # find_spec imports the parent package, which may fail
        return None
    return _import("apex.normalization.fused_layer_norm", "fused_layer_norm_affine")


# Resolved once at import, so compiled (torch.compile) forwards only read constants.
_FLASH_QKVPACKED = _import("flash_attn", "flash_attn_qkvpacked_func")
_XFORMERS_OPS = _import("xformers.ops")
APEX_LAYER_NORM = detect_apex_layer_norm()
APEX_DEVICE_TYPES = ("cuda",)  # devices whose tensors go to APEX_LAYER_NORM


def flash_attn_available() -> bool:
    return _FLASH_QKVPACKED is not None


def xformers_available() -> bool:
    return _XFORMERS_OPS is not None


def set_attention_backend(name: str | None) -> None:
    """Force an attention backend for this process (None or "auto": automatic choice)."""
    global _forced
    if name is not None and name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name == "flash_attn" and not flash_attn_available():
        raise ValueError("attention backend 'flash_attn' requested but flash_attn is not importable")
    if name == "xformers" and not xformers_available():
        raise ValueError("attention backend 'xformers' requested but xformers is not importable")
    _forced = None if name == "auto" else name


def requested_attention_backend() -> str:
    if _forced is not None:
        return _forced
    value = os.environ.get("CLIP_FAST_ATTENTION", "auto").strip().lower()
    if value not in ATTENTION_BACKENDS:
        raise ValueError(f"CLIP_FAST_ATTENTION must be one of {ATTENTION_BACKENDS}, got {value!r}")
    if value == "flash_attn" and not flash_attn_available():
        raise ValueError("CLIP_FAST_ATTENTION=flash_attn but flash_attn is not importable")
    if value == "xformers" and not xformers_available():
        raise ValueError("CLIP_FAST_ATTENTION=xformers but xformers is not importable")
    return value


def _flash_applicable(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256


def attention_backend(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, head_dim: int = 64) -> str:
    """The backend `attention` uses for tensors of this device, dtype and head dim."""
    device = torch.device(device)
    requested = requested_attention_backend()
    flash_ok = flash_attn_available() and _flash_applicable(device, dtype, head_dim)
    xformers_ok = xformers_available() and device.type == "cuda"
    if requested == "auto":
        return "flash_attn" if flash_ok else "xformers" if xformers_ok else "sdpa"
    if requested == "flash_attn" and not flash_ok:
        warn_once(f"flash_attn cannot run {device.type} {dtype} head_dim={head_dim} attention: using sdpa")
        return "sdpa"
    if requested == "xformers" and not xformers_ok:
        warn_once(f"xformers cannot run {device.type} attention: using sdpa")
        return "sdpa"
    return requested


def attention(qkv: torch.Tensor, causal: bool) -> torch.Tensor:
    """Multi-head self-attention of packed projections.

    qkv (B, L, 3, H, D) -> (B, L, H * D); softmax scale 1/sqrt(D); `causal` masks keys
    after each query (text tower).
    """
    b, l, _, h, d = qkv.shape
    backend = attention_backend(qkv.device, qkv.dtype, d)
    if backend == "flash_attn":
        out = _FLASH_QKVPACKED(qkv, causal=causal)  # (B, L, H, D)
    elif backend == "xformers":
        q, k, v = qkv.unbind(2)  # (B, L, H, D) each
        bias = _XFORMERS_OPS.LowerTriangularMask() if causal else None
        out = _XFORMERS_OPS.memory_efficient_attention(q, k, v, attn_bias=bias)  # (B, L, H, D)
    else:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, D) each
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)  # (B, L, H, D)
    return out.reshape(b, l, h * d)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (autocast or half weights),
    returning the input dtype; apex's fused kernel on CUDA when installed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        weight = self.weight.to(dtype) if self.weight is not None else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        fused = APEX_LAYER_NORM if x.device.type in APEX_DEVICE_TYPES and dtype == torch.float32 else None
        if fused is not None and weight is not None:
            # apex registers its fused function with autocast's half-precision cast
            # (amp.half_function): autocast off, so it runs on the fp32 tensors given.
            with torch.autocast(x.device.type, enabled=False):
                out = fused(x.to(dtype), weight, bias, self.normalized_shape, self.eps)
        else:
            out = F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)
