"""Name -> builder registry for the model zoo (timm-style ``create_model``).

A builder is a callable ``fn(input_shape, num_classes, **kwargs) -> nn.Module``.
``input_shape`` is the shape of ONE sample, without the batch dimension, e.g.
``(1, 8, 8)`` for 8x8 digits, ``(3, 32, 32)`` for CIFAR, ``(2,)`` for 2-D points.
"""
from __future__ import annotations

import inspect
import numbers
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import torch
import torch.nn as nn

from modeconn.models.external import external_builder, is_external

__all__ = ["register_model", "create_model", "list_models", "model_parameters"]

ModelBuilder = Callable[..., nn.Module]

_REGISTRY: Dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering ``fn(input_shape, num_classes, **kwargs) -> nn.Module``
    under ``name``. Registering a name twice raises ``ValueError``.

    Example:
        >>> import math
        >>> @register_model("linear_probe")
        ... def linear_probe(input_shape, num_classes, bias=True):
        ...     return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes, bias=bias))
        >>> create_model("linear_probe", (1, 8, 8), 10, bias=False)[1]
        Linear(in_features=64, out_features=10, bias=False)
        >>> _ = _REGISTRY.pop("linear_probe")   # (doctest only: leave the registry as it was)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def decorator(fn: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_models() -> List[str]:
    """Sorted names of all registered models.

    Example:
        >>> {"mlp", "convnet", "preresnet"} <= set(list_models())
        True
    """
    return sorted(_REGISTRY)


def _accepted_kwargs(fn: ModelBuilder):
    """Names of keyword arguments ``fn`` accepts beyond (input_shape, num_classes),
    or ``None`` if it takes ``**kwargs`` (anything goes)."""
    params = list(inspect.signature(fn).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [
        p.name
        for p in params[2:]
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]


def model_parameters(name: str):
    """Keyword arguments the registered model ``name`` accepts (None: any), e.g. to see if it reads tokens.

    Example:
        >>> model_parameters("mlp"), "vocab" in model_parameters("gpt")
        (['depth', 'width'], True)
    """
    if is_external(name):
        return _accepted_kwargs(external_builder(name))
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _accepted_kwargs(_REGISTRY[name])


def create_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
    """Build the registered model ``name`` for samples of shape ``input_shape``
    (no batch dim) and ``num_classes`` outputs.

    ``name`` may also be a spec of a model outside the zoo (``pkg.module:factory``,
    ``file.py:factory``, ``torchvision:NAME``, ``timm:NAME``; see
    :mod:`modeconn.models.external`).

    Raises ``ValueError`` for an unknown name (listing the known ones), an unknown
    keyword argument (listing the accepted ones), or an invalid argument value
    (naming the parameter and its allowed values).

    Example:
        >>> import torch
        >>> net = create_model("mlp", (1, 8, 8), 10, width=16)
        >>> net(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """
    if is_external(name):
        fn = external_builder(name)
    elif name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())} "
                         "(or a spec such as pkg.module:factory, file.py:factory, torchvision:NAME)")
    else:
        fn = _REGISTRY[name]
    accepted = _accepted_kwargs(fn)
    if accepted is not None:
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(
                f"model {name!r} got unknown parameter(s) {', '.join(unknown)}; "
                f"accepted parameters: {', '.join(accepted) if accepted else '(none)'}"
            )
    input_shape = check_input_shape(input_shape)
    num_classes = check_int("num_classes", num_classes, minimum=1)
    model = fn(input_shape, num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r}: the builder returned {type(model).__name__}, not an nn.Module")
    return model


# ----------------------------------------------------------------------------
# argument validation helpers shared by the family modules
# ----------------------------------------------------------------------------
def check_input_shape(input_shape: Iterable[int]) -> Tuple[int, ...]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be a sequence of positive ints, got {input_shape!r}") from None
    if len(shape) == 0 or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in shape
    ):
        raise ValueError(f"input_shape must be a non-empty sequence of positive ints, got {input_shape!r}")
    return tuple(int(s) for s in shape)


def check_image_shape(input_shape: Sequence[int], model: str) -> Tuple[int, int, int]:
    """Require a (C, H, W) sample shape for convolutional models."""
    shape = check_input_shape(input_shape)
    if len(shape) != 3:
        raise ValueError(
            f"{model} needs input_shape of the form (C, H, W) (one image, no batch dim); got {shape}"
        )
    return shape  # type: ignore[return-value]


def check_int(name: str, value, minimum: int = None) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"parameter {name!r} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"parameter {name!r} must be >= {minimum}, got {value!r}")
    return int(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"parameter {name!r} must be True or False, got {value!r}")
    return value


def check_probability(name: str, value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not (0.0 <= value < 1.0):
        raise ValueError(f"parameter {name!r} must be a float in [0, 1), got {value!r}")
    return float(value)


def check_positive_float(name: str, value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"parameter {name!r} must be a number > 0, got {value!r}")
    return float(value)


def pooled_size(size: int) -> int:
    """Spatial size after ``nn.MaxPool2d(2)`` (floor division, as PyTorch does)."""
    return size // 2


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` (images ``[B, C, H, W]``) in the channels-last memory format: the same values, another layout.

    The convolutional zoo models call it first in ``forward``: every later
    activation inherits the layout, and oneDNN's channels-last convolutions
    train markedly faster on CPUs (measured here, batch 128 at 32x32:
    PreResNet-20 steps 23 % and VGG16 steps 11 % shorter); it is also the
    layout GPU tensor cores prefer. ``torch.flatten`` keeps the (C, H, W)
    order of the features, whatever the layout.
    """
    return x.contiguous(memory_format=torch.channels_last)
