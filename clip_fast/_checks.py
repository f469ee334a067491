"""Input handling shared by the losses: the modules' rank checks, checks whose errors
name the argument and what was expected, scalars as tensors, the empty-batch value, the
dtype the losses compute in, and autocast switched off around the losses' own arithmetic."""
from __future__ import annotations

import functools
import numbers
from typing import Callable, Optional, TypeVar, Union

import torch

T = TypeVar("T")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class LossInputError(ValueError, RuntimeError, IndexError):
    """Bad loss input. A ValueError (the message names the argument and what was
    expected), and also a RuntimeError and an IndexError: open_clip's losses raise one
    of those for the same inputs (from the matmul or cross_entropy), so code written
    against open_clip's exceptions still catches it."""


class RankedLoss(torch.nn.Module):
    """Base of the open_clip-compatible loss modules: this process's place in its group
    (0 <= rank < world_size, checked) and open_clip's `cache_labels` flag, accepted for
    API parity (no label tensor is ever materialised here)."""

    def __init__(self, cache_labels: bool, rank: int, world_size: int) -> None:
        super().__init__()
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size


def check_feature_pair(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    """Both (B, D) floating-point tensors of one shape, dtype and device, D >= 1 (B = 0
    is allowed: the losses return NaN for it, as open_clip's do)."""
    for name, x in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (batch, dim), got {type(x).__name__}")
        if x.dim() != 2:
            raise LossInputError(f"{name} must be 2-D (batch, dim), got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise LossInputError(f"{name} must be fp16, bf16, fp32 or fp64, got {x.dtype}")
        if x.shape[1] < 1:
            raise LossInputError(f"{name} must have dim >= 1, got shape {tuple(x.shape)}")
    if image_features.shape != text_features.shape:
        raise LossInputError(
            "image_features and text_features must have the same shape (batch, dim), got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if image_features.device != text_features.device:
        raise LossInputError(
            "image_features and text_features must be on the same device, got "
            f"{image_features.device} and {text_features.device}"
        )
    if image_features.dtype != text_features.dtype:
        raise LossInputError(
            "image_features and text_features must have the same dtype, got "
            f"{image_features.dtype} and {text_features.dtype}"
        )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the losses accumulate in for features of `dtype`: fp64 for fp64 (so
    gradcheck sees fp64 arithmetic), fp32 for fp32, bf16 and fp16."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_scalar(value: Union[torch.Tensor, float, None], name: str, like: torch.Tensor) -> Optional[torch.Tensor]:
    """`logit_scale` / `logit_bias` as a 0-dim tensor on `like`'s device (None stays None).
    Python numbers and integer tensors (which open_clip accepts too; they carry no
    gradient) become constant fp32 tensors; floating-point tensors keep their dtype
    and autograd graph."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), device=like.device, dtype=torch.float32)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or a number, got {type(value).__name__}")
    if value.numel() != 1:
        raise LossInputError(f"{name} must be a scalar tensor (one element), got shape {tuple(value.shape)}")
    if value.is_complex() or value.dtype == torch.bool:
        raise LossInputError(f"{name} must be a real number tensor, got {value.dtype}")
    if value.device != like.device:
        raise LossInputError(f"{name} must be on the features' device {like.device}, got {value.device}")
    if not value.is_floating_point():
        value = value.to(torch.float32)
    return value.reshape(())


def empty_batch_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """The loss of a batch of 0 pairs: NaN (a mean over no terms, 0/0, as open_clip
    returns), in the dtype non-empty batches get, attached to the inputs' graph with
    zero gradients (empty for the features, 0 for the scale and bias)."""
    total = (image.sum() + text.sum()) * scale  # = 0; gradients 0
    if bias is not None:
        total = total + 0 * bias
    out_dtype = torch.promote_types(image.dtype, torch.float32)
    return total.to(out_dtype) + torch.tensor(float("nan"), dtype=out_dtype, device=image.device)


def without_autocast(method: Callable[..., T]) -> Callable[..., T]:
    """Run an autograd.Function's forward(ctx, x, ...) or backward(ctx, grad, ...) with
    autocast disabled for the device of its first tensor: the losses compute in the
    dtypes they choose for the tensors they are given, so the value (and its gradient)
    is the same inside `torch.autocast` as outside it."""

    @functools.wraps(method)
    def run(ctx, first: torch.Tensor, *args):
        if first.device.type not in ("cpu", "cuda", "xpu", "mps", "hpu", "xla"):
            return method(ctx, first, *args)
        with torch.autocast(device_type=first.device.type, enabled=False):
            return method(ctx, first, *args)

    return run
