"""A start for weight matching that aligns the network from its input: one group at a time, forward.

Coordinate descent (:func:`~modeconn.alignment.matching.weight_matching`) from B as given solves a
group against its neighbours' *current* permutations. At the start those are the identity, i.e.
unrelated to A's order, so half of every cost matrix (the side the group shares with a neighbour that
is not aligned yet) is noise, and descent settles in a poor local optimum (two random VGG11: 245.8,
where rebasin's differently weighted descent reaches 254 and this start 270).

The greedy start visits the groups in the spec's order (the forward pass's, for an inferred spec) and
solves each one with the Hungarian algorithm on the parameters whose *other* groups are already
solved (its "ready" axes): the first layer's rows against A's (the input is never permuted), then the
next layer's rows with the previous permutation applied to their columns, and so on: layer-wise
matching from the input, as in Singh & Jaggi 2020 (Model fusion via optimal transport, the weight-based
alignment) and Ainsworth et al. 2023's layer-by-layer view. A group that appears on two axes of one
parameter never counts that parameter as ready. A group without ready axes (attention heads and the
dims inside them share the query rows: neither is ready before the other) is matched by its units'
sorted weights instead (:mod:`~modeconn.alignment.signatures`), which do not depend on the other
groups' orders.

If B is A with its units permuted, every ready cost matrix is A's Gram matrix with its columns
permuted, whose maximal assignment is the one undoing the permutation (by Cauchy-Schwarz, when the
units' rows are distinct): the start is then exact. Between different networks it is a start:
:func:`weight_matching` descends from it and from B as given and keeps the higher end.
"""
from __future__ import annotations

from typing import List, Set

import torch
from scipy.optimize import linear_sum_assignment

from modeconn.alignment.signatures import group_signature_permutation
from modeconn.alignment.spec import PermutationSpec

__all__ = ["greedy_start"]


def _ready_refs(matcher, g: str, solved: Set[str]) -> List:
    """Axes of group ``g`` whose parameter carries only groups already solved (and ``g`` on this axis only)."""
    return [r for r in matcher.refs_of[g] if all(h != g and h in solved for h in matcher.deps[(g, r)])]


def greedy_start(matcher, spec: PermutationSpec) -> List[str]:
    """Set ``matcher.perms`` group by group in ``spec``'s order, each solved on its ready axes.

    ``matcher`` is a :class:`~modeconn.alignment.matching._WeightMatcher` at the identity; its
    objective ``current`` is recomputed exactly (float64) at the end. Returns the groups that had no
    ready axis (matched by their sorted weights instead).
    """
    solved: Set[str] = set()
    blind: List[str] = []
    for g, refs in matcher.refs_of.items():
        if not refs:
            solved.add(g)
            continue
        ready = _ready_refs(matcher, g, solved)
        if ready:
            cost = matcher.contribution(g, ready[0])[2].clone()
            for r in ready[1:]:
                cost += matcher.contribution(g, r)[2]
            new = torch.as_tensor(linear_sum_assignment(cost.numpy(), maximize=True)[1], dtype=torch.long)
        else:
            blind.append(g)
            new = group_signature_permutation(matcher.A, matcher.B, spec, g)
        if not torch.equal(new, matcher.perms[g]):
            matcher.perms[g] = new
            matcher.version[g] += 1
        solved.add(g)
    matcher.current = matcher.objective(matcher.names, matcher.perms)
    return blind
