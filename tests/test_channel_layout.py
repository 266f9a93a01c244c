"""Layout algebra (modeconn/alignment/channel_layout.py) from mutation run 9: every function checked
against a brute-force reference built with torch (reshape / index a tensor of channel labels and see
where the labels land), plus small models whose permuted copy must compute the same function."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
from torch import fx

from modeconn.alignment import apply_permutation, infer_permutation_spec
from modeconn.alignment.channel_layout import (ChannelLayout, Segment, Unsupported, channel_slice, indexed_dim,
                                               make_layout, matrix_transpose_order, permute_order, reshape_map,
                                               reshaped, sliced_segments, swap_order)
from tests.test_alignment import _brute_force_channel_map

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_function(model, spec, x, seeds=(1, 2, 3)):
    for seed in seeds:
        permuted = apply_permutation(model, spec, spec.random_permutation(seed))
        with torch.no_grad():
            torch.testing.assert_close(permuted.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def _axes_of(spec):
    return {a.name for g in spec.groups.values() for a in g.axes}


# ------------------------------------------------------------------------ the layout type
SEGS = (Segment(0, 2, 3), Segment(None, 4, 1), Segment(1, 3, 2), Segment(2, 2, 1))


def test_offsets_and_length_are_running_sums_of_the_blocks():
    layout = ChannelLayout(1, 3, SEGS)
    assert [off for off, _ in layout.offsets()] == [0, 6, 10, 16]
    assert [s for _, s in layout.offsets()] == list(SEGS)
    assert layout.length() == 18 and layout.blocks() == [(2, 3), (4, 1), (3, 2), (2, 1)]
    assert layout.groups() == [0, 1, 2]


def test_make_layout_defaults_to_not_after_an_activation_and_drops_unpermuted_layouts():
    assert make_layout(1, 2, [Segment(0, 4, 1)]) == ChannelLayout(1, 2, (Segment(0, 4, 1),), False)
    assert make_layout(1, 2, [Segment(0, 4, 1)], True).post_act is True
    assert make_layout(1, 2, [Segment(None, 4, 1)]) is None


# ------------------------------------------------------------------------------- reshapes
def _shapes(total, max_len):
    out = []
    for n in range(1, max_len + 1):
        for dims in itertools.product((1, 2, 3, 4, 6), repeat=n):
            if math.prod(dims) == total:
                out.append(dims)
    return out


def test_reshape_map_agrees_with_reshaping_an_index_tensor_on_every_small_shape():
    """All shapes of 12 and 24 entries with up to 4 dims (sizes 1, 2, 3, 4, 6), every channel dim of size > 1."""
    checked = 0
    for total, max_len in ((12, 4), (24, 3)):
        shapes = _shapes(total, max_len)
        for a, b in itertools.product(shapes, shapes):
            for c in range(len(a)):
                if a[c] == 1:
                    continue
                expected = _brute_force_channel_map(a, b, c)
                got = reshape_map(a, b, c)
                if expected is None:
                    assert got is None, (a, b, c, got)
                else:
                    assert got is not None, (a, b, c, expected)
                    new_dim, mult, div = got
                    assert (new_dim, mult / div) == expected, (a, b, c, got, expected)
                    assert a[c] * mult == b[new_dim] * div, (a, b, c, got)
                checked += 1
    assert checked > 1000


@pytest.mark.parametrize("a,b,c,want", [
    ((2, 1), (2, 1), 1, (1, 1, 1)),             # identity: a single unit stays where it is
    ((2, 1), (2, 1, 1), 1, (1, 1, 1)),          # unsqueeze after a single unit: it stays at dim 1
    ((2, 1, 1), (2, 1), 1, (1, 1, 1)),          # squeeze of the trailing dim
    ((2, 1, 3), (2, 3), 1, (1, 3, 1)),          # the single unit owns the whole merged dim
    ((3, 4), (12,), 0, (0, 4, 1)),              # channels first, merged with a minor dim
    ((24,), (2, 3, 4), 0, None),                # split in three
    ((2, 24, 5), (2, 6, 4, 5), 1, None),        # split in the middle, a dim after it
    ((2, 6, 4, 5), (2, 24, 5), 1, (1, 4, 1)),   # merged in the middle, a dim after it
    ((0, 3), (0, 5), 1, None),                  # zero-size shapes: the run of a ends first
    ((0, 5), (0, 3), 1, None),                  # zero-size shapes: the run of b ends first
    ((2, 3), (3, 2), 1, None),
])
def test_reshape_map_exact_cases(a, b, c, want):
    assert reshape_map(a, b, c) == want


def test_reshaped_carries_post_act_and_scales_the_blocks():
    layout = ChannelLayout(1, 4, (Segment(0, 2, 1), Segment(None, 1, 1), Segment(1, 3, 1)), post_act=True)
    out = reshaped(layout, (2, 6, 4, 4), (2, 96))
    assert out == ChannelLayout(1, 2, (Segment(0, 2, 16), Segment(None, 1, 16), Segment(1, 3, 16)), True)
    assert reshaped(layout.replace(post_act=False), (2, 6, 4, 4), (2, 96)).post_act is False


@pytest.mark.parametrize("a,b", [(None, (2, 6)), ((2, 6), None), (None, None)])
def test_reshaped_without_a_traced_shape_is_unsupported(a, b):
    with pytest.raises(Unsupported, match="splits or interleaves the permuted dimension"):
        reshaped(ChannelLayout(1, 2, (Segment(0, 6, 1),)), a, b)


class ScalarOut(nn.Module):
    """A single-output Linear on an unbatched input, reshaped to a 0-d scalar."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).reshape(())


def test_reshape_of_a_single_unit_to_a_scalar_is_followed_without_crashing():
    """reshape_map((1,), (), 0) used to index ``jb[0]`` of an empty run: IndexError from inference."""
    assert reshape_map((1,), (), 0) is None
    torch.manual_seed(0)
    model, x = ScalarOut(), torch.randn(4)
    spec = infer_permutation_spec(model, x)
    assert list(spec.groups) == ["a"] and "b.weight" in _axes_of(spec)
    _same_function(model, spec, x)


# ------------------------------------------------------------------------ dimension orders
@pytest.mark.parametrize("shape", [(5,), (2, 5)])
def test_matrix_transpose_order_is_the_order_of_tensor_t(shape):
    order = matrix_transpose_order(len(shape))
    assert [shape[o] for o in order] == list(torch.empty(shape).t().shape)
    assert sorted(order) == list(range(len(shape)))
    assert matrix_transpose_order(0) == []


class Transposed(nn.Module):
    """Units read after ``.t()``: reduced over the batch (dim 1 of the transpose), or transposed back."""

    def __init__(self, back):
        super().__init__()
        self.back = back
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.a(x)).t()
        return self.b(h.t()) if self.back else self.b(h.sum(1))


@pytest.mark.parametrize("back", [False, True])
def test_transposed_units_keep_their_group(back):
    torch.manual_seed(0)
    model, x = Transposed(back), torch.randn(5, 4)
    spec = infer_permutation_spec(model, x[:2])
    assert list(spec.groups) == ["a"] and spec.groups["a"].size == 6 and "b.weight" in _axes_of(spec)
    _same_function(model, spec, x)


def _node():
    return fx.Graph().placeholder("d")


def test_permute_and_swap_orders_need_constant_ints():
    assert permute_order([0, -1, 1], 3) == [0, 2, 1]
    assert swap_order(0, -1, 3) == [2, 1, 0]
    for dims in ([0, _node()], [_node(), 1], [0, "1"]):
        with pytest.raises(Unsupported, match="permute with non-constant dims"):
            permute_order(dims, 2)
    with pytest.raises(Unsupported, match="permute with non-constant dims"):
        permute_order([1, 0], 3)
    for d0, d1 in ((0, _node()), (_node(), 1), ("0", 1), (0, None)):
        with pytest.raises(Unsupported, match="transpose with non-constant dims"):
            swap_order(d0, d1, 2)


# -------------------------------------------------------------------------------- indexing
def _labels(shape, dim):
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return torch.arange(shape[dim]).view(view).expand(*shape)


def _reference(shape, dim, idx):
    """``(out_dim, lo, hi)``: the output dim holding channels ``lo..hi-1`` in order, or None (picked,
    stepped or reordered channels)."""
    out = _labels(shape, dim)[idx]
    varying = [d for d in range(out.dim()) if out.shape[d] > 1 and not torch.equal(out, out.narrow(d, 0, 1).expand_as(out))]
    if len(varying) > 1:
        return None
    if not varying:  # one channel left, or none: find the dim holding it by its size
        return None
    d = varying[0]
    vals = out.movedim(d, 0).reshape(out.shape[d], -1)[:, 0]
    lo, hi = int(vals[0]), int(vals[-1]) + 1
    if not torch.equal(vals, torch.arange(lo, hi)):
        return None
    return d, lo, hi


S, F = slice, slice(None)
INDEXES = [
    # shape, channel dim, index
    ((2, 6, 5), 1, F), ((2, 6, 5), 1, (F, S(1, 4))), ((2, 6, 5), 1, (Ellipsis, S(0, 3), F)),
    ((2, 6, 5), 1, (F, None, S(2, None))), ((2, 6, 5), 1, (None, None, F, S(0, 4))),
    ((2, 6, 5), 1, (0,)), ((2, 6, 5), 1, 0), ((2, 6, 5), 1, (0, S(1, 3))), ((2, 6, 5), 1, (F, F, 2)),
    ((2, 6, 5), 1, (F, S(1, 4), 2)), ((2, 6, 5), 1, (F, S(1, 4), None)), ((2, 6, 5), 1, (F, F, None)),
    ((2, 6, 5), 1, (Ellipsis,)), ((2, 6, 5), 1, Ellipsis), ((2, 6, 5), 1, None), ((2, 6, 5), 1, (None, None)),
    ((2, 6, 5), 1, (F, S(0, 6, 1))), ((2, 6, 5), 1, (1, Ellipsis)), ((2, 6, 5), 1, (0, Ellipsis, None)),
    ((2, 6, 5), 1, (Ellipsis, None)), ((2, 6, 5), 1, (None, Ellipsis)), ((2, 6, 5), 1, (0, Ellipsis, S(1, 3))),
    ((2, 6, 5), 1, (Ellipsis, 1)), ((2, 6, 5), 1, (F, 2)), ((2, 6, 5), 1, (F, S(None, None, 2))),
    ((2, 6, 5), 1, (F, S(1, 5, 2))), ((2, 6, 5), 1, (F, S(0, 6, 2))), ((2, 6, 5), 1, (S(0, 1), S(2, 5), S(1, 3))),
    ((2, 5, 6), 2, (F, F, S(1, 5))), ((2, 5, 6), 2, (Ellipsis, S(0, 3))), ((2, 5, 6), 2, (0,)),
    ((2, 5, 6), 2, (0, S(1, 3))), ((2, 5, 6), 2, (F, 1)), ((2, 5, 6), 2, (None, 0, Ellipsis, S(2, 4))),
    ((2, 5, 6), 2, (None, None, 0)), ((2, 5, 6), 2, (F, S(0, 2))), ((2, 5, 6), 2, (F, None, F, S(1, 6))),
    ((2, 5, 6), 2, (0, 1)), ((2, 5, 6), 2, (F, F, S(None, None, 2))), ((2, 5, 6), 2, (Ellipsis, 3)),
    ((2, 6), 1, (F, S(1, 4))), ((2, 6), 1, (S(0, 1),)), ((2, 6), 1, (F, None)), ((2, 6), 1, (None, F, S(2, 6))),
    ((6, 2), 0, S(1, 3)), ((6, 2), 0, (S(1, 3),)), ((6, 2), 0, (F, 0)), ((6, 2), 0, (Ellipsis, 1)),
    ((6, 2), 0, (None, S(2, 5), None)), ((6, 2), 0, 2),
    # advanced indexing with a constant list: the inference refuses it (or must be right)
    ((2, 6), 1, ([0, 1], F)), ((2, 6), 1, (F, [0, 2])), ((2, 6, 5), 1, (F, F, [0, 1])),
]


@pytest.mark.parametrize("shape,dim,idx", INDEXES)
def test_channel_slice_and_indexed_dim_agree_with_indexing_a_label_tensor(shape, dim, idx):
    expected = _reference(shape, dim, idx)
    static = not any(isinstance(i, list) for i in (idx if isinstance(idx, tuple) else (idx,)))
    try:
        idx2, cut = channel_slice(idx, dim, len(shape))
        new_dim = indexed_dim(idx2, dim, len(shape))
    except Unsupported:
        assert expected is None or not static, (shape, dim, idx, expected)
        return
    assert expected is not None, (shape, dim, idx, idx2, cut, new_dim)
    out_dim, lo, hi = expected
    assert new_dim == out_dim
    full = _labels(shape, dim)[idx2]
    assert full.shape[new_dim] == shape[dim]
    if cut is None:
        assert (lo, hi) == (0, shape[dim])
        assert torch.equal(full, _labels(shape, dim)[idx])
    else:
        start, stop, step = cut.indices(shape[dim])
        assert (start, stop, step) == (lo, hi, 1)
        assert torch.equal(full.narrow(new_dim, lo, hi - lo), _labels(shape, dim)[idx])


def test_channel_slice_returns_the_expanded_index_with_a_full_slice_on_the_channels():
    assert channel_slice((Ellipsis, S(1, 3), 0), 1, 3) == ((F, F, 0), S(1, 3))
    assert channel_slice((0, S(1, 3), None, 2), 1, 3) == ((0, F, None, 2), S(1, 3))
    assert channel_slice((None, S(1, 3), Ellipsis), 0, 2) == ((None, F, F), S(1, 3))
    assert channel_slice((F, S(0, 6, 1)), 1, 2) == ((F, F), S(0, 6, 1))
    for idx in ((F, 2), (F, S(None, None, 2)), (F, F), F, (F,)):
        assert channel_slice(idx, 1, 2) == (idx, None)


def test_tensor_and_dynamic_indices_are_unsupported():
    node = _node()
    for idx in ((F, node), node, (F, [0, 1]), ([0, 1], F), (F, torch.tensor([0, 1])), (F, 1.5)):
        with pytest.raises(Unsupported, match="indexing with tensors"):
            channel_slice(idx, 1, 2)
        with pytest.raises(Unsupported, match="indexing with tensors"):
            indexed_dim(idx, 1, 2)
    for idx in ((F, S(node, None)), (F, S(0, node)), (S(None, None, node), F)):
        with pytest.raises(Unsupported, match="slicing with dynamic bounds"):
            channel_slice(idx, 1, 2)


def _entry_labels(segments):
    """One ``(segment index, group, unit)`` per entry of the channel dimension."""
    return [(k, s.group, u) for k, s in enumerate(segments) for u in range(s.count) for _ in range(s.inner)]


def _reference_cut(segments, cut):
    entries = _entry_labels(segments)[cut]
    kept, partial = [], []
    for k, s in enumerate(segments):
        n = sum(1 for e in entries if e[0] == k)
        if n == s.count * s.inner:
            kept.append(s)
        elif n:
            kept.append(Segment(None, n, 1))
            if s.group is not None:
                partial.append(s.group)
    return kept, partial


def test_sliced_segments_agrees_with_slicing_a_list_of_entry_labels():
    layout = ChannelLayout(1, 2, SEGS)
    n = layout.length()
    cuts = [slice(lo, hi) for lo in range(-3, n + 2) for hi in range(-3, n + 2)]
    cuts += [slice(None), slice(4, None), slice(None, 7)]
    for cut in cuts:
        assert sliced_segments(layout, cut) == _reference_cut(SEGS, cut), cut


class CatSlice(nn.Module):
    """Three layers concatenated, sliced: the first in part, the others whole, and a flattened conv."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        if conv:
            self.a, self.b, self.c = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1)
            self.fc = nn.Linear(2 * 4 + 16 + 8, 3)
        else:
            self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 4), nn.Linear(4, 2)
            self.fc = nn.Linear(1 + 4 + 2, 3)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x)), torch.relu(self.c(x))], 1)
        if self.conv:
            return self.fc(h[:, :, :2, :2].flatten(1)[:, 4:])
        return self.fc(h[:, 2:])


@pytest.mark.parametrize("conv", [False, True])
def test_a_slice_keeps_the_whole_groups_at_their_offsets_and_fixes_the_cut_one(conv):
    torch.manual_seed(0)
    model = CatSlice(conv)
    x = torch.randn(3, 3, 5, 5) if conv else torch.randn(3, 4)
    spec = infer_permutation_spec(model, x[:1])
    assert sorted(spec.groups) == ["b", "c"] and "a.weight" in spec.fixed
    assert any("'a'" in r and "sliced through the middle" in r for r in spec.reasons), spec.reasons
    _same_function(model, spec, x)


class Indexed(nn.Module):
    """A Linear's units read through an index: ``h[idx]`` then a Linear over the last dimension."""

    def __init__(self, idx, width):
        super().__init__()
        self.idx = idx
        self.a, self.b = nn.Linear(4, 6), nn.Linear(width, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))[self.idx])


@pytest.mark.parametrize("idx,width,kept", [
    ((Ellipsis, S(1, 5)), 4, False),            # the group cut in part: fixed
    ((Ellipsis, F), 6, True),
    ((None, Ellipsis), 6, True),
    ((F, None, F), 6, True),
    ((0, Ellipsis, None, F), 6, True),          # the Ellipsis stands for nothing: [0, None, :], units at dim 1
    ((F, S(None, None, 2)), 3, False),          # stepped: not a permutation of the units
    ((F, S(0, 6, 1)), 6, True),
    (([0, 1], F), 6, False),                    # constant list: refused
])
def test_indexed_units_keep_their_group_or_are_fixed_and_the_function_is_kept(idx, width, kept):
    torch.manual_seed(0)
    model, x = Indexed(idx, width), torch.randn(3, 4)
    spec = infer_permutation_spec(model, x[:2])
    _same_function(model, spec, x)
    assert ("a" in spec.groups) == kept, (spec.groups, spec.reasons)
    if kept:
        assert "b.weight" in _axes_of(spec)


Tokens = Indexed   # units on the last of three dims, sliced, picked and indexed after the batch


@pytest.mark.parametrize("idx,width,kept", [
    ((F, F, S(1, 5)), 4, False),
    ((Ellipsis, S(0, 6)), 6, True),
    ((0,), 6, True),
    ((F, 1), 6, True),
    ((None, 0, Ellipsis, F), 6, True),
    ((F, None, F, F), 6, True),
])
def test_units_on_the_last_of_three_dims(idx, width, kept):
    torch.manual_seed(0)
    model, x = Tokens(idx, width), torch.randn(3, 5, 4)
    spec = infer_permutation_spec(model, x[:2])
    assert ("a" in spec.groups) == kept, (spec.groups, spec.reasons)
    if kept:
        assert "b.weight" in _axes_of(spec)
    _same_function(model, spec, x)
