"""Spec inference, case by case, from mutation testing (tests/MUTATION.md, run 9): which groups form,
which parameters move with them, and the reasons given for what stays fixed."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from modeconn.alignment import apply_permutation, infer_permutation_spec
from modeconn.alignment.spec import ObservePoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_function(model, spec, x, seed=3):
    permuted = apply_permutation(model, spec, spec.random_permutation(seed))
    with torch.no_grad():
        torch.testing.assert_close(permuted.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def _axes_of(spec):
    return {a.name for g in spec.groups.values() for a in g.axes}


class SizedPosition(nn.Module):
    """A token embedding plus a position embedding sliced by a size query on the parameter itself."""

    def __init__(self, vocab=7, seq=5, dim=6):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, seq, dim))
        self.fc = nn.Linear(dim, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.tok(x) + self.pos[:, :self.pos.size(1)]
        return self.head(torch.relu(self.fc(h)).mean(1))


def test_a_size_query_is_not_a_second_reader_of_a_position_embedding():
    torch.manual_seed(0)
    model, x = SizedPosition(), torch.randint(0, 7, (4, 5))
    spec = infer_permutation_spec(model, x[:1])
    # `pos.size(1)` only reads the shape: pos is still added to the embedding alone, so it moves with it
    assert "pos" in _axes_of(spec) and "pos" not in spec.fixed
    assert "tok.weight" in _axes_of(spec)
    _same_function(model, spec, x)


class Cumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), 1))


def test_the_reason_names_the_unsupported_function():
    spec = infer_permutation_spec(Cumsum(), torch.randn(1, 4))
    assert list(spec.groups) == [] and "a.weight" in spec.fixed
    reason = next(r for r in spec.reasons if "'a'" in r)
    assert "unsupported operation" in reason and "(function cumsum)" in reason, reason


class SharedLayer(nn.Module):
    """``mid`` is called twice: its second call's units reach the output, and they share mid's weight."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid = nn.Linear(4, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = torch.relu(self.mid(torch.relu(self.inp(x))))
        return self.mid(h)


def test_a_layer_called_again_opens_a_numbered_group():
    spec = infer_permutation_spec(SharedLayer(), torch.randn(1, 4))
    # every group is tied to the output through the shared weight: all fixed, the reason lists the openers
    assert list(spec.groups) == [] and set(spec.fixed) == {"inp.weight", "inp.bias", "mid.weight", "mid.bias"}
    assert spec.reasons == ["group 'inp' (6 units, opened by inp, mid, mid@1) left unpermuted: "
                            "its units reach the model output (never permuted)"]


class ViewAs(nn.Module):
    """``a.view_as(b)``: b only gives a shape there, yet b's units are also used on their own."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.ha, self.hb = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        a, b = torch.relu(self.a(x)), torch.relu(self.b(x))
        return self.ha(a.view_as(b)) + self.hb(b)


def test_a_permuted_secondary_argument_is_left_fixed_with_its_reason():
    torch.manual_seed(0)
    model, x = ViewAs(), torch.randn(5, 4)
    spec = infer_permutation_spec(model, x[:1])
    assert list(spec.groups) == ["a"]                                   # the main tensor's units still move
    assert {"b.weight", "b.bias", "hb.weight"} <= set(spec.fixed)
    assert ("group 'b' (6 units, opened by b) left unpermuted: permuted tensor used as a secondary argument "
            "of node 'view_as' (method .view_as())") in spec.reasons
    _same_function(model, spec, x)


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.sh, self.h = nn.Conv2d(1, 4, 3, padding=1), nn.PixelShuffle(2), nn.Linear(64, 3)

    def forward(self, x):
        return self.h(torch.flatten(self.sh(self.c(x)), 1))


def test_the_reason_names_the_unsupported_module_and_its_type():
    spec = infer_permutation_spec(Shuffle(), torch.randn(1, 1, 4, 4))
    assert list(spec.groups) == [] and {"c.weight", "c.bias"} <= set(spec.fixed)
    assert ("group 'c' (4 units, opened by c) left unpermuted: unsupported module PixelShuffle at node 'sh' "
            "(PixelShuffle 'sh')") in spec.reasons


class PlainTensorAttribute(nn.Module):
    """``pos`` is a plain tensor attribute: tracing makes it a buffer of the graph, but it is not in the
    model's state dict, so it cannot be permuted and the units it is added to must stay fixed."""

    def __init__(self):
        super().__init__()
        self.a, self.h = nn.Linear(4, 6), nn.Linear(6, 3)
        self.pos = torch.randn(1, 6)

    def forward(self, x):
        return self.h(torch.relu(self.a(x) + self.pos))


def test_a_tensor_outside_the_state_dict_never_moves_with_the_units():
    torch.manual_seed(0)
    model, x = PlainTensorAttribute(), torch.randn(5, 4)
    spec = infer_permutation_spec(model, x[:1])
    assert list(spec.groups) == [] and {"a.weight", "a.bias"} <= set(spec.fixed)
    assert any("'a'" in r and "unpermuted tensor 'pos'" in r for r in spec.reasons), spec.reasons
    _same_function(model, spec, x)


KEYWORD_CALLS = {
    "relu": lambda h: torch.relu(input=h),
    "flatten": lambda h: torch.flatten(input=h, start_dim=1),
    "dropout": lambda h: nn.functional.dropout(input=h, p=0.5, training=False),
    "softmax": lambda h: torch.softmax(input=h, dim=1),
}


class KeywordInput(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.a, self.h, self.op = nn.Linear(4, 6), nn.Linear(6, 3), KEYWORD_CALLS[op]

    def forward(self, x):
        return self.h(self.op(self.a(x)))        # the op gets its tensor as `input=`, no positional argument


@pytest.mark.parametrize("op", sorted(KEYWORD_CALLS))
def test_a_tensor_passed_by_keyword_is_followed(op):
    torch.manual_seed(0)
    model, x = KeywordInput(op), torch.randn(5, 4)
    spec = infer_permutation_spec(model, x[:1])
    assert list(spec.groups) == ["a"] and "h.weight" not in spec.fixed    # h's input axis moves with a
    _same_function(model, spec, x)


def test_units_are_observed_after_their_activation():
    # activation matching compares units where the activation has been applied, not the layer's raw output
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    spec = infer_permutation_spec(model, torch.randn(1, 4))
    assert [p.node for p in spec.groups["0"].observe] == ["_1"]           # fx names the ReLU module 1 node "_1"
    assert [p.node for p in spec.groups["2"].observe] == ["_3"]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.head(h + self.b(h))


def test_a_residual_stream_is_observed_after_the_activation_only():
    spec = infer_permutation_spec(Residual(), torch.randn(1, 4))
    # b's raw output and the sum are not activations: the ReLU output is the one point kept
    assert list(spec.groups) == ["a"] and [p.node for p in spec.groups["a"].observe] == ["relu"]


class PlainThenGrouped(nn.Module):
    """An ordinary layer first, then a layer read by a grouped convolution (2 blocks of 4 channels)."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c2, self.fc = nn.Conv2d(8, 8, 1, groups=2), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.c1(torch.relu(self.c0(x))))
        return self.fc(torch.relu(self.c2(h)).mean((2, 3)))


def test_every_class_read_in_blocks_is_restricted_not_only_the_first():
    torch.manual_seed(0)
    model, x = PlainThenGrouped(), torch.randn(4, 1, 5, 5)
    spec = infer_permutation_spec(model, x[:1])
    # c0 is free (8 units); c1 and c2 may only permute the same way in both blocks of 4
    assert {k: g.size for k, g in spec.groups.items()} == {"c0": 8, "c1": 4, "c2": 4}
    for seed in range(3):
        _same_function(model, spec, x, seed)


class TwoGroupings(nn.Module):
    """``a + b`` merges c1's and c2's units; a is also read by a conv of ``ga`` groups, b by one of ``gb``;
    ``out``'s units are read by a conv of 2 groups after that."""

    def __init__(self, ga, gb):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 12, 3, padding=1), nn.Conv2d(1, 12, 3, padding=1)
        self.ga, self.gb = nn.Conv2d(12, 12, 1, groups=ga), nn.Conv2d(12, 12, 1, groups=gb)
        self.out, self.tail, self.fc = nn.Conv2d(12, 8, 1), nn.Conv2d(8, 8, 1, groups=2), nn.Linear(8, 3)

    def forward(self, x):
        a, b = torch.relu(self.c1(x)), torch.relu(self.c2(x))
        side = torch.relu(self.ga(a)).mean((1, 2, 3)) + torch.relu(self.gb(b)).mean((1, 2, 3))
        h = torch.relu(self.tail(torch.relu(self.out(a + b))))
        return self.fc(h.mean((2, 3))) + side[:, None]


def test_blocks_of_2_and_4_give_a_permutation_equal_in_4_blocks_of_3():
    torch.manual_seed(0)
    model, x = TwoGroupings(2, 4), torch.randn(4, 1, 5, 5)
    spec = infer_permutation_spec(model, x[:1])
    assert {k: g.size for k, g in spec.groups.items()} == {"c1": 3, "ga": 6, "gb": 3, "out": 4, "tail": 4}
    for seed in range(3):
        _same_function(model, spec, x, seed)


def test_blocks_of_2_and_3_cannot_both_hold_and_are_left_fixed():
    torch.manual_seed(0)
    model, x = TwoGroupings(2, 3), torch.randn(4, 1, 5, 5)
    spec = infer_permutation_spec(model, x[:1])
    # the classes after the dropped one are still restricted to their blocks
    assert {k: g.size for k, g in spec.groups.items()} == {"ga": 6, "gb": 4, "out": 4, "tail": 4}
    assert {"c1.weight", "c1.bias", "c2.weight", "c2.bias"} <= set(spec.fixed)
    assert ("group 'c1' (12 units, opened by c1, c2) left unpermuted: its units are read in incompatible "
            "blocks (units, blocks): [(12, 2), (12, 3)]") in spec.reasons
    for seed in range(3):
        _same_function(model, spec, x, seed)


class SharedInputAxis(nn.Module):
    """``shared`` reads a's 8 units, and (called again) h's 4 units twice over: one axis, two group sizes."""

    def __init__(self):
        super().__init__()
        self.a, self.h, self.shared = nn.Linear(4, 8), nn.Linear(4, 4), nn.Linear(8, 3)

    def forward(self, x):
        a, h = torch.relu(self.a(x)), torch.relu(self.h(x))
        return self.shared(a) + self.shared(torch.cat([h, h], 1))


def test_one_axis_claimed_by_groups_of_different_sizes_leaves_both_fixed():
    spec = infer_permutation_spec(SharedInputAxis(), torch.randn(1, 4))
    assert list(spec.groups) == []
    for name, size in (("a", 8), ("h", 4)):
        assert (f"group '{name}' ({size} units, opened by {name}) left unpermuted: 'shared.weight' axis 1 is "
                "shared by groups of different sizes") in spec.reasons


class TwoViewsOfOneAxis(nn.Module):
    """``fc`` reads a flattened conv map (2 channels x 4 positions) and, called again, a Linear's 8 units."""

    def __init__(self):
        super().__init__()
        self.c, self.a, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(3, 8), nn.Linear(8, 3)

    def forward(self, x, z):
        return self.fc(torch.flatten(torch.relu(self.c(x)), 1)) + self.fc(torch.relu(self.a(z)))


def test_overlapping_permutations_of_one_axis_are_both_dropped():
    spec = infer_permutation_spec(TwoViewsOfOneAxis(), (torch.randn(1, 1, 2, 2), torch.randn(1, 3)))
    assert list(spec.groups) == []
    for name, size in (("c", 2), ("a", 8)):
        assert (f"group '{name}' ({size} units, opened by {name}) left unpermuted: conflicting permutations "
                "of 'fc.weight' axis 1") in spec.reasons


def _observed(model, x):
    return {k: g.observe for k, g in infer_permutation_spec(model, x).groups.items()}


class ConvFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(1, 3, 3, padding=1), nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.c(x)), 1))


class LinearBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.fc = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.bn(self.a(x)))


def test_observe_points_skip_data_movement_and_raw_outputs_seen_again():
    # the flattened map is only moved data: the channels are read at the ReLU, on dim 1
    assert _observed(ConvFlatten(), torch.randn(1, 1, 2, 2)) == {"c": [ObservePoint("relu", 1, 0, 1, 1)]}
    # no activation: the BatchNorm output, not the Linear output it transforms per channel
    assert _observed(LinearBatchNorm(), torch.randn(2, 4)) == {"a": [ObservePoint("bn", 1, 0, 1, 1)]}


def test_observe_points_of_units_read_in_blocks_repeat_per_block():
    observed = _observed(PlainThenGrouped(), torch.randn(1, 1, 5, 5))
    # c1's 8 channels are 2 blocks of 4 units: one point that views the channels as [2, 4]
    assert observed["c1"] == [ObservePoint("relu_1", 1, 0, 1, 2)]
    assert observed["c0"] == [ObservePoint("relu", 1, 0, 1, 1)]


class TwoSlices(nn.Module):
    def __init__(self):
        super().__init__()
        self.fa, self.fb, self.fc = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        a, b = torch.relu(self.fa(x)), torch.relu(self.fb(x))
        return self.fc(a + b) + a[:, :3] + b[:, 1:4]


def test_a_class_dropped_for_two_reasons_lists_both():
    spec = infer_permutation_spec(TwoSlices(), torch.randn(1, 4))
    assert ("group 'fa' (6 units, opened by fa, fb) left unpermuted: "
            "channels sliced through the middle of the group at node 'getitem' (function getitem); "
            "channels sliced through the middle of the group at node 'getitem_1' (function getitem)") in spec.reasons


class Functional(nn.Module):
    def __init__(self, follow):
        super().__init__()
        self.w, self.fc, self.follow = nn.Parameter(torch.randn(6, 4)), nn.Linear(6, 2), follow

    def forward(self, x):
        return self.fc(self.follow(nn.functional.linear(x, self.w)))


@pytest.mark.parametrize("follow", [torch.relu, lambda h: torch.cumsum(h, 1)], ids=["relu", "cumsum"])
def test_a_parameter_read_as_an_attribute_is_used(follow):
    spec = infer_permutation_spec(Functional(follow), torch.randn(1, 4))
    # permuted after a ReLU; fixed after cumsum, for that reason alone: w is used by the forward pass
    assert list(spec.groups) == (["w"] if follow is torch.relu else [])
    assert not any("not used" in r for r in spec.reasons), spec.reasons


class TwoConflicts(nn.Module):
    """Two independent copies of :class:`TwoViewsOfOneAxis`: the second conflict must be found as well."""

    def __init__(self):
        super().__init__()
        self.one, self.two = TwoViewsOfOneAxis(), TwoViewsOfOneAxis()

    def forward(self, x, z):
        return self.one(x, z) + self.two(x, z)


def test_every_conflict_is_found_not_only_the_first():
    spec = infer_permutation_spec(TwoConflicts(), (torch.randn(1, 1, 2, 2), torch.randn(1, 3)))
    assert list(spec.groups) == []
    for net in ("one", "two"):
        for layer in ("c", "a"):
            assert any(r.startswith(f"group '{net}.{layer}'") and f"conflicting permutations of '{net}.fc.weight'" in r
                       for r in spec.reasons), (net, layer, spec.reasons)


class ConflictChain(nn.Module):
    """a's 8 units meet c1's map (2 channels x 4) on fc1's input and c2's map (4 channels x 2) on fc2's."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.a, self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x1, x2, z):
        a = torch.relu(self.a(z))
        m1, m2 = torch.flatten(torch.relu(self.c1(x1)), 1), torch.flatten(torch.relu(self.c2(x2)), 1)
        return self.fc1(m1) + self.fc1(a) + self.fc2(m2) + self.fc2(a)


def test_a_dropped_class_still_holds_its_slice_against_every_other():
    torch.manual_seed(0)
    model, inputs = ConflictChain(), (torch.randn(4, 1, 2, 2), torch.randn(4, 1, 1, 2), torch.randn(4, 3))
    spec = infer_permutation_spec(model, tuple(t[:1] for t in inputs))
    # a conflicts with both maps. Once a is dropped its units stay in place, and fc1 and fc2 still read them:
    # permuting either map's columns of those weights would change fc(a). So all three are left fixed.
    assert list(spec.groups) == []
    for layer, weight in (("c1", "fc1"), ("a", "fc1"), ("c2", "fc2")):
        assert any(r.startswith(f"group '{layer}'") and f"conflicting permutations of '{weight}.weight'" in r
                   for r in spec.reasons), (layer, spec.reasons)


class SlicedAndFlattened(nn.Module):
    """Like :class:`TwoViewsOfOneAxis`, but a's units are also sliced, so a is dropped before the conflicts."""

    def __init__(self):
        super().__init__()
        self.c, self.a, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(3, 8), nn.Linear(8, 3)

    def forward(self, x, z):
        a = torch.relu(self.a(z))
        return self.fc(torch.flatten(torch.relu(self.c(x)), 1)) + self.fc(a) + a[:, :3]


def test_a_class_dropped_for_another_reason_pins_its_slice():
    torch.manual_seed(0)
    model, inputs = SlicedAndFlattened(), (torch.randn(4, 1, 2, 2), torch.randn(4, 3))
    spec = infer_permutation_spec(model, tuple(t[:1] for t in inputs))
    # c's map shares fc's columns with a's unpermuted units: permuting c would change fc(a) (it did)
    assert list(spec.groups) == [] and {"c.weight", "c.bias"} <= set(spec.fixed)
    assert ("group 'c' (2 units, opened by c) left unpermuted: conflicting permutations of 'fc.weight' axis 1"
            in spec.reasons)
    permuted = apply_permutation(model, spec, spec.random_permutation(1))
    with torch.no_grad():
        torch.testing.assert_close(permuted(*inputs), model(*inputs))


class UnusedAfterBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.h = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.h(torch.relu(self.bn(self.a(x))))


def test_every_unused_entry_is_explained_after_a_never_permuted_one():
    spec = infer_permutation_spec(UnusedAfterBatchNorm(), torch.randn(2, 4))
    # bn.num_batches_tracked is fixed without a reason (never permuted); the unused layer after it is explained
    assert {"bn.num_batches_tracked", "unused.weight", "unused.bias"} <= set(spec.fixed)
    assert [r for r in spec.reasons if "not used" in r] == [
        "'unused.weight' is not used by the traced forward pass; left unpermuted",
        "'unused.bias' is not used by the traced forward pass; left unpermuted"]


class CatBehindOthers(nn.Module):
    """relu(cat([input, a, b])): b's units sit after the unpermuted input and after a, which is dropped."""

    def __init__(self):
        super().__init__()
        self.fa, self.fb, self.fc = nn.Linear(4, 6), nn.Linear(4, 5), nn.Linear(15, 3)

    def forward(self, x):
        a, b = self.fa(x), self.fb(x)
        return self.fc(torch.relu(torch.cat([x, a, b], 1))) + a[:, :3]


def test_units_after_unpermuted_and_dropped_segments_are_observed_at_their_offset():
    torch.manual_seed(0)
    model, x = CatBehindOthers(), torch.randn(4, 4)
    spec = infer_permutation_spec(model, x[:1])
    assert list(spec.groups) == ["fb"] and spec.groups["fb"].observe == [ObservePoint("relu", 1, 10, 1, 1)]
    _same_function(model, spec, x)


class OneClassTwoViews(nn.Module):
    """a and c's channels are one class (added); fc reads them as cat([a, a]) and as c's flattened map."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.fc = nn.Linear(3, 4), nn.Conv1d(1, 4, 3, padding=1), nn.Linear(8, 2)

    def forward(self, z, x):
        a = torch.relu(self.a(z))
        m = torch.relu(self.c(x) + a[:, :, None])
        return self.fc(torch.cat([a, a], 1)) + self.fc(torch.flatten(m, 1))


def test_one_class_seen_two_ways_on_one_slice_is_dropped():
    spec = infer_permutation_spec(OneClassTwoViews(), (torch.randn(1, 3), torch.randn(1, 1, 2)))
    assert list(spec.groups) == []
    assert ("group 'a' (4 units, opened by a, c) left unpermuted: conflicting permutations of 'fc.weight' axis 1"
            in spec.reasons)


class CatTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Linear(3, 4), nn.Linear(8, 2)

    def forward(self, z):
        a = torch.relu(self.a(z))
        return self.fc(torch.cat([a, a], 1))


def test_one_class_on_two_touching_slices_is_permuted_in_both():
    torch.manual_seed(0)
    model, z = CatTwice(), torch.randn(4, 3)
    spec = infer_permutation_spec(model, z[:1])
    assert list(spec.groups) == ["a"]
    assert {(a.name, a.offset) for a in spec.groups["a"].axes} >= {("fc.weight", 0), ("fc.weight", 4)}
    _same_function(model, spec, z)
