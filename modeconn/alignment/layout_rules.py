"""Transfer rules: how each class of operation carries channel groups from its inputs to its output.

Each rule sets the node's :class:`NodeKind` and output layout in a
:class:`WalkState`, or raises :class:`Unsupported`.  The module and function
forms of an operation (``nn.Linear`` / ``F.linear``, ``nn.MaxPool2d`` /
``F.max_pool2d``...) share one rule.

* A layer (Linear, Conv) consumes its input's groups on the weight's input
  axis and opens a new group for its outputs.  It is proven safe only when it
  contracts exactly the channel dimension; otherwise the incoming groups stay
  fixed.  A depthwise convolution passes its input's groups through; a
  grouped one keeps its inputs fixed and permutes the outputs within blocks.
* Per-channel ops (activations, norms, pooling) keep the layout; norms add
  their per-channel parameters and buffers to the group.
* Elementwise ops on several tensors line unit ``i`` of each input up with
  unit ``i`` of the others, so their groups merge; combining a group with
  unpermuted channels (or a tensor that varies along the channels) would
  break that, so such groups are dropped.
* Reshapes, transposes, indexing and concatenation move units; the layout
  algebra in :mod:`~modeconn.alignment.channel_layout` follows them.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Tuple

import torch
from torch import fx

from modeconn.alignment.channel_layout import (ChannelLayout, Segment, Unsupported, channel_slice, indexed_dim,
                                               make_layout, reshaped, sliced_segments)
from modeconn.alignment.spec import AxisRef
from modeconn.alignment.walk_state import NodeKind, WalkState, main_input, tensor_shape, value_users


def merge_segments(walk: WalkState, layouts: Sequence[ChannelLayout], reason: str) -> List[Segment]:
    """Line up equally laid-out ``layouts`` segment by segment.

    Where every input has a group, the groups merge; where one is unpermuted,
    the others are dropped with ``reason`` and the output segment is unpermuted.
    """
    segments = []
    for i, s in enumerate(layouts[0].segments):
        gs = [layout.segments[i].group for layout in layouts]
        if all(g is not None for g in gs):
            for g in gs[1:]:
                walk.groups.union(gs[0], g)
            segments.append(Segment(gs[0], s.count, s.inner))
        else:
            walk.groups.drop(gs, reason)
            segments.append(Segment(None, s.count, s.inner))
    return segments


# -------------------------------------------------------------------- layers
def linear(walk: WalkState, node: fx.Node, layout: Optional[ChannelLayout], base: str, weight: str,
           bias: Optional[str], out_features: int) -> None:
    """``y = x W^T + b`` over the last dimension: consumes the input's groups, opens ``base``.

    A q/k/v projection of an attention site opens no group: the site's head
    groups permute its rows.
    """
    if layout is not None and layout.dim != layout.ndim - 1 and node not in walk.site_projections:
        linear_over_other_dim(walk, node, layout)
        return
    if layout is not None and layout.dim != layout.ndim - 1:
        walk.groups.drop(layout.groups(), "Linear applied over a dimension other than the permuted one "
                                          f"at {walk.describe(node)}")
        layout = None
    walk.add_axes(layout, weight, 1)
    if node in walk.site_projections:
        walk.kind[node] = NodeKind.OTHER
        walk.layout[node] = None
        return
    entries = [(weight, 0)] + ([(bias, 0)] if bias is not None else [])
    walk.open_group(node, base, out_features, 1, entries)


def _restrict_to_blocks(walk: WalkState, layout: ChannelLayout, groups: int, weight: str) -> bool:
    """Let one whole group reach a grouped convolution as a permutation that is the same in every block.

    Input channel ``k*w + j`` (block ``k`` of ``groups``, ``w`` channels each)
    is the weight's input ``j`` of block ``k``: permuting ``j`` by the same
    ``sigma`` in every block keeps each channel in its block, and moves the
    weight's axis 1 by ``sigma``.  The group is restricted to such
    permutations (:func:`~modeconn.alignment.spec_builder.build_spec`).
    Returns False (nothing recorded) unless the layout is one group, unit by unit.
    """
    if len(layout.segments) != 1 or layout.segments[0].inner != 1 or layout.segments[0].group is None:
        return False
    g = walk.groups[layout.segments[0].group]
    if g.size % groups or g.blocks not in (1, groups):
        return False
    g.blocks = groups
    g.block_axes.append((AxisRef(weight, 1), g.size // groups))
    return True


def linear_over_other_dim(walk: WalkState, node: fx.Node, layout: ChannelLayout) -> None:
    """A Linear over the last dimension while the permuted units sit at another (MLP-Mixer's token MLP).

    ``y[..., c, :] = x[..., c, :] W^T + b`` for every unit ``c``: the map acts
    on each unit's slice alike, so it commutes with permuting the units, which
    keep their place.  Its own outputs would be a second permuted dimension,
    which a layout cannot hold: they open no group (its rows stay fixed).
    """
    walk.kind[node] = NodeKind.OTHER
    walk.notes.append(f"{walk.describe(node)}: applied over a dimension other than the permuted units, which "
                      f"pass through; its own output units are left unpermuted")
    walk.layout[node] = layout.replace(post_act=False)


def conv(walk: WalkState, node: fx.Node, layout: Optional[ChannelLayout], base: str, spatial: int,
         transposed: bool, groups: int, out_channels: int, weight: str, bias: Optional[str]) -> None:
    """A convolution with ``spatial`` kernel dims: consumes the channel groups, opens ``base``.

    The weight is ``[out, in, ...]`` (``[in, out, ...]`` when ``transposed``).
    Grouped and depthwise convolutions (``groups != 1``): :func:`grouped_conv`.
    """
    desc = walk.describe(node)
    xs = tensor_shape(main_input(node))
    if groups != 1:
        grouped_conv(walk, node, layout, base, spatial, transposed, groups, out_channels, weight, bias)
        return
    if layout is not None and xs is not None and layout.dim != len(xs) - spatial - 1:
        walk.groups.drop(layout.groups(), f"convolution over a permuted spatial dimension at {desc}")
        layout = None
    walk.add_axes(layout, weight, 0 if transposed else 1)
    entries = [(weight, 1 if transposed else 0)] + ([(bias, 0)] if bias else [])
    walk.open_group(node, base, out_channels, spatial + 1, entries)


def grouped_conv(walk: WalkState, node: fx.Node, layout: Optional[ChannelLayout], base: str, spatial: int,
                 transposed: bool, groups: int, out_channels: int, weight: str, bias: Optional[str]) -> None:
    """A convolution with ``groups > 1``: output block ``k`` reads only input block ``k``.

    Depthwise (one input channel per group, ``m = out/in`` filters each): input
    channel ``c`` feeds outputs ``[c*m, (c+1)*m)``, so the input's groups pass
    through with blocks ``m`` times larger and permute the weight's (and
    bias') rows the same way.  Otherwise, a permutation of the input channels
    would move channels across blocks, so the input's groups stay fixed; the
    outputs of every block may still be permuted, the same way in each block:
    one group of ``out/groups`` units laid out ``groups`` times.  When the
    input is one whole group, it is kept instead, restricted to permutations
    that are the same in every block (:func:`_restrict_to_blocks`).
    """
    desc = walk.describe(node)
    xs = tensor_shape(main_input(node))
    if transposed or xs is None or (layout is not None and layout.dim != len(xs) - spatial - 1):
        walk.kind[node] = NodeKind.OTHER
        walk.drop_layouts([layout], f"transposed grouped convolution or over a permuted spatial dimension at {desc}")
        walk.layout[node] = None
        return
    in_channels = xs[len(xs) - spatial - 1]
    if groups < in_channels and layout is not None and _restrict_to_blocks(walk, layout, groups, weight):
        layout = None
    if groups == in_channels and layout is not None:
        m = out_channels // in_channels
        walk.kind[node] = NodeKind.PER_CHANNEL if m == 1 else NodeKind.OTHER
        out = layout.replace(segments=tuple(Segment(s.group, s.count, s.inner * m) for s in layout.segments),
                             post_act=False)
        for name in [weight] + ([bias] if bias else []):
            walk.add_axes(out, name, 0)
        walk.layout[node] = out
        return
    walk.kind[node] = NodeKind.OTHER
    walk.drop_layouts([layout], f"grouped convolution (groups={groups}) mixes channels within blocks at {desc}")
    per_block = out_channels // groups
    if per_block == 1:
        walk.layout[node] = None
        return
    walk.open_group(node, base, per_block, spatial + 1, [])
    g = walk.layout[node].segments[0].group
    for name in [weight] + ([bias] if bias else []):
        walk.groups[g].axes.append(AxisRef(name, 0, 0, 1, groups))
    walk.layout[node] = walk.layout[node].replace(segments=(Segment(g, per_block, 1),) * groups)


# --------------------------------------------------------------- per channel
def passthrough(walk: WalkState, node: fx.Node, layout: Optional[ChannelLayout], act: Optional[bool]) -> None:
    """A per-unit op of one tensor: same layout; ``act`` True/False sets/clears ``post_act``, None keeps it."""
    walk.kind[node] = NodeKind.PER_CHANNEL
    if layout is None:
        walk.layout[node] = None
        return
    walk.layout[node] = layout if act is None else layout.replace(post_act=act)


def spatial(walk: WalkState, node: fx.Node, layout: Optional[ChannelLayout], spatial_dims: int) -> None:
    """Pooling/padding/resampling over the last ``spatial_dims`` dims: the channels must be before them."""
    walk.kind[node] = NodeKind.PER_CHANNEL
    if layout is None:
        walk.layout[node] = None
        return
    xs = tensor_shape(main_input(node))
    if xs is None or layout.dim >= len(xs) - spatial_dims:
        raise Unsupported("pooling/padding over the permuted dimension")
    walk.layout[node] = layout


def norm(walk: WalkState, node: fx.Node, layout: Optional[ChannelLayout], channel_dim: int,
         entries: Sequence[str]) -> None:
    """A normalisation with per-channel ``entries`` (affine parameters, running stats) at ``channel_dim``."""
    walk.kind[node] = NodeKind.PER_CHANNEL
    if layout is None:
        walk.layout[node] = None
        return
    if layout.dim != channel_dim:
        raise Unsupported("normalisation over a dimension other than the permuted one")
    for name in entries:
        walk.add_axes(layout, name, 0)
    walk.layout[node] = layout.replace(post_act=False)


def layer_norm(walk: WalkState, node: fx.Node, layout: Optional[ChannelLayout], normalized_shape: Tuple[int, ...],
               entries: Sequence[str]) -> None:
    """LayerNorm over the last ``len(normalized_shape)`` dims.

    The statistics are symmetric in the normalised entries, so permuting the
    channels commutes with it wherever they sit; the affine ``entries`` are
    permuted only when the channels are among the normalised dims.
    """
    walk.kind[node] = NodeKind.PER_CHANNEL
    if layout is None:
        walk.layout[node] = None
        return
    first = layout.ndim - len(normalized_shape)
    if layout.dim >= first:
        for name in entries:
            walk.add_axes(layout, name, layout.dim - first)
    walk.layout[node] = layout.replace(post_act=False)


def _broadcast_check(walk: WalkState, node: fx.Node, ins: List[fx.Node], ref: ChannelLayout, channel_dim: int,
                     ndim: int) -> None:
    """Raise Unsupported if an unpermuted input varies along the (broadcast) channel dimension.

    A parameter that varies along it (a position embedding, a per-channel
    scale) joins the groups instead: :func:`join_parameter`.
    """
    for n in ins:
        if walk.layout.get(n) is None:
            s = tensor_shape(n)
            pos = channel_dim - (ndim - len(s))
            if pos >= 0 and s[pos] != 1 and not (pos == len(s) - 1 and join_parameter(walk, n, ref)) \
                    and not join_reshaped_parameter(walk, n, ref, pos):
                raise Unsupported(
                    f"elementwise op with the unpermuted tensor '{n.name}' (shape {tuple(s)}) "
                    f"varying along the permuted dimension")


def _keeps_last_dim(n: fx.Node) -> bool:
    """Whether ``n`` (a getitem/expand/copy) keeps its input's last dimension whole and last."""
    src, shape = n.args[0], tensor_shape(n)
    if not isinstance(src, fx.Node) or shape is None or tensor_shape(src) is None:
        return False
    if tensor_shape(src)[-1] != shape[-1]:
        return False
    if n.op == "call_function" and n.target is operator.getitem:
        idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        if any(isinstance(i, fx.Node) for i in idx):
            return False  # tensor indices may move dimensions
        used = [i for i in idx if i is not None]
        hits_last = Ellipsis in used or len(used) == len(tensor_shape(src))
        return not hits_last or used[-1] == slice(None)
    return n.op == "call_method" and n.target in ("expand", "contiguous", "clone")


def join_parameter(walk: WalkState, n: fx.Node, layout: ChannelLayout) -> bool:
    """Let a parameter combined with permuted units on its last axis move with them; True if it did.

    ``n`` must be a state-dict entry (``get_attr``), possibly sliced on other
    dims, expanded or copied, used by this op alone: a position embedding
    added to the residual stream, ViT's class token concatenated to it.
    Permuting the parameter's last axis with the units keeps the sum (or the
    concatenation) a permutation of the original.
    """
    while n.op != "get_attr":
        if len(value_users(n)) != 1 or not _keeps_last_dim(n):
            return False
        n = n.args[0]
    shape = tensor_shape(n)
    if len(value_users(n)) != 1 or n.target not in walk.state_names or shape is None or shape[-1] != layout.length():
        return False
    walk.add_axes(layout, n.target, len(shape) - 1)
    return True


def join_reshaped_parameter(walk: WalkState, n: fx.Node, layout: ChannelLayout, pos: int) -> bool:
    """Let a 1-D parameter reshaped to vary only along dimension ``pos`` move with the units; True if it did.

    ``n`` is ``p.reshape(...)``/``p.view(...)`` of a state-dict entry ``p`` of
    one value per channel, used by this op alone: ConvNeXt's and PoolFormer's
    layer scale ``x * gamma.reshape(1, -1, 1, 1)``.  Entry ``c`` of ``p`` then
    multiplies channel ``c``, so permuting ``p`` with the channels keeps the
    product a permutation of the original.
    """
    if n.op not in ("call_method", "call_function") or n.target not in ("view", "reshape", torch.reshape):
        return False
    p, shape = n.args[0], tensor_shape(n)
    if not isinstance(p, fx.Node) or p.op != "get_attr" or p.target not in walk.state_names:
        return False
    ps = tensor_shape(p)
    if ps is None or len(ps) != 1 or ps[0] != layout.length() or shape[pos] != ps[0]:
        return False
    if len(value_users(n)) != 1 or len(value_users(p)) != 1:
        return False
    walk.add_axes(layout, p.target, 0)
    return True


def blockwise_layouts(walk: WalkState, layouts: Sequence[ChannelLayout]) -> List[ChannelLayout]:
    """Line up one-group layouts with a layout of ``k`` equal segments, as ``k`` blocks of that group.

    GhostNet adds ``cat([x1, dw(x1)])`` (two segments of x1's group) to a
    shortcut conv's output (one group of twice the units): unit ``j*c + i`` of
    the shortcut meets unit ``i`` of segment ``j``.  The shortcut's group is
    restricted to permutations equal in each of its ``k`` blocks (recorded in
    its ``blocks``, applied by :func:`~modeconn.alignment.spec_builder.build_spec`),
    and merges with each segment's group.  The finest layout comes first (its
    segments are the output's).  Raises Unsupported for other shapes.
    """
    fine = max(layouts, key=lambda layout: len(layout.segments))
    k, (c, i) = len(fine.segments), fine.blocks()[0]
    if any(b != (c, i) for b in fine.blocks()):
        raise Unsupported("elementwise op combining tensors with different channel layouts")
    out = [fine]
    for layout in layouts:
        if layout is fine:
            continue
        if layout.blocks() != fine.blocks():
            s = layout.segments[0]
            if len(layout.segments) != 1 or (s.count, s.inner) != (k * c, i) or s.group is None \
                    or walk.groups[s.group].blocks not in (1, k):
                raise Unsupported("elementwise op combining tensors with different channel layouts")
            walk.groups[s.group].blocks = k
            layout = layout.replace(segments=(Segment(s.group, c, i),) * k)
        out.append(layout)
    return out


def elementwise(walk: WalkState, node: fx.Node, act: Optional[bool]) -> None:
    """Elementwise op over broadcast tensors: the permuted inputs must share a layout and merge.

    ``act``: True for an activation, False for arithmetic, None for a cast
    (keeps the input's ``post_act``).
    """
    walk.kind[node] = NodeKind.PER_CHANNEL if len(node.all_input_nodes) == 1 else NodeKind.OTHER
    out = tensor_shape(node)
    ins = [n for n in node.all_input_nodes if tensor_shape(n) is not None]
    permuted = [walk.layout[n] for n in ins if walk.layout.get(n) is not None]
    if not permuted:
        walk.layout[node] = None
        return
    desc = walk.describe(node)
    if out is None:
        raise Unsupported("elementwise op without a tensor output")
    nd = len(out)
    ref = permuted[0]
    cdim = ref.dim + nd - ref.ndim  # broadcasting aligns trailing dims
    if any(layout.dim + nd - layout.ndim != cdim for layout in permuted[1:]):
        raise Unsupported("elementwise op combining tensors with different channel layouts")
    if any(layout.blocks() != ref.blocks() for layout in permuted[1:]):
        permuted = blockwise_layouts(walk, permuted)
        ref = permuted[0]
    _broadcast_check(walk, node, ins, ref, cdim, nd)
    segments = merge_segments(walk, permuted, f"added/multiplied with unpermuted channels at {desc}")
    post = ref.post_act if act is None and len(ins) == 1 else bool(act)
    walk.layout[node] = make_layout(cdim, nd, segments, post)


# -------------------------------------------------------------- data movement
def reshape(walk: WalkState, node: fx.Node, x: object) -> None:
    """A row-major reshape of ``x`` to the node's traced shape."""
    walk.kind[node] = NodeKind.MOVE
    layout = walk.layout_of(x)
    if layout is None:
        walk.layout[node] = None
        return
    walk.layout[node] = reshaped(layout, tensor_shape(x), tensor_shape(node))


def reorder_dims(walk: WalkState, node: fx.Node, layout: Optional[ChannelLayout], order_of) -> None:
    """A transpose/permute; ``order_of(ndim)`` gives the output's dimension order (may raise)."""
    walk.kind[node] = NodeKind.MOVE
    if layout is None:
        walk.layout[node] = None
        return
    order = order_of(layout.ndim)
    walk.layout[node] = layout.replace(dim=order.index(layout.dim))


def getitem(walk: WalkState, node: fx.Node, layout: Optional[ChannelLayout]) -> None:
    """``x[idx]`` with constant indices: ``:`` on the channel dimension, or a contiguous slice of it.

    A slice keeps the segments it covers whole; a group it cuts in part is left fixed.
    """
    walk.kind[node] = NodeKind.MOVE
    if layout is None:
        walk.layout[node] = None
        return
    idx, cut = channel_slice(node.args[1], layout.dim, layout.ndim)
    new_dim = indexed_dim(idx, layout.dim, layout.ndim)
    out = tensor_shape(node)
    if out is None:
        raise Unsupported("indexing without a tensor output")
    if cut is None:
        walk.layout[node] = layout.replace(dim=new_dim, ndim=len(out))
        return
    segments, partial = sliced_segments(layout, cut)
    walk.groups.drop(partial, f"channels sliced through the middle of the group at {walk.describe(node)}")
    walk.layout[node] = make_layout(new_dim, len(out), segments, layout.post_act)


def cat(walk: WalkState, node: fx.Node) -> None:
    """``torch.cat(tensors, dim)``: along the channels the segments concatenate, elsewhere they merge."""
    walk.kind[node] = NodeKind.MOVE
    tensors = walk.arg(node, 0, "tensors")
    dim = walk.arg(node, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        raise Unsupported("cat with non-constant arguments")
    layouts = [walk.layout_of(t) for t in tensors]
    if all(layout is None for layout in layouts):
        walk.layout[node] = None
        return
    out = tensor_shape(node)
    if out is None:
        raise Unsupported("cat without a tensor output")
    nd = len(out)
    d = dim % nd
    if any(layout is not None and layout.ndim != nd for layout in layouts):
        raise Unsupported("cat of tensors of different rank")
    if all(layout is None or layout.dim == d for layout in layouts):
        walk.layout[node] = _cat_channels(tensors, layouts, d, nd)
    else:
        walk.layout[node] = _cat_other_dim(walk, node, layouts, nd)


def _cat_channels(tensors: Sequence[object], layouts: List[Optional[ChannelLayout]], d: int,
                  nd: int) -> Optional[ChannelLayout]:
    """Concatenation along the channel dimension ``d``: unpermuted parts become unpermuted segments."""
    segments: List[Segment] = []
    for t, layout in zip(tensors, layouts):
        if layout is None:
            s = tensor_shape(t)
            if s is None:
                raise Unsupported("cat of a non-tensor")
            segments.append(Segment(None, s[d], 1))
        else:
            segments.extend(layout.segments)
    post = all(layout is not None and layout.post_act for layout in layouts)
    return make_layout(d, nd, segments, post)


def _cat_other_dim(walk: WalkState, node: fx.Node, layouts: List[Optional[ChannelLayout]],
                   nd: int) -> Optional[ChannelLayout]:
    """Concatenation along another dimension: every part must carry the same channel layout.

    An unpermuted part that is a parameter (ViT's class token) joins the
    groups on its last axis (:func:`join_parameter`).
    """
    tensors = walk.arg(node, 0, "tensors")
    ref = next(layout for layout in layouts if layout is not None)
    for t, layout in zip(tensors, layouts):
        if layout is None and not (ref.dim == nd - 1 and isinstance(t, fx.Node) and join_parameter(walk, t, ref)):
            raise Unsupported("cat along a non-permuted dimension with unpermuted tensors")
    layouts = [layout for layout in layouts if layout is not None]
    for layout in layouts[1:]:
        if layout.dim != ref.dim or layout.blocks() != ref.blocks():
            raise Unsupported("cat along a non-permuted dimension of tensors with different channel layouts")
    segments = merge_segments(walk, layouts, f"concatenated with unpermuted channels at {walk.describe(node)}")
    return make_layout(ref.dim, nd, segments, all(layout.post_act for layout in layouts))


def reduce(walk: WalkState, node: fx.Node, x: object) -> None:
    """Sum/mean/max/min of ``x`` over constant dims; reducing over the units themselves is invariant."""
    walk.kind[node] = NodeKind.OTHER
    walk.drop_secondary(node, x)
    layout = walk.layout_of(x)
    if layout is None:
        walk.layout[node] = None
        return
    dim = walk.arg(node, 1, "dim", None)
    keep = walk.arg(node, 2, "keepdim", False)
    if dim is None:
        walk.layout[node] = None  # full reduction: invariant
        return
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    if not all(isinstance(d, int) for d in dims) or not isinstance(keep, bool):
        raise Unsupported("reduction with non-constant arguments")
    dims = {d % layout.ndim for d in dims}
    if layout.dim in dims:
        walk.layout[node] = None  # reduced over the units: invariant
        return
    if keep:
        walk.layout[node] = layout.replace(post_act=False)
    else:
        new = layout.dim - sum(1 for d in dims if d < layout.dim)
        walk.layout[node] = layout.replace(dim=new, ndim=layout.ndim - len(dims), post_act=False)
