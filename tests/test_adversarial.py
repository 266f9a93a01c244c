"""PGD attacks, adversarial training and robust loss along a path (modeconn.evaluation.adversarial)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeconn.core.curve_model import linear_path
from modeconn.data import TensorLoader
from modeconn.evaluation.adversarial import PGD, pgd_attack, pgd_step, robust_evaluate, robust_path
from modeconn.evaluation.bn import recompute_bn
from modeconn.evaluation.path import evaluate_path
from modeconn.training.loop import train_model


def _linear_grad(W, b, x, y):
    """∇ₓ Σ_i CE(W x_i + b, y_i) by hand: Wᵀ (softmax(z) − onehot(y)) per sample, float64."""
    z = x @ W.T + b
    p = torch.softmax(z, dim=1)
    p[torch.arange(len(y)), y] -= 1
    return p @ W


def _tiny(seed=0):
    torch.manual_seed(seed)
    net = nn.Linear(5, 3).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    return net, x, y


def test_linf_step_is_the_signed_gradient_step_clipped_to_the_box():
    net, x, y = _tiny()
    attack = PGD(eps=0.05, steps=1, step_size=0.03, random_start=False)
    start = x + 0.04 * torch.sign(torch.randn_like(x))  # inside the box; a step of 0.03 leaves it somewhere
    g = _linear_grad(net.weight.detach(), net.bias.detach(), start, y)
    expected = x + torch.clamp(start + 0.03 * g.sign() - x, -0.05, 0.05)
    got = pgd_step(net, start, x, y, attack)
    assert torch.allclose(got, expected, atol=1e-12)
    assert ((got - x).abs().max() - 0.05).abs() < 1e-12  # the projection was active
    assert net.weight.grad is None  # only the input was differentiated


def test_l2_step_is_the_normalised_gradient_step_projected_onto_the_ball():
    net, x, y = _tiny(1)
    attack = PGD(eps=0.1, steps=1, norm="l2", step_size=0.2, random_start=False)
    start = x.clone()
    start[0] += 0.07 * torch.ones(5) / 5 ** 0.5  # |step| 0.2 > 0.07 + 0.1: sample 0 leaves the ball
    g = _linear_grad(net.weight.detach(), net.bias.detach(), start, y)
    moved = start + 0.2 * g / g.norm(dim=1, keepdim=True)
    delta = moved - x
    factor = torch.clamp(0.1 / delta.norm(dim=1, keepdim=True), max=1.0)
    got = pgd_step(net, start, x, y, attack)
    assert torch.allclose(got, x + delta * factor, atol=1e-12)
    assert abs(float((got - x)[0].norm()) - 0.1) < 1e-12 and float(factor[0]) < 1


def test_attack_stays_in_the_ball_raises_the_loss_and_leaves_bn_statistics_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    before = copy.deepcopy(net.state_dict())
    for norm in ("linf", "l2"):
        attack = PGD(eps=0.2, steps=5, norm=norm)
        adv = pgd_attack(net, x, y, attack, generator=torch.Generator().manual_seed(0))
        size = (adv - x).abs().flatten(1).amax(1) if norm == "linf" else (adv - x).flatten(1).norm(dim=1)
        assert float(size.max()) <= 0.2 + 1e-6
        net.eval()
        assert F.cross_entropy(net(adv), y) > F.cross_entropy(net(x), y) + 1e-3
        net.train()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_pgd_rejects_bad_settings_by_name():
    with pytest.raises(ValueError, match="eps"):
        PGD(eps=0.0)
    with pytest.raises(ValueError, match="steps"):
        PGD(eps=0.1, steps=0)
    with pytest.raises(ValueError, match="norm"):
        PGD(eps=0.1, norm="l1")


def test_adversarial_training_step_equals_sgd_on_hand_made_fgsm_examples():
    """One-step PGD from x with α = ε is FGSM: x + ε sign(∇ₓL); train_model must take SGD steps on those."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    ref = copy.deepcopy(net)
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    loader = TensorLoader(x, y, batch_size=8)
    attack = PGD(eps=0.1, steps=1, step_size=0.1, random_start=False)
    train_model(net, loader, epochs=1, lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant",
                adversarial=attack)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for xb, yb in loader:
        xa = xb.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(ref(xa), yb, reduction="sum"), xa)
        opt.zero_grad()
        F.cross_entropy(ref(xb + 0.1 * g.sign()), yb).backward()
        opt.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_robust_path_recomputes_bn_on_clean_data_and_matches_endpoints():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    a, b = make(), make()
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    data = TensorLoader(x, y, batch_size=32)
    for m in (a, b):
        recompute_bn(m, data)
    attack = PGD(eps=0.3, steps=3)
    path = linear_path(a, b)
    r = robust_path(path, data, attack, [0.0, 0.5, 1.0], bn_loader=data)
    assert abs(r["robust_test_loss"][0] - robust_evaluate(a, data, attack)["loss"]) < 1e-6
    mid = recompute_bn(path.point(0.5), data)  # independent: the midpoint with clean BN statistics
    assert abs(r["robust_test_loss"][1] - robust_evaluate(mid, data, attack)["loss"]) < 1e-6
    clean = evaluate_path(path, data, data, ts=[0.0, 0.5, 1.0])
    assert np.all(r["robust_test_loss"] > clean.test_nll)  # the attack raises the loss at every point
    clean.extra.update(r)
    d = clean.to_dict()
    assert d["barriers"]["robust_test_loss"]["interp"]["barrier"] == pytest.approx(
        clean.barrier("robust_test_loss"))


def test_adversarial_curve_step_attacks_the_network_at_the_sampled_t():
    """fit_curve(adversarial=FGSM) takes SGD steps on the bends with x + ε sign(∇ₓL(θ(t), x)) at its own t."""
    from modeconn import Bezier, CurveModel
    from modeconn.data import epoch_generator
    from modeconn.training.loop import fit_curve

    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), nn.Sequential(nn.Linear(4, 6), nn.Tanh(),
                                                                                      nn.Linear(6, 3))
    curve = CurveModel(a, a, b, Bezier(3))
    ref = copy.deepcopy(curve)
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    loader = TensorLoader(x, y, batch_size=8)
    attack = PGD(eps=0.2, steps=1, step_size=0.2, random_start=False)
    fit_curve(curve, loader, epochs=1, lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant",
              adversarial=attack)
    opt = torch.optim.SGD([ref.free_bends], lr=0.1)
    gen = epoch_generator(0, 0, stream=1000)
    for xb, yb in loader:
        t = torch.rand((), generator=gen)
        fixed = ref.flat_weights_at(t).detach()
        xa = xb.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(ref.forward_flat(xa, fixed), yb, reduction="sum"), xa)
        opt.zero_grad()
        F.cross_entropy(ref.forward_flat(xb + 0.2 * g.sign(), ref.flat_weights_at(t)), yb).backward()
        opt.step()
    assert not torch.allclose(curve.free_bends, CurveModel(a, a, b, Bezier(3)).free_bends)
    assert torch.allclose(curve.free_bends, ref.free_bends, atol=1e-6)
