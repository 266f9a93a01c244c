"""PAM: curve and permutation optimised together (modeconn.alignment.pam)."""
import math

import pytest
import torch
from torch import nn

from modeconn.alignment import apply_permutation, infer_permutation_spec, weight_matching
from modeconn.alignment.pam import moved_fraction, pam_fit, permutation_update, proximal_weight_matching
from modeconn.core.curve_model import CurveModel
from modeconn.data import TensorLoader
from modeconn.evaluation.path import evaluate_path


def _mlp():
    return nn.Sequential(nn.Linear(4, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 6), nn.ReLU(),
                         nn.Linear(6, 3))


def _setup(seed=0):
    torch.manual_seed(seed)
    a, b = _mlp(), _mlp()
    spec = infer_permutation_spec(a, torch.randn(2, 4))
    curve = CurveModel(_mlp(), a, b)
    with torch.no_grad():  # a bend of its own, not the midpoint of a and b
        curve.free_bends.copy_(torch.randn_like(curve.free_bends))
    return a, b, spec, curve


def _params(curve, k):
    return {n: v[k] for n, v in curve.bends_by_name().items()}


def test_with_the_curve_fixed_and_no_proximal_term_the_update_is_weight_matching_to_the_bend():
    a, b, spec, curve = _setup()
    perm, _ = permutation_update(curve, b.state_dict(), spec)
    bend = _params(curve, 1)
    ref, _ = weight_matching(bend, {n: b.state_dict()[n] for n in bend}, _reduced(spec, bend))
    assert set(perm) == set(spec.groups)
    for k in spec.groups:
        assert torch.equal(perm[k], ref[k]), k


def test_update_recovers_the_permutation_of_a_shuffled_copy_of_the_bend():
    a, b, spec, curve = _setup(1)
    bend = _params(curve, 1)
    shuffle = spec.random_permutation(seed=4)
    b_state = dict(b.state_dict())
    b_state.update(apply_permutation(bend, _reduced(spec, bend), shuffle))  # B's weights: the bend shuffled
    perm, _ = permutation_update(curve, b_state, spec, previous=spec.random_permutation(seed=9))
    for k in spec.groups:
        assert torch.equal(perm[k], torch.argsort(shuffle[k])), k


def _reduced(spec, names):
    return spec.__class__({k: (g.size, [r for r in g.axes if r.name in names]) for k, g in spec.groups.items()})


def test_proximal_objective_is_matching_plus_lambda_per_unit_kept_and_large_lambda_keeps_the_previous():
    a, b, spec, curve = _setup(2)
    bend = _params(curve, 1)
    bp = {n: b.state_dict()[n] for n in bend}
    red = _reduced(spec, bend)
    prev = red.random_permutation(seed=3)
    lam = 0.5
    perm, info = proximal_weight_matching(bend, bp, red, prev, proximal=lam)
    moved_b = apply_permutation(bp, red, perm)
    covered = {r.name for g in red.groups.values() for r in g.axes}  # the last bias is in no group's objective
    inner = math.fsum(float((bend[n].double() * moved_b[n].double()).sum()) for n in covered)
    kept = sum(int((perm[k] == prev[k]).sum()) for k in red.groups)
    assert info.objectives[-1] == pytest.approx(inner + lam * kept, rel=1e-6)  # √λ·I in float32
    big, _ = proximal_weight_matching(bend, bp, red, prev, proximal=1e6)
    assert all(torch.equal(big[k], prev[k]) for k in red.groups)
    with pytest.raises(ValueError, match="proximal"):
        proximal_weight_matching(bend, bp, red, prev, proximal=-1.0)


def test_pam_fit_reports_rounds_and_leaves_the_curve_at_the_final_permutation():
    a, b, spec, curve = _setup(3)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    data = TensorLoader(x, y, batch_size=16)
    start = spec.random_permutation(seed=5)  # a poor start: the first update must move units
    b_state = b.state_dict()
    curve = CurveModel(_mlp(), a, apply_permutation(b_state, spec, start))
    res = pam_fit(curve, b_state, spec, data, (data, data), rounds=2, epochs_per_round=1, initial=start,
                  num_points=5, fit_kwargs={"lr": 0.05})
    assert [r.round for r in res.rounds] == [1, 2] and len(res.history) == 2
    assert res.rounds[0].moved == moved_fraction(start, res.perms[0]) and res.rounds[0].moved["total"] > 0
    assert res.rounds[1].moved == moved_fraction(res.perms[0], res.perms[1])
    assert all(torch.equal(res.perm[k], res.perms[1][k]) for k in spec.groups)
    end = apply_permutation(b_state, spec, res.perm)
    for n, v in curve.bends_by_name().items():
        assert torch.equal(v[-1], end[n].to(v)), n
    b.eval()
    with torch.no_grad():  # the end network is B itself, up to the permutation: the same function
        assert torch.allclose(curve.point(1.0).eval()(x), b(x), atol=1e-5)
    direct = evaluate_path(curve, data, data, 5).barrier("test_loss")
    assert res.rounds[-1].barrier_after == pytest.approx(direct, abs=1e-9)
