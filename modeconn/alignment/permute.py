"""Applying a permutation to a model or a state dict."""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from modeconn.alignment.spec import AxisRef, PermutationSpec, state_dict_of

__all__ = ["apply_permutation", "permute_tensor", "segment_rows"]


def _axis_index(length: int, refs: Iterable[Tuple[AxisRef, torch.Tensor, int]]) -> Optional[torch.Tensor]:
    """Index vector for one axis: identity except on the permuted slices.

    ``refs`` yields ``(AxisRef, perm, size)``; returns None if nothing moves.
    Each ref's slice is viewed as ``[outer, size, inner]`` and its middle
    dimension is indexed by ``perm``.  The refs' index vectors are composed
    (``index_select`` by ``i1`` then by ``i2`` is ``index_select`` by
    ``i1[i2]``): on disjoint slices this is each ref on its own slice, and refs
    sharing a slice act on disjoint digits, so their order does not matter.
    """
    idx = None
    for ref, p, size in refs:
        if idx is None:
            idx = torch.arange(length)
        span = ref.span(size)
        local = torch.arange(span).view(ref.outer, size, ref.inner)[:, p, :].reshape(-1)
        step = torch.arange(length)
        step[ref.offset:ref.offset + span] = local + ref.offset
        idx = idx[step]
    return idx


def permute_tensor(
    t: torch.Tensor,
    entries: Iterable[Tuple[str, AxisRef]],
    perms: Mapping[str, torch.Tensor],
    sizes: Mapping[str, int],
    skip: Optional[AxisRef] = None,
) -> torch.Tensor:
    """Apply every ``(group, AxisRef)`` entry of one tensor, except ``skip``."""
    by_axis: Dict[int, List[Tuple[AxisRef, torch.Tensor, int]]] = {}
    for gname, ref in entries:
        if skip is not None and ref == skip:
            continue
        by_axis.setdefault(ref.axis, []).append((ref, perms[gname], sizes[gname]))
    for axis, refs in by_axis.items():
        idx = _axis_index(t.shape[axis], refs)
        if idx is not None:
            t = t.index_select(axis, idx.to(t.device))
    return t


def segment_rows(t: torch.Tensor, ref: AxisRef, size: int) -> torch.Tensor:
    """The group's slice of ``t`` as a ``[size, rest]`` matrix (one row per unit, its ``outer`` copies included)."""
    seg = t.narrow(ref.axis, ref.offset, ref.span(size))
    shape = list(seg.shape)
    shape[ref.axis:ref.axis + 1] = [ref.outer, size, ref.inner]
    seg = seg.reshape(shape).movedim(ref.axis + 1, 0)
    return seg.reshape(size, -1)


def apply_permutation(model_or_state_dict, spec: PermutationSpec, perm: Mapping[str, torch.Tensor]):
    """Return a permuted copy of a module or state dict (the input is not mutated).

    For every group ``g`` and every :class:`AxisRef` it lists,
    ``w' = w.index_select(axis, perm[g])`` (on the group's slice of the axis,
    blockwise for flattened feature maps).  Groups missing from ``perm`` keep
    the identity.  A module gives a deep copy whose parameters and buffers are
    permuted; a state dict gives a new ``OrderedDict`` of new tensors.  With a
    spec that is valid for the model, the copy computes the same function
    (in eval mode).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modeconn.alignment import infer_permutation_spec
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x = torch.randn(5, 4)
        >>> spec = infer_permutation_spec(net, x[:1])
        >>> shuffled = apply_permutation(net, spec, {"0": torch.randperm(8)})
        >>> torch.allclose(shuffled(x), net(x), atol=1e-6)
        True
    """
    is_module = isinstance(model_or_state_dict, nn.Module)
    sd = state_dict_of(model_or_state_dict)
    spec.validate(sd)
    perms = spec.check_permutation(perm)
    sizes = {k: g.size for k, g in spec.groups.items()}
    entries = spec.entries_by_name()
    out = OrderedDict()
    with torch.no_grad():
        for name, t in sd.items():
            if name in entries:
                out[name] = permute_tensor(t.detach(), entries[name], perms, sizes).clone()
            else:
                out[name] = t.detach().clone()
    if not is_module:
        return out
    model = copy.deepcopy(model_or_state_dict)
    model.load_state_dict(out)
    return model
