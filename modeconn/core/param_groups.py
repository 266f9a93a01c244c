"""Parameters grouped by name: one parameter, one module, or one top-level block per group.

Layer-wise barriers (:mod:`modeconn.evaluation.layerwise`) and per-module
curvature (:func:`modeconn.geometry.sharpness.module_curvature`) ask the same
question of every group of parameters, so the grouping lives once, here. Groups
are ordered as the network registers its parameters (``named_parameters``),
which for ``nn.Sequential`` and the usual ``__init__`` is the order of the
forward pass.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Mapping, Sequence, Union

from torch import nn

__all__ = ["GROUPINGS", "parameter_groups"]

GROUPINGS = ("parameter", "module", "block")

GroupsLike = Union[str, Mapping[str, Sequence[str]]]


def _key(name: str, by: str) -> str:
    """The group of parameter ``name`` under grouping ``by``."""
    if by == "parameter":
        return name
    parts = name.split(".")
    if by == "module":
        return ".".join(parts[:-1]) or name
    return parts[0] if len(parts) > 2 else (".".join(parts[:-1]) or name)


def parameter_groups(model: nn.Module, by: GroupsLike = "module") -> "OrderedDict[str, List[str]]":
    """Group ``model``'s parameters (those with ``requires_grad``): group name -> parameter names.

    Args:
        model: any ``nn.Module``.
        by: ``"parameter"`` (one group per parameter), ``"module"`` (per
            owning module: ``features.0.weight`` and ``features.0.bias`` form
            ``features.0``), ``"block"`` (per top-level child: ``features``,
            ``classifier``; a parameter of a direct child stays in that child's
            group), or a mapping group name -> parameter names (checked: names
            must exist, no name in two groups).

    Returns an ordered dict in ``named_parameters`` order; raises ``ValueError``
    for an unknown grouping or a bad mapping.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> dict(parameter_groups(net, "module"))
        {'0': ['0.weight', '0.bias'], '2': ['2.weight', '2.bias']}
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(by, Mapping):
        return _checked_mapping(by, names)
    if by not in GROUPINGS:
        raise ValueError(f"unknown grouping {by!r}: choose one of {GROUPINGS} or pass a mapping "
                         "group name -> parameter names")
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    for n in names:
        groups.setdefault(_key(n, by), []).append(n)
    return groups


def _checked_mapping(by: Mapping[str, Sequence[str]], names: List[str]) -> "OrderedDict[str, List[str]]":
    """A user's grouping, checked against the model's parameter names."""
    known, seen = set(names), {}
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    for g, members in by.items():
        members = [members] if isinstance(members, str) else list(members)
        if not members:
            raise ValueError(f"group {g!r} lists no parameters")
        for n in members:
            if n not in known:
                raise ValueError(f"group {g!r}: {n!r} is not a trainable parameter of the model "
                                 f"(parameters: {names[:6]}{' ...' if len(names) > 6 else ''})")
            if n in seen:
                raise ValueError(f"parameter {n!r} is in two groups: {seen[n]!r} and {g!r}")
            seen[n] = g
        groups[str(g)] = members
    if not groups:
        raise ValueError("the grouping is empty")
    return groups
