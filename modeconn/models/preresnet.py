"""Pre-activation ResNet for CIFAR (He et al. 2016, "Identity Mappings in Deep
Residual Networks"), laid out like the PreResNet of Garipov et al. 2018
(github.com/timgaripov/dnn-mode-connectivity), with the same parameter names.

conv3x3(C->16) -> stage 1 (16) -> stage 2 (32, stride 2) -> stage 3 (64, stride 2)
-> BN -> ReLU -> global average pool -> Linear.  Stage widths are x4 for bottleneck
blocks. The shortcut of a block whose shape changes is a 1x1 conv (with the
block's stride, no bias) applied to the pre-activated input, as in the reference.

Block type: ``block="auto"`` uses bottleneck blocks for depth >= 164 (depth 164:
18 bottleneck blocks per stage, (depth-2) % 9 == 0) and basic blocks otherwise
(depth 20/56/110: 3/9/18 basic blocks per stage, (depth-2) % 6 == 0), following
He et al. (Garipov's code switches to bottlenecks already at depth >= 44; pass
``block="bottleneck"`` to get that variant for 56 or 110).

``shortcut=False`` removes every identity path (Li et al. 2018's "ResNet-noshort"
of "Visualizing the Loss Landscape of Neural Nets"): each block returns its residual
branch only, and the 1x1 downsample convs are not built: a parameter the forward never
uses would stall DistributedDataParallel, be fitted by curves and weight-decayed for nothing.

Differences from the reference: ``AdaptiveAvgPool2d(1)`` instead of ``AvgPool2d(8)``
so any input size (8x8 .. 32x32) works, any number of input channels, and the
residual add is not in place (``out + shortcut``). The ReLUs are in place, as in the
reference: each acts on a BatchNorm output nothing else reads (BatchNorm's backward
does not need it). Init as the reference: conv weights ~ N(0, 2 / (k*k*out_channels)),
BN weight 1 / bias 0, Linear PyTorch default.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

from modeconn.models.registry import channels_last, check_bool, check_image_shape, register_model

__all__ = ["PreResNet", "PreActBasicBlock", "PreActBottleneck", "preresnet"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _identity_path(block: nn.Module, x: torch.Tensor, pre: torch.Tensor) -> Optional[torch.Tensor]:
    """What a block adds to its residual branch: ``x``, the downsampled pre-activation ``pre``, or None
    without shortcuts (all decided at construction time, so fx traces one branch)."""
    if not block.shortcut:
        return None
    return x if block.downsample is None else block.downsample(pre)


class PreActBasicBlock(nn.Module):
    """bn1 -> relu -> conv1 (3x3, stride) -> bn2 -> relu -> conv2 (3x3) ; + shortcut (if ``shortcut``)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 shortcut: bool = True):
        super().__init__()
        self.shortcut = shortcut
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        shortcut = _identity_path(self, x, out)
        out = self.conv1(out)
        out = self.relu(self.bn2(out))
        out = self.conv2(out)
        return out if shortcut is None else out + shortcut


class PreActBottleneck(nn.Module):
    """bn1 -> relu -> conv1 (1x1) -> bn2 -> relu -> conv2 (3x3, stride) -> bn3 -> relu
    -> conv3 (1x1, x4 channels) ; + shortcut (if ``shortcut``)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 shortcut: bool = True):
        super().__init__()
        self.shortcut = shortcut
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        shortcut = _identity_path(self, x, out)
        out = self.conv1(out)
        out = self.relu(self.bn2(out))
        out = self.conv2(out)
        out = self.relu(self.bn3(out))
        out = self.conv3(out)
        return out if shortcut is None else out + shortcut


class PreResNet(nn.Module):
    """Parameters: ``conv1.weight``, ``layer{1,2,3}.{i}.{bn1,conv1,bn2,conv2[,bn3,conv3]}.*``,
    ``layer{s}.0.downsample.0.weight`` (1x1 shortcut), ``bn.weight/bias``, ``fc.weight/bias``.
    ``shortcut=False``: no identity paths and no downsample convs."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, depth: int = 20, bottleneck: bool = False,
                 shortcut: bool = True):
        super().__init__()
        self.shortcut = shortcut
        block = PreActBottleneck if bottleneck else PreActBasicBlock
        per_block = 9 if bottleneck else 6
        n = (depth - 2) // per_block
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.depth = depth
        self.inplanes = 16
        self.conv1 = nn.Conv2d(input_shape[0], 16, kernel_size=3, padding=1, bias=False)
        self.layer1 = self._make_layer(block, 16, n)
        self.layer2 = self._make_layer(block, 32, n, stride=2)
        self.layer3 = self._make_layer(block, 64, n, stride=2)
        self.bn = nn.BatchNorm2d(64 * block.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n_fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n_fan))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if self.shortcut and (stride != 1 or self.inplanes != planes * block.expansion):
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
            )
        layers = [block(self.inplanes, planes, stride, downsample, shortcut=self.shortcut)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, shortcut=self.shortcut))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(channels_last(x))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.relu(self.bn(x))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


_BLOCKS = ("auto", "basic", "bottleneck")


@register_model("preresnet")
def preresnet(input_shape, num_classes, depth: int = 20, block: str = "auto", shortcut: bool = True) -> PreResNet:
    """PreResNet-``depth``; depth 20, 56, 110 (basic blocks) or 164 (bottleneck blocks).

    ``shortcut=False``: the same network without identity paths (Li et al. 2018's "-noshort").
    """
    input_shape = check_image_shape(input_shape, "preresnet")
    shortcut = check_bool("shortcut", shortcut)
    if block not in _BLOCKS:
        raise ValueError(f"parameter 'block' must be one of {', '.join(map(repr, _BLOCKS))}; got {block!r}")
    allowed = ("parameter 'depth' must be 20, 56 or 110 (basic blocks, in general (depth - 2) % 6 == 0) "
               "or 164 (bottleneck blocks, in general (depth - 2) % 9 == 0 and depth >= 164 "
               "unless block='bottleneck')")
    if not isinstance(depth, int) or isinstance(depth, bool):
        raise ValueError(f"{allowed}; got {depth!r}")
    if block == "auto":
        block = "bottleneck" if depth >= 164 else "basic"
    per_block = 9 if block == "bottleneck" else 6
    if depth < 2 + per_block or (depth - 2) % per_block != 0:
        raise ValueError(f"{allowed}; got depth={depth!r} with {block} blocks")
    return PreResNet(input_shape, num_classes, depth=depth, bottleneck=(block == "bottleneck"), shortcut=shortcut)
