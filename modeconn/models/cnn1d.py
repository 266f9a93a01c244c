"""Small 1-D CNN for sequences such as MNIST-1D (inputs ``[B, C, L]``).

features: conv5(C->w) [BN] ReLU, conv3(w->w) [BN] ReLU, [maxpool2],
          conv3(w->2w) [BN] ReLU, [maxpool2]
classifier: Linear(2w * L' -> num_classes)

Each max-pool is kept only if the length before it is >= 2; L' is computed at
construction, so the model traces with ``torch.fx`` and its channels align
like :class:`~modeconn.models.convnet.ConvNet`'s. Convolutions have a bias
unless followed by BatchNorm.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from modeconn.models.registry import check_bool, check_input_shape, check_int, pooled_size, register_model

__all__ = ["CNN1d", "cnn1d"]


class CNN1d(nn.Module):
    """Parameters: ``features.{i}.weight/bias`` (convs, and BNs when ``bn=True``), ``classifier.weight/bias``."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 32, bn: bool = False):
        super().__init__()
        channels, length = input_shape
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        layers = []

        def block(cin: int, cout: int, kernel: int) -> None:
            layers.append(nn.Conv1d(cin, cout, kernel_size=kernel, padding=kernel // 2, bias=not bn))
            if bn:
                layers.append(nn.BatchNorm1d(cout))
            layers.append(nn.ReLU())

        def maybe_pool() -> None:
            nonlocal length
            if length >= 2:
                layers.append(nn.MaxPool1d(kernel_size=2, stride=2))
                length = pooled_size(length)

        block(channels, width, 5)
        block(width, width, 3)
        maybe_pool()
        block(width, 2 * width, 3)
        maybe_pool()
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(2 * width * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


@register_model("cnn1d")
def cnn1d(input_shape, num_classes, width: int = 32, bn: bool = False) -> CNN1d:
    """A :class:`CNN1d`; ``input_shape`` is ``(C, L)``, e.g. ``(1, 40)`` for MNIST-1D."""
    shape = check_input_shape(input_shape)
    if len(shape) != 2:
        raise ValueError(f"cnn1d needs input_shape of the form (C, L) (one sequence, no batch dim); got {shape}")
    return CNN1d(shape, num_classes, width=check_int("width", width, minimum=1), bn=check_bool("bn", bn))
