"""Rules for ``call_function`` and ``call_method`` nodes: dispatch tables from target to rule.

:data:`FUNCTION_RULES` is keyed by the called function (``torch.cat``,
``F.relu``, ``operator.add``...), :data:`METHOD_RULES` by the tensor method
name (``"view"``, ``"relu"``...).  Functional layers (``F.linear``,
``F.conv2d``) are followed only when their weights are module attributes
(``get_attr`` nodes), since those are the state-dict entries a group can
permute.  For ops with one main tensor, a permuted tensor passed in another
argument is dropped: the rule follows units through the main tensor only.
"""
from __future__ import annotations

import operator
from functools import partial
from typing import Any, Callable, Dict, Iterable

import torch
import torch.nn.functional as F
from torch import fx

from modeconn.alignment import layout_rules as rules
from modeconn.alignment.channel_layout import Unsupported, matrix_transpose_order, permute_order, swap_order
from modeconn.alignment.op_tables import (ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, BINARY_FUNCTIONS,
                                          BINARY_METHODS, CAST_METHODS, CAT_FUNCTIONS, CONV_FUNCTIONS,
                                          COPY_METHODS, IDENTITY_FUNCTIONS, POOL_FUNCTIONS, REDUCE_FUNCTIONS,
                                          REDUCE_METHODS, RESHAPE_FUNCTIONS, RESHAPE_LIKE_METHODS,
                                          RESHAPE_METHODS, SAFE_ATTRIBUTES, SIZE_METHODS, SOFTMAX_FUNCTIONS,
                                          SOFTMAX_METHODS, SWAP_FUNCTIONS, SWAP_METHODS, UNARY_FUNCTIONS,
                                          UNARY_METHODS)
from modeconn.alignment.walk_state import NodeKind, WalkState, main_input, tensor_shape

CallRule = Callable[[WalkState, fx.Node], None]


def _no_units(walk: WalkState, node: fx.Node) -> None:
    """A query returning plain numbers (``x.size()``, ``numel``): nothing to permute."""
    walk.layout[node] = None


def _attribute(walk: WalkState, node: fx.Node) -> None:
    """``getattr(x, name)``: metadata such as ``.shape`` carries no units; anything else is unsupported."""
    if node.args[1] not in SAFE_ATTRIBUTES:
        raise Unsupported(f"attribute .{node.args[1]}")
    walk.layout[node] = None


def _getitem(walk: WalkState, node: fx.Node) -> None:
    """``x[idx]``; item ``i`` of a module's tuple output (``nn.MultiheadAttention``) has its own layout."""
    x = main_input(node)
    if x in walk.tuple_layouts:
        walk.kind[node] = NodeKind.MOVE
        walk.layout[node] = walk.tuple_layouts[x].get(node.args[1])
        return
    rules.getitem(walk, node, walk.layout_of(x))


def _is_attr(value: Any) -> bool:
    """Whether ``value`` is a ``get_attr`` node (a parameter of the traced module)."""
    return isinstance(value, fx.Node) and value.op == "get_attr"


def _layer_base(weight: fx.Node) -> str:
    """Group name for a functional layer: its weight's name without ``.weight``."""
    return weight.target[:-len(".weight")] if weight.target.endswith(".weight") else weight.target


def _f_linear(walk: WalkState, node: fx.Node) -> None:
    """``F.linear(x, weight, bias)`` on module attributes."""
    x, w, b = main_input(node), walk.arg(node, 1, "weight"), walk.arg(node, 2, "bias")
    if not _is_attr(w) or (b is not None and not _is_attr(b)):
        raise Unsupported("F.linear with weights that are not module attributes")
    walk.drop_secondary(node, x)
    rules.linear(walk, node, walk.layout_of(x), _layer_base(w), w.target, b.target if b is not None else None,
                 tensor_shape(w)[0])


def _f_conv(walk: WalkState, node: fx.Node, spatial: int) -> None:
    """``F.convNd(x, weight, bias, ..., groups)`` on module attributes."""
    x, w, b = main_input(node), walk.arg(node, 1, "weight"), walk.arg(node, 2, "bias")
    groups = walk.arg(node, 6, "groups", 1)
    if not _is_attr(w) or (b is not None and not _is_attr(b)) or not isinstance(groups, int):
        raise Unsupported("functional convolution with weights that are not module attributes")
    walk.drop_secondary(node, x)
    rules.conv(walk, node, walk.layout_of(x), _layer_base(w), spatial, False, groups, tensor_shape(w)[0],
               w.target, b.target if b is not None else None)


def _attr_entries(walk: WalkState, node: fx.Node, tensors: Iterable[Any], what: str) -> list:
    """State-dict names of the optional per-channel ``tensors`` of a functional norm (None skipped).

    Each must be a module attribute (``get_attr``) that is a state-dict entry,
    the module's own parameter or running statistic; otherwise Unsupported.
    """
    names = []
    for t in tensors:
        if t is None:
            continue
        if not _is_attr(t) or t.target not in walk.state_names:
            raise Unsupported(f"{what} with statistics or affine parameters that are not module attributes")
        names.append(t.target)
    walk.drop_secondary(node, main_input(node))
    return names


def _f_batch_norm(walk: WalkState, node: fx.Node) -> None:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, ...)`` (timm's ``BatchNormAct2d``)."""
    tensors = [walk.arg(node, i, kw) for i, kw in ((1, "running_mean"), (2, "running_var"), (3, "weight"),
                                                   (4, "bias"))]
    rules.norm(walk, node, walk.layout_of(main_input(node)), 1, _attr_entries(walk, node, tensors, "F.batch_norm"))


def _f_layer_norm(walk: WalkState, node: fx.Node) -> None:
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)`` (timm's ``LayerNorm2d`` after a permute)."""
    shape = walk.arg(node, 1, "normalized_shape")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) for d in shape):
        raise Unsupported("F.layer_norm with a non-constant normalized_shape")
    entries = _attr_entries(walk, node, [walk.arg(node, 2, "weight"), walk.arg(node, 3, "bias")], "F.layer_norm")
    rules.layer_norm(walk, node, walk.layout_of(main_input(node)), tuple(shape), entries)


def _f_group_norm(walk: WalkState, node: fx.Node) -> None:
    """``F.group_norm(x, num_groups, weight, bias, eps)``: per-channel with 1 group or 1 channel per group."""
    x = main_input(node)
    num_groups, xs = walk.arg(node, 1, "num_groups"), tensor_shape(x)
    entries = _attr_entries(walk, node, [walk.arg(node, 2, "weight"), walk.arg(node, 3, "bias")], "F.group_norm")
    if walk.layout_of(x) is not None and (xs is None or num_groups not in (1, xs[1])):
        raise Unsupported(f"group_norm with {num_groups} groups (statistics mix a subset of channels)")
    rules.norm(walk, node, walk.layout_of(x), 1, entries)


def _elementwise(walk: WalkState, node: fx.Node, act) -> None:
    """An elementwise function or method (see :func:`layout_rules.elementwise` for ``act``)."""
    rules.elementwise(walk, node, act)


def _passthrough(walk: WalkState, node: fx.Node, act, kind: NodeKind = NodeKind.PER_CHANNEL) -> None:
    """Dropout, copies and softmax: one main tensor, same units out; ``kind`` overrides the node kind."""
    x = main_input(node)
    walk.drop_secondary(node, x)
    rules.passthrough(walk, node, walk.layout_of(x), act)
    walk.kind[node] = kind


def _pool(walk: WalkState, node: fx.Node, spatial: int) -> None:
    """A functional pooling over ``spatial`` dims; returning indices as well is unsupported."""
    x = main_input(node)
    walk.drop_secondary(node, x)
    layout = walk.layout_of(x)
    if tensor_shape(node) is None and layout is not None:
        raise Unsupported("pooling that returns indices")
    rules.spatial(walk, node, layout, spatial)


def _interpolate(walk: WalkState, node: fx.Node) -> None:
    """``F.interpolate``: resamples every dimension after batch and channels."""
    x = main_input(node)
    walk.drop_secondary(node, x)
    xs = tensor_shape(x)
    rules.spatial(walk, node, walk.layout_of(x), (len(xs) - 2) if xs else 0)


def _pad(walk: WalkState, node: fx.Node) -> None:
    """``F.pad(x, pad)``: pads the last ``len(pad) // 2`` dims."""
    x = main_input(node)
    walk.drop_secondary(node, x)
    pad = walk.arg(node, 1, "pad")
    if not isinstance(pad, (list, tuple)):
        raise Unsupported("F.pad with non-constant padding")
    rules.spatial(walk, node, walk.layout_of(x), len(pad) // 2)


def _reshape(walk: WalkState, node: fx.Node) -> None:
    """``flatten``/``view``/``reshape``/``squeeze``... to the traced output shape."""
    rules.reshape(walk, node, main_input(node))


def _reshape_like(walk: WalkState, node: fx.Node) -> None:
    """``x.view_as(y)`` / ``x.reshape_as(y)``: y only gives the shape."""
    walk.kind[node] = NodeKind.MOVE
    walk.drop_secondary(node, main_input(node))
    rules.reshape(walk, node, main_input(node))


def _matrix_transpose(walk: WalkState, node: fx.Node) -> None:
    """``x.t()``."""
    rules.reorder_dims(walk, node, walk.layout_of(main_input(node)), matrix_transpose_order)


def _permute(walk: WalkState, node: fx.Node) -> None:
    """``x.permute(*dims)`` / ``torch.permute(x, dims)``."""
    args = list(node.args[1:])
    dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
    if not dims and "dims" in node.kwargs:
        dims = node.kwargs["dims"]
    rules.reorder_dims(walk, node, walk.layout_of(main_input(node)), partial(permute_order, dims))


def _swap(walk: WalkState, node: fx.Node) -> None:
    """``x.transpose(d0, d1)`` and its aliases ``swapaxes``/``swapdims``."""
    args = node.args[1:]
    d0 = args[0] if len(args) > 0 else node.kwargs.get("dim0")
    d1 = args[1] if len(args) > 1 else node.kwargs.get("dim1")
    rules.reorder_dims(walk, node, walk.layout_of(main_input(node)), partial(swap_order, d0, d1))


def _reduce(walk: WalkState, node: fx.Node) -> None:
    """``sum``/``mean``/``amax``/``amin`` over constant dims."""
    rules.reduce(walk, node, main_input(node))


def _each(targets: Iterable[Any], rule: CallRule) -> Dict[Any, CallRule]:
    """The same rule for every target in ``targets``."""
    return {t: rule for t in targets}


FUNCTION_RULES: Dict[Callable, CallRule] = {
    torch.numel: _no_units,
    getattr: _attribute,
    operator.getitem: _getitem,
    F.linear: _f_linear,
    **{f: partial(_f_conv, spatial=k) for f, k in CONV_FUNCTIONS.items()},
    F.batch_norm: _f_batch_norm,
    F.layer_norm: _f_layer_norm,
    F.group_norm: _f_group_norm,
    **_each(ACTIVATION_FUNCTIONS, partial(_elementwise, act=True)),
    **_each(UNARY_FUNCTIONS, partial(_elementwise, act=False)),
    **_each(BINARY_FUNCTIONS, partial(_elementwise, act=False)),
    **_each(IDENTITY_FUNCTIONS, partial(_passthrough, act=None)),
    **_each(SOFTMAX_FUNCTIONS, partial(_passthrough, act=False)),
    **{f: partial(_pool, spatial=k) for f, k in POOL_FUNCTIONS.items()},
    F.interpolate: _interpolate,
    F.pad: _pad,
    **_each(RESHAPE_FUNCTIONS, _reshape),
    torch.t: _matrix_transpose,
    torch.permute: _permute,
    **_each(SWAP_FUNCTIONS, _swap),
    **_each(CAT_FUNCTIONS, rules.cat),
    **_each(REDUCE_FUNCTIONS, _reduce),
}

METHOD_RULES: Dict[str, CallRule] = {
    **_each(SIZE_METHODS, _no_units),
    **_each(ACTIVATION_METHODS, partial(_elementwise, act=True)),
    **_each(CAST_METHODS, partial(_elementwise, act=None)),
    **_each(UNARY_METHODS, partial(_elementwise, act=False)),
    **_each(BINARY_METHODS, partial(_elementwise, act=False)),
    # a copy is data movement: observe the tensor it copies, not the copy
    **_each(COPY_METHODS, partial(_passthrough, act=None, kind=NodeKind.MOVE)),
    **_each(SOFTMAX_METHODS, partial(_passthrough, act=False)),
    **_each(RESHAPE_METHODS, _reshape),
    **_each(RESHAPE_LIKE_METHODS, _reshape_like),
    "t": _matrix_transpose,
    "permute": _permute,
    **_each(SWAP_METHODS, _swap),
    **_each(REDUCE_METHODS, _reduce),
}


def visit_call(walk: WalkState, node: fx.Node) -> None:
    """Apply the rule of the called function or method; an unknown target is unsupported."""
    table = METHOD_RULES if node.op == "call_method" else FUNCTION_RULES
    rule = table.get(node.target)
    if rule is None:
        walk.unsupported(node, "unsupported operation")
        return
    rule(walk, node)
