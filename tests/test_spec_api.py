"""PermutationSpec's public constructors and checks, from mutation run 9 (tests/MUTATION.md): which refs of one
axis may both be permuted (against a brute-force check that their permutations commute), ``from_axes``
with tuples, offsets and observe points, and ``check_permutation``."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from modeconn.alignment import AxisRef, PermutationGroup, PermutationSpec
from modeconn.alignment.spec import ObservePoint, compatible_refs


def _position_map(ref, size, perm, length):
    """Where each entry of an axis of ``length`` goes when ``perm`` permutes ``ref``'s ``size`` units."""
    idx = torch.arange(length)
    span = ref.span(size)
    block = idx[ref.offset:ref.offset + span].view(ref.outer, size, ref.inner)
    idx[ref.offset:ref.offset + span] = block[:, perm].reshape(-1)
    return idx


def _commute(a, na, b, nb, length, draws=6):
    gen = torch.Generator().manual_seed(0)
    for _ in range(draws):
        pa, pb = _position_map(a, na, torch.randperm(na, generator=gen), length), \
            _position_map(b, nb, torch.randperm(nb, generator=gen), length)
        if not torch.equal(pa[pb], pb[pa]):
            return False
    return True


def _refs(length):
    """Every (ref, size) of an axis of ``length`` with at least 3 units (permutations of 2 always commute)."""
    out = []
    for offset in (0, length // 2):
        rest = length - offset
        for outer, size in itertools.product(range(1, rest + 1), range(3, rest + 1)):
            if rest % (outer * size) == 0:
                out.append((AxisRef("w", 0, offset, rest // (outer * size), outer), size))
    return out


def test_compatible_refs_on_one_slice_are_those_whose_permutations_commute():
    length, pairs = 24, 0
    refs = _refs(length)
    for (a, na), (b, nb) in itertools.product(refs, refs):
        if (a, na) == (b, nb):
            continue
        sa, sb = (a.offset, a.offset + a.span(na)), (b.offset, b.offset + b.span(nb))
        if sa == sb or sa[1] <= sb[0] or sb[1] <= sa[0]:
            assert compatible_refs(a, na, b, nb) == _commute(a, na, b, nb, length), (a, na, b, nb)
            pairs += 1
        else:  # slices that partly overlap are refused without looking further (the documented rule)
            assert not compatible_refs(a, na, b, nb)
    assert pairs > 100


def test_heads_and_dims_of_one_projection_are_compatible_in_either_order():
    heads, dims = AxisRef("q.weight", 0, 0, 4), AxisRef("q.weight", 0, 0, 1, 2)   # 2 heads of 4 dims
    assert compatible_refs(heads, 2, dims, 4) and compatible_refs(dims, 4, heads, 2)
    assert not compatible_refs(AxisRef("q.weight", 0, 0, 2), 4, AxisRef("q.weight", 0, 0, 2, 2), 2)


# ----------------------------------------------------------------------------- from_axes
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(4, 6)
        self.big = nn.Linear(14, 2)   # reads cat([a, b]): a's 8 units, then b's 6 at offset 8

    def forward(self, x):
        return self.big(torch.cat([self.a(x), self.b(x[:, :1].expand(-1, 4))], 1))


def test_from_axes_sizes_groups_from_their_first_ref_and_keeps_observe_and_reasons():
    spec = PermutationSpec.from_axes(
        {"a": [("a.weight", 0), ["a.bias", 0], ("big.weight", 1, 0, 1)],
         "b": [("big.weight", 1, 8), ("b.weight", 0), AxisRef("b.bias", 0)]},
        Net(), observe={"a": [("relu",), ("cat", 1, 0, 1, 1)], "b": [("cat", 1, 8)]}, reasons=["by hand"])
    assert {k: g.size for k, g in spec.groups.items()} == {"a": 8, "b": 6}   # b: (14 - 8) // 1 from its offset ref
    assert spec.groups["a"].axes[2] == AxisRef("big.weight", 1, 0, 1, 1)
    assert spec.groups["a"].observe == [ObservePoint("relu"), ObservePoint("cat", 1, 0, 1, 1)]
    assert spec.groups["b"].observe == [ObservePoint("cat", 1, 8, 1, 1)]
    assert spec.reasons == ["by hand"] and spec.fixed == ["big.bias"]


def test_from_axes_takes_a_five_field_observe_point():
    spec = PermutationSpec.from_axes({"a": [("a.weight", 0)]}, {"a.weight": torch.zeros(8, 3)},
                                     observe={"a": [("x", 1, 0, 2, 3)]})
    assert spec.groups["a"].observe == [ObservePoint("x", 1, 0, 2, 3)]


def test_from_axes_needs_the_full_axis_first():
    with pytest.raises(ValueError):   # sized from the slice (6 units), a's 8 rows do not fit
        PermutationSpec.from_axes({"a": [("big.weight", 1, 8), ("a.weight", 0)]}, Net())


@pytest.mark.parametrize("entry", ["a.weight", ("a.weight",), ("a.weight", 0, 0, 1, 1, 1), (0, 0)])
def test_a_malformed_axis_entry_is_refused(entry):
    with pytest.raises(ValueError, match="must be \\(name, axis\\)"):
        PermutationSpec.from_axes({"a": [entry]}, Net())


@pytest.mark.parametrize("entry", [5, (), ("x", 1, 0, 1, 1, 1), (1, 2)])
def test_a_malformed_observe_entry_is_refused(entry):
    with pytest.raises(ValueError, match="must be a node name"):
        PermutationSpec.from_axes({"a": [("a.weight", 0)]}, Net(), observe={"a": [entry]})


def test_from_axes_refuses_an_axis_past_the_last():
    with pytest.raises(ValueError, match="axis 2 is out of range for 'a.weight' with shape \\(8, 3\\)"):
        PermutationSpec.from_axes({"a": [("a.weight", 2)]}, Net())


# ----------------------------------------------------------------------- permutations
def _spec():
    return PermutationSpec.from_axes({"a": [("a.weight", 0), ("a.bias", 0), ("big.weight", 1)]},
                                     {"a.weight": torch.zeros(5, 3), "a.bias": torch.zeros(5),
                                      "big.weight": torch.zeros(2, 5)})


def test_check_permutation_refuses_bool_and_float_and_returns_long():
    spec = _spec()
    for bad in (torch.tensor([True, False, True, False, True]), torch.tensor([0., 1, 2, 3, 4])):
        with pytest.raises(ValueError, match="must be integer"):
            spec.check_permutation({"a": bad})
    out = spec.check_permutation({"a": torch.tensor([4, 3, 2, 1, 0], dtype=torch.int32)})
    assert out["a"].dtype == torch.long and out["a"].tolist() == [4, 3, 2, 1, 0]


def test_random_permutation_defaults_to_seed_0():
    spec = _spec()
    expected = torch.randperm(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(spec.random_permutation()["a"], expected)


def test_summary_lists_groups_and_reasons():
    spec = PermutationSpec.from_axes({"a": [("a.weight", 0), ("a.bias", 0)]}, Net(),
                                     observe={"a": ["relu", ("relu", 1)]}, reasons=["b: by hand"])
    assert spec.summary() == ("PermutationSpec: 1 groups, 4 fixed entries\n"
                              "  a: 8 units, 2 axes, observed at 2 points\n"
                              "  fixed: b: by hand")


# ----------------------------------------------------------------------- bad input
SD = {"a.weight": torch.zeros(8, 3), "a.bias": torch.zeros(8), "b.weight": torch.zeros(2, 8)}


@pytest.mark.parametrize("size", [0, -1, 2.0, True, "8"])
def test_a_group_size_must_be_a_positive_int(size):
    with pytest.raises(ValueError, match="group size must be a positive int"):
        PermutationGroup(size, [("a.weight", 0)])


@pytest.mark.parametrize("name", ["", 3])
def test_group_names_must_be_non_empty_strings(name):
    with pytest.raises(ValueError, match="group names must be non-empty strings"):
        PermutationSpec({name: PermutationGroup(8, [("a.weight", 0)])})


def test_groups_may_be_given_as_tuples_of_two_or_three():
    spec = PermutationSpec({"a": (8, [("a.weight", 0)]), "b": (8, [("a.bias", 0)], ["relu"])})
    assert spec.groups["a"] == PermutationGroup(8, [AxisRef("a.weight", 0)])
    assert spec.groups["b"].observe == [ObservePoint("relu")]
    for bad in ((8,), (8, [("a.weight", 0)], [], "extra"), "8"):
        with pytest.raises(ValueError, match="must be a PermutationGroup or"):
            PermutationSpec({"a": bad})


def test_a_five_field_axis_entry_is_an_axis_ref():
    group = PermutationGroup(4, [("a.weight", 0, 0, 1, 2)])
    assert group.axes == [AxisRef("a.weight", 0, 0, 1, 2)]
    with pytest.raises(ValueError, match="must be \\(name, axis\\)"):
        PermutationGroup(4, [("a.weight", 0, 0, 1, 2, 1)])


@pytest.mark.parametrize("bad", [{"a.weight": [1.0]}, {3: torch.zeros(1)}])
def test_a_state_dict_must_map_strings_to_tensors(bad):
    with pytest.raises(ValueError, match="must map a str to a torch.Tensor"):
        PermutationSpec({"a": (8, [("a.weight", 0)])}).validate(bad)


@pytest.mark.parametrize("ref", [AxisRef("a.weight", 0, -1), AxisRef("a.weight", 0, 0, 0), AxisRef("a.weight", 0, 0, 1, 0)])
def test_validate_refuses_negative_offsets_and_empty_blocks(ref):
    with pytest.raises(ValueError, match="has invalid offset"):
        PermutationSpec({"a": (8, [AxisRef("a.weight", 0), ref])}).validate(SD)


def test_validate_refuses_a_slice_past_the_end_of_the_axis():
    with pytest.raises(ValueError, match="a.bias"):
        PermutationSpec({"a": (8, [AxisRef("a.weight", 0), AxisRef("a.bias", 0, 4)])}).validate(SD)


def test_a_group_without_a_full_axis_names_its_first_axis():
    with pytest.raises(ValueError, match="has size 4 but none of its axes has that length "
                                         "\\(e.g. 'a.weight' has shape \\(8, 3\\), length 8 on axis 0\\)"):
        PermutationSpec({"a": (4, [AxisRef("a.weight", 0), AxisRef("b.weight", 1)])}).validate(SD)
