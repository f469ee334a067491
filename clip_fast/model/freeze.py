"""LiT-style locking of a tower (open_clip's lock_image_tower / lock_text_tower semantics).

Image tower, ViT: the tower is split into groups, in order
  [conv1, class_embedding, positional_embedding, ln_pre], block 0, ..., block L-2,
  [block L-1, ln_post], proj
and every parameter is frozen except those of the last `unlocked_groups` groups.
Image tower, ModifiedResNet: locked whole (open_clip supports no partial lock there);
`freeze_bn_stats` also stops its BatchNorm layers from updating running statistics
(they normalise with the stored ones, in training too).
Text tower: groups [token_embedding, positional_embedding], block 0, ..., block L-2,
[block L-1, ln_final], text_projection; all but the last `unlocked_layers` groups frozen.
LayerNorm is locked like any other weight (it has no running statistics), so
`freeze_layer_norm` changes nothing: open_clip documents it as API compatibility only.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its running statistics and never updates
    them (same parameters and buffers as BatchNorm2d, so state_dicts are unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _set_requires_grad(items: Iterable[nn.Module | nn.Parameter], flag: bool) -> None:
    for item in items:
        params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
        for p in params:
            p.requires_grad_(flag)


def _unlock_last(groups: list[list[nn.Module | nn.Parameter]], count: int) -> None:
    if count:
        for group in groups[-count:]:
            _set_requires_grad(group, True)


def freeze_batchnorm_stats(module: nn.Module) -> int:
    """Turns every BatchNorm2d under `module` into FrozenStatsBatchNorm2d in place;
    returns how many were converted."""
    count = 0
    for m in module.modules():
        if type(m) in (nn.BatchNorm2d, nn.SyncBatchNorm):
            m.__class__ = FrozenStatsBatchNorm2d
            count += 1
    return count


def lock_image_tower(model: nn.Module, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
    """Freeze the image tower of a clip_fast CLIP except its last `unlocked_groups`
    layer groups (see the module docstring). ValueError for a partial ResNet lock."""
    if not isinstance(unlocked_groups, int) or unlocked_groups < 0:
        raise ValueError(f"unlocked_groups must be an int >= 0, got {unlocked_groups!r}")
    visual = model.visual
    _set_requires_grad([visual], False)
    if hasattr(visual, "transformer"):  # ViT
        blocks = list(visual.transformer.resblocks)
        groups = [[visual.conv1, visual.class_embedding, visual.positional_embedding, visual.ln_pre],
                  *[[b] for b in blocks[:-1]], [blocks[-1], visual.ln_post], [visual.proj]]
        _unlock_last(groups, min(unlocked_groups, len(groups)))
        return
    if unlocked_groups:
        raise ValueError("unlocked_groups: partial locking of a ModifiedResNet image tower is not supported "
                         "(as in open_clip); lock it whole")
    if freeze_bn_stats:
        freeze_batchnorm_stats(visual)


def lock_text_tower(model: nn.Module, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
    """Freeze the text tower of a clip_fast CLIP except its last `unlocked_layers` groups
    (see the module docstring; `freeze_layer_norm` is accepted for API compatibility)."""
    if not isinstance(unlocked_layers, int) or unlocked_layers < 0:
        raise ValueError(f"unlocked_layers must be an int >= 0, got {unlocked_layers!r}")
    blocks = list(model.transformer.resblocks)
    groups = [[model.token_embedding, model.positional_embedding], *[[b] for b in blocks[:-1]],
              [blocks[-1], model.ln_final], [model.text_projection]]
    _set_requires_grad([p for g in groups for p in g], False)
    _unlock_last(groups, min(unlocked_layers, len(groups)))
