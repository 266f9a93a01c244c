"""Fully connected network: flatten -> [Linear, ReLU] x depth -> Linear."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from modeconn.models.registry import check_input_shape, check_int, register_model

__all__ = ["MLP", "mlp"]


class MLP(nn.Module):
    """Parameters: ``layers.{2i}.weight/bias`` for i = 0..depth (last one is the output layer).

    ``depth`` is the number of hidden layers (``depth=0`` gives a linear classifier).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, depth: int = 2, width: int = 128):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        in_features = math.prod(self.input_shape)
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(in_features, width), nn.ReLU()]
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.layers(x)


@register_model("mlp")
def mlp(input_shape, num_classes, depth: int = 2, width: int = 128) -> MLP:
    input_shape = check_input_shape(input_shape)
    depth = check_int("depth", depth, minimum=0)
    width = check_int("width", width, minimum=1)
    return MLP(input_shape, num_classes, depth=depth, width=width)
