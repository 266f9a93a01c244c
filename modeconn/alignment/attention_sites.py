"""Hand-written attention in a traced graph: finding the sites, opening their head groups, checking them.

A pre-pass over the fx graph finds attention sites:

* ``F.scaled_dot_product_attention(q, k, v)``, or
* ``matmul(P, V)`` where ``P`` comes, through a softmax (and masking, scaling,
  dropout), from ``matmul(Q, Kᵀ)``.

From ``Q``, ``K`` and ``V`` it walks back through reshapes, transposes,
copies, scaling by constants and ``split``/``chunk`` of a fused projection to
their projection ``nn.Linear`` (and the row offset inside it), and forward
from the output through transposes and reshapes to the output ``nn.Linear``.
With ``H = Q.shape[-3]`` heads of ``d = Q.shape[-1]`` dims (``dv`` for ``V``),
the site opens the heads, query/key-dims and value-dims groups of
:mod:`~modeconn.alignment.attention_rules`, assuming the usual head layout
(projection feature ``h*d + e`` is dim ``e`` of head ``h``).  The projections
then only consume the stream on their input axis.

A pattern match is not a proof: :func:`verify_sites` applies a random
permutation of each site's groups to a copy of the model and compares the
outputs on the example input; a site that changes them is dropped, with a
reason naming its layers.
"""
from __future__ import annotations

import copy
import operator
from collections import OrderedDict
from numbers import Number
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from modeconn.alignment.op_tables import (BINARY_FUNCTIONS, BINARY_METHODS, CAST_METHODS, COPY_METHODS,
                                          IDENTITY_FUNCTIONS, IDENTITY_MODULES, SOFTMAX_FUNCTIONS,
                                          SOFTMAX_METHODS, SOFTMAX_MODULES)
from modeconn.alignment.permute import apply_permutation
from modeconn.alignment.spec import AxisRef, ObservePoint, PermutationGroup, PermutationSpec
from modeconn.alignment.attention_rules import open_site
from modeconn.alignment.walk_state import WalkState, tensor_shape, value_users

__all__ = ["find_attention_sites", "verify_sites"]

MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm}
MATMUL_METHODS = {"matmul", "bmm"}
MOVE_METHODS = {"view", "reshape", "transpose", "permute", "flatten", "unflatten"} | COPY_METHODS
MOVE_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.flatten}
SPLIT_METHODS = {"split", "chunk"}
SPLIT_FUNCTIONS = {torch.split, torch.chunk}
Projection = Tuple[fx.Node, int]  # (Linear node, first row of this role)


def _is(node: fx.Node, functions, methods) -> bool:
    """Whether ``node`` calls one of ``functions`` or one of the tensor ``methods``."""
    return (node.op == "call_function" and node.target in functions) or \
        (node.op == "call_method" and node.target in methods)


def _module(walk: WalkState, node: fx.Node, classes) -> bool:
    """Whether ``node`` calls a submodule that is an instance of ``classes``."""
    return node.op == "call_module" and isinstance(walk.modules.get(node.target), classes)


def _score_step(walk: WalkState, node: fx.Node) -> Optional[str]:
    """``"softmax"``, ``"pass"`` (masking, scaling, dropout, casts) or None for anything else."""
    if _is(node, SOFTMAX_FUNCTIONS, SOFTMAX_METHODS) or _module(walk, node, SOFTMAX_MODULES):
        return "softmax"
    ok = _is(node, BINARY_FUNCTIONS | IDENTITY_FUNCTIONS, BINARY_METHODS | CAST_METHODS | COPY_METHODS |
             {"masked_fill"}) or _module(walk, node, IDENTITY_MODULES)
    return "pass" if ok else None


def _scores_matmul(walk: WalkState, node: fx.Node, softmax: bool = False, depth: int = 0) -> Optional[fx.Node]:
    """The ``matmul(Q, Kᵀ)`` that ``node`` (the probabilities) comes from through a softmax, or None."""
    if not isinstance(node, fx.Node) or depth > 16:
        return None
    if _is(node, MATMUL_FUNCTIONS, MATMUL_METHODS):
        return node if softmax else None
    step = _score_step(walk, node)
    if step is None:
        return None
    for arg in node.all_input_nodes:
        found = _scores_matmul(walk, arg, softmax or step == "softmax", depth + 1)
        if found is not None:
            return found
    return None


def _split_offset(node: fx.Node, index: int) -> Optional[int]:
    """First row of item ``index`` of a ``split``/``chunk`` over the last dim, or None."""
    shape = tensor_shape(node.args[0])
    arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections", node.kwargs.get("chunks"))
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if shape is None or not isinstance(dim, int) or dim % len(shape) != len(shape) - 1:
        return None
    if node.target in ("chunk", torch.chunk):
        arg = -(-shape[-1] // arg) if isinstance(arg, int) else None
    if isinstance(arg, int):
        return index * arg
    if isinstance(arg, (list, tuple)) and all(isinstance(a, int) for a in arg):
        return sum(arg[:index])
    return None


def _unbind_source(node: fx.Node, index: int) -> Optional[Tuple[fx.Node, int]]:
    """``(fused projection output, first row of item index)`` for ``unbind`` of a reshaped fused projection.

    timm's attention: ``qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)``. The unbound
    dim, followed back through one ``permute``, must be a dim of a ``reshape``/``view`` that splits
    the last dim of its input into it and the dims after it; item ``i`` then starts at row
    ``i * prod(those later dims)``. None for anything else.
    """
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    src = node.args[0]
    if not isinstance(dim, int) or not isinstance(src, fx.Node):
        return None
    if _is(src, {torch.permute}, {"permute"}):
        order = src.args[1] if len(src.args) == 2 and isinstance(src.args[1], (list, tuple)) else src.args[1:]
        shape = tensor_shape(src)
        if shape is None or len(order) != len(shape) or len(value_users(src)) != 1:
            return None
        dim, src = order[dim % len(shape)], src.args[0]
    if not (_is(src, {torch.reshape}, {"reshape", "view"}) and isinstance(src.args[0], fx.Node)) \
            or len(value_users(src)) != 1:
        return None
    shape, before = tensor_shape(src), tensor_shape(src.args[0])
    if shape is None or before is None:
        return None
    dim %= len(shape)
    rows = 1
    for s in shape[dim + 1:]:
        rows *= s
    if rows * shape[dim] != before[-1] or list(shape[:dim]) != list(before[:-1]):
        return None
    return src.args[0], index * rows


def _scaled_by_constant(node: fx.Node) -> bool:
    """``x * c`` or ``x / c`` with a plain number ``c``."""
    return _is(node, {operator.mul, operator.truediv, torch.mul, torch.div}, {"mul", "div"}) and \
        len(node.args) == 2 and isinstance(node.args[1], Number)


def _projection(walk: WalkState, node: fx.Node) -> Optional[Projection]:
    """Walk back from a head tensor to its projection Linear (through moves, scaling, split); None if unclear."""
    offset = 0
    while isinstance(node, fx.Node):
        if _module(walk, node, nn.Linear):
            return (node, offset) if len(value_users(node)) == 1 else None
        if len(value_users(node)) != 1:
            return None
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int) \
                and isinstance(node.args[0], fx.Node) and _is(node.args[0], SPLIT_FUNCTIONS, SPLIT_METHODS):
            start = _split_offset(node.args[0], node.args[1])
            if start is None:
                return None
            offset += start
            node = node.args[0].args[0]
            continue
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int) \
                and isinstance(node.args[0], fx.Node) and _is(node.args[0], {torch.unbind}, {"unbind"}):
            found = _unbind_source(node.args[0], node.args[1])
            if found is None:
                return None
            node, offset = found[0], offset + found[1]
            continue
        if not (_is(node, MOVE_FUNCTIONS, MOVE_METHODS) or _scaled_by_constant(node)
                or _module(walk, node, IDENTITY_MODULES)):
            return None
        node = node.args[0]
    return None


def _output_projection(walk: WalkState, node: fx.Node) -> Optional[fx.Node]:
    """Walk forward from the attention output through moves to the output Linear; None if unclear."""
    while True:
        users = value_users(node)
        if len(users) != 1:
            return None
        user = users[0]
        if _module(walk, user, nn.Linear) and user.args[0] is node:
            return user
        if not ((_is(user, MOVE_FUNCTIONS, MOVE_METHODS) or _module(walk, user, IDENTITY_MODULES))
                and user.args[0] is node):
            return None
        node = user


def _site_name(layers: Sequence[str], fallback: str) -> str:
    """The longest common dotted prefix of the layers' names (``blocks.0.attn``), else ``fallback``."""
    parts = [name.split(".") for name in layers]
    common = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common) or fallback


def _candidate(walk: WalkState, node: fx.Node):
    """``(Q, K, V, probabilities or None)`` if ``node`` computes multi-head attention, else None.

    ``K`` is the tensor whose transpose is multiplied (``Kᵀ`` for hand-written
    attention).  Q, K, V and the output must read ``[..., H, T, d]`` (at least
    4 dims, the same ``H``): a 3-dim ``[B*H, T, d]`` layout hides the heads.
    """
    if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
        q, k, v, probs = *(tuple(node.args) + (None,) * 3)[:3], None
        k_dims = -1  # K is [..., H, S, d]
    elif _is(node, MATMUL_FUNCTIONS, MATMUL_METHODS) and len(node.args) == 2:
        probs, v = node.args
        scores = _scores_matmul(walk, probs)
        if scores is None or len(scores.args) != 2:
            return None
        q, k = scores.args
        k_dims = -2  # Kᵀ is [..., H, d, S]
    else:
        return None
    shapes = [tensor_shape(t) for t in (q, k, v, node)]
    if any(s is None or len(s) < 4 for s in shapes) or len({s[-3] for s in shapes}) != 1 \
            or shapes[1][k_dims] != shapes[0][-1]:
        return None
    return q, k, v, probs


def _rows(proj: Projection, walk: WalkState, inner: int, outer: int) -> List[AxisRef]:
    """Refs to a projection's rows (weight and bias) with the given digit structure."""
    node, offset = proj
    names = walk.present([f"{node.target}.weight", f"{node.target}.bias"])
    return [AxisRef(n, 0, offset, inner, outer) for n in names]


def _open_site(walk: WalkState, out: fx.Node, projs: Sequence[Projection], o: fx.Node, sizes: Tuple[int, int, int],
               heads_at: Optional[ObservePoint]) -> None:
    """Open the heads / query-key-dims / value-dims groups of one hand-written site and register it.

    ``sizes`` is ``(H, d, dv)``; ``heads_at`` where the heads can be told apart
    for activation matching (the attention probabilities, which do not depend
    on how the dims inside a head are ordered).  The q/k and value dims are not
    observed: their activations sit in a head whose counterpart in the other
    model is not known while they are compared.
    """
    (q, k, v), (h, d, dv) = projs, sizes
    weight = f"{o.target}.weight"
    layers = list(OrderedDict.fromkeys(str(n.target) for n in (q[0], k[0], v[0], o)))
    name = _site_name(layers, f"attention@{out.name}")
    open_site(walk, name, layers, [
        ("heads", h, _rows(q, walk, d, 1) + _rows(k, walk, d, 1) + _rows(v, walk, dv, 1)
         + [AxisRef(weight, 1, 0, dv, 1)], heads_at),
        ("qk", d, _rows(q, walk, 1, h) + _rows(k, walk, 1, h), None),
        ("v", dv, _rows(v, walk, 1, h) + [AxisRef(weight, 1, 0, 1, h)], None)])
    walk.site_projections.update({q[0], k[0], v[0]})


def find_attention_sites(walk: WalkState) -> None:
    """Find hand-written attention in ``walk.gm`` and open the head groups of every site found.

    Called before the walk, so that the q/k/v projections open no group of
    their own.  Attention whose projections cannot be traced is noted in the
    spec's reasons (its heads stay unpermuted).
    """
    for node in walk.gm.graph.nodes:
        found = _candidate(walk, node)
        if found is None:
            continue
        q, k, v, probs = found
        projs = [_projection(walk, t) for t in (q, k, v)]
        o = _output_projection(walk, node)
        h, dv = tensor_shape(node)[-3], tensor_shape(node)[-1]
        d = tensor_shape(q)[-1]
        claimed = walk.site_projections
        if any(p is None for p in projs) or o is None or o in claimed or any(p[0] in claimed for p in projs) \
                or walk.modules[o.target].in_features != h * dv \
                or any(walk.modules[p[0].target].out_features < p[1] + h * n for p, n in zip(projs, (d, d, dv))):
            walk.notes.append(f"attention at node '{node.name}': its query/key/value and output projections "
                              f"could not be traced to nn.Linear layers with {h} heads; its heads are left "
                              f"unpermuted")
            continue
        _open_site(walk, node, projs, o, (h, d, dv), ObservePoint(probs.name, -3) if probs is not None else None)


def _tensors(out) -> List[torch.Tensor]:
    """The tensors of a model output (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def _change(model: nn.Module, args: tuple, ref: List[torch.Tensor], walk: WalkState, ids: Sequence[int],
            seed: int) -> float:
    """Largest relative change of the outputs when the groups ``ids`` get a random (non-identity) permutation."""
    groups = OrderedDict((walk.groups[g].name, PermutationGroup(walk.groups[g].size, list(walk.groups[g].axes)))
                         for g in ids)
    gen = torch.Generator().manual_seed(seed)
    perm = {}
    for name, g in groups.items():
        p = torch.randperm(g.size, generator=gen)
        perm[name] = p.roll(1) if torch.equal(p, torch.arange(g.size)) else p
    try:
        moved = _tensors(apply_permutation(model, PermutationSpec(groups), perm)(*args))
    except (ValueError, RuntimeError):  # the groups do not even fit the parameters
        return float("inf")
    if len(moved) != len(ref) or any(a.shape != b.shape for a, b in zip(moved, ref)):
        return float("inf")
    return max((float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(moved, ref)
                if b.numel()), default=0.0)


def verify_sites(model: nn.Module, args: tuple, walk: WalkState, tol: float = 1e-4, seed: int = 0) -> None:
    """Drop every attention site whose random head permutation changes the output on ``args``.

    Run in eval mode without gradients.  All sites are tried at once first (one
    forward pass when everything is fine), then one by one.  The change is
    ``max|y' - y| / max|y|`` per output tensor; ``tol`` allows float rounding.
    """
    live = [s for s in walk.sites if not any(walk.groups[g].reasons for g in s.groups)]
    if not live:
        return
    ref = _tensors(model(*args))
    if _change(model, args, ref, walk, [g for s in live for g in s.groups], seed) <= tol:
        return
    for s in live:
        change = _change(model, args, ref, walk, s.groups, seed)
        if change > tol:
            walk.groups.drop(s.groups, f"permuting the heads of attention '{s.name}' ({', '.join(s.layers)}) "
                                       f"changed the model output (relative change {change:.3g} on the "
                                       f"example input), so the pattern is not a standard multi-head layout")
