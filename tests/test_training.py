import copy

import pytest
import torch

import modeconn as mc
from modeconn.evaluation.path import evaluate_path
from modeconn.training.loop import reference_lr_factor


def test_reference_schedule_by_hand():
    assert reference_lr_factor(0, 10) == 1.0
    assert reference_lr_factor(5, 10) == 1.0
    assert reference_lr_factor(7, 10) == pytest.approx(1 - 0.2 / 0.4 * 0.99)
    assert reference_lr_factor(9, 10) == pytest.approx(0.01)
    assert reference_lr_factor(19, 20) == pytest.approx(0.01)


def test_fixed_endpoints_do_not_move_free_ones_do(mlp_pair, digits):
    a, b = mlp_pair
    loader = digits.train_loader(128, seed=0)
    fixed = mc.CurveModel(a, a, b, mc.Bezier(3))
    before = fixed.bends.clone()
    mc.fit_curve(fixed, loader, epochs=1, lr=0.05)
    after = fixed.bends
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert not torch.allclose(after[1], before[1])

    free = mc.CurveModel(a, a, b, mc.Bezier(3), fix_start=False, fix_end=True)
    before = free.bends.clone()
    mc.fit_curve(free, loader, epochs=1, lr=0.05)
    assert not torch.allclose(free.bends[0], before[0])
    assert torch.equal(free.bends[2], before[2])


def test_fit_curve_lowers_the_loss_in_the_middle(mlp_pair, digits):
    a, b = mlp_pair
    curve = mc.CurveModel(a, a, b, mc.Bezier(3))
    tr, te = digits.eval_loader("train"), digits.eval_loader("test")
    before = evaluate_path(curve, tr, te, ts=[0.5])
    mc.fit_curve(curve, digits.train_loader(64, seed=0), epochs=5, lr=0.05)
    after = evaluate_path(curve, tr, te, ts=[0.0, 0.5])
    assert after.train_loss[1] < 0.5 * before.train_loss[0]
    assert after.test_loss[1] < before.test_loss[0]


def test_weight_decay_is_applied_at_the_sampled_point(mlp_pair, digits):
    a, b = mlp_pair
    loader = digits.train_loader(256, seed=0)
    c0 = mc.CurveModel(a, a, b, mc.Bezier(3))
    c1 = mc.CurveModel(a, a, b, mc.Bezier(3))
    mc.fit_curve(c0, loader, epochs=1, lr=0.05, weight_decay=0.0)
    mc.fit_curve(c1, loader, epochs=1, lr=0.05, weight_decay=0.1)
    # the penalty pulls the trained middle bend towards 0
    assert c1.bends[1].norm() < c0.bends[1].norm()


@pytest.mark.parametrize("which", ["curve", "model"])
def test_resume_matches_uninterrupted_run(which, mlp_pair, digits):
    a, b = mlp_pair
    loader = digits.train_loader(64, seed=3)

    def fresh():
        return mc.CurveModel(a, a, b, mc.Bezier(3)) if which == "curve" else copy.deepcopy(a)

    def fit(module, **kw):
        fn = mc.fit_curve if which == "curve" else mc.train_model
        return fn(module, loader, epochs=4, lr=0.03, seed=3, **kw)

    full = fresh()
    fit(full)

    saved = {}

    class Stop(Exception):
        pass

    def stop_after_two(record, state):
        saved["state"] = copy.deepcopy(state)
        if record["epoch"] == 2:
            raise Stop

    part = fresh()
    with pytest.raises(Stop):
        fit(part, on_epoch_end=stop_after_two)
    resumed = fresh()
    history = fit(resumed, resume=saved["state"])
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


def test_bad_training_arguments(mlp_pair, digits):
    a, b = mlp_pair
    with pytest.raises(ValueError, match="epochs"):
        mc.train_model(copy.deepcopy(a), digits.train_loader(), epochs=0)
    with pytest.raises(ValueError, match="no free bends"):
        mc.fit_curve(mc.linear_path(a, b), digits.train_loader(), epochs=1)
    with pytest.raises(ValueError, match="schedule"):
        mc.train_model(copy.deepcopy(a), digits.train_loader(), epochs=1, schedule="warp")


def test_training_point_gradient_includes_weight_decay(mlp_pair):
    a, b = mlp_pair
    curve = mc.CurveModel(a, a, b, mc.Bezier(4), fix_start=True, fix_end=False)
    t, wd = torch.tensor(0.3), 0.02
    g = torch.randn(curve.num_parameters)
    # the custom backward
    theta = curve.training_point(t, wd)
    (theta * g).sum().backward()
    fast = curve.free_bends.grad.clone()
    curve.free_bends.grad = None
    # the plain autograd formula: <θ(t), g> + 0.5 wd ||θ(t)||²
    theta2 = curve.flat_weights_at(t)
    ((theta2 * g).sum() + 0.5 * wd * theta2.pow(2).sum()).backward()
    assert torch.allclose(theta, theta2, atol=1e-6)
    assert torch.allclose(fast, curve.free_bends.grad, atol=1e-5, rtol=1e-5)
