"""CIFAR VGG as in Garipov et al. 2018 (github.com/timgaripov/dnn-mode-connectivity).

features: the standard VGG conv configs (3x3 convs, padding 1, with bias;
          optional BatchNorm after each conv), ReLU, 2x2 max-pool after each stage.
classifier: Dropout, Linear(512, 512), ReLU, Dropout, Linear(512, 512), ReLU,
            Linear(512, num_classes).

Differences from the reference, needed to support other inputs:
- a max-pool is skipped when the spatial size is already 1 (so 8x8 inputs work:
  8 -> 4 -> 2 -> 1 and the last two pools are dropped);
- the flattened feature size (last channels * H' * W') is computed at construction;
- ``width_multiplier`` scales every conv channel count and the classifier's hidden
  width (512) by the same factor: ``max(1, round(c * width_multiplier))``.

ReLUs are in place, as in the reference: each acts on a tensor only this model made
and reads (a conv's, BatchNorm's or Linear's output, whose backward does not need it),
which saves one activation-sized buffer per ReLU (VGG16 at batch 128: up to 33 MB each).

Init follows the reference: conv weights ~ N(0, 2 / (k*k*out_channels)), conv biases 0;
Linear and BatchNorm layers use PyTorch defaults.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Union

import torch
import torch.nn as nn

from modeconn.models.registry import (
    channels_last,
    check_image_shape,
    check_positive_float,
    check_probability,
    pooled_size,
    register_model,
)

__all__ = ["VGG", "VGG_CONFIGS", "vgg11", "vgg16", "vgg11_bn", "vgg16_bn"]

# one inner list per stage; a 2x2 max-pool follows every stage
VGG_CONFIGS = {
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _scaled(c: int, multiplier: float) -> int:
    return max(1, int(round(c * multiplier)))


class VGG(nn.Module):
    """Parameters: ``features.{i}.weight/bias`` (convs and, for ``batch_norm``, BNs),
    ``classifier.{1,4,6}.weight/bias``."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        config: List[List[int]],
        batch_norm: bool = False,
        width_multiplier: float = 1.0,
        dropout: float = 0.5,
    ):
        super().__init__()
        c, h, w = input_shape
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.num_pools = 0
        layers: List[nn.Module] = []
        in_channels = c
        for stage in config:
            for channels in stage:
                channels = _scaled(channels, width_multiplier)
                layers.append(nn.Conv2d(in_channels, channels, kernel_size=3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(channels))
                layers.append(nn.ReLU(inplace=True))
                in_channels = channels
            if h >= 2 and w >= 2:  # skip pools once the feature map is 1 pixel wide/high
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                h, w = pooled_size(h), pooled_size(w)
                self.num_pools += 1
        self.features = nn.Sequential(*layers)
        self.feature_shape = (in_channels, h, w)
        hidden = _scaled(512, width_multiplier)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_channels * h * w, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(channels_last(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _build(name: str, depth: int, batch_norm: bool, input_shape, num_classes,
           width_multiplier: Union[int, float], dropout: float) -> VGG:
    input_shape = check_image_shape(input_shape, name)
    width_multiplier = check_positive_float("width_multiplier", width_multiplier)
    dropout = check_probability("dropout", dropout)
    return VGG(input_shape, num_classes, VGG_CONFIGS[depth], batch_norm=batch_norm,
               width_multiplier=width_multiplier, dropout=dropout)


@register_model("vgg11")
def vgg11(input_shape, num_classes, width_multiplier: float = 1.0, dropout: float = 0.5) -> VGG:
    return _build("vgg11", 11, False, input_shape, num_classes, width_multiplier, dropout)


@register_model("vgg11_bn")
def vgg11_bn(input_shape, num_classes, width_multiplier: float = 1.0, dropout: float = 0.5) -> VGG:
    return _build("vgg11_bn", 11, True, input_shape, num_classes, width_multiplier, dropout)


@register_model("vgg16")
def vgg16(input_shape, num_classes, width_multiplier: float = 1.0, dropout: float = 0.5) -> VGG:
    return _build("vgg16", 16, False, input_shape, num_classes, width_multiplier, dropout)


@register_model("vgg16_bn")
def vgg16_bn(input_shape, num_classes, width_multiplier: float = 1.0, dropout: float = 0.5) -> VGG:
    return _build("vgg16_bn", 16, True, input_shape, num_classes, width_multiplier, dropout)
