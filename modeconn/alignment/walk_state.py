"""State of the walk over a traced model: channel groups, node layouts, node kinds.

Every Linear/Conv output *opens* a channel group: one candidate permutation
of its output units, recording each state-dict axis it must re-order.  Groups
live in a union-find (:class:`UnitGroups`): when two groups' units meet
elementwise (a residual add, a gated product, a concatenation of equally laid
out tensors), unit ``i`` of one is combined with unit ``i`` of the other, so
only the *same* permutation applied to both keeps the function intact, and the
two groups merge.  A group that reaches something the walk cannot prove
permutation-equivariant is *dropped* (left unpermuted) with a reason; a merged
class is dropped as a whole.

:class:`WalkState` holds, per fx node, its :class:`ChannelLayout` (None: no
permuted units) and its :class:`NodeKind`, plus the primitives the transfer
rules share.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from torch import fx
from torch.fx.passes.shape_prop import TensorMetadata

from modeconn.alignment.channel_layout import ChannelLayout, Segment, Unsupported
from modeconn.alignment.op_tables import SIZE_METHODS
from modeconn.alignment.spec import AxisRef, ObservePoint


class NodeKind(enum.Enum):
    """What a node does to the units flowing through it; decides where units are observed."""

    PER_CHANNEL = "per-channel"  # a per-unit function of one tensor (activation, norm, pool): observe after it
    MOVE = "move"                # data movement (view, transpose, cat, indexing): same values, never observed
    OTHER = "other"              # anything else (layers, arithmetic on several tensors, reductions)


@dataclass
class RawGroup:
    """A group opened by one layer: its name, size, the axes it permutes, why it was dropped."""

    name: str
    size: int
    axes: List[AxisRef] = field(default_factory=list)
    reasons: List[str] = field(default_factory=list)
    observe: List[ObservePoint] = field(default_factory=list)  # points known to the rule that opened it
    # a grouped convolution reading this group's units in ``blocks`` blocks: only a permutation that
    # is the same in every block keeps them in their block; ``block_axes`` are (ref, units per ref)
    blocks: int = 1
    block_axes: List[Tuple[AxisRef, int]] = field(default_factory=list)


class UnitGroups:
    """Union-find over the opened groups; a class is represented by its first-opened member."""

    def __init__(self) -> None:
        """No groups yet."""
        self.groups: List[RawGroup] = []
        self.parent: List[int] = []
        self.names_used: Dict[str, int] = {}

    def __getitem__(self, gid: int) -> RawGroup:
        """The group with id ``gid``."""
        return self.groups[gid]

    def __len__(self) -> int:
        """Number of groups opened."""
        return len(self.groups)

    def open(self, base: str, size: int) -> int:
        """Open a group named ``base`` (``base@k`` for a layer called again); return its id."""
        k = self.names_used.get(base, 0)
        self.names_used[base] = k + 1
        name = base if k == 0 else f"{base}@{k}"
        self.groups.append(RawGroup(name, int(size)))
        self.parent.append(len(self.parent))
        return len(self.groups) - 1

    def find(self, g: int) -> int:
        """Id of the representative of ``g``'s class (path halving)."""
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        """Merge the classes of ``a`` and ``b``; the earlier-opened representative stays."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra > rb:
                ra, rb = rb, ra
            self.parent[rb] = ra

    def drop(self, gids: Iterable[Optional[int]], reason: str) -> None:
        """Record ``reason`` for leaving each group in ``gids`` (None entries ignored) unpermuted."""
        for g in gids:
            if g is not None:
                self.groups[g].reasons.append(reason)


@dataclass
class AttentionSite:
    """An attention layer whose heads (and the dims inside them) are candidate groups.

    ``name`` names it in reasons (the common prefix of its layers), ``layers``
    are its modules, ``groups`` the ids of its head / query-key / value groups.
    Inference checks every site numerically before keeping its groups.
    """

    name: str
    layers: List[str]
    groups: List[int]


def tensor_shape(node: Any) -> Optional[Tuple[int, ...]]:
    """The traced shape of a node's output, or None for non-nodes and non-tensor outputs."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata):
        return tuple(int(s) for s in meta.shape)
    return None


def value_users(node: fx.Node) -> List[fx.Node]:
    """Users of ``node`` that read its values (not ``x.size()``/``x.dim()``/``x.shape`` queries)."""
    return [u for u in node.users
            if not (u.op == "call_method" and u.target in SIZE_METHODS)
            and not (u.op == "call_function" and u.target is getattr)]


def main_input(node: fx.Node) -> Any:
    """The tensor a call acts on: its first positional argument, else its ``input`` keyword
    (``torch.flatten(input=x, start_dim=1)``); None if it has neither."""
    return node.args[0] if node.args else node.kwargs.get("input")


def _target_name(node: fx.Node) -> str:
    """A readable name of a node's target (a string already, or a function's name)."""
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", repr(t))


class WalkState:
    """Layouts and kinds of the nodes visited so far, the groups, and notes for the spec's reasons."""

    def __init__(self, gm: fx.GraphModule, state_names: Iterable[str]):
        """Empty state for the traced module ``gm`` (shapes already propagated).

        ``state_names``: the model's state-dict names, the entries a group may
        permute (not ``gm``'s: tracing registers plain tensor attributes as buffers).
        """
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.state_names = set(state_names)
        self.tuple_layouts: Dict[fx.Node, Dict[int, ChannelLayout]] = {}  # layouts of a tuple output's items
        self.sites: List[AttentionSite] = []
        self.site_projections: Set[fx.Node] = set()  # q/k/v Linears of attention sites: open no group
        self.groups = UnitGroups()
        self.layout: Dict[fx.Node, Optional[ChannelLayout]] = {}
        self.kind: Dict[fx.Node, NodeKind] = {}
        self.notes: List[str] = []

    # ----------------------------------------------------------- queries
    def layout_of(self, x: Any) -> Optional[ChannelLayout]:
        """Layout of ``x`` if it is a visited node, else None (constants carry no units)."""
        return self.layout.get(x) if isinstance(x, fx.Node) else None

    def permuted_inputs(self, node: fx.Node) -> List[ChannelLayout]:
        """Layouts of ``node``'s input nodes that carry permuted units."""
        return [self.layout[n] for n in node.all_input_nodes if self.layout.get(n) is not None]

    def describe(self, node: fx.Node) -> str:
        """How a reason names ``node``: its name and what it calls."""
        if node.op == "call_module":
            mod = self.modules.get(node.target)
            return f"node '{node.name}' ({type(mod).__name__} '{node.target}')"
        if node.op == "call_method":
            return f"node '{node.name}' (method .{node.target}())"
        if node.op == "call_function":
            return f"node '{node.name}' (function {_target_name(node)})"
        return f"node '{node.name}' ({node.op})"

    @staticmethod
    def arg(node: fx.Node, pos: int, kw: str, default: Any = None) -> Any:
        """Argument ``pos`` of the call, or keyword ``kw``, or ``default``."""
        if len(node.args) > pos:
            return node.args[pos]
        return node.kwargs.get(kw, default)

    # ---------------------------------------------------------- updates
    def drop_layouts(self, layouts: Iterable[Optional[ChannelLayout]], reason: str) -> None:
        """Drop every group carried by ``layouts``."""
        for layout in layouts:
            if layout is not None:
                self.groups.drop(layout.groups(), reason)

    def unsupported(self, node: fx.Node, why: str) -> None:
        """``node`` cannot be followed: drop the groups of all its inputs; its output carries none."""
        ins = self.permuted_inputs(node)
        if ins:
            self.drop_layouts(ins, f"{why} at {self.describe(node)}")
        self.layout[node] = None

    def drop_secondary(self, node: fx.Node, main: Any) -> None:
        """Drop the groups reaching ``node`` through arguments other than ``main``.

        The rules follow units through the main tensor only; a permuted tensor
        used as e.g. a shape template or a weight is not proven safe.
        """
        extra = [self.layout[n] for n in node.all_input_nodes if n is not main and self.layout.get(n) is not None]
        if extra:
            self.drop_layouts(extra, f"permuted tensor used as a secondary argument of {self.describe(node)}")

    def add_axes(self, layout: Optional[ChannelLayout], name: str, axis: int) -> None:
        """Axis ``axis`` of state-dict entry ``name`` is indexed by the units of ``layout``."""
        if layout is None:
            return
        for off, s in layout.offsets():
            if s.group is not None:
                self.groups[s.group].axes.append(AxisRef(name, axis, off, s.inner))

    def present(self, names: Iterable[str]) -> List[str]:
        """The ``names`` that are state-dict entries (a layer built with ``bias=False`` has no bias)."""
        return [n for n in names if n in self.state_names]

    def open_group(self, node: fx.Node, base: str, size: int, dim_from_end: int,
                   entries: Sequence[Tuple[str, int]]) -> None:
        """``node`` outputs ``size`` new units at dimension ``-dim_from_end``, set by ``entries`` (name, axis)."""
        shape = tensor_shape(node)
        if shape is None:
            raise Unsupported("output is not a tensor")
        g = self.groups.open(base, size)
        for name, axis in entries:
            self.groups[g].axes.append(AxisRef(name, axis, 0, 1))
        nd = len(shape)
        self.layout[node] = ChannelLayout(nd - dim_from_end, nd, (Segment(g, size, 1),), False)
