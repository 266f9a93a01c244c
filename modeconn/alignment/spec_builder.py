"""Turning the walk's groups into a :class:`PermutationSpec` with reasons.

After the walk, a few more constraints can only be seen globally:

* the same slice of a state-dict axis claimed by two groups (a layer called
  twice, tied weights) forces one permutation: the groups merge (or, with
  different sizes, are dropped);
* overlapping but different slices of one axis claimed by two classes cannot
  both be permuted: both are dropped (repeated until nothing changes, since
  dropping a class frees its slices).

Each surviving class becomes one group, named after its first-opened layer.
It is observed (for activation matching) at the nodes where its units are
visible: not at data movement, and not right before a per-channel op that
would show them again later; post-activation points are preferred.  Every
dropped class gets one reason listing its layers and why, and state-dict
entries the traced forward pass never touches are explained too.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Set, Tuple

from torch import nn

from modeconn.alignment.spec import (NEVER_PERMUTED_SUFFIXES, AxisRef, ObservePoint, PermutationGroup, PermutationSpec,
                                    compatible_refs)
from modeconn.alignment.walk_state import NodeKind, UnitGroups, WalkState

Classes = Dict[int, List[int]]  # representative -> member group ids, in opening order


def _merge_shared_axes(groups: UnitGroups) -> None:
    """Groups permuting the same axis slice merge (sizes must agree, else both are dropped)."""
    by_key: Dict[AxisRef, int] = {}
    for gid in range(len(groups)):
        g = groups[gid]
        for a in g.axes:
            if a in by_key:
                other = by_key[a]
                if groups[other].size != g.size:
                    groups.drop([gid, other], f"'{a.name}' axis {a.axis} is shared by groups of different sizes")
                else:
                    groups.union(other, gid)
            else:
                by_key[a] = gid


def _restrict_blocks(groups: UnitGroups, classes: Classes, dropped: Set[int]) -> Dict[int, int]:
    """Restrict every class with blocked members to permutations equal in each block.

    A member of ``n`` units in ``b`` blocks (read by a grouped convolution, or
    added blockwise to another layer's units) only allows a permutation that
    is the same in each block.  The class's unit is ``u = min(n/b)`` over its
    members; a member of ``n`` units then has ``f = n/u`` blocks, and its refs
    cover the same slice viewed as ``[outer*f, u, inner]``; a grouped
    convolution's own refs (``w`` units each) repeat ``w/u`` times.  Classes
    whose members do not divide into such blocks are dropped.  Returns each
    member's ``f`` (1 when not restricted).
    """
    factors: Dict[int, int] = {}
    for r, ms in classes.items():
        if all(groups[m].blocks == 1 for m in ms) or r in dropped:
            continue
        u = min(groups[m].size // groups[m].blocks for m in ms)
        sizes = [(groups[m].size, groups[m].blocks) for m in ms]
        if any(n % b or n % u or (n // u) % b for n, b in sizes):
            groups.drop([r], f"its units are read in incompatible blocks (units, blocks): {sorted(set(sizes))}")
            dropped.add(r)
            continue
        for m in ms:
            g = groups[m]
            f = factors[m] = g.size // u
            g.axes = [a._replace(outer=a.outer * f) for a in g.axes] + \
                [a._replace(outer=a.outer * (units // u)) for a, units in g.block_axes]
            g.observe = [p._replace(outer=p.outer * f) for p in g.observe]
            g.size, g.block_axes = u, []
    return factors


def _classes(groups: UnitGroups) -> Classes:
    """Members of every class, keyed by representative (the earliest member), in opening order."""
    members: Classes = OrderedDict()
    for gid in range(len(groups)):
        members.setdefault(groups.find(gid), []).append(gid)
    return members


def _class_axes(groups: UnitGroups, members: List[int]) -> List[AxisRef]:
    """The axes a class permutes, without repeats, never-permuted entries excluded."""
    seen: Dict[AxisRef, None] = OrderedDict()
    for m in members:
        for a in groups[m].axes:
            if not a.name.endswith(NEVER_PERMUTED_SUFFIXES):
                seen[a] = None
    return list(seen)


def _drop_conflicts(groups: UnitGroups, classes: Classes, dropped: Set[int]) -> Dict[int, List[str]]:
    """Add to ``dropped`` the classes whose slices of an axis overlap another's; return their reasons.

    Refs of different classes on one slice that permute disjoint digits of it
    (attention heads and the dims inside every head) do not conflict.  A class
    already dropped still holds its slice: its units stay in place, so a kept
    class permuting an overlapping slice of the same tensor (a layer that reads
    both) would move entries the dropped class's units are multiplied with.
    Whether two refs clash does not depend on which classes are dropped, so one
    pass over every pair finds all of them.
    """
    reasons: Dict[int, List[str]] = {}
    spans: Dict[Tuple[str, int], List[Tuple[AxisRef, int, int]]] = {}
    for r in classes:
        for a in _class_axes(groups, classes[r]):
            spans.setdefault((a.name, a.axis), []).append((a, groups[r].size, r))
    for (name, axis), lst in spans.items():
        for i, (a0, n0, r0) in enumerate(lst):
            for a1, n1, r1 in lst[i + 1:]:
                clash = (a1 != a0) if r1 == r0 else not compatible_refs(a0, n0, a1, n1)
                if clash and a0.offset < a1.offset + a1.span(n1) and a1.offset < a0.offset + a0.span(n0):
                    for r in (r0, r1):
                        if r not in dropped:
                            dropped.add(r)
                            reasons.setdefault(r, []).append(f"conflicting permutations of '{name}' axis {axis}")
    return reasons


def _observe_points(walk: WalkState, dropped: Set[int],
                    blocks: Dict[int, int]) -> Dict[int, List[Tuple[bool, ObservePoint]]]:
    """Per kept class, ``(post_act, point)`` for every node where its units can be read.

    ``blocks``: members restricted to the same permutation in each of ``f`` blocks (:func:`_restrict_blocks`).
    """
    points: Dict[int, List[Tuple[bool, ObservePoint]]] = {}
    for node, layout in walk.layout.items():
        if layout is None or walk.kind.get(node) is NodeKind.MOVE or node.op == "output":
            continue
        users = list(node.users)
        if users and all(walk.kind.get(u) is NodeKind.PER_CHANNEL for u in users):
            continue  # the units are seen again, transformed per channel, at the users
        for off, s in layout.offsets():
            if s.group is None:
                continue
            r = walk.groups.find(s.group)
            if r in dropped:
                continue
            point = ObservePoint(node.name, layout.dim, off, s.inner, blocks.get(s.group, 1))
            points.setdefault(r, []).append((layout.post_act, point))
    return points


def _dropped_reason(groups: UnitGroups, r: int, members: List[int], extra: List[str]) -> str:
    """One sentence saying which layers' class ``r`` is left unpermuted and why."""
    why: List[str] = []
    for m in members:
        why.extend(groups[m].reasons)
    why.extend(extra)
    why = list(OrderedDict.fromkeys(why))
    openers = ", ".join(groups[m].name for m in members)
    return (f"group '{groups[r].name}' ({groups[r].size} units, opened by {openers}) left unpermuted: "
            + "; ".join(why))


def _explain_unused(spec: PermutationSpec, gm, state_dict) -> None:
    """Set ``spec.fixed`` and add a reason for every fixed entry the traced forward pass never uses."""
    used_modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    used_attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    spec.fixed = spec.uncovered(state_dict)
    for k in spec.fixed:
        if k.endswith(NEVER_PERMUTED_SUFFIXES):
            continue
        parts = k.split(".")[:-1]
        ancestors = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        if k not in used_attrs and not ancestors & used_modules:
            spec.reasons.append(f"'{k}' is not used by the traced forward pass; left unpermuted")


def build_spec(walk: WalkState, model: nn.Module) -> PermutationSpec:
    """The validated spec of ``model`` from a finished walk over its traced graph."""
    sd = model.state_dict()
    groups = walk.groups
    _merge_shared_axes(groups)
    classes = _classes(groups)
    dropped = {r for r, ms in classes.items() if any(groups[m].reasons for m in ms)}
    blocks = _restrict_blocks(groups, classes, dropped)
    conflicts = _drop_conflicts(groups, classes, dropped)
    points = _observe_points(walk, dropped, blocks)
    kept: Dict[str, PermutationGroup] = OrderedDict()
    reasons: List[str] = []
    for r, ms in classes.items():  # representatives in opening order
        if r in dropped:
            reasons.append(_dropped_reason(groups, r, ms, conflicts.get(r, [])))
            continue
        pts = points.get(r, []) + [(True, p) for m in ms for p in groups[m].observe]
        best = [p for act, p in pts if act] or [p for _, p in pts]
        kept[groups[r].name] = PermutationGroup(groups[r].size, _class_axes(groups, ms),
                                                list(OrderedDict.fromkeys(best)))
    reasons.extend(walk.notes)
    spec = PermutationSpec(kept, reasons=reasons)
    _explain_unused(spec, walk.gm, sd)
    spec.validate(sd)
    return spec
