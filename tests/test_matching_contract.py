"""Weight and activation matching against independent computations (mutation run 10, alignment/matching.py):
the brute-force optimum over every permutation of a one-group network, the objective recomputed from the returned
permutation, one sweep when nothing can improve, groups that touch no parameter, activation correlations by numpy,
models left as they were, and bad input named."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from modeconn.alignment import (PermutationSpec, activation_matching, apply_permutation, infer_permutation_spec,
                                weight_matching, weight_similarity)
from modeconn.alignment.spec import ObservePoint, PermutationGroup

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed, widths=(3, 5, 2)):
    torch.manual_seed(seed)
    layers = []
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(w_in, w_out)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def _objective(a, b, spec, perm):
    """sum over the parameters a group moves of <A_w, P(B_w)>, in float64 from the state dicts."""
    sd_a, sd_b = a.state_dict(), apply_permutation(b.state_dict(), spec, perm)
    names = set(spec.covered()) & {n for n, _ in a.named_parameters()}
    return math.fsum(float((sd_a[n].double() * sd_b[n].double()).sum()) for n in names)


@pytest.mark.parametrize("init", ["identity", "greedy", "sorted"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_group_reaches_the_brute_force_optimum(init, seed):
    a, b = _mlp(10 + seed), _mlp(20 + seed)
    spec = infer_permutation_spec(a, torch.randn(1, 3))
    assert list(spec.groups) == ["0"] and spec.groups["0"].size == 5
    best = max(_objective(a, b, spec, {"0": torch.tensor(p)}) for p in itertools.permutations(range(5)))
    perm, info = weight_matching(a, b, spec, init=init)
    assert _objective(a, b, spec, perm) == pytest.approx(best, rel=1e-12, abs=1e-12)
    assert info.objectives[-1] == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_units_told_apart_by_their_bias_alone_are_matched():
    a = _mlp(0)
    with torch.no_grad():  # every unit has the same incoming and outgoing weights; biases differ
        a[0].weight.copy_(torch.tensor([0.3, -0.2, 0.5]).expand(5, 3))
        a[0].bias.copy_(torch.tensor([0.4, -1.0, 2.0, 0.1, -0.3]))
        a[2].weight.copy_(torch.tensor([[0.7], [-0.1]]).expand(2, 5))
    spec = infer_permutation_spec(a, torch.randn(1, 3))
    shuffle = {"0": torch.tensor([3, 0, 4, 1, 2])}
    b = apply_permutation(a, spec, shuffle)
    for init in ("identity", "greedy"):
        perm, _ = weight_matching(a, b, spec, init=init)
        assert torch.equal(perm["0"], torch.argsort(shuffle["0"])), init


@pytest.mark.parametrize("restarts", [1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_reported_objective_is_that_of_the_returned_permutation(seed, restarts):
    a, b = _mlp(30 + seed, (6, 12, 10, 8, 3)), _mlp(40 + seed, (6, 12, 10, 8, 3))
    spec = infer_permutation_spec(a, torch.randn(1, 6))
    perm, info = weight_matching(a, b, spec, seed=seed, restarts=restarts, init="identity")
    assert info.sweeps >= 2  # several groups moved, some more than once
    assert info.objectives[-1] == pytest.approx(_objective(a, b, spec, perm), rel=1e-12)
    assert info.initial_objective == pytest.approx(_objective(a, b, spec, spec.identity()), rel=1e-12)
    assert all(x <= y + 1e-9 for x, y in zip(info.objectives, info.objectives[1:]))


def test_matching_a_network_to_itself_is_one_sweep_that_changes_nothing():
    a = _mlp(3, (4, 7, 6, 2))
    spec = infer_permutation_spec(a, torch.randn(1, 4))
    perm, info = weight_matching(a, a, spec, init="identity")
    assert info.sweeps == 1 and info.converged and len(info.objectives) == 1
    assert info.objectives[0] == info.initial_objective
    assert all(torch.equal(perm[k], torch.arange(g.size)) for k, g in spec.groups.items())


@pytest.mark.parametrize("seed", range(6))
def test_a_swap_of_two_equal_units_gains_nothing_and_is_not_taken(seed):
    # units 1 and 3, and 0 and 5, are copies: the Hungarian step may return a swap of them, which ties
    torch.manual_seed(seed)
    a = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        for i, j in ((1, 3), (0, 5)):
            a[0].weight[j], a[0].bias[j], a[2].weight[:, j] = a[0].weight[i], a[0].bias[i], a[2].weight[:, i]
    spec = infer_permutation_spec(a, torch.randn(1, 4))
    perm, info = weight_matching(a, a, spec, init="identity")
    assert info.sweeps == 1 and info.converged
    assert torch.equal(perm["0"], torch.arange(6))


def _buffer_group_spec(model):
    """Group "stats" moves only BatchNorm statistics (no parameter enters the objective); group "0" a layer."""
    return PermutationSpec.from_axes({"stats": [("1.running_mean", 0), ("1.running_var", 0)],
                                      "0": [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]}, model)


def test_a_group_of_statistics_alone_is_left_out_of_the_objective_and_of_the_similarity():
    a = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2))
    spec = _buffer_group_spec(a)
    perm, info = weight_matching(a, a, spec, init="identity")
    assert info.converged and info.sweeps == 1
    assert torch.equal(perm["stats"], torch.arange(4))
    sim = weight_similarity(a, a, spec)
    assert list(sim) == ["stats", "0"]
    assert math.isnan(sim["stats"]) and sim["0"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------- activation matching
def _act_pair():
    a, b = _mlp(5, (3, 6, 2)), _mlp(6, (3, 6, 2))
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    return a, b, x, infer_permutation_spec(a, x[:1])


def test_activation_correlations_match_numpy():
    a, b, x, spec = _act_pair()
    perm, info = activation_matching(a, b, [x[:70], x[70:]], spec)
    with torch.no_grad():
        ha, hb = torch.relu(a[0](x)).double().numpy(), torch.relu(b[0](x)).double().numpy()
    corr = np.corrcoef(ha.T, hb.T)[:6, 6:]  # [A's unit, B's unit]
    _, col = linear_sum_assignment(corr, maximize=True)
    assert torch.equal(perm["0"], torch.as_tensor(col))
    assert info.correlation_before["0"] == pytest.approx(corr.diagonal().mean(), abs=1e-12)
    assert info.correlation_after["0"] == pytest.approx(corr[np.arange(6), col].mean(), abs=1e-12)
    assert info.num_batches == 2 and info.num_samples["0"] == 200


def test_activation_matching_leaves_both_models_as_they_were():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2))
    b = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2))
    x = torch.randn(64, 3)
    spec = infer_permutation_spec(a, x[:2])
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (a, b)]
    a.train(), b.train()
    activation_matching(a, b, [x[:32], x[32:]], spec)
    for m, sd in zip((a, b), before):
        assert m.training and all(sub.training for sub in m.modules())
        assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())  # no BN statistics updated


def test_max_batches_and_device_are_taken_as_given():
    a, b, x, spec = _act_pair()
    batches = [x[:50], x[50:100], x[100:]]
    _, info = activation_matching(a, b, batches, spec, max_batches=1, device="cpu")
    assert info.num_batches == 1 and info.num_samples["0"] == 50


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_a_bad_max_batches_is_refused(bad):
    a, b, x, spec = _act_pair()
    with pytest.raises(ValueError, match="max_batches must be a positive int"):
        activation_matching(a, b, [x], spec, max_batches=bad)


def test_activation_matching_needs_two_modules():
    a, b, x, spec = _act_pair()
    for pair in ((a, b.state_dict()), (a.state_dict(), b)):
        with pytest.raises(ValueError, match="needs nn.Module models"):
            activation_matching(*pair, [x], spec)


def test_a_network_without_weights_has_nothing_to_observe():
    a, b = nn.Sequential(nn.ReLU()), nn.Sequential(nn.ReLU())
    with pytest.raises(ValueError, match="no group of the spec has observation points"):
        activation_matching(a, b, [torch.randn(4, 3)], PermutationSpec({}))


@pytest.mark.parametrize("node,message", [("nowhere", "observe point 'nowhere' of group 'hidden' is neither"),
                                          ("2", "observe point '2' of group 'hidden' has shape")])
def test_a_bad_observe_point_names_its_group(node, message):
    a, b, x, spec = _act_pair()
    g = spec.groups["0"]
    hand = PermutationSpec({"hidden": PermutationGroup(g.size, g.axes, [ObservePoint(node)])})
    with pytest.raises(ValueError, match=message):
        activation_matching(a, b, [x], hand)
