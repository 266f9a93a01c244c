"""A start for weight matching that ignores every other group: units matched by their sorted weights.

Coordinate descent (:func:`~modeconn.alignment.matching.weight_matching`) solves one group with the
others held at their current permutations; from the identity it can stop in a local optimum when
the groups' permutations only make sense together (timm's PoolFormer and MLP-Mixer at their
initialisation, where norm weights and layer scales are constant and carry no information).

A unit's *signature* is, for each parameter slice the group permutes, that unit's slice with its
entries sorted. Sorting forgets the order of the other axes, so the signature does not change when
any other group (or this group on another axis) is permuted: if B is a permutation of A, matching
signatures by the Hungarian algorithm recovers every group's permutation at once, whatever the
others are. For two independently trained networks it is a start, not an answer: descent from it
only raises the objective.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch
from scipy.optimize import linear_sum_assignment

from modeconn.alignment.permute import segment_rows
from modeconn.alignment.spec import PermutationSpec


def signatures(tensors: Mapping[str, torch.Tensor], spec: PermutationSpec, group: str) -> torch.Tensor:
    """``[size, features]``: every unit of ``group``'s sorted slices of ``tensors``, side by side."""
    size = spec.groups[group].size
    parts = [segment_rows(tensors[r.name], r, size).sort(dim=1).values
             for r in spec.groups[group].axes if r.name in tensors]
    return torch.cat(parts, dim=1) if parts else torch.zeros(size, 0, dtype=torch.float64)


def signature_permutation(A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor],
                          spec: PermutationSpec) -> Dict[str, torch.Tensor]:
    """Per group, the permutation of B's units (``perm[g][i]``: B's unit placed at A's unit i) that
    minimises the summed squared distance between matched units' signatures.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modeconn.alignment import apply_permutation, infer_permutation_spec
        >>> _ = torch.manual_seed(0)
        >>> a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> spec = infer_permutation_spec(a, torch.randn(1, 4))
        >>> shuffle = spec.random_permutation(seed=1)
        >>> b = apply_permutation(a.state_dict(), spec, shuffle)
        >>> found = signature_permutation(a.state_dict(), b, spec)
        >>> all(torch.equal(found[g], torch.argsort(shuffle[g])) for g in spec.groups)
        True
    """
    return {g: group_signature_permutation(A, B, spec, g) for g in spec.groups}


def group_signature_permutation(A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor],
                                spec: PermutationSpec, group: str) -> torch.Tensor:
    """:func:`signature_permutation` of one group (also the greedy start's match of a group none of
    whose axes is ready, :mod:`~modeconn.alignment.greedy`)."""
    fa, fb = signatures(A, spec, group).double(), signatures(B, spec, group).double()
    cost = torch.cdist(fa, fb).pow(2)   # no features (no tensor of the group given): all zero, order kept
    _, col = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(col, dtype=torch.long)
