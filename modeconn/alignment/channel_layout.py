"""Layout algebra: where a tensor's permutable units sit, and how data movement carries them.

A :class:`ChannelLayout` says which dimension of a tensor holds permutable
units (the *channel* dimension) and how that dimension is cut into
:class:`Segment` s: consecutive runs of ``count`` units, each unit owning a
contiguous block of ``inner`` entries, that belong to one channel group (or to
no group: unpermuted channels).  ``torch.cat`` along channels produces several
segments; ``flatten`` after a convolution turns each channel into a block of
``H*W`` entries (``inner``).

The functions here are pure: given a layout and the operation's constant
arguments and traced shapes, they compute the output layout, or raise
:class:`Unsupported` when the units would be split, interleaved or indexed,
i.e. when a permutation of the input would not be a permutation of the output.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from torch import fx


class Unsupported(Exception):
    """An operation the inference cannot follow; the message says why (it becomes a reason)."""


@dataclass(frozen=True)
class Segment:
    """``count`` consecutive units of one group (``group`` None: unpermuted), ``inner`` entries each."""

    group: Optional[int]
    count: int
    inner: int


@dataclass(frozen=True)
class ChannelLayout:
    """Dimension ``dim`` of an ``ndim``-dimensional tensor is the concatenation of ``segments``.

    ``post_act``: the tensor is the output of an activation, the preferred place to observe units.
    """

    dim: int
    ndim: int
    segments: Tuple[Segment, ...]
    post_act: bool = False

    def groups(self) -> List[int]:
        """Group ids of the permuted segments, in order."""
        return [s.group for s in self.segments if s.group is not None]

    def offsets(self) -> Iterator[Tuple[int, Segment]]:
        """Each segment with the index of its first entry along ``dim``."""
        off = 0
        for s in self.segments:
            yield off, s
            off += s.count * s.inner

    def length(self) -> int:
        """Size of the channel dimension covered by the segments."""
        return sum(s.count * s.inner for s in self.segments)

    def blocks(self) -> List[Tuple[int, int]]:
        """``(count, inner)`` of every segment: the layout's shape, ignoring which group owns what."""
        return [(s.count, s.inner) for s in self.segments]

    def replace(self, **changes: Any) -> "ChannelLayout":
        """A copy with some of ``dim``, ``ndim``, ``post_act`` changed (same segments)."""
        return dataclasses.replace(self, **changes)


def make_layout(dim: int, ndim: int, segments, post_act: bool = False) -> Optional[ChannelLayout]:
    """A layout, or None when no segment belongs to a group (nothing left to permute)."""
    segments = tuple(segments)
    if not any(s.group is not None for s in segments):
        return None
    return ChannelLayout(dim, ndim, segments, post_act)


# ------------------------------------------------------------------ reshapes
def _matching_blocks(a: Sequence[int], b: Sequence[int]) -> Optional[List[Tuple[List[int], List[int]]]]:
    """Pair runs of dims of ``a`` and ``b`` with equal products (the reshape's merges/splits)."""
    blocks = []
    i = j = 0
    while i < len(a) and j < len(b):
        ia, jb = [i], [j]
        pa, pb = a[i], b[j]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb:
                if i >= len(a):
                    return None
                pa *= a[i]
                ia.append(i)
                i += 1
            else:
                if j >= len(b):
                    return None
                pb *= b[j]
                jb.append(j)
                j += 1
        blocks.append((ia, jb))
    rest_a, rest_b = list(range(i, len(a))), list(range(j, len(b)))
    if any(a[k] != 1 for k in rest_a) or any(b[k] != 1 for k in rest_b):
        return None
    if blocks:  # trailing size-1 dims join the last block
        blocks[-1] = (blocks[-1][0] + rest_a, blocks[-1][1] + rest_b)
    else:
        blocks = [(rest_a, rest_b)]
    return blocks


def reshape_map(a: Sequence[int], b: Sequence[int], c: int) -> Optional[Tuple[int, int, int]]:
    """Where dimension ``c`` of shape ``a`` lands after a row-major reshape to ``b``.

    Returns ``(new_dim, mult, div)``: every entry ``e`` of ``c`` becomes the
    slice ``[e*mult/div, (e+1)*mult/div)`` of ``new_dim`` (mult/div integral),
    or None when the channel is split or not the major part of a merge (then
    its units would be interleaved with other entries).
    """
    if math.prod(a) != math.prod(b):
        return None
    blocks = _matching_blocks(a, b)
    if blocks is None:
        return None
    for ia, jb in blocks:
        if c not in ia:
            continue
        outer = math.prod(a[k] for k in ia if k < c)
        inner = math.prod(a[k] for k in ia if k > c)
        if outer != 1:
            return None
        non1 = [k for k in jb if b[k] != 1]
        if not non1:
            # a single unit; none of b's dims holds it when b is a scalar (0-d)
            return (jb[0], 1, 1) if a[c] == 1 and jb else None
        jstar = non1[0]
        post = math.prod(b[k] for k in jb if k > jstar)
        if a[c] * inner != b[jstar] * post or inner % post != 0:
            return None
        return (jstar, inner, post)
    return None


def reshaped(layout: ChannelLayout, a: Optional[Sequence[int]], b: Optional[Sequence[int]]) -> Optional[ChannelLayout]:
    """The layout after reshaping a tensor of shape ``a`` to ``b``; raises Unsupported if units split."""
    m = reshape_map(a, b, layout.dim) if (a is not None and b is not None) else None
    if m is None:
        raise Unsupported(f"reshape from {a} to {b} that splits or interleaves the permuted dimension")
    new_dim, mult, div = m
    segments = []
    for s in layout.segments:
        total = s.inner * mult
        if total % div:
            raise Unsupported(f"reshape from {a} to {b} that splits a unit's block")
        segments.append(Segment(s.group, s.count, total // div))
    return make_layout(new_dim, len(b), segments, layout.post_act)


# ------------------------------------------------------- dimension orders
def matrix_transpose_order(ndim: int) -> List[int]:
    """Dimension order of ``Tensor.t()``: reversed for a matrix, unchanged for fewer dims."""
    return list(range(ndim))[::-1] if ndim == 2 else list(range(ndim))


def permute_order(dims: Sequence[Any], ndim: int) -> List[int]:
    """Dimension order of ``permute(dims)``; raises Unsupported unless dims are constant ints."""
    if not all(isinstance(d, int) for d in dims) or len(dims) != ndim:
        raise Unsupported("permute with non-constant dims")
    return [d % ndim for d in dims]


def swap_order(d0: Any, d1: Any, ndim: int) -> List[int]:
    """Dimension order of ``transpose(d0, d1)``; raises Unsupported unless both are constant ints."""
    if not isinstance(d0, int) or not isinstance(d1, int):
        raise Unsupported("transpose with non-constant dims")
    order = list(range(ndim))
    order[d0 % ndim], order[d1 % ndim] = order[d1 % ndim], order[d0 % ndim]
    return order


# ----------------------------------------------------------------- indexing
def _check_static_index(idx: Tuple[Any, ...]) -> None:
    """Raise Unsupported unless ``idx`` holds only None, Ellipsis, ints and constant slices."""
    if any(isinstance(i, fx.Node) for i in idx) or not all(
            i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in idx):
        raise Unsupported("indexing with tensors")
    for i in idx:
        if isinstance(i, slice) and any(isinstance(v, fx.Node) for v in (i.start, i.stop, i.step)):
            raise Unsupported("slicing with dynamic bounds")


def _expand_index(idx: Any, ndim: int) -> List[Any]:
    """``idx`` as a list with the Ellipsis replaced by full slices (checked to be static)."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    _check_static_index(idx)
    consuming = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded: List[Any] = []
    for i in idx:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (ndim - consuming))
        else:
            expanded.append(i)
    return expanded


def channel_slice(idx: Any, dim: int, ndim: int) -> Tuple[Any, Optional[slice]]:
    """Split ``idx`` into the index with ``:`` on channel dimension ``dim``, and the slice taken there.

    The slice is None when the channel dimension is indexed by ``:`` (or not at
    all); raises Unsupported for an int index, a stepped slice or tensors.
    """
    expanded = _expand_index(idx, ndim)
    in_d = 0
    for pos, i in enumerate(expanded):
        if i is None:
            continue
        if in_d == dim:
            if isinstance(i, slice) and i != slice(None) and i.step in (None, 1):
                return tuple(expanded[:pos] + [slice(None)] + expanded[pos + 1:]), i
            return idx, None
        in_d += 1
    return idx, None


def sliced_segments(layout: ChannelLayout, cut: slice) -> Tuple[List[Segment], List[int]]:
    """Segments of ``layout`` left by ``cut`` on its channel dim, and the groups cut in part.

    A segment kept whole keeps its group; a segment cut in part keeps its
    entries unpermuted and its group is returned (to be left fixed: a part of a
    permuted group is not a permutation); segments cut off entirely vanish
    (their units are not read here).
    """
    start, stop, _ = cut.indices(layout.length())
    kept: List[Segment] = []
    partial: List[int] = []
    for off, s in layout.offsets():
        lo, hi = max(off, start), min(off + s.count * s.inner, stop)
        if hi <= lo:
            continue
        if (lo, hi) == (off, off + s.count * s.inner):
            kept.append(s)
        else:
            if s.group is not None:
                partial.append(s.group)
            kept.append(Segment(None, hi - lo, 1))
    return kept, partial


def indexed_dim(idx: Any, dim: int, ndim: int) -> int:
    """Where dimension ``dim`` of an ``ndim``-dim tensor lands in ``tensor[idx]``.

    Only a full slice ``:`` may touch the channel dimension (units cannot be
    picked or reordered), and every index must be a constant, not a traced
    value.  Raises Unsupported otherwise.
    """
    expanded = _expand_index(idx, ndim)
    in_d = out_d = 0
    new_dim = None
    for i in expanded:
        if i is None:  # a new axis of size 1
            out_d += 1
            continue
        if in_d == dim:
            if not (isinstance(i, slice) and i == slice(None)):
                raise Unsupported("indexing into the permuted dimension")
            new_dim = out_d
        if isinstance(i, slice):
            out_d += 1
        in_d += 1
    if new_dim is None:  # the channel dimension is after the indexed ones
        new_dim = out_d + (dim - in_d)
    return new_dim
