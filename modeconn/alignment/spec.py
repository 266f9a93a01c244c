"""Permutation specifications: which parameter axes move together.

A :class:`PermutationSpec` is a set of named *groups*.  Each group is one
permutation of ``size`` hidden units; it lists every ``(name, axis)`` pair of
the state dict that must be re-ordered with it (parameters **and** buffers,
e.g. BatchNorm ``running_mean``/``running_var``).  ``num_batches_tracked`` is
never permuted.

Two refinements of a plain ``(name, axis)`` pair are supported through
:class:`AxisRef`:

* ``offset``: the group covers only the slice ``[offset, offset + size*inner)``
  of the axis.  This represents ``torch.cat`` along channels: the input axis of
  the next layer is a concatenation of several groups (and possibly of
  unpermuted channels).
* ``inner``: every unit owns a contiguous block of ``inner`` entries.  This
  represents ``flatten`` after a convolution: the input axis of the following
  Linear is laid out channel-major, ``C x (H*W)``, so a channel permutation
  moves blocks of ``H*W`` entries.

Permuting with ``perm`` (a LongTensor of length ``size``) means
``w' = w.index_select(axis, perm)`` on the covered slice, i.e. new unit ``i`` is
old unit ``perm[i]``.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "AxisRef",
    "ObservePoint",
    "PermutationGroup",
    "PermutationSpec",
    "state_dict_of",
    "check_same_architecture",
    "compatible_refs",
]

NEVER_PERMUTED_SUFFIXES = ("num_batches_tracked",)


class AxisRef(NamedTuple):
    """One axis (or a slice of it) of a state-dict entry permuted by a group.

    ``AxisRef("fc2.weight", 1)`` is the whole input axis of ``fc2``;
    ``AxisRef("fc.weight", 1, 0, 64)`` is a flattened conv feature map with 64
    spatial positions per channel; ``AxisRef("conv3.weight", 1, 16)`` is the
    second half of a channel concatenation starting at channel 16.

    ``outer``: the slice ``[offset, offset + outer*size*inner)`` is viewed as
    ``[outer, size, inner]`` and the group permutes the middle dimension, the
    same way in each of the ``outer`` blocks.  Attention with ``H`` heads of
    ``d`` dims: the heads are ``AxisRef("q.weight", 0, 0, d)`` (blocks of d
    rows) and the query/key dims shared by every head are
    ``AxisRef("q.weight", 0, 0, 1, H)``.  Two refs on the same slice are
    compatible when they permute disjoint mixed-radix digits of it (see
    :func:`compatible_refs`); such permutations commute.
    """

    name: str
    axis: int
    offset: int = 0
    inner: int = 1
    outer: int = 1

    def span(self, size: int) -> int:
        """Number of entries of the axis covered by a group of ``size`` units: ``outer*size*inner``."""
        return self.outer * size * self.inner


def compatible_refs(a: "AxisRef", size_a: int, b: "AxisRef", size_b: int) -> bool:
    """Whether groups of ``size_a``/``size_b`` units on refs ``a``/``b`` of one axis can both be permuted.

    True when their slices are disjoint, or when they cover the same slice and
    act on disjoint digits of its mixed-radix index ``[outer, size, inner]``:
    one's block ``size*inner`` divides the other's ``inner``.  Permutations of
    disjoint digits commute, so the order of applying them does not matter.
    """
    ea, eb = a.offset + a.span(size_a), b.offset + b.span(size_b)
    if ea <= b.offset or eb <= a.offset:
        return True
    if (a.offset, ea) != (b.offset, eb):
        return False
    return a.inner % (size_b * b.inner) == 0 or b.inner % (size_a * a.inner) == 0


class ObservePoint(NamedTuple):
    """Where a group's units can be observed in the forward pass.

    ``node`` is a torch.fx node name of the traced model (or a module name, used
    with a forward hook); ``dim`` is the tensor dimension holding the units;
    ``offset``/``inner`` select the group's slice of that dimension the same
    way as in :class:`AxisRef` (blocks of ``inner`` entries, and the ``outer``
    repetitions of the slice, are treated as extra samples).
    """

    node: str
    dim: int = 1
    offset: int = 0
    inner: int = 1
    outer: int = 1


AxisLike = Union[AxisRef, Tuple]
ObserveLike = Union[ObservePoint, str, Tuple]


def _to_axis(item: AxisLike) -> AxisRef:
    """An :class:`AxisRef` from itself or a ``(name, axis[, offset, inner])`` tuple; ValueError otherwise."""
    if isinstance(item, AxisRef):
        return item
    if isinstance(item, (tuple, list)) and 2 <= len(item) <= 5 and isinstance(item[0], str):
        return AxisRef(item[0], *[int(v) for v in item[1:]])
    raise ValueError(
        f"axis entry {item!r} must be (name, axis) or (name, axis, offset, inner[, outer])"
    )


def _to_observe(item: ObserveLike) -> ObservePoint:
    """An :class:`ObservePoint` from itself, a node name or a ``(node, dim[, offset, inner])`` tuple."""
    if isinstance(item, ObservePoint):
        return item
    if isinstance(item, str):
        return ObservePoint(item)
    if isinstance(item, (tuple, list)) and 1 <= len(item) <= 5 and isinstance(item[0], str):
        return ObservePoint(item[0], *[int(v) for v in item[1:]])
    raise ValueError(
        f"observe entry {item!r} must be a node name or (node, dim, offset, inner[, outer])"
    )


@dataclass
class PermutationGroup:
    """One permutation of ``size`` units and everything it re-orders."""

    size: int
    axes: List[AxisRef] = field(default_factory=list)
    observe: List[ObservePoint] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Check the size; normalise axes and observe points to their named tuples."""
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"group size must be a positive int, got {self.size!r}")
        self.axes = [_to_axis(a) for a in self.axes]
        self.observe = [_to_observe(o) for o in self.observe]

    @property
    def names(self) -> List[str]:
        """State-dict names touched by this group (in order, without repeats)."""
        return list(OrderedDict.fromkeys(a.name for a in self.axes))


def state_dict_of(model_or_state_dict) -> "OrderedDict[str, torch.Tensor]":
    """The state dict of a module, or the mapping itself (checked)."""
    if isinstance(model_or_state_dict, nn.Module):
        return model_or_state_dict.state_dict()
    if isinstance(model_or_state_dict, Mapping):
        for k, v in model_or_state_dict.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise ValueError(
                    f"state dict entry {k!r} must map a str to a torch.Tensor, got {type(v).__name__}"
                )
        return OrderedDict(model_or_state_dict)
    raise ValueError(
        f"expected an nn.Module or a state dict (Mapping[str, Tensor]), got {type(model_or_state_dict).__name__}"
    )


def _check_axis(gname: str, size: int, a: AxisRef, sd: Mapping[str, torch.Tensor]) -> int:
    """Raise ValueError unless group ``gname`` (``size`` units) fits axis ``a`` of ``sd``; return the slice end."""
    if a.name not in sd:
        raise ValueError(
            f"group '{gname}': '{a.name}' is not a parameter or buffer of the model"
        )
    if a.name.endswith(NEVER_PERMUTED_SUFFIXES):
        raise ValueError(f"group '{gname}': '{a.name}' can never be permuted")
    t = sd[a.name]
    if not 0 <= a.axis < t.dim():
        raise ValueError(
            f"group '{gname}': axis {a.axis} is out of range for '{a.name}' "
            f"with shape {tuple(t.shape)}"
        )
    if a.offset < 0 or a.inner < 1 or a.outer < 1:
        raise ValueError(
            f"group '{gname}': '{a.name}' axis {a.axis} has invalid offset {a.offset} / inner {a.inner}"
            f" / outer {a.outer}"
        )
    length = t.shape[a.axis]
    end = a.offset + a.span(size)
    if end > length:
        raise ValueError(
            f"group '{gname}' has size {size} but '{a.name}' (shape {tuple(t.shape)}) "
            f"has length {length} on axis {a.axis}"
            + (f" (needs {a.outer}x{size}x{a.inner} entries from offset {a.offset})"
               if (a.offset or a.inner != 1 or a.outer != 1) else "")
        )
    return end


@dataclass
class PermutationSpec:
    """Named permutation groups of a network.

    ``groups`` maps a group name to a :class:`PermutationGroup`.  ``fixed``
    lists state-dict names not covered by any group (left unpermuted) and
    ``reasons`` explains, in plain words, what was left unpermuted and why.

    Written by hand for an MLP ``fc1 -> relu -> fc2 -> relu -> fc3``::

        PermutationSpec({
            "fc1": PermutationGroup(512, [("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)]),
            "fc2": PermutationGroup(512, [("fc2.weight", 0), ("fc2.bias", 0), ("fc3.weight", 1)]),
        })

    or, taking sizes from the model, ``PermutationSpec.from_axes({...}, model)``.
    """

    groups: Dict[str, PermutationGroup] = field(default_factory=dict)
    fixed: List[str] = field(default_factory=list)
    reasons: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Check the group names; accept ``(size, axes[, observe])`` tuples as groups."""
        if not isinstance(self.groups, Mapping):
            raise ValueError("groups must be a mapping name -> PermutationGroup")
        groups: Dict[str, PermutationGroup] = OrderedDict()
        for name, g in self.groups.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"group names must be non-empty strings, got {name!r}")
            if not isinstance(g, PermutationGroup):
                if isinstance(g, (tuple, list)) and len(g) in (2, 3):
                    g = PermutationGroup(*g)
                else:
                    raise ValueError(
                        f"group '{name}' must be a PermutationGroup or (size, axes[, observe]), got {g!r}"
                    )
            groups[name] = g
        self.groups = groups
        self.fixed = list(self.fixed)
        self.reasons = list(self.reasons)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_axes(
        cls,
        axes: Mapping[str, Sequence[AxisLike]],
        model_or_state_dict,
        observe: Optional[Mapping[str, Sequence[ObserveLike]]] = None,
        reasons: Sequence[str] = (),
    ) -> "PermutationSpec":
        """Build a spec from ``{group: [(name, axis[, offset, inner]), ...]}``.

        Each group's size is read from the first listed axis (``(length -
        offset) // inner``, so list a full axis first); ``fixed`` is every
        state-dict entry not listed anywhere.  The result is validated.
        """
        sd = state_dict_of(model_or_state_dict)
        observe = dict(observe or {})
        groups = OrderedDict()
        for gname, items in axes.items():
            refs = [_to_axis(a) for a in items]
            if not refs:
                raise ValueError(f"group '{gname}' lists no axes")
            first = refs[0]
            if first.name not in sd:
                raise ValueError(f"group '{gname}': '{first.name}' is not in the model's state dict")
            t = sd[first.name]
            if not 0 <= first.axis < t.dim():
                raise ValueError(
                    f"group '{gname}': axis {first.axis} is out of range for '{first.name}' with shape {tuple(t.shape)}"
                )
            size = (t.shape[first.axis] - first.offset) // first.inner
            groups[gname] = PermutationGroup(size, refs, list(observe.get(gname, [])))
        spec = cls(groups, reasons=list(reasons))
        spec.fixed = spec.uncovered(sd)
        spec.validate(sd)
        return spec

    # ---------------------------------------------------------------- queries
    def __len__(self) -> int:
        """Number of groups."""
        return len(self.groups)

    @property
    def group_names(self) -> List[str]:
        """Group names, in order."""
        return list(self.groups)

    def covered(self) -> List[str]:
        """State-dict names permuted by at least one group."""
        out: Dict[str, None] = OrderedDict()
        for g in self.groups.values():
            for a in g.axes:
                out[a.name] = None
        return list(out)

    def uncovered(self, model_or_state_dict) -> List[str]:
        """State-dict names of ``model_or_state_dict`` not covered by any group."""
        sd = state_dict_of(model_or_state_dict)
        cov = set(self.covered())
        return [k for k in sd if k not in cov]

    def entries_by_name(self) -> Dict[str, List[Tuple[str, AxisRef]]]:
        """``name -> [(group, AxisRef), ...]``."""
        out: Dict[str, List[Tuple[str, AxisRef]]] = OrderedDict()
        for gname, g in self.groups.items():
            for a in g.axes:
                out.setdefault(a.name, []).append((gname, a))
        return out

    def identity(self) -> Dict[str, torch.Tensor]:
        """The identity permutation of every group."""
        return {k: torch.arange(g.size) for k, g in self.groups.items()}

    def random_permutation(self, seed: int = 0) -> Dict[str, torch.Tensor]:
        """A random permutation of every group (seeded, reproducible)."""
        gen = torch.Generator().manual_seed(int(seed))
        return {k: torch.randperm(g.size, generator=gen) for k, g in self.groups.items()}

    def canonical(self) -> frozenset:
        """Name- and order-independent form: a set of ``(size, axes)`` groups."""
        return frozenset((g.size, frozenset(g.axes)) for g in self.groups.values())

    def equivalent(self, other: "PermutationSpec") -> bool:
        """Same groups (sizes and covered axes), ignoring names, order, observe points."""
        return self.canonical() == other.canonical()

    def summary(self) -> str:
        """A short multi-line description (for printing by applications)."""
        lines = [f"PermutationSpec: {len(self.groups)} groups, {len(self.fixed)} fixed entries"]
        for name, g in self.groups.items():
            lines.append(f"  {name}: {g.size} units, {len(g.axes)} axes, observed at {len(g.observe)} points")
        for r in self.reasons:
            lines.append(f"  fixed: {r}")
        return "\n".join(lines)

    # ------------------------------------------------------------- validation
    def validate(self, model_or_state_dict) -> None:
        """Raise ValueError if this spec does not fit the model / state dict.

        Checks: every name exists, is not ``num_batches_tracked``, each axis is
        in range, each group's slice ``offset + size*inner`` fits the axis
        length, no two groups (or two entries) overlap on an axis, and every
        ``fixed`` name exists.  Two refs may share a slice only when they
        permute disjoint digits of it (:func:`compatible_refs`); a group with
        an ``outer`` ref need not cover a whole axis (packed q/k/v rows).
        """
        sd = state_dict_of(model_or_state_dict)
        spans: Dict[Tuple[str, int], List[Tuple[AxisRef, int, str]]] = {}
        for gname, g in self.groups.items():
            if not g.axes:
                raise ValueError(f"group '{gname}' permutes no axes")
            for a in g.axes:
                _check_axis(gname, g.size, a, sd)
                spans.setdefault((a.name, a.axis), []).append((a, g.size, gname))
            if not any((a.offset == 0 and a.span(g.size) == sd[a.name].shape[a.axis]) or a.outer > 1
                       for a in g.axes):
                a = g.axes[0]
                raise ValueError(
                    f"group '{gname}' has size {g.size} but none of its axes has that length "
                    f"(e.g. '{a.name}' has shape {tuple(sd[a.name].shape)}, length "
                    f"{sd[a.name].shape[a.axis]} on axis {a.axis})"
                )
        for (name, axis), lst in spans.items():
            for i, (a0, n0, g0) in enumerate(lst):
                for a1, n1, g1 in lst[i + 1:]:
                    if a0 == a1 or not compatible_refs(a0, n0, a1, n1):
                        raise ValueError(
                            f"groups '{g0}' and '{g1}' overlap on '{name}' axis {axis} "
                            f"([{a0.offset}, {a0.offset + a0.span(n0)}) and [{a1.offset}, {a1.offset + a1.span(n1)}))"
                        )
        for name in self.fixed:
            if name not in sd:
                raise ValueError(f"fixed entry '{name}' is not a parameter or buffer of the model")

    def check_permutation(self, perm: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Validate ``perm`` against the groups; missing groups mean identity."""
        if not isinstance(perm, Mapping):
            raise ValueError(f"perm must be a dict group name -> LongTensor, got {type(perm).__name__}")
        out: Dict[str, torch.Tensor] = {}
        for k, p in perm.items():
            if k not in self.groups:
                raise ValueError(f"perm has unknown group '{k}' (spec groups: {list(self.groups)[:8]}...)")
            p = torch.as_tensor(p)
            size = self.groups[k].size
            if p.dim() != 1 or p.numel() != size:
                raise ValueError(f"perm for group '{k}' must have shape ({size},), got {tuple(p.shape)}")
            if p.dtype.is_floating_point or p.dtype == torch.bool:
                raise ValueError(f"perm for group '{k}' must be integer, got {p.dtype}")
            p = p.to(device="cpu", dtype=torch.long)
            if not torch.equal(torch.sort(p).values, torch.arange(size)):
                raise ValueError(f"perm for group '{k}' is not a permutation of 0..{size - 1}")
            out[k] = p
        for k, g in self.groups.items():
            out.setdefault(k, torch.arange(g.size))
        return out


def check_same_architecture(a, b, names: Tuple[str, str] = ("model_a", "model_b")) -> None:
    """Raise ValueError naming the first state-dict entry whose name or shape differs."""
    sa, sb = state_dict_of(a), state_dict_of(b)
    na, nb = names
    for k, v in sa.items():
        if k not in sb:
            raise ValueError(
                f"{na} and {nb} have different architectures: '{k}' (shape {tuple(v.shape)}) "
                f"is in {na} but not in {nb}")
        if tuple(v.shape) != tuple(sb[k].shape):
            raise ValueError(
                f"{na} and {nb} have different architectures: '{k}' has shape {tuple(v.shape)} "
                f"in {na} but {tuple(sb[k].shape)} in {nb}")
    for k, v in sb.items():
        if k not in sa:
            raise ValueError(
                f"{na} and {nb} have different architectures: '{k}' (shape {tuple(v.shape)}) "
                f"is in {nb} but not in {na}")
