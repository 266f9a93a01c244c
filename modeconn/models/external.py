"""Models from outside the zoo, named by a spec string that a checkpoint can store and rebuild.

* ``pkg.module:factory`` — ``factory`` imported from an installed module;
* ``path/to/file.py:factory`` — ``factory`` loaded from a Python file (the spec
  is made absolute, so a checkpoint rebuilds from any working directory);
* ``torchvision:NAME`` — ``torchvision.models.get_model(NAME, weights=None,
  num_classes=...)``; its first layer takes 3 channels, so a 1-channel sample
  is repeated to 3 by a parameter-free :class:`GrayToRGB` in front;
* ``timm:NAME`` — ``timm.create_model(NAME, num_classes=..., in_chans=C)`` when
  timm is installed (an optional extra);
* ``hf:MODEL_TYPE`` with ``config=`` a plain config — a ``transformers``
  language model (fresh weights) behind :class:`modeconn.hf.models.LMLogits`,
  as a Hugging Face model directory's metadata names it (the optional extra
  ``modeconn[hf]``).

A factory is called like a zoo builder, ``factory(input_shape, num_classes,
**kwargs)``, and returns an ``nn.Module``.
"""
from __future__ import annotations

import importlib
from typing import Callable, Sequence

from torch import nn

from modeconn.runtime.user_code import load_attribute

__all__ = ["is_external", "external_builder", "GrayToRGB"]


def is_external(name: str) -> bool:
    """Whether ``name`` is a spec (``a:b``) rather than a zoo name."""
    return isinstance(name, str) and ":" in name


class GrayToRGB(nn.Module):
    """Repeat a 1-channel image to the 3 channels a torchvision model's first layer expects (no parameters)."""

    def forward(self, x):
        """``[B, 1, H, W] -> [B, 3, H, W]``."""
        return x.expand(-1, 3, -1, -1)


class _TorchvisionModel(nn.Module):
    """A torchvision model behind a :class:`GrayToRGB` adapter (state-dict names ``net.*``)."""

    def __init__(self, net: nn.Module):
        """Wrap ``net``."""
        super().__init__()
        self.adapt = GrayToRGB()
        self.net = net

    def forward(self, x):
        """The model on the 3-channel copy of ``x``."""
        return self.net(self.adapt(x))


def _torchvision(name: str) -> Callable[..., nn.Module]:
    """The builder of ``torchvision:NAME``."""
    import torchvision

    if name not in torchvision.models.list_models():
        raise ValueError(f"model 'torchvision:{name}': torchvision has no model {name!r} "
                         f"(torchvision.models.list_models() lists them)")

    def build(input_shape: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
        """torchvision's model, untrained, for ``input_shape`` images with 1 or 3 channels."""
        if len(input_shape) != 3 or input_shape[0] not in (1, 3):
            raise ValueError(f"model 'torchvision:{name}' needs (C, H, W) samples with 1 or 3 channels, "
                             f"got {tuple(input_shape)}")
        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        return _TorchvisionModel(net) if input_shape[0] == 1 else net

    return build


def _timm(name: str) -> Callable[..., nn.Module]:
    """The builder of ``timm:NAME`` (timm is optional)."""
    try:
        timm = importlib.import_module("timm")
    except ImportError:
        raise ValueError(f"model 'timm:{name}' needs timm, which is not installed (pip install 'modeconn[timm]')") from None

    def build(input_shape: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
        """timm's model, untrained, with ``in_chans`` from the sample shape."""
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=input_shape[0], **kwargs)

    return build


def external_builder(spec: str) -> Callable[..., nn.Module]:
    """The builder a spec names; ValueError naming the spec when it cannot be found."""
    source, _, attr = spec.rpartition(":")
    if not source or not attr:
        raise ValueError(f"model spec {spec!r} must be 'module:factory', 'file.py:factory', "
                         "'torchvision:NAME', 'timm:NAME' or 'hf:MODEL_TYPE'")
    if source == "torchvision":
        return _torchvision(attr)
    if source == "timm":
        return _timm(attr)
    if source == "hf":
        from modeconn.hf.models import hf_builder

        return hf_builder(attr)
    return load_attribute(spec, "model")
