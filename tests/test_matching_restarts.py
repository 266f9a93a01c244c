"""Weight matching with restarts: the best of several coordinate descents, each objective checked by hand."""
import pytest
import torch
from torch import nn

from modeconn.alignment import apply_permutation, infer_permutation_spec
from modeconn.alignment.matching import weight_matching


def _objective(a, b, perm, spec, names):
    """sum_w <A_w, P(B_w)> over the parameters ``names`` (those the matcher compares), in float64, from the
    permuted copy."""
    pb = apply_permutation(b, spec, perm)
    sa, sb = a.state_dict(), pb.state_dict()
    return sum(float((sa[n].double() * sb[n].double()).sum()) for n in names)


def test_restarts_keep_the_best_objective_and_report_every_run():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    b = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    spec = infer_permutation_spec(a, torch.randn(1, 6))
    one, info1 = weight_matching(a, b, spec, seed=3)
    best, info = weight_matching(a, b, spec, seed=3, restarts=6)
    assert len(info.restart_objectives) == 6 and info.restart_objectives[0] == pytest.approx(info1.objectives[-1])
    # every restart's final objective is that of its own permutation; the one returned is the largest
    assert _objective(a, b, best, spec, info.names) == pytest.approx(max(info.restart_objectives), rel=1e-9)
    assert _objective(a, b, one, spec, info.names) == pytest.approx(info1.objectives[-1], rel=1e-9)
    assert max(info.restart_objectives) >= info1.objectives[-1]
    assert info.initial_objective == pytest.approx(_objective(a, b, spec.identity(), spec, info.names), rel=1e-9)
    with pytest.raises(ValueError, match="restarts"):
        weight_matching(a, b, spec, restarts=0)


def test_restarts_recover_a_permuted_convnext_where_one_descent_stops_early():
    # at timm's initialisation (constant norm weights and layer scales) descent from the identity stops in a
    # local optimum on convnext_atto (objective 2706 vs 3824); a random start finds the exact permutation
    timm = pytest.importorskip("timm")  # a test dependency: installed by `make test`
    torch.manual_seed(0)
    m = timm.create_model("convnext_atto", num_classes=10, pretrained=False).double().eval()
    spec = infer_permutation_spec(m, torch.randn(1, 3, 32, 32, dtype=torch.float64))
    shuffle = spec.random_permutation(seed=7)
    b = apply_permutation(m, spec, shuffle)
    one, _ = weight_matching(m, b, spec, seed=0, init="identity")
    assert any(not torch.equal(one[g], torch.argsort(shuffle[g])) for g in spec.groups)
    perm, info = weight_matching(m, b, spec, seed=0, restarts=8, init="identity")
    assert all(torch.equal(perm[g], torch.argsort(shuffle[g])) for g in spec.groups), info.restart_objectives
    # the default greedy start (aligned from the input, layer after layer) needs no restart here
    greedy, _ = weight_matching(m, b, spec, seed=0)
    assert all(torch.equal(greedy[g], torch.argsort(shuffle[g])) for g in spec.groups)
