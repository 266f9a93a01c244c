"""Wide residual network WRN-depth-k (Zagoruyko & Komodakis 2016) for CIFAR-sized images.

conv3x3(C->16) -> stage 1 (16k) -> stage 2 (32k, stride 2) -> stage 3 (64k, stride 2)
-> BN -> ReLU -> global average pool -> Linear, with n = (depth - 4) / 6 pre-activation
basic blocks per stage:

    bn1 -> relu -> conv1 (3x3, stride) -> bn2 -> relu -> dropout -> conv2 (3x3) ; + shortcut

Convs have no bias. When a block changes the shape (stride or channels) the shortcut is
a 1x1 conv with the block's stride applied to the pre-activated input (relu(bn1(x))),
as in the authors' code; otherwise it is the identity. Global pooling is adaptive, so
any spatial size works. Init as the authors' PyTorch code: kaiming-normal (fan_out)
convs, BN weight 1 / bias 0, Linear bias 0.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from modeconn.models.registry import channels_last, check_image_shape, check_int, check_probability, register_model

__all__ = ["WideResNet", "WideBasicBlock", "wide_resnet"]


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = stride == 1 and in_planes == out_planes
        if self.equal_in_out:
            self.shortcut = None
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        if self.shortcut is not None:  # decided at construction time
            shortcut = self.shortcut(out)
        else:
            shortcut = x
        out = self.conv1(out)
        out = self.relu(self.bn2(out))
        out = self.dropout(out)
        out = self.conv2(out)
        out = out + shortcut
        return out


class WideResNet(nn.Module):
    """Parameters: ``conv1.weight``, ``layer{1,2,3}.{i}.{bn1,conv1,bn2,conv2}.*``,
    ``layer{s}.0.shortcut.0.weight`` (1x1 shortcut), ``bn.weight/bias``, ``fc.weight/bias``."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, depth: int = 28,
                 widen_factor: int = 10, dropout: float = 0.0):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.depth = depth
        self.widen_factor = widen_factor
        self.conv1 = nn.Conv2d(input_shape[0], widths[0], kernel_size=3, padding=1, bias=False)
        self.layer1 = self._make_layer(widths[0], widths[1], n, 1, dropout)
        self.layer2 = self._make_layer(widths[1], widths[2], n, 2, dropout)
        self.layer3 = self._make_layer(widths[2], widths[3], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_layer(in_planes: int, out_planes: int, blocks: int, stride: int, dropout: float) -> nn.Sequential:
        layers = [WideBasicBlock(in_planes, out_planes, stride, dropout)]
        for _ in range(1, blocks):
            layers.append(WideBasicBlock(out_planes, out_planes, 1, dropout))
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


@register_model("wide_resnet")
def wide_resnet(input_shape, num_classes, depth: int = 28, widen_factor: int = 10,
                dropout: float = 0.0) -> WideResNet:
    """WRN-``depth``-``widen_factor``; depth must satisfy (depth - 4) % 6 == 0 (10, 16, 22, 28, 40, ...)."""
    input_shape = check_image_shape(input_shape, "wide_resnet")
    if (not isinstance(depth, int) or isinstance(depth, bool) or depth < 10 or (depth - 4) % 6 != 0):
        raise ValueError(
            "parameter 'depth' must satisfy (depth - 4) % 6 == 0 and depth >= 10 "
            f"(e.g. 10, 16, 22, 28, 40); got {depth!r}"
        )
    widen_factor = check_int("widen_factor", widen_factor, minimum=1)
    dropout = check_probability("dropout", dropout)
    return WideResNet(input_shape, num_classes, depth=depth, widen_factor=widen_factor, dropout=dropout)
