"""Rescaling-aware matching: canonical scale keeps the function, removes rescalings, and matching then
recovers a rescaled and permuted copy."""
import copy

import pytest
import torch
from torch import nn

import modeconn as mc
from modeconn.alignment import apply_permutation, infer_permutation_spec
from modeconn.alignment.rescale import canonical_scale, rescalable_groups, scale_units

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(act=nn.ReLU, width=(12, 10)):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, width[0]), act(), nn.Linear(width[0], width[1]), act(),
                         nn.Linear(width[1], 3)).double()


def _rescaled(net, spec, seed):
    """``net`` with every hidden unit's incoming weights times c ∈ [0.05, 20] (log-uniform) and outgoing / c."""
    gen = torch.Generator().manual_seed(seed)
    sd = dict(net.state_dict())
    for g, group in spec.groups.items():
        sd = scale_units(sd, spec, g, torch.exp(torch.empty(group.size, dtype=torch.float64).uniform_(-3, 3,
                                                                                                  generator=gen)))
    out = copy.deepcopy(net)
    out.load_state_dict(sd)
    return out


def test_a_rescaled_copy_computes_the_same_function_and_has_the_same_canonical_form():
    net, x = _mlp(), torch.randn(32, 6, dtype=torch.float64)
    spec = infer_permutation_spec(net, x[:1])
    assert rescalable_groups(net, spec, x[:4]) == ["0", "2"]
    other = _rescaled(net, spec, seed=1)
    assert torch.allclose(other(x), net(x), atol=1e-10)
    assert not torch.allclose(other[0].weight, net[0].weight, atol=1e-2)
    canon, factors, groups = canonical_scale(net, spec, x[:4])
    assert torch.allclose(canon(x), net(x), atol=1e-10)
    rows = torch.cat([canon[0].weight, canon[0].bias[:, None]], 1).norm(dim=1)
    assert torch.allclose(rows, torch.ones(12, dtype=torch.float64))
    canon_other, _, _ = canonical_scale(other, spec, groups=groups)
    for p, q in zip(canon.parameters(), canon_other.parameters()):
        assert torch.allclose(p, q, atol=1e-10)


def test_rescaling_aware_matching_recovers_a_rescaled_and_permuted_copy():
    net, x = _mlp(width=(32, 32)), torch.randn(4, 6, dtype=torch.float64)
    spec = infer_permutation_spec(net, x[:1])
    shuffle = spec.random_permutation(seed=3)
    b = apply_permutation(_rescaled(net, spec, seed=2), spec, shuffle)
    _, perm, report = mc.align_models(net, b, example_input=x, rescale=True)
    assert report.rescaled == ["0", "2"] and report.mean_after == pytest.approx(1.0)
    for g in spec.groups:
        assert torch.equal(perm[g], torch.argsort(shuffle[g])), g
    # raw weights, descent from B as given: the rescaling hides the match (the default greedy start happens
    # to recover this copy: factors in e^±3 do not reorder these inner products; nothing guarantees that)
    _, plain, _ = mc.align_models(net, b, example_input=x, init="identity")
    assert all(int((plain[g] == torch.argsort(shuffle[g])).sum()) < 16 for g in spec.groups)


def test_no_rescaling_where_the_function_would_change():
    x = torch.randn(8, 6, dtype=torch.float64)
    tanh = _mlp(nn.Tanh)
    assert rescalable_groups(tanh, infer_permutation_spec(tanh, x[:1]), x) == []
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 10), nn.LeakyReLU(0.1),
                       nn.Linear(10, 3)).double().eval()
    bn[1].running_mean.normal_()
    spec = infer_permutation_spec(bn, x[:2])
    found = rescalable_groups(bn, spec, x)
    assert found == [g for g in spec.groups if any(r.name == "3.weight" and r.axis == 0 for r in spec.groups[g].axes)]
    canon, _, _ = canonical_scale(bn, spec, x)
    assert torch.allclose(canon(x), bn(x), atol=1e-10)
    with pytest.raises(ValueError, match="rescale"):
        mc.align_models(bn, bn, method="activation", loader=[(x, None)], rescale=True)


def test_align_command_rescale_flag(tmp_path):
    from modeconn import align

    from tests.conftest import CKPT
    out = tmp_path / "b.pt"
    assert align.main(["--a", str(CKPT / "digits_mlp_a.pt"), "--b", str(CKPT / "digits_mlp_b.pt"), "--rescale",
                       "--num-points", "0", "--out", str(out)]) == 0
    report = mc.load_checkpoint(out)["alignment"]["report"]
    assert report["rescaled"] == list(report["groups"])  # the shipped MLP is ReLU without normalisation
