"""Spec inference through the layout rules (mutation run 10, layout_rules.py): layer scales reshaped from a
1-D parameter, GhostNet's blockwise sum, grouped and depthwise convolutions, a token MLP over another
dimension, concatenations along and across the channels. Each model's groups, parameters, reasons and
observe points are the ones a reader derives from the architecture, and three random permutations leave
the function unchanged."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from modeconn.alignment import apply_permutation, infer_permutation_spec
from modeconn.alignment.spec import AxisRef, ObservePoint
from tests.test_module_rules import _axes, _randomize, _same_function

pytestmark = pytest.mark.usefixtures("one_thread")


def _spec(model, x):
    return infer_permutation_spec(_randomize(model), x[:1])


def _refs(spec, group):
    return set(spec.groups[group].axes)


def _observed(spec):
    return {k: g.observe for k, g in spec.groups.items()}


# ------------------------------------------------------------------------ layer scale (join_reshaped_parameter)
class LayerScale(nn.Module):
    """conv(1 -> 6) -> ``h * gamma`` reshaped to [1, 6, 1, 1] (ConvNeXt/PoolFormer) -> relu -> conv(6 -> 4) -> fc."""

    def __init__(self, how):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1), nn.Linear(4, 3)
        self.gamma, self.how = nn.Parameter(torch.randn(6)), how

    def forward(self, x):
        if self.how == "view":
            g = self.gamma.view(1, -1, 1, 1)
        elif self.how == "reshape":
            g = self.gamma.reshape(6, 1, 1)
        else:
            g = torch.reshape(self.gamma, (1, 6, 1, 1))
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x) * g))).mean((2, 3)))


@pytest.mark.parametrize("how", ["view", "reshape", "torch.reshape"])
def test_a_layer_scale_reshaped_from_one_value_per_channel_moves_with_the_channels(how):
    model, x = LayerScale(how), torch.randn(3, 1, 5, 5)
    spec = _spec(model, x)
    assert list(spec.groups) == ["c1", "c2"]
    assert _axes(spec, "c1") == {("c1.weight", 0), ("c1.bias", 0), ("gamma", 0), ("c2.weight", 1)}
    assert set(spec.fixed) == {"fc.bias"}
    _same_function(model, spec, x)


class ScaleNotReshaped(nn.Module):
    """A Linear's units times a per-unit vector that is *not* a plain reshape of the parameter (``what``)."""

    def __init__(self, what):
        super().__init__()
        self.a, self.b, self.what = nn.Linear(4, 6), nn.Linear(6, 3), what
        self.gamma = nn.Parameter(torch.randn(6))
        self.mat = nn.Parameter(torch.randn(6, 2))

    def forward(self, x):                                   # x: [B, 2, 4]
        h = self.a(x)                                       # [B, 2, 6]: a's units last
        if self.what == "cumsum":
            s = torch.cumsum(self.gamma, 0)                 # entry c mixes gamma[:c + 1]
        elif self.what == "matrix":
            s = self.mat.view(2, 6)                         # entry [i, c] is mat.flatten()[6i + c]
        else:
            s = self.gamma.view(1, 6)
            h = h + self.gamma[:3].sum()                    # gamma is read a second time, by position
        return self.b(torch.relu(h * s))


@pytest.mark.parametrize("what,shape", [("cumsum", (6,)), ("matrix", (2, 6)), ("twice", (1, 6))])
def test_a_per_unit_vector_that_is_not_a_reshaped_parameter_leaves_the_units_fixed(what, shape):
    model, x = ScaleNotReshaped(what), torch.randn(3, 2, 4)
    spec = _spec(model, x)
    assert list(spec.groups) == []
    node = {"cumsum": "cumsum", "matrix": "view", "twice": "view"}[what]
    assert spec.reasons[0] == (
        f"group 'a' (6 units, opened by a) left unpermuted: elementwise op with the unpermuted tensor '{node}' "
        f"(shape {shape}) varying along the permuted dimension at node 'mul' (function mul)")
    _same_function(model, spec, x)


class ScaleFromInput(nn.Module):
    """The scale is a forward argument named like a parameter of the model: the argument, not the parameter."""

    def __init__(self):
        super().__init__()
        self.c1, self.fc = nn.Conv2d(1, 6, 3, padding=1), nn.Linear(6, 3)
        self.g = nn.Parameter(torch.randn(6))

    def forward(self, x, g):
        return self.fc(torch.relu(self.c1(x) * g.view(1, -1, 1, 1)).mean((2, 3))) + self.g.sum()


def test_a_forward_argument_named_like_a_parameter_is_not_that_parameter():
    model = _randomize(ScaleFromInput())
    x, g = torch.randn(3, 1, 5, 5), torch.randn(6)
    spec = infer_permutation_spec(model, (x[:1], g))
    assert list(spec.groups) == [] and "g" in spec.fixed
    assert spec.reasons[0].startswith("group 'c1' (6 units, opened by c1) left unpermuted: elementwise op with the "
                                      "unpermuted tensor 'view' (shape (1, 6, 1, 1))")
    for seed in (1, 2, 3):
        permuted = apply_permutation(model, spec, spec.random_permutation(seed)).eval()
        with torch.no_grad():
            torch.testing.assert_close(permuted(x, g), model.eval()(x, g), rtol=1e-5, atol=1e-5)


class OneUnitTimesScale(nn.Module):
    """A layer of one unit, broadcast against a scale of 6 values: its unit meets 6 different entries."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.gamma = nn.Linear(4, 1), nn.Linear(6, 3), nn.Parameter(torch.randn(6))

    def forward(self, x):
        return self.b(torch.relu(self.a(x) * self.gamma.view(1, 6)))


def test_a_scale_longer_than_the_units_it_meets_is_refused_by_name():
    model, x = OneUnitTimesScale(), torch.randn(3, 4)
    spec = _spec(model, x)
    assert list(spec.groups) == [] and "gamma" in spec.fixed
    assert spec.reasons[0] == (
        "group 'a' (1 units, opened by a) left unpermuted: elementwise op with the unpermuted tensor 'view' "
        "(shape (1, 6)) varying along the permuted dimension at node 'mul' (function mul)")


# ------------------------------------------------------------------------------ blockwise sums (GhostNet)
class Ghost(nn.Module):
    """GhostNet's block: ``cat([h, dw(h)])`` (h's 4 units twice) plus a shortcut conv of 8 units.

    Unit ``j*4 + i`` of the shortcut meets unit ``i`` of h in both halves: the shortcut's permutation must be
    the same in its 2 blocks of 4, and equal to h's."""

    def __init__(self):
        super().__init__()
        self.c1, self.dw = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.sc, self.c2, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 3, 1), nn.Linear(3, 2)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        g = torch.cat([h, self.dw(h)], 1)
        return self.fc(self.c2(torch.relu(g + self.sc(x))).mean((2, 3)))


def test_a_sum_with_a_concatenation_of_one_group_restricts_the_other_side_to_blocks():
    model, x = Ghost(), torch.randn(3, 1, 5, 5)
    spec = _spec(model, x)
    assert {k: g.size for k, g in spec.groups.items()} == {"c1": 4, "c2": 3}
    assert _refs(spec, "c1") == {
        AxisRef("c1.weight", 0), AxisRef("c1.bias", 0), AxisRef("dw.weight", 0), AxisRef("dw.bias", 0),
        AxisRef("sc.weight", 0, 0, 1, 2), AxisRef("sc.bias", 0, 0, 1, 2),      # 2 blocks of 4, permuted alike
        AxisRef("c2.weight", 1, 0), AxisRef("c2.weight", 1, 4)}
    # after the sum, h's units are seen in both halves of the channels
    assert spec.groups["c1"].observe == [ObservePoint("relu", 1, 0, 1, 1), ObservePoint("relu_1", 1, 0, 1, 1),
                                         ObservePoint("relu_1", 1, 4, 1, 1)]
    assert set(spec.fixed) == {"fc.bias"}
    _same_function(model, spec, x)


class GhostReadInThirds(Ghost):
    """As Ghost (6 units, a shortcut of 12), but the shortcut is also read by a conv of 3 groups first."""

    def __init__(self):
        super().__init__()
        self.c1, self.dw = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.sc, self.g3, self.c2 = nn.Conv2d(1, 12, 3, padding=1), nn.Conv2d(12, 12, 1, groups=3), nn.Conv2d(12, 3, 1)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        s = self.sc(x)
        side = torch.relu(self.g3(s)).mean((1, 2, 3))
        return self.fc(self.c2(torch.relu(torch.cat([h, self.dw(h)], 1) + s)).mean((2, 3))) + side[:, None]


def test_a_shortcut_already_read_in_3_blocks_cannot_also_be_2_blocks():
    model, x = GhostReadInThirds(), torch.randn(3, 1, 5, 5)
    spec = _spec(model, x)
    assert {k: g.size for k, g in spec.groups.items()} == {"g3": 4, "c2": 3}
    assert {"c1.weight", "sc.weight", "dw.weight"} <= set(spec.fixed)
    why = "elementwise op combining tensors with different channel layouts at node 'add' (function add)"
    assert f"group 'c1' (6 units, opened by c1) left unpermuted: {why}" in spec.reasons
    assert f"group 'sc' (12 units, opened by sc) left unpermuted: {why}" in spec.reasons
    _same_function(model, spec, x)


class DifferentSingleSegments(nn.Module):
    """A Linear's 8 units plus a conv's 4 channels flattened (2 positions each): both one segment, not alike."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.fc = nn.Linear(2, 8), nn.Conv1d(1, 4, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x):                                  # x: [B, 1, 2]
        return self.fc(torch.relu(self.a(x[:, 0]) + torch.flatten(self.c(x), 1)))


def test_a_sum_of_differently_laid_out_units_leaves_both_fixed():
    model, x = DifferentSingleSegments(), torch.randn(3, 1, 2)
    spec = _spec(model, x)
    assert list(spec.groups) == []
    why = "elementwise op combining tensors with different channel layouts at node 'add' (function add)"
    assert spec.reasons[:2] == [f"group 'a' (8 units, opened by a) left unpermuted: {why}",
                                f"group 'c' (4 units, opened by c) left unpermuted: {why}"]


# ------------------------------------------------------------------------- grouped and depthwise convolutions
class Chain(nn.Module):
    """c1(1 -> 4) -> relu -> ``mid`` -> relu -> mean -> fc; ``mid`` is a grouped or depthwise conv."""

    def __init__(self, mid, out):
        super().__init__()
        self.c1, self.mid, self.fc = nn.Conv2d(1, 4, 3, padding=1), mid, nn.Linear(out, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.mid(torch.relu(self.c1(x)))).mean((2, 3)))


def test_a_transposed_grouped_convolution_leaves_its_input_and_output_fixed():
    model, x = Chain(nn.ConvTranspose2d(4, 6, 2, groups=2), 6), torch.randn(3, 1, 3, 3)
    spec = _spec(model, x)
    assert list(spec.groups) == [] and {"c1.weight", "c1.bias", "mid.weight", "mid.bias"} <= set(spec.fixed)
    assert spec.reasons[0] == (
        "group 'c1' (4 units, opened by c1) left unpermuted: transposed grouped convolution or over a permuted "
        "spatial dimension at node 'mid' (ConvTranspose2d 'mid')")


class UnitsAlongTheLength(nn.Module):
    """a's units on the last dim of [B, 2, 6], which a grouped Conv1d slides over (its length, not channels)."""

    def __init__(self):
        super().__init__()
        self.a, self.g, self.fc = nn.Linear(4, 6), nn.Conv1d(2, 4, 3, padding=1, groups=2), nn.Linear(4, 3)

    def forward(self, x):                                     # x: [B, 2, 4]
        return self.fc(torch.relu(self.g(torch.relu(self.a(x)))).mean(2))


def test_a_grouped_convolution_sliding_over_the_units_leaves_them_fixed():
    model, x = UnitsAlongTheLength(), torch.randn(3, 2, 4)
    spec = _spec(model, x)
    assert list(spec.groups) == [] and {"a.weight", "a.bias", "g.weight", "g.bias"} <= set(spec.fixed)
    assert spec.reasons[0] == (
        "group 'a' (6 units, opened by a) left unpermuted: transposed grouped convolution or over a permuted "
        "spatial dimension at node 'g' (Conv1d 'g')")
    _same_function(model, spec, x)


def test_a_depthwise_convolution_on_the_input_permutes_its_filters_alike_per_channel():
    # input channel k feeds outputs 2k and 2k+1: both input channels' pairs of filters swap the same way
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 3))
    x = torch.randn(3, 2, 3, 3)
    spec = _spec(model, x)
    assert {k: g.size for k, g in spec.groups.items()} == {"0": 2}
    assert _refs(spec, "0") == {AxisRef("0.weight", 0, 0, 1, 2), AxisRef("0.bias", 0, 0, 1, 2),
                                AxisRef("3.weight", 1, 0, 9), AxisRef("3.weight", 1, 18, 9)}
    _same_function(model, spec, x)


def test_a_depthwise_convolution_passes_the_channels_through_and_is_per_channel():
    model, x = Chain(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), 4), torch.randn(3, 1, 5, 5)
    spec = _spec(model, x)
    assert list(spec.groups) == ["c1"] and spec.groups["c1"].size == 4
    assert _axes(spec, "c1") == {("c1.weight", 0), ("c1.bias", 0), ("mid.weight", 0), ("fc.weight", 1)}
    # relu -> depthwise -> relu: the units are read after the second relu only
    assert spec.groups["c1"].observe == [ObservePoint("relu_1", 1, 0, 1, 1)]
    _same_function(model, spec, x)


def test_a_depthwise_convolution_with_2_filters_per_channel_gives_units_of_2_channels():
    model, x = Chain(nn.Conv2d(4, 8, 3, padding=1, groups=4), 8), torch.randn(3, 1, 5, 5)
    spec = _spec(model, x)
    assert list(spec.groups) == ["c1"] and spec.groups["c1"].size == 4
    assert _refs(spec, "c1") == {AxisRef("c1.weight", 0), AxisRef("c1.bias", 0), AxisRef("mid.weight", 0, 0, 2),
                                 AxisRef("mid.bias", 0, 0, 2), AxisRef("fc.weight", 1, 0, 2)}
    # the depthwise conv is no longer per channel: the first relu is read too
    assert spec.groups["c1"].observe == [ObservePoint("relu", 1, 0, 1, 1), ObservePoint("relu_1", 1, 0, 2, 1)]
    _same_function(model, spec, x)


class DepthwiseRaw(nn.Module):
    """h = relu(c1(x)); out = c2(dw(h)) + c3(h): the depthwise output is a raw conv output, not an activation."""

    def __init__(self):
        super().__init__()
        self.c1, self.dw = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.c2, self.c3, self.fc = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 3, 1), nn.Linear(3, 2)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        return self.fc(torch.relu(self.c2(self.dw(h)) + self.c3(h)).mean((2, 3)))


def test_a_depthwise_output_is_not_an_activation_reading():
    model, x = DepthwiseRaw(), torch.randn(3, 1, 5, 5)
    spec = _spec(model, x)
    assert list(spec.groups) == ["c1", "c2"]
    assert spec.groups["c1"].observe == [ObservePoint("relu", 1, 0, 1, 1)]
    _same_function(model, spec, x)


def test_a_grouped_convolution_without_bias_opens_a_group_per_block():
    model, x = Chain(nn.Conv2d(4, 4, 1, groups=2, bias=False), 4), torch.randn(3, 1, 5, 5)
    spec = _spec(model, x)
    assert {k: g.size for k, g in spec.groups.items()} == {"c1": 2, "mid": 2}
    assert _refs(spec, "c1") == {AxisRef("c1.weight", 0, 0, 1, 2), AxisRef("c1.bias", 0, 0, 1, 2),
                                 AxisRef("mid.weight", 1)}
    # the output is laid out as 2 blocks of mid's 2 units: fc reads each block
    assert _refs(spec, "mid") == {AxisRef("mid.weight", 0, 0, 1, 2), AxisRef("fc.weight", 1, 0),
                                  AxisRef("fc.weight", 1, 2)}
    _same_function(model, spec, x)


def test_a_grouped_convolution_of_one_output_per_block_opens_no_group():
    model, x = Chain(nn.Conv2d(4, 2, 1, groups=2), 2), torch.randn(3, 1, 5, 5)
    spec = _spec(model, x)
    assert {k: g.size for k, g in spec.groups.items()} == {"c1": 2}
    assert _refs(spec, "c1") == {AxisRef("c1.weight", 0, 0, 1, 2), AxisRef("c1.bias", 0, 0, 1, 2),
                                 AxisRef("mid.weight", 1)}
    assert set(spec.fixed) == {"mid.bias", "fc.weight", "fc.bias"}
    _same_function(model, spec, x)


class TwoGroupsIntoGrouped(nn.Module):
    """cat([a, b]) -> conv of ``groups`` groups: the input is two groups, not one read in blocks."""

    def __init__(self, groups=2):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)
        self.g, self.fc = nn.Conv2d(4, 4, 1, groups=groups), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(torch.cat([self.a(x), self.b(x)], 1))
        return self.fc(torch.relu(self.g(h)).mean((2, 3)))


def test_a_grouped_convolution_of_two_concatenated_groups_leaves_them_fixed():
    model, x = TwoGroupsIntoGrouped(), torch.randn(3, 1, 5, 5)
    spec = _spec(model, x)
    assert {k: g.size for k, g in spec.groups.items()} == {"g": 2}
    why = "grouped convolution (groups=2) mixes channels within blocks at node 'g' (Conv2d 'g')"
    assert spec.reasons[:2] == [f"group 'a' (2 units, opened by a) left unpermuted: {why}",
                                f"group 'b' (2 units, opened by b) left unpermuted: {why}"]
    _same_function(model, spec, x)


class ReadInHalvesAndThirds(nn.Module):
    """c1's 12 channels read by a conv of 2 groups, then by one of 3 groups."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 12, 3, padding=1)
        self.g2, self.g3 = nn.Conv2d(12, 6, 1, groups=2), nn.Conv2d(12, 6, 1, groups=3)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        return self.fc(torch.cat([torch.relu(self.g2(h)), torch.relu(self.g3(h))], 1).mean((2, 3)))


def test_units_read_in_2_blocks_then_in_3_are_left_fixed():
    model, x = ReadInHalvesAndThirds(), torch.randn(3, 1, 5, 5)
    spec = _spec(model, x)
    assert {k: g.size for k, g in spec.groups.items()} == {"g2": 3, "g3": 2}
    assert spec.reasons[0] == ("group 'c1' (12 units, opened by c1) left unpermuted: grouped convolution (groups=3) "
                               "mixes channels within blocks at node 'g3' (Conv2d 'g3')")
    _same_function(model, spec, x)


class PairsIntoGrouped(nn.Module):
    """c1's 4 units, 2 channels each after a depthwise conv, read by a conv of 2 groups."""

    def __init__(self):
        super().__init__()
        self.c1, self.dw = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.g, self.fc = nn.Conv2d(8, 4, 1, groups=2), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.g(torch.relu(self.dw(torch.relu(self.c1(x)))))).mean((2, 3)))


def test_units_of_several_channels_read_in_blocks_are_left_fixed():
    model, x = PairsIntoGrouped(), torch.randn(3, 1, 5, 5)
    spec = _spec(model, x)
    assert {k: g.size for k, g in spec.groups.items()} == {"g": 2}
    assert spec.reasons[0] == ("group 'c1' (4 units, opened by c1) left unpermuted: grouped convolution (groups=2) "
                               "mixes channels within blocks at node 'g' (Conv2d 'g')")
    _same_function(model, spec, x)


# ----------------------------------------------------------------------- a Linear over another dim (MLP-Mixer)
class TokenMLP(nn.Module):
    """a's units on the last dim of [B, 3, 6]; a token Linear (3 -> 5) over the other dim; b reads the units."""

    def __init__(self):
        super().__init__()
        self.a, self.tok, self.b, self.fc = nn.Linear(4, 6), nn.Linear(3, 5), nn.Linear(6, 2), nn.Linear(2, 3)

    def forward(self, x):                                   # x: [B, 3, 4]
        h = torch.relu(self.a(x)).transpose(1, 2)           # [B, 6, 3]
        return self.fc(torch.relu(self.b(self.tok(h).transpose(1, 2))).mean(1))


def test_a_linear_over_another_dimension_passes_the_units_through_unobserved():
    model, x = TokenMLP(), torch.randn(3, 3, 4)
    spec = _spec(model, x)
    assert list(spec.groups) == ["a", "b"]
    assert _axes(spec, "a") == {("a.weight", 0), ("a.bias", 0), ("b.weight", 1)}
    assert {"tok.weight", "tok.bias"} <= set(spec.fixed)
    # the token Linear's raw output is not an activation: a is read at its relu
    assert spec.groups["a"].observe == [ObservePoint("relu", 2, 0, 1, 1)]
    assert ("node 'tok' (Linear 'tok'): applied over a dimension other than the permuted units, which pass "
            "through; its own output units are left unpermuted") in spec.reasons
    _same_function(model, spec, x)


# ------------------------------------------------------------------------------------------ concatenation
class CatActivations(nn.Module):
    """cat([relu(a), relu(b)]) along the channels, max-pooled, then a conv: the pooled map is an activation."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 3, 3, padding=1)
        self.c, self.fc = nn.Conv2d(5, 4, 1), nn.Linear(4, 3)

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1), 2)
        return self.fc(self.c(h).mean((2, 3)))


def test_a_concatenation_of_activations_is_an_activation():
    model, x = CatActivations(), torch.randn(3, 1, 4, 4)
    spec = _spec(model, x)
    assert list(spec.groups) == ["a", "b", "c"]
    assert _refs(spec, "b") == {AxisRef("b.weight", 0), AxisRef("b.bias", 0), AxisRef("c.weight", 1, 2)}
    assert _observed(spec)["a"] == [ObservePoint("relu", 1, 0, 1, 1), ObservePoint("max_pool2d", 1, 0, 1, 1)]
    assert _observed(spec)["b"] == [ObservePoint("relu_1", 1, 0, 1, 1), ObservePoint("max_pool2d", 1, 2, 1, 1)]
    _same_function(model, spec, x)


class StackTokens(nn.Module):
    """relu(fa(x)) and relu(fb(x)) as two tokens of [B, 2, 6] (a cat along a new dim), then fc on the units."""

    def __init__(self, keyword=False):
        super().__init__()
        self.fa, self.fb, self.fc, self.keyword = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3), keyword

    def forward(self, x):
        parts = [torch.relu(self.fa(x))[:, None], torch.relu(self.fb(x))[:, None]]
        h = torch.cat(tensors=parts, dim=1) if self.keyword else torch.cat(parts, 1)
        return self.fc(h).mean(1)


@pytest.mark.parametrize("keyword", [False, True])
def test_units_concatenated_along_another_dimension_merge(keyword):
    model, x = StackTokens(keyword), torch.randn(3, 4)
    spec = _spec(model, x)
    assert {k: g.size for k, g in spec.groups.items()} == {"fa": 6}
    assert _axes(spec, "fa") == {("fa.weight", 0), ("fa.bias", 0), ("fb.weight", 0), ("fb.bias", 0), ("fc.weight", 1)}
    assert spec.groups["fa"].observe == [ObservePoint("relu", 1, 0, 1, 1), ObservePoint("relu_1", 1, 0, 1, 1)]
    _same_function(model, spec, x)


class ClassToken(nn.Module):
    """ViT's class token concatenated before the tokens (units last), then a Linear over the units."""

    def __init__(self):
        super().__init__()
        self.a, self.fc, self.head = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))

    def forward(self, x):                                   # x: [B, 3, 4]
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.a(x)], 1)
        return self.head(torch.relu(self.fc(h))[:, 0])


def test_a_class_token_concatenated_to_the_tokens_moves_with_the_units():
    model, x = ClassToken(), torch.randn(3, 3, 4)
    spec = _spec(model, x)
    assert list(spec.groups) == ["a", "fc"]
    assert _axes(spec, "a") == {("a.weight", 0), ("a.bias", 0), ("cls", 2), ("fc.weight", 1)}
    _same_function(model, spec, x)


class StackWithInput(StackTokens):
    def forward(self, x):                                   # x: [B, 6]
        return self.fc(torch.cat([torch.relu(self.fa(x))[:, None], x[:, None]], 1)).mean(1)


def test_units_stacked_with_an_unpermuted_tensor_are_left_fixed():
    model = StackWithInput()
    model.fa = nn.Linear(6, 6)
    x = torch.randn(3, 6)
    spec = _spec(model, x)
    assert list(spec.groups) == []
    assert spec.reasons[0] == ("group 'fa' (6 units, opened by fa) left unpermuted: cat along a non-permuted "
                               "dimension with unpermuted tensors at node 'cat' (function cat)")
    _same_function(model, spec, x)


class BatchCat(nn.Module):
    """cat([u, v], 0) along the batch: u and v must carry the same channel layout."""

    def __init__(self, parts):
        super().__init__()
        self.fa, self.fb, self.fc, self.fd = nn.Linear(4, 6), nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 4)
        self.head, self.parts = nn.Linear(6 if parts == "split" else 10, 2), parts

    def forward(self, x):                                   # x: [B, 4]
        if self.parts == "split":                            # 6 units of fa, or 3 of fb then 3 of fc
            u, v = self.fa(x), torch.cat([self.fb(x), self.fc(x)], 1)
        else:                                                # [x, fa(x)] and [fd(x), fa(x)]: 4 + 6 either way
            u, v = torch.cat([x, self.fa(x)], 1), torch.cat([self.fd(x), self.fa(x)], 1)
        return self.head(torch.relu(torch.cat([u, v], 0)))


def test_units_concatenated_along_the_batch_with_another_layout_are_left_fixed():
    model, x = BatchCat("split"), torch.randn(3, 4)
    spec = _spec(model, x)
    assert list(spec.groups) == []
    why = ("cat along a non-permuted dimension of tensors with different channel layouts at node 'cat_1' "
           "(function cat)")
    assert spec.reasons[:3] == [f"group '{n}' ({k} units, opened by {n}) left unpermuted: {why}"
                                for n, k in [("fa", 6), ("fb", 3), ("fc", 3)]]
    _same_function(model, spec, x)


def test_units_concatenated_along_the_batch_with_unpermuted_channels_are_left_fixed():
    model, x = BatchCat("with_input"), torch.randn(3, 4)
    spec = _spec(model, x)
    assert {k: g.size for k, g in spec.groups.items()} == {"fa": 6}
    assert spec.reasons[0] == ("group 'fd' (4 units, opened by fd) left unpermuted: concatenated with unpermuted "
                               "channels at node 'cat_2' (function cat)")
    _same_function(model, spec, x)
