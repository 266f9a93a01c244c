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


def _unit_rows(sd, group):
    """Each unit's entries of every parameter the group moves, in float64: [units, all its entries]
    (the full-axis refs of plain MLPs: the axis moved to the front, the rest flattened)."""
    return torch.cat([sd[r.name].double().movedim(r.axis, 0).reshape(group.size, -1) for r in group.axes], 1)


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


@pytest.mark.parametrize("widths", [(6, 12, 10, 8, 3), (6, 8, 30, 8, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_result_is_a_fixed_point_of_every_groups_assignment(seed, widths):
    """Converged descent: with B permuted by the result, each group's cost matrix C[i, j] = <A's unit i,
    B's unit j> over the group's axes (built here from the state dicts, in float64) has the identity among its
    optimal assignments (scipy's optimum equals the trace)."""
    a, b = _mlp(30 + seed, widths), _mlp(40 + seed, widths)
    spec = infer_permutation_spec(a, torch.randn(1, widths[0]))
    perm, info = weight_matching(a, b, spec, seed=seed, init="identity")
    assert info.converged
    sd_a, sd_b = a.state_dict(), apply_permutation(b.state_dict(), spec, perm)
    for g, group in spec.groups.items():
        cost = (_unit_rows(sd_a, group) @ _unit_rows(sd_b, group).T).numpy()
        i, j = linear_sum_assignment(cost, maximize=True)
        assert cost[i, j].sum() <= np.trace(cost) + 1e-9, g


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


# ------------------------------------------------------------------------------------------ starts and restarts
def _pair(seed=0, widths=(6, 12, 10, 8, 3)):
    a, b = _mlp(30 + seed, widths), _mlp(40 + seed, widths)
    return a, b, infer_permutation_spec(a, torch.randn(1, widths[0]))


def test_a_descent_cut_short_says_so_and_records_its_seed():
    a, b, spec = _pair()
    full, info = weight_matching(a, b, spec, init="identity")
    assert info.sweeps >= 2 and info.converged is True and info.seed == 0
    _, cut = weight_matching(a, b, spec, init="identity", max_iter=1, seed=4)
    assert cut.sweeps == 1 and cut.converged is False and cut.seed == 4


@pytest.mark.parametrize("init", ["identity", "greedy", "sorted"])
def test_every_start_reports_b_as_given_for_its_initial_objective(init):
    a, b, spec = _pair(1)
    perm, info = weight_matching(a, b, spec, init=init)
    assert info.initial_objective == pytest.approx(_objective(a, b, spec, spec.identity()), rel=1e-12)
    assert info.objectives[-1] == pytest.approx(_objective(a, b, spec, perm), rel=1e-12)
    assert info.start in ({"identity", "greedy"} if init == "greedy" else {init})


def test_each_restart_is_a_descent_from_its_seeded_random_permutation():
    a, b, spec = _pair(2)
    perm, info = weight_matching(a, b, spec, seed=5, restarts=3, init="identity")
    assert len(info.restart_objectives) == 3
    for r in (1, 2):  # restart r: B shuffled by spec.random_permutation(seed + r), then one descent with seed + r
        start = spec.random_permutation(5 + r)
        _, alone = weight_matching(a, apply_permutation(b.state_dict(), spec, start), spec, seed=5 + r,
                                   init="identity")
        assert info.restart_objectives[r] == pytest.approx(alone.objectives[-1], rel=1e-12)
    best = int(np.argmax(info.restart_objectives))
    assert info.best_restart == best and info.start == ("random" if best else "identity")
    assert _objective(a, b, spec, perm) == pytest.approx(max(info.restart_objectives), rel=1e-12)


def test_the_sorted_start_is_reported_and_random_restarts_after_it():
    a, b, spec = _pair(3)
    _, info = weight_matching(a, b, spec, init="sorted", restarts=4, seed=1)
    assert info.start == ("random" if info.best_restart else "sorted")
    _, only = weight_matching(a, b, spec, init="sorted")
    assert only.start == "sorted"


def test_on_a_tie_the_earliest_restart_and_b_as_given_win():
    a = _mlp(3, (4, 7, 6, 2))
    spec = infer_permutation_spec(a, torch.randn(1, 4))
    perm, info = weight_matching(a, a, spec, restarts=3)  # every restart ends at the identity's objective
    assert info.restart_objectives == pytest.approx([info.initial_objective] * 3, rel=1e-12)
    assert info.best_restart == 0 and info.start == "identity"
    assert all(torch.equal(perm[k], torch.arange(g.size)) for k, g in spec.groups.items())


@pytest.mark.parametrize("name", ["max_iter", "restarts"])
@pytest.mark.parametrize("bad", [0, True, 1.5])
def test_a_bad_count_is_refused_by_name(name, bad):
    a, b, spec = _pair()
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        weight_matching(a, b, spec, **{name: bad})


def test_matching_state_dicts_leaves_batchnorm_statistics_out_of_the_objective():
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)) for _ in range(2))
    for m in (a, b):
        m.train()(torch.randn(16, 3))  # running statistics away from 0 and 1
    spec = infer_permutation_spec(a, torch.randn(2, 3))
    perm, info = weight_matching(a.state_dict(), b.state_dict(), spec, init="identity")
    assert set(info.names) == {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight"}
    assert info.objectives[-1] == pytest.approx(_objective(a, b, spec, perm), rel=1e-12)


def test_a_float64_network_is_matched_to_a_float32_one():
    a, b = _mlp(1), _mlp(2).double()
    spec = infer_permutation_spec(a, torch.randn(1, 3))
    best = max(_objective(a, b, spec, {"0": torch.tensor(p)}) for p in itertools.permutations(range(5)))
    _, info = weight_matching(a, b, spec, init="identity")
    assert info.objectives[-1] == pytest.approx(best, rel=1e-12)


def test_weight_similarity_is_the_float64_cosine_of_matched_units():
    a, b, spec = _pair(4)
    perm = spec.random_permutation(3)
    sim = weight_similarity(a, b, spec, perm)
    sd_a, sd_b = a.state_dict(), apply_permutation(b.state_dict(), spec, perm)
    for g, group in spec.groups.items():
        ra, rb = _unit_rows(sd_a, group), _unit_rows(sd_b, group)
        want = float(torch.nn.functional.cosine_similarity(ra, rb, dim=1).mean())
        assert sim[g] == pytest.approx(want, abs=1e-13), g
