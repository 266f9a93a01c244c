"""The walk over a traced graph: one rule per fx node, chosen from dispatch tables.

Nodes are visited in graph (topological) order, so every input's layout is
known before its users.  :data:`NODE_RULES` picks the rule by the node's fx op;
``call_module`` and ``call_function``/``call_method`` nodes dispatch again on
the module class or the target (:mod:`~modeconn.alignment.module_rules`,
:mod:`~modeconn.alignment.function_rules`).  A rule that raises
:class:`Unsupported` leaves every group of the node's inputs fixed, with the
message as the reason.  The network's inputs carry no groups and its outputs
must keep their order, so groups reaching the output are dropped.  As a last
safety net, a layout that disagrees with the traced output shape is dropped.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable

from torch import fx

from modeconn.alignment.attention_sites import find_attention_sites
from modeconn.alignment.channel_layout import Unsupported
from modeconn.alignment.function_rules import visit_call
from modeconn.alignment.module_rules import visit_module
from modeconn.alignment.walk_state import NodeKind, WalkState, tensor_shape


def _no_units(walk: WalkState, node: fx.Node) -> None:
    """Inputs and attributes: nothing is permuted (the network input keeps its order)."""
    walk.layout[node] = None


def _output(walk: WalkState, node: fx.Node) -> None:
    """The model output: its units are what the caller sees, so their groups are never permuted."""
    walk.drop_layouts(walk.permuted_inputs(node), "its units reach the model output (never permuted)")


def _unknown_op(walk: WalkState, node: fx.Node) -> None:
    """An fx op this walk does not know (fx defines no other ops today)."""
    walk.unsupported(node, "unknown fx op")


NODE_RULES: Dict[str, Callable[[WalkState, fx.Node], None]] = {
    "placeholder": _no_units,
    "get_attr": _no_units,
    "output": _output,
    "call_module": visit_module,
    "call_function": visit_call,
    "call_method": visit_call,
}


def _check_layout(walk: WalkState, node: fx.Node) -> None:
    """Drop the node's groups if its layout does not match its traced output shape."""
    layout = walk.layout.get(node)
    if layout is None:
        return
    out_shape = tensor_shape(node)
    if out_shape is None or len(out_shape) != layout.ndim or out_shape[layout.dim] != layout.length():
        walk.groups.drop(layout.groups(), f"could not follow the channel layout through {walk.describe(node)}")
        walk.layout[node] = None


def walk_graph(gm: fx.GraphModule, state_names: Iterable[str]) -> WalkState:
    """Visit every node of ``gm`` (shapes already propagated) and return the final state.

    Hand-written attention is found first
    (:func:`~modeconn.alignment.attention_sites.find_attention_sites`), so that
    its q/k/v projections open no group of their own.  ``state_names``: the
    model's state-dict names.
    """
    walk = WalkState(gm, state_names)
    find_attention_sites(walk)
    for node in gm.graph.nodes:
        walk.kind[node] = NodeKind.OTHER
        rule = NODE_RULES.get(node.op, _unknown_op)
        try:
            rule(walk, node)
        except Unsupported as e:
            walk.unsupported(node, str(e))
        if node.op != "output" and node not in walk.layout:
            walk.layout[node] = None
        _check_layout(walk, node)
    return walk
