"""REPAIR (Jordan et al. 2023): endpoints untouched, corrected statistics on target, exact folding, BN = reset."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import modeconn as mc
from modeconn.alignment.repair import Repair, channel_statistics, fold_affine
from modeconn.data import TensorLoader
from modeconn.evaluation.model import evaluate


def _net(seed, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 6, 3, padding=1)] + ([nn.BatchNorm2d(6)] if bn else []) + [nn.ReLU(),
              nn.Conv2d(6, 8, 3, padding=1)] + ([nn.BatchNorm2d(8)] if bn else []) + [nn.ReLU(),
              nn.Flatten(), nn.Linear(8 * 16, 12), nn.ReLU(), nn.Linear(12, 3)]
    return nn.Sequential(*layers).eval()


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 4, 4, generator=gen)
    return TensorLoader(x, torch.randint(0, 3, (96,), generator=gen), batch_size=32)


def _preactivations(model, names, loader):
    """Hand computation: every named module's output over all data, channels last, float64."""
    outs = {n: [] for n in names}
    mods = dict(model.named_modules())
    hs = [mods[n].register_forward_hook(lambda m, i, o, n=n: outs[n].append(o.detach().double())) for n in names]
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    for h in hs:
        h.remove()
    res = {}
    for n, lst in outs.items():
        o = torch.cat(lst)
        o = o.movedim(1, -1) if o.dim() > 2 else o
        o = o.reshape(-1, o.shape[-1])
        res[n] = (o.mean(0), o.std(0, unbiased=False))
    return res


def test_endpoints_keep_their_function(data):
    a, b = _net(1), _net(2)
    rep = Repair(a, b, data)
    x = torch.cat([x for x, _ in data])
    for t, ref in ((0.0, a), (1.0, b)):
        model, report = rep.at(t)
        assert list(report.layers) == ["0", "2", "5"]          # the hidden Linear/Conv layers, not the logits
        assert torch.allclose(model(x), ref(x), atol=1e-5)


def test_corrected_channels_reach_the_interpolated_statistics(data):
    a, b = _net(1), _net(2)
    names = ["0", "2", "5"]
    sa, sb = _preactivations(a, names, data), _preactivations(b, names, data)
    for t in (0.3, 0.5):
        model, report = mc.repair(a, b, t, data)
        line_point = mc.linear_path(a, b).point(t)
        got, plain = _preactivations(model, names, data), _preactivations(line_point, names, data)
        for n in names:
            target_mean = (1 - t) * sa[n][0] + t * sb[n][0]
            target_std = (1 - t) * sa[n][1] + t * sb[n][1]
            assert torch.allclose(got[n][0], target_mean, atol=1e-4), n
            assert torch.allclose(got[n][1], target_std, atol=1e-4), n
        assert not torch.allclose(plain["5"][1], got["5"][1], atol=1e-3)   # the correction did something
        # the first layer is measured before any correction: its collapse figure is the plain point's
        target0 = (1 - t) * sa["0"][1] + t * sb["0"][1]
        assert report.layers["0"]["std_ratio"] == pytest.approx(float((plain["0"][1] / target0).mean()), rel=1e-6)


@pytest.mark.parametrize("layer", [nn.Linear(5, 4), nn.Conv2d(2, 4, 3, padding=1), nn.Conv1d(2, 4, 3)])
def test_folding_equals_an_explicit_affine_after_the_layer(layer):
    x = torch.randn(7, 5) if isinstance(layer, nn.Linear) else torch.randn(7, 2, 6, 6)[..., 0] \
        if isinstance(layer, nn.Conv1d) else torch.randn(7, 2, 6, 6)
    scale, shift = torch.rand(4) + 0.5, torch.randn(4)
    with torch.no_grad():
        y = layer(x)
        view = (1, -1) + (1,) * (y.dim() - 2)
        expected = y * scale.view(view) + shift.view(view)
        folded = fold_affine(copy.deepcopy(layer), scale, shift)(x)
    assert torch.allclose(folded, expected, atol=1e-6)


def test_fold_refuses_a_layer_without_bias():
    with pytest.raises(ValueError, match="bias"):
        fold_affine(nn.Linear(2, 3, bias=False), torch.ones(3), torch.zeros(3))


def test_batchnorm_network_reduces_to_the_statistics_reset(data):
    a, b = _net(1, bn=True), _net(2, bn=True)
    for m in (a, b):
        mc.recompute_bn(m, data)
    model, report = mc.repair(a, b, 0.4, data)
    assert report.bn_groups == ["0", "3"] and list(report.layers) == ["7"]   # the MLP head has no BN
    # BN-only network: nothing to fold, the repaired point is the BN-recomputed line point
    a2, b2 = nn.Sequential(*list(a)[:6]), nn.Sequential(*list(b)[:6])
    small = TensorLoader(torch.randn(64, 1, 4, 4), torch.zeros(64, dtype=torch.long), batch_size=32)
    model, report = mc.repair(a2, b2, 0.4, small)
    assert not report.layers and report.bn_groups
    reset = mc.recompute_bn(mc.linear_path(a2, b2).point(0.4), small)
    x = torch.randn(10, 1, 4, 4)
    assert torch.allclose(model.eval()(x), reset.eval()(x), atol=1e-6)


def test_repaired_path_of_a_bn_network_is_the_recomputed_line(cnn_pair, digits):
    a, b = cnn_pair
    train, test = digits.eval_loader("train", 512), digits.eval_loader("test", 512)
    rep = mc.evaluate_repaired_path(a, b, train, test, num_points=3)
    line = mc.evaluate_path(mc.linear_path(a, b), train, test, num_points=3)
    assert np.allclose(rep.test_loss, line.test_loss, atol=1e-6)
    assert rep.bn_recomputed


def test_repaired_path_evaluates_the_corrected_points(data):
    a, b = _net(1), _net(2)
    res = mc.evaluate_repaired_path(a, b, data, data, ts=[0.0, 0.5, 1.0])
    mid, _ = mc.repair(a, b, 0.5, data)
    assert res.test_nll[1] == pytest.approx(evaluate(mid, data)["loss"], rel=1e-5)
    assert res.test_nll[0] == pytest.approx(evaluate(a, data)["loss"], rel=1e-5)


def test_a_given_point_is_corrected_like_the_line_point(data):
    a, b = _net(1), _net(2)
    rep = Repair(a, b, data)
    point = mc.linear_path(a, b).point(0.7)
    before = copy.deepcopy(point.state_dict())
    m1, _ = rep.at(0.7)
    m2, _ = rep.at(0.7, point=point)
    x = torch.randn(5, 1, 4, 4)
    assert torch.allclose(m1(x), m2(x), atol=1e-6)
    assert all(torch.equal(v, point.state_dict()[k]) for k, v in before.items())   # the input is not changed


def test_bad_inputs(data):
    a = _net(1)
    with pytest.raises(ValueError, match="t must lie"):
        Repair(a, _net(2), data).at(1.5)
    with pytest.raises(ValueError, match="different architectures"):
        mc.repair(a, nn.Sequential(nn.Linear(2, 2)), 0.5, data)
    with pytest.raises(ValueError, match="no batches"):
        mc.repair(a, _net(2), 0.5, [])
