"""Rules for PyTorch's attention modules: ``MultiheadAttention``, ``TransformerEncoderLayer``, ``TransformerEncoder``.

torch.fx keeps these modules as leaves, so their rules read the module's
parameters directly.  An attention layer with ``H`` heads of ``d`` dims has
three symmetries (Verma & Elbayad 2024; Imfeld et al. 2024):

* the **heads**: a block permutation of the ``H`` row blocks of the query, key
  and value projections together with the matching column blocks of the
  output projection (``inner=d``);
* the **query/key dims**: one permutation of the ``d`` dims, shared by every
  head (``outer=H``), applied to the query and key rows alike (the scores
  ``q·k`` are sums over those dims);
* the **value dims**: one permutation of the ``d`` dims of the value rows and
  of the output projection's columns inside every head (``outer=H``).

The residual stream (the features on the last dimension of the input) is
consumed on the projections' input axis.  In ``TransformerEncoderLayer`` it is
also what the output projection, ``linear2`` and both norms write back, so
their rows join the stream's groups; ``linear1`` opens the FFN group.  (A
subclass defined outside ``torch.nn`` is not a leaf: fx traces its own
forward, so these rules only meet PyTorch's own classes.)
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import fx, nn

from modeconn.alignment.channel_layout import ChannelLayout, Segment, Unsupported
from modeconn.alignment.op_tables import ACTIVATION_FUNCTIONS, ACTIVATION_MODULES
from modeconn.alignment.spec import AxisRef, ObservePoint
from modeconn.alignment.walk_state import AttentionSite, NodeKind, WalkState, tensor_shape

__all__ = ["ATTENTION_MODULE_RULES", "head_groups", "open_site"]


def _last_dim(walk: WalkState, layout: Optional[ChannelLayout], desc: str) -> Optional[ChannelLayout]:
    """``layout`` if its units are the features (last dimension); else its groups are dropped."""
    if layout is not None and layout.dim != layout.ndim - 1:
        walk.groups.drop(layout.groups(), f"attention input permuted on a dimension other than the features at {desc}")
        return None
    return layout


def head_groups(walk: WalkState, prefix: str, mod: nn.MultiheadAttention) -> None:
    """Open the heads, query/key-dims and value-dims groups of attention ``prefix`` and register the site.

    Rows of the query, key and value projections sit at offsets ``0, E, 2E`` of
    the packed ``in_proj_weight``/``in_proj_bias`` (or in ``q/k/v_proj_weight``);
    ``bias_k``/``bias_v`` (shape ``[1, 1, E]``) are split into heads like the keys
    and values they are appended to.
    """
    e, h, d = mod.embed_dim, mod.num_heads, mod.head_dim
    packed = mod._qkv_same_embed_dim
    rows = {r: (f"{prefix}.in_proj_weight", i * e) if packed else (f"{prefix}.{r}_proj_weight", 0)
            for i, r in enumerate("qkv")}
    bias = {r: (f"{prefix}.in_proj_bias", i * e) for i, r in enumerate("qkv")}
    extra = {"k": f"{prefix}.bias_k", "v": f"{prefix}.bias_v"}
    out = f"{prefix}.out_proj.weight"

    def refs(roles: str, inner: int, outer: int) -> List[AxisRef]:
        """The row refs of ``roles`` (with their biases) with the given digit structure."""
        found = []
        for r in roles:
            found.append(AxisRef(rows[r][0], 0, rows[r][1], inner, outer))
            if bias[r][0] in walk.state_names:
                found.append(AxisRef(bias[r][0], 0, bias[r][1], inner, outer))
            if extra.get(r) in walk.state_names:
                found.append(AxisRef(extra[r], 2, 0, inner, outer))
        return found

    # the heads are observed by their attention probabilities (a hook on the module, see observe.py)
    open_site(walk, prefix, [prefix], [("heads", h, refs("qkv", d, 1) + [AxisRef(out, 1, 0, d, 1)],
                                        ObservePoint(prefix, -3)),
                                       ("qk", d, refs("qk", 1, h), None),
                                       ("v", d, refs("v", 1, h) + [AxisRef(out, 1, 0, 1, h)], None)])


def open_site(walk: WalkState, name: str, layers: Sequence[str],
              groups: Sequence[Tuple[str, int, List[AxisRef], Optional[ObservePoint]]]) -> None:
    """Open an attention site's groups ``(suffix, size, axes, observe point)`` and register the site.

    A group of one unit (one head, or heads of one dim) permutes nothing and
    is not opened.
    """
    ids = []
    for suffix, size, axes, point in groups:
        if size < 2:
            continue
        g = walk.groups.open(f"{name}.{suffix}", size)
        walk.groups[g].axes.extend(axes)
        walk.groups[g].observe.extend([point] if point is not None else [])
        ids.append(g)
    walk.sites.append(AttentionSite(name, list(layers), ids))


def _consume_qkv(walk: WalkState, node: fx.Node, mod: nn.MultiheadAttention, q, k, v) -> None:
    """The query/key/value features enter the projections' input axis.

    Packed projections share one input axis, so query, key and value must carry
    the same permutation (their groups merge through the shared axis) or none.
    """
    desc, prefix = walk.describe(node), node.target
    layouts = [_last_dim(walk, walk.layout_of(t), desc) for t in (q, k, v)]
    if mod._qkv_same_embed_dim:
        permuted = [lay for lay in layouts if lay is not None]
        if permuted and (len(permuted) < 3 or any(lay.blocks() != permuted[0].blocks() for lay in permuted)):
            walk.drop_layouts(permuted, f"cross-attention at {desc}: query, key and value share the input axis "
                                        f"of '{prefix}.in_proj_weight' but not one permutation")
            return
        for lay in layouts:
            walk.add_axes(lay, f"{prefix}.in_proj_weight", 1)
        return
    for r, lay in zip("qkv", layouts):
        walk.add_axes(lay, f"{prefix}.{r}_proj_weight", 1)


def _multihead_attention(walk: WalkState, node: fx.Node, mod: nn.MultiheadAttention,
                         layout: Optional[ChannelLayout]) -> None:
    """``nn.MultiheadAttention``: consumes q/k/v features, opens the head groups and ``out_proj``.

    The node returns ``(output, weights)``; item 0 carries the ``out_proj``
    group (its rows and bias), like a Linear.
    """
    q, k, v = (walk.arg(node, i, kw) for i, kw in enumerate(("query", "key", "value")))
    masks = [n for n in node.all_input_nodes if n not in (q, k, v)]
    walk.drop_layouts([walk.layout.get(n) for n in masks], f"permuted tensor used as a mask of {walk.describe(node)}")
    _consume_qkv(walk, node, mod, q, k, v)
    head_groups(walk, node.target, mod)
    shape = tensor_shape(q)
    walk.kind[node] = NodeKind.OTHER
    walk.layout[node] = None
    if shape is None:
        raise Unsupported("query is not a tensor")
    g = walk.groups.open(f"{node.target}.out_proj", mod.embed_dim)
    walk.groups[g].axes.extend(AxisRef(n, 0) for n in walk.present(
        [f"{node.target}.out_proj.weight", f"{node.target}.out_proj.bias"]))
    walk.tuple_layouts[node] = {0: ChannelLayout(len(shape) - 1, len(shape), (Segment(g, mod.embed_dim, 1),))}


_multihead_attention.all_inputs = True  # reads key and value itself (visit_module must not drop them)


def _elementwise_activation(act) -> bool:
    """Whether a TransformerEncoderLayer's activation acts on each entry alone (relu, gelu...)."""
    return act in ACTIVATION_FUNCTIONS or isinstance(act, ACTIVATION_MODULES) or act in (F.relu, F.gelu)


def encoder_layer(walk: WalkState, prefix: str, mod: nn.TransformerEncoderLayer, layout: Optional[ChannelLayout],
                  desc: str) -> Optional[ChannelLayout]:
    """The groups of one ``TransformerEncoderLayer`` whose input carries ``layout``; returns the output's layout.

    ``x + attn(norm(x))`` and ``x + ffn(norm(x))`` (either order of norm and
    sum): every entry written back to the stream moves with it.
    """
    attn = f"{prefix}.self_attn"
    walk.add_axes(layout, f"{attn}.in_proj_weight", 1)
    walk.add_axes(layout, f"{prefix}.linear1.weight", 1)
    head_groups(walk, attn, mod.self_attn)
    stream = walk.present([f"{attn}.out_proj.weight", f"{attn}.out_proj.bias", f"{prefix}.linear2.weight",
                           f"{prefix}.linear2.bias"] + [f"{prefix}.{n}.{p}" for n in ("norm1", "norm2")
                                                        for p in ("weight", "bias")])
    for name in stream:
        walk.add_axes(layout, name, 0)
    if layout is None:
        walk.notes.append(f"{desc}: the residual stream entering it is not permuted, so "
                          f"{', '.join(stream)} are left unpermuted")
    g = walk.groups.open(f"{prefix}.linear1", mod.linear1.out_features)
    walk.groups[g].axes.extend([AxisRef(n, 0) for n in walk.present([f"{prefix}.linear1.weight",
                                                                       f"{prefix}.linear1.bias"])]
                               + [AxisRef(f"{prefix}.linear2.weight", 1)])
    walk.groups[g].observe.append(ObservePoint(f"{prefix}.linear1", -1))
    if not _elementwise_activation(mod.activation):
        walk.groups.drop([g], f"activation {mod.activation!r} of '{prefix}' is not known to act entrywise")
    return layout


def _transformer_encoder_layer(walk: WalkState, node: fx.Node, mod: nn.TransformerEncoderLayer,
                               layout: Optional[ChannelLayout]) -> None:
    """``nn.TransformerEncoderLayer``: stream in = stream out, FFN and head groups inside."""
    desc = walk.describe(node)
    walk.kind[node] = NodeKind.OTHER
    walk.layout[node] = encoder_layer(walk, node.target, mod, _last_dim(walk, layout, desc), desc)


def _transformer_encoder(walk: WalkState, node: fx.Node, mod: nn.TransformerEncoder,
                         layout: Optional[ChannelLayout]) -> None:
    """``nn.TransformerEncoder``: its layers in sequence on one stream, then the optional final norm."""
    if mod.norm is not None and not isinstance(mod.norm, (nn.LayerNorm, nn.RMSNorm)):
        raise Unsupported(f"final norm {type(mod.norm).__name__} of a TransformerEncoder")
    desc = walk.describe(node)
    walk.kind[node] = NodeKind.OTHER
    layout = _last_dim(walk, layout, desc)
    for i, layer in enumerate(mod.layers):
        layout = encoder_layer(walk, f"{node.target}.layers.{i}", layer, layout, desc)
    for name in walk.present([f"{node.target}.norm.weight", f"{node.target}.norm.bias"]):
        walk.add_axes(layout, name, 0)
    walk.layout[node] = layout


ATTENTION_MODULE_RULES: Dict[type, object] = {
    nn.MultiheadAttention: _multihead_attention,
    nn.TransformerEncoderLayer: _transformer_encoder_layer,
    nn.TransformerEncoder: _transformer_encoder,
}
