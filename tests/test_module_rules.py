"""Spec inference through the module types the zoo does not use (mutation run 9, module_rules.py):
InstanceNorm, GroupNorm, PReLU, Upsample, Embedding, Flatten/Unflatten. Each model's groups are the ones a
reader derives from the architecture, and every random permutation of them leaves the function unchanged."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from modeconn.alignment import apply_permutation, infer_permutation_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_function(model, spec, x, seeds=(1, 2, 3)):
    model.eval()
    for seed in seeds:
        permuted = apply_permutation(model, spec, spec.random_permutation(seed)).eval()
        with torch.no_grad():
            torch.testing.assert_close(permuted(x), model(x), rtol=1e-5, atol=1e-5)


def _axes(spec, group):
    return {(a.name, a.axis) for a in spec.groups[group].axes}


def _randomize(model):
    """Non-trivial affine parameters and running statistics (so that a wrong permutation shows)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "var" in name else torch.randn_like(t))
    return model


class Body(nn.Module):
    """conv(1 -> 6) -> ``mid`` -> relu -> conv(6 -> 4) -> mean -> fc."""

    def __init__(self, mid, spatial=2):
        super().__init__()
        conv = nn.Conv2d if spatial == 2 else nn.Conv1d
        self.c1, self.mid, self.c2, self.fc = conv(1, 6, 3, padding=1), mid, conv(6, 4, 3, padding=1), nn.Linear(4, 3)
        self.dims = tuple(range(2, 2 + spatial))

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.mid(self.c1(x))))).mean(self.dims))


MIDS = {
    "instance_affine_stats": (lambda: nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
                              {"mid.weight", "mid.bias", "mid.running_mean", "mid.running_var"}),
    "instance_stats": (lambda: nn.InstanceNorm2d(6, track_running_stats=True), {"mid.running_mean", "mid.running_var"}),
    "instance_affine": (lambda: nn.InstanceNorm2d(6, affine=True), {"mid.weight", "mid.bias"}),
    "instance_plain": (lambda: nn.InstanceNorm2d(6), set()),
    "groupnorm_1": (lambda: nn.GroupNorm(1, 6), {"mid.weight", "mid.bias"}),
    "groupnorm_per_channel": (lambda: nn.GroupNorm(6, 6), {"mid.weight", "mid.bias"}),
    "groupnorm_no_affine": (lambda: nn.GroupNorm(6, 6, affine=False), set()),
    "prelu_per_channel": (lambda: nn.PReLU(6), {"mid.weight"}),
    "prelu_shared": (lambda: nn.PReLU(), set()),
    "upsample": (lambda: nn.Upsample(scale_factor=2), set()),
}


@pytest.mark.parametrize("name", sorted(MIDS))
def test_per_channel_modules_move_with_the_channels(name):
    make, entries = MIDS[name]
    model, x = _randomize(Body(make())), torch.randn(3, 1, 5, 5)
    spec = infer_permutation_spec(model, x[:1])
    assert list(spec.groups) == ["c1", "c2"]
    assert _axes(spec, "c1") == {("c1.weight", 0), ("c1.bias", 0), ("c2.weight", 1)} | {(e, 0) for e in entries}
    # a shared PReLU slope and the BN counter are never permuted
    assert {e for e in spec.fixed if e.startswith("mid.")} <= {"mid.weight" if name == "prelu_shared" else "",
                                                              "mid.num_batches_tracked"}
    _same_function(model, spec, x)


def test_instance_norm_1d_normalises_the_channels_before_the_length():
    model, x = _randomize(Body(nn.InstanceNorm1d(6, affine=True), spatial=1)), torch.randn(3, 1, 7)
    spec = infer_permutation_spec(model, x[:1])
    assert ("mid.weight", 0) in _axes(spec, "c1")
    _same_function(model, spec, x)


def test_group_norm_with_groups_of_several_channels_is_fixed():
    model, x = _randomize(Body(nn.GroupNorm(3, 6))), torch.randn(3, 1, 5, 5)
    spec = infer_permutation_spec(model, x[:1])
    assert list(spec.groups) == ["c2"] and {"c1.weight", "mid.weight", "mid.bias"} <= set(spec.fixed)
    assert any("GroupNorm with 3 groups" in r for r in spec.reasons), spec.reasons


def test_a_group_norm_after_unpermuted_input_is_fine():
    # the input is never permuted: a GroupNorm of 2 groups on it leaves every layer after it permutable
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 2))
    spec = infer_permutation_spec(_randomize(model), torch.randn(1, 4, 5, 5))
    assert list(spec.groups) == ["1"] and not any("GroupNorm" in r for r in spec.reasons)


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(7, 6), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, idx):
        return self.head(torch.relu(self.fc(self.emb(idx))).mean(1))


def test_an_embedding_opens_a_group_on_its_columns():
    model, x = _randomize(Tokens()), torch.randint(0, 7, (3, 4))
    spec = infer_permutation_spec(model, x[:1])
    assert list(spec.groups) == ["emb", "fc"]
    assert _axes(spec, "emb") == {("emb.weight", 1), ("fc.weight", 1)}
    _same_function(model, spec, x)


class PermutedIndices(nn.Module):
    """A layer's values, cast to integers, used as embedding indices."""

    def __init__(self):
        super().__init__()
        self.a, self.emb, self.head = nn.Linear(4, 5), nn.Embedding(7, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.emb(self.a(x).abs().long().clamp(0, 6)).mean(1))


def test_permuted_values_used_as_embedding_indices_are_left_fixed():
    model, x = _randomize(PermutedIndices()), 3 * torch.randn(6, 4)
    spec = infer_permutation_spec(model, x[:1])
    # (the cast to integers is refused first: no supported operation turns permuted units into indices)
    assert "a" not in spec.groups and {"a.weight", "a.bias"} <= set(spec.fixed)
    _same_function(model, spec, x)


class UnitsResampled(nn.Module):
    """a's units end up on dim 2 of a 4-D map, which Upsample then interpolates (mixing the units)."""

    def __init__(self):
        super().__init__()
        self.a, self.up, self.head = nn.Linear(4, 6), nn.Upsample(scale_factor=2, mode="bilinear"), nn.Linear(12, 3)

    def forward(self, x):                                    # x: [B, 1, 4, 3]
        h = torch.relu(self.a(x.transpose(2, 3))).transpose(2, 3)      # [B, 1, 6, 3]: units on dim 2
        return self.head(self.up(h).mean(3).flatten(1))


def test_upsample_over_the_units_leaves_them_fixed():
    model, x = _randomize(UnitsResampled()), torch.randn(3, 1, 4, 3)
    spec = infer_permutation_spec(model, x[:1])
    assert "a" not in spec.groups and {"a.weight", "a.bias"} <= set(spec.fixed)
    _same_function(model, spec, x)


class PReLUResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.mid, self.cb = nn.Conv2d(1, 6, 3, padding=1), nn.PReLU(6), nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = self.mid(self.c1(x))
        return self.fc((h + self.cb(h)).mean((2, 3)))


def test_a_per_channel_prelu_is_where_units_are_observed():
    model, x = _randomize(PReLUResidual()), torch.randn(3, 1, 5, 5)
    spec = infer_permutation_spec(model, x[:1])
    # the PReLU output is an activation; cb's raw output and the sum are not
    assert list(spec.groups) == ["c1"] and [p.node for p in spec.groups["c1"].observe] == ["mid"]
    _same_function(model, spec, x)


class Act(nn.Module):
    """A Linear, an activation *module*, and a residual branch: only the activation's output is observed."""

    def __init__(self, act):
        super().__init__()
        self.a, self.act, self.b, self.head = nn.Linear(4, 6), act, nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.act(self.a(x))
        return self.head(h + self.b(h))


@pytest.mark.parametrize("act", [nn.ReLU(), nn.GELU(), nn.PReLU()], ids=["relu", "gelu", "prelu_shared"])
def test_activation_modules_mark_where_units_are_observed(act):
    model, x = _randomize(Act(act)), torch.randn(5, 4)
    spec = infer_permutation_spec(model, x[:1])
    assert list(spec.groups) == ["a"] and [p.node for p in spec.groups["a"].observe] == ["act"]
    _same_function(model, spec, x)


def test_layers_without_bias_and_transposed_convolutions():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(),
                          nn.ConvTranspose2d(4, 5, 2, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(5 * 6 * 6, 6, bias=False), nn.Tanh(), nn.Linear(6, 2))
    model, x = _randomize(model), torch.randn(3, 1, 3, 3)
    spec = infer_permutation_spec(model, x[:1])
    assert list(spec.groups) == ["0", "2", "5"]
    assert _axes(spec, "0") == {("0.weight", 0), ("2.weight", 0)}     # a transposed conv's input channels: axis 0
    assert _axes(spec, "2") == {("2.weight", 1), ("2.bias", 0), ("5.weight", 1)}
    assert _axes(spec, "5") == {("5.weight", 0), ("7.weight", 1)}
    _same_function(model, spec, x)


class TwoInputModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bil = nn.Linear(4, 6), nn.Linear(4, 5), nn.Bilinear(6, 5, 3)

    def forward(self, x):
        return self.bil(torch.relu(self.a(x)), torch.relu(self.b(x)))


def test_a_module_of_two_inputs_drops_the_second_as_a_secondary_argument():
    spec = infer_permutation_spec(TwoInputModule(), torch.randn(1, 4))
    assert list(spec.groups) == []
    assert spec.reasons[:2] == [
        "group 'a' (6 units, opened by a) left unpermuted: unsupported module Bilinear at node 'bil' (Bilinear 'bil')",
        "group 'b' (5 units, opened by b) left unpermuted: permuted tensor used as a secondary argument of node 'bil' "
        "(Bilinear 'bil'); unsupported module Bilinear at node 'bil' (Bilinear 'bil')"]
