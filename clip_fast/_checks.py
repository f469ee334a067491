"""Input checks shared by the losses: errors name the argument and what was expected."""
from __future__ import annotations

import numbers
from typing import Optional, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_feature_pair(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    """Both (B, D) floating-point tensors of one shape, dtype and device, B, D >= 1."""
    for name, x in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (batch, dim), got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be fp16, bf16, fp32 or fp64, got {x.dtype}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{name} must have batch >= 1 and dim >= 1, got shape {tuple(x.shape)}")
    if image_features.shape != text_features.shape:
        raise ValueError(
            "image_features and text_features must have the same shape (batch, dim), got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if image_features.device != text_features.device:
        raise ValueError(
            "image_features and text_features must be on the same device, got "
            f"{image_features.device} and {text_features.device}"
        )
    if image_features.dtype != text_features.dtype:
        raise ValueError(
            "image_features and text_features must have the same dtype, got "
            f"{image_features.dtype} and {text_features.dtype}"
        )


def as_scalar(value: Union[torch.Tensor, float, None], name: str, like: torch.Tensor) -> Optional[torch.Tensor]:
    """`logit_scale` / `logit_bias` as a 0-dim tensor on `like`'s device (None stays None).
    Python numbers become constant fp32 tensors; tensors keep their autograd graph."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), device=like.device, dtype=torch.float32)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or a number, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar tensor (one element), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.device != like.device:
        raise ValueError(f"{name} must be on the features' device {like.device}, got {value.device}")
    return value.reshape(())
