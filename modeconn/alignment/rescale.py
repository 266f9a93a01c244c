"""Rescaling symmetry: bring a network to a canonical neuron scale before matching.

A unit h = σ(w·x + b) with a positively homogeneous σ (ReLU, LeakyReLU:
σ(c z) = c σ(z) for c > 0) feeding the next layer through W' computes the
same function when its incoming weights and bias are multiplied by c and its
outgoing weights by 1/c (the scale invariance discussed by Li et al. 2018,
and with permutations the symmetry that maps solutions onto each other in
"Topological obstruction to the training of shallow ReLU neural networks").
Weight matching compares raw weights, so two networks that differ by such a
rescaling look unmatched. :func:`canonical_scale` removes the freedom: every
rescalable unit gets unit incoming norm ‖(w, b)‖ = 1, compensated in its
outgoing weights, layer by layer from the input (a layer's incoming rows
include the compensation of the layer before), so ``canonical_scale`` of any
rescaled copy is the same network, and of a permuted copy the permuted one.

Which groups of a :class:`~modeconn.alignment.spec.PermutationSpec` are
rescalable is decided per group: its axes must be producers (axis 0 of
weights and biases, no normalisation statistics) and consumers (axis 1 of
the next weights), and scaling its units by random positive factors (with
the compensation) must leave the network's output on ``example_input``
unchanged (float64). That check is what "the nonlinearity is positively
homogeneous and no normalisation follows" means for an arbitrary module:
tanh, BatchNorm/LayerNorm after the layer, or a residual connection around
it make the output change, and the group is left alone.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from modeconn.alignment.permute import segment_rows
from modeconn.alignment.spec import AxisRef, PermutationSpec

__all__ = ["rescalable_groups", "canonical_scale", "scale_units"]

_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _roles(spec: PermutationSpec, sd) -> Dict[str, Tuple[List[AxisRef], List[AxisRef]]]:
    """Per group whose axes are all producers (axis 0, whole axis) or consumers (axis 1 of a matrix or
    kernel): ``(producers, consumers)``; groups with any other axis (attention digits, statistics) are left out."""
    out = {}
    for g, group in spec.groups.items():
        prod = [r for r in group.axes if r.axis == 0 and (r.offset, r.inner, r.outer) == (0, 1, 1)
                and not r.name.endswith(_STATISTICS)]
        cons = [r for r in group.axes if r.axis == 1 and sd[r.name].dim() >= 2]
        if prod and cons and len(prod) + len(cons) == len(group.axes):
            out[g] = (prod, cons)
    return out


def _scaled(t: torch.Tensor, ref: AxisRef, size: int, factor: torch.Tensor) -> torch.Tensor:
    """``t`` with the group's slice on ``ref`` multiplied unit-wise by ``factor`` (``[size]``)."""
    seg = t.narrow(ref.axis, ref.offset, ref.span(size))
    shape = list(seg.shape)
    view = shape[:ref.axis] + [ref.outer, size, ref.inner] + shape[ref.axis + 1:]
    f = factor.to(t.dtype).reshape([1] * (ref.axis + 1) + [size] + [1] * (len(view) - ref.axis - 2))
    out = t.clone()
    out.narrow(ref.axis, ref.offset, ref.span(size)).copy_((seg.reshape(view) * f).reshape(shape))
    return out


def scale_units(sd: Dict[str, torch.Tensor], spec: PermutationSpec, group: str, factor: torch.Tensor,
                roles: Optional[Dict] = None) -> Dict[str, torch.Tensor]:
    """A copy of state dict ``sd`` with ``group``'s incoming weights times ``factor`` and outgoing ones divided."""
    prod, cons = (roles or _roles(spec, sd))[group]
    size = spec.groups[group].size
    out = dict(sd)
    for r in prod:
        out[r.name] = _scaled(out[r.name], r, size, factor)
    for r in cons:
        out[r.name] = _scaled(out[r.name], r, size, 1.0 / factor)
    return out


def _outputs(model: nn.Module, sd, x) -> List[torch.Tensor]:
    """The model's output tensors at ``sd`` on ``x``."""
    out = torch.func.functional_call(model, sd, (x,))
    leaves = list(out) if isinstance(out, (tuple, list)) else [out]
    if not all(isinstance(t, torch.Tensor) for t in leaves):
        raise ValueError(f"rescaling needs a model returning tensors, got {type(out).__name__}")
    return leaves


def rescalable_groups(model: nn.Module, spec: PermutationSpec, example_input: torch.Tensor,
                      seed: int = 0) -> List[str]:
    """The groups whose units can be rescaled without changing the function (module docstring), in the order
    of their first producer in the state dict (input to output)."""
    net = copy.deepcopy(model).double().eval()
    x = example_input.double() if example_input.is_floating_point() else example_input
    sd = dict(net.state_dict())
    roles = _roles(spec, sd)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ref = _outputs(net, sd, x)
        found = []
        for g in roles:
            factor = 0.5 + 1.5 * torch.rand(spec.groups[g].size, generator=gen, dtype=torch.float64)
            moved = _outputs(net, scale_units(sd, spec, g, factor, roles), x)
            same = all(torch.allclose(a, b, rtol=1e-9, atol=1e-9 * (1 + float(a.abs().max())))
                       for a, b in zip(ref, moved))
            if same:
                found.append(g)
    order = {name: i for i, name in enumerate(sd)}
    return sorted(found, key=lambda g: min(order[r.name] for r in roles[g][0]))


def canonical_scale(model: nn.Module, spec: PermutationSpec, example_input: Optional[torch.Tensor] = None,
                    groups: Optional[Sequence[str]] = None) -> Tuple[nn.Module, Dict[str, torch.Tensor], List[str]]:
    """A copy of ``model`` in which every rescalable unit has unit incoming norm, compensated downstream.

    Args:
        model: the network.
        spec: its permutation spec (units as groups).
        example_input: a batch for :func:`rescalable_groups` (not needed when ``groups`` is given).
        groups: the groups to rescale, input to output (default: :func:`rescalable_groups`).

    Returns:
        ``(scaled copy, {group: factor c per unit}, groups)``; the copy computes the same
        function; a unit whose incoming weights are all zero keeps c = 1.
    """
    if groups is None:
        if example_input is None:
            raise ValueError("canonical_scale needs example_input to find the rescalable groups (or groups=)")
        groups = rescalable_groups(model, spec, example_input)
    sd = dict(model.state_dict())
    roles = _roles(spec, sd)
    unknown = [g for g in groups if g not in roles]
    if unknown:
        raise ValueError(f"groups {unknown} are not rescalable (axes other than incoming rows and outgoing columns)")
    factors = {}
    for g in groups:
        size = spec.groups[g].size
        sq = sum(segment_rows(sd[r.name], r, size).double().pow(2).sum(1) for r in roles[g][0])
        norm = sq.sqrt()
        factors[g] = torch.where(norm > 0, 1.0 / norm.clamp_min(1e-300), torch.ones_like(norm))
        sd = scale_units(sd, spec, g, factors[g], roles)
    out = copy.deepcopy(model)
    out.load_state_dict(sd)
    return out, factors, list(groups)
