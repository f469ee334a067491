"""OpenAI's ModifiedResNet image tower: (B, 3, S, S) images -> (B, output_dim) features.

A 3-convolution stem with an average pool (S -> S/4), four stages of Bottleneck blocks
whose strided blocks average-pool before the strided convolutions (anti-aliasing;
S/4 -> S/32), and attention pooling over the final (S/32)^2 positions instead of a
global average: the fused kernel of clip_fast.model.attention_pool, with the
projections moved off the L tokens. Convolutions run channels_last (NHWC, tensor cores
on GPU; the attention pool reads NHWC maps without a copy). Under gradient
checkpointing the recomputed blocks leave BatchNorm's running statistics unchanged.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip_fast.model.attention_pool import AttentionPool2d
from clip_fast.model.config import VisionConfig


@contextlib.contextmanager
def _batchnorm_stats_frozen(module: nn.Module):
    """Recomputation under gradient checkpointing must not update BatchNorm running
    statistics a second time: momentum 0 leaves them unchanged; the counter is restored."""
    saved = [(bn, bn.momentum, bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None)
             for bn in module.modules() if isinstance(bn, nn.modules.batchnorm._BatchNorm)]
    for bn, _, _ in saved:
        bn.momentum = 0.0
    try:
        yield
    finally:
        for bn, momentum, count in saved:
            bn.momentum = momentum
            if count is not None:
                bn.num_batches_tracked.copy_(count)


class Bottleneck(nn.Module):
    """1x1, 3x3, 1x1 convolutions with a residual: (B, inplanes, H, W) -> (B, 4 planes,
    H/stride, W/stride)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        # All convolutions have stride 1; a stride > 1 is an avgpool after the 3x3 conv.
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)  # (B, planes, H, W)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(self.avgpool(out)))  # (B, 4 planes, H/stride, W/stride)
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity, inplace=True)


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: 3-conv stem with an avgpool, anti-aliased strided blocks
    (avgpool before the strided convs), attention pooling instead of global average."""

    def __init__(self, cfg: VisionConfig, output_dim: int, channels_last: bool = True):
        super().__init__()
        width, self.image_size = cfg.width, cfg.image_size
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, cfg.layers[0])
        self.layer2 = self._make_layer(width * 2, cfg.layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, cfg.layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, cfg.layers[3], stride=2)
        self.attnpool = AttentionPool2d(cfg.image_size // 32, width * 32, cfg.num_heads, output_dim)
        # NHWC convolutions (tensor cores on GPU); the attention pool reads NHWC maps
        # without a copy. Parameters keep their layout through load_state_dict.
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), _batchnorm_stats_frozen(block)))
        return block(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, output_dim)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = self.avgpool(F.relu(self.bn3(self.conv3(x)), inplace=True))  # (B, W, S/4, S/4)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = self._block(block, x)  # ... -> (B, 32W, S/32, S/32)
        return self.attnpool(x)
