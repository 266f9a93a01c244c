"""Small CNN for 8x8 .. 32x32 images.

features: conv3x3(C->w) [BN] ReLU, conv3x3(w->2w) [BN] ReLU, [maxpool2],
          conv3x3(2w->2w) [BN] ReLU, [maxpool2]
classifier: Linear(2w * H' * W' -> num_classes)

Each max-pool is kept only if the spatial size before it is >= 2 (so tiny inputs
still work); H', W' are computed at construction time. Convolutions have a bias
unless followed by BatchNorm.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from modeconn.models.registry import (channels_last, check_bool, check_image_shape, check_int, pooled_size,
                                      register_model)

__all__ = ["ConvNet", "convnet", "convnet_bn"]


class ConvNet(nn.Module):
    """Parameters: ``features.{i}.weight/bias`` (convs, and BNs when ``bn=True``),
    ``classifier.weight/bias``."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 32, bn: bool = False):
        super().__init__()
        c, h, w = input_shape
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.num_pools = 0
        layers = []

        def conv_block(cin: int, cout: int) -> None:
            layers.append(nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=not bn))
            if bn:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU())

        def maybe_pool() -> None:
            nonlocal h, w
            if h >= 2 and w >= 2:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                h, w = pooled_size(h), pooled_size(w)
                self.num_pools += 1

        conv_block(c, width)
        conv_block(width, 2 * width)
        maybe_pool()
        conv_block(2 * width, 2 * width)
        maybe_pool()
        self.features = nn.Sequential(*layers)
        self.feature_shape = (2 * width, h, w)
        self.classifier = nn.Linear(2 * width * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(channels_last(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)


@register_model("convnet")
def convnet(input_shape, num_classes, width: int = 32, bn: bool = False) -> ConvNet:
    input_shape = check_image_shape(input_shape, "convnet")
    width = check_int("width", width, minimum=1)
    bn = check_bool("bn", bn)
    return ConvNet(input_shape, num_classes, width=width, bn=bn)


@register_model("convnet_bn")
def convnet_bn(input_shape, num_classes, width: int = 32) -> ConvNet:
    """``convnet`` with ``bn=True``."""
    input_shape = check_image_shape(input_shape, "convnet_bn")
    width = check_int("width", width, minimum=1)
    return ConvNet(input_shape, num_classes, width=width, bn=True)
