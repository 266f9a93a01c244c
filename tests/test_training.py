import copy

import pytest
import torch
from torch import nn

import modeconn as mc
from modeconn.evaluation.path import evaluate_path
from modeconn.runtime import Hooks
from modeconn.training.schedules import make_scheduler, reference_lr_factor

# Garipov et al.'s train.py counts epochs 1..E and takes alpha = epoch / E: factor 1 for alpha <= 0.5,
# 1 - (alpha - 0.5) / 0.4 * 0.99 up to alpha = 0.9, then 0.01. By hand for E = 20 (alpha = 0.05 .. 1.0):
# epochs 1-10 at 1, epochs 11-18 on the ramp (steps of 0.05 / 0.4 * 0.99 = 0.12375, epoch 18 reaching 0.01),
# epochs 19-20 at 0.01.
REFERENCE_20 = [1.0] * 10 + [0.87625, 0.7525, 0.62875, 0.505, 0.38125, 0.2575, 0.13375, 0.01] + [0.01] * 2
# E = 4: alpha = 0.25, 0.5 -> 1; 0.75 -> 1 - 0.25 / 0.4 * 0.99 = 0.38125; 1.0 -> 0.01
REFERENCE_4 = [1.0, 1.0, 0.38125, 0.01]


@pytest.mark.parametrize("epochs, factors", [(20, REFERENCE_20), (4, REFERENCE_4), (1, [0.01])])
def test_reference_schedule_by_hand(epochs, factors):
    assert [reference_lr_factor(e, epochs) for e in range(epochs)] == pytest.approx(factors, abs=1e-12)
    # the scheduler the loops use gives epoch e (0-based) exactly that factor
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    sched = make_scheduler(opt, "reference", epochs)
    rates = []
    for _ in range(epochs):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([0.2 * f for f in factors], abs=1e-12)
    assert sum(f == pytest.approx(1.0) for f in factors) == (10 if epochs == 20 else 2 if epochs == 4 else 0)
    assert sum(f == pytest.approx(0.01) for f in factors) == (3 if epochs == 20 else 1)


def test_train_model_history_follows_the_reference_schedule(mlp_pair, digits):
    history = mc.train_model(copy.deepcopy(mlp_pair[0]), digits.train_loader(256, seed=0), epochs=4, lr=0.2)
    assert [r["lr"] for r in history] == pytest.approx([0.2 * f for f in REFERENCE_4], abs=1e-12)


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


def _dropout_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Dropout(0.5), nn.Linear(48, 10))


@pytest.mark.parametrize("which", ["curve", "model"])
def test_resume_with_dropout_matches_uninterrupted_run(which, digits, tmp_path):
    """Interrupted after epoch 2 and resumed (state through torch.save/load) == uninterrupted, bit for bit.

    The networks have dropout, whose masks come from the global RNG: the resumed run gets the same
    masks only if the state restores that RNG (the RNG is scrambled before resuming, so a missing
    restore cannot pass by luck).
    """
    a, b = _dropout_net(1), _dropout_net(2)
    loader = digits.train_loader(64, seed=3)

    def fresh():
        return mc.CurveModel(a, a, b, mc.Bezier(3)) if which == "curve" else copy.deepcopy(a)

    def fit(module, **kw):
        fn = mc.fit_curve if which == "curve" else mc.train_model
        return fn(module, loader, epochs=4, lr=0.03, seed=3, **kw)

    torch.manual_seed(7)
    full = fresh()
    fit(full)

    class Stop(Exception):
        pass

    saved = {}

    def stop_after_two(record, state):
        saved["state"] = state
        if record["epoch"] == 2:
            raise Stop

    torch.manual_seed(7)
    part = fresh()
    with pytest.raises(Stop):
        fit(part, hooks=Hooks(on_epoch_end=stop_after_two))
    torch.save(saved["state"], tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    torch.manual_seed(12345)
    resumed = fresh()
    history = fit(resumed, resume=state)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="different settings: lr=0.05"):
        (mc.fit_curve if which == "curve" else mc.train_model)(fresh(), loader, epochs=4, lr=0.05, seed=3,
                                                                resume=state)


def test_bad_training_arguments(mlp_pair, digits):
    a, b = mlp_pair
    with pytest.raises(ValueError, match="epochs"):
        mc.train_model(copy.deepcopy(a), digits.train_loader(), epochs=0)
    with pytest.raises(ValueError, match="no free bends"):
        mc.fit_curve(mc.linear_path(a, b), digits.train_loader(), epochs=1)
    with pytest.raises(ValueError, match="schedule"):
        mc.train_model(copy.deepcopy(a), digits.train_loader(), epochs=1, schedule="warp")


def test_training_weights_gradient_includes_weight_decay(mlp_pair):
    a, b = mlp_pair
    curve = mc.CurveModel(a, a, b, mc.Bezier(4), fix_start=True, fix_end=False)
    t, wd = torch.tensor(0.3), 0.02
    g = torch.randn(curve.num_parameters)
    # the custom backward
    weights = curve.training_weights(t, wd)
    sum((weights[n] * gn).sum() for n, gn in curve.layout.unflatten(g).items()).backward()
    theta = torch.cat([weights[n].detach().reshape(-1) for n in curve.layout.names])
    fast = curve.free_bends.grad.clone()
    curve.free_bends.grad = None
    # the plain autograd formula: <θ(t), g> + 0.5 wd ||θ(t)||²
    theta2 = curve.flat_weights_at(t)
    ((theta2 * g).sum() + 0.5 * wd * theta2.pow(2).sum()).backward()
    assert torch.allclose(theta, theta2, atol=1e-6)
    assert torch.allclose(fast, curve.free_bends.grad, atol=1e-5, rtol=1e-5)
