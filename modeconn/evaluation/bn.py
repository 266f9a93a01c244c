"""BatchNorm statistics: recomputed, never interpolated.

Running statistics along a curve are meaningless: a point's weights are new,
so its BN statistics are recomputed over training data before it is
evaluated, as an exact cumulative average (``torch.optim.swa_utils.update_bn``
semantics). This is also the simple form of REPAIR (Jordan et al. 2022):
resetting statistics at interpolated points removes most of the variance
collapse that inflates barriers between aligned networks.
"""
from __future__ import annotations

from typing import Iterable, List

import torch
from torch import nn
from torch.optim.swa_utils import update_bn


def batchnorm_modules(model: nn.Module) -> List[nn.Module]:
    """The BatchNorm layers of ``model`` that track running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    """True when the model has BatchNorm layers that track running statistics."""
    return bool(batchnorm_modules(model))


@torch.no_grad()
def recompute_bn(model: nn.Module, loader: Iterable, device=None) -> nn.Module:
    """Reset and recompute every BN layer's statistics over ``loader`` (exact average).

    Models without BatchNorm are returned untouched, with no pass over the data.
    The model's train/eval mode is preserved.
    """
    if has_batchnorm(model):
        update_bn(loader, model, device=device)
    return model
