"""SAM / ASAM: one step equals the two-step update computed by hand (float64), in every way it is driven."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import modeconn as mc
from modeconn.data import TensorLoader, epoch_generator
from modeconn.runtime import Hooks
from modeconn.training.loop import run_epoch
from modeconn.training.sam import SAM, frozen_bn_statistics, sam_step_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
    return net, x, y


def _by_hand(net, x, y, rho, lr, adaptive=False, eta=0.01):
    """w − lr·∇L(w + ε), ε = ρ g/‖g‖ (SAM) or ρ T²g/‖Tg‖ with T = |w| + η (ASAM), from torch.func gradients."""
    w = {k: v.detach().clone() for k, v in net.named_parameters()}

    def loss(params):
        return F.cross_entropy(functional_call(net, params, (x,)), y)

    g = grad(loss)(w)
    T = {k: (w[k].abs() + eta) if adaptive else torch.ones_like(w[k]) for k in w}
    norm = torch.sqrt(sum(((T[k] * g[k]) ** 2).sum() for k in w))
    eps = {k: rho * T[k] ** 2 * g[k] / norm for k in w}
    g2 = grad(loss)({k: w[k] + eps[k] for k in w})
    return {k: w[k] - lr * g2[k] for k in w}


@pytest.mark.parametrize("adaptive", [False, True])
def test_one_step_of_train_model_is_the_hand_computed_sam_update(adaptive):
    net, x, y = _tiny()
    expected = _by_hand(net, x, y, rho=0.3, lr=0.1, adaptive=adaptive)
    plain = copy.deepcopy(net)
    mc.train_model(net, TensorLoader(x, y, batch_size=6), epochs=1, lr=0.1, weight_decay=0.0, momentum=0.0,
                   schedule="constant", sam=0.3, sam_adaptive=adaptive)
    for k, p in net.named_parameters():
        assert torch.allclose(p, expected[k], atol=1e-12), k
    # and it is not plain SGD: the ascent step changed the update
    mc.train_model(plain, TensorLoader(x, y, batch_size=6), epochs=1, lr=0.1, weight_decay=0.0, momentum=0.0,
                   schedule="constant")
    assert not torch.allclose(plain[0].weight, net[0].weight, atol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_closure_step_is_the_hand_computed_update(adaptive):
    net, x, y = _tiny()
    expected = _by_hand(net, x, y, rho=0.2, lr=0.05, adaptive=adaptive, eta=0.1)
    sam = SAM(net.parameters(), torch.optim.SGD, rho=0.2, adaptive=adaptive, eta=0.1, lr=0.05)

    def closure():
        sam.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    at_w = float(F.cross_entropy(net(x), y).detach())
    assert float(sam.step(closure).detach()) == pytest.approx(at_w, abs=1e-12)  # step returns the loss at w
    for k, p in net.named_parameters():
        assert torch.allclose(p, expected[k], atol=1e-12), k


def test_step_without_first_step_is_refused():
    net, _, _ = _tiny()
    sam = SAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(RuntimeError, match="first_step"):
        sam.step()
    with pytest.raises(ValueError, match="rho"):
        SAM(net.parameters(), torch.optim.SGD, rho=0.0, lr=0.1)


def test_curve_sam_uses_the_same_t_in_both_passes():
    """fit_curve with SAM = the hand update of the free bend, both passes at the epoch generator's first t."""
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    curve = mc.CurveModel(a, a, b, mc.Bezier(3))
    t = torch.rand((), generator=epoch_generator(0, 0, stream=1000)).double()
    bends = curve.free_bends.detach().clone()

    def loss(free):
        c = curve.curve.coefficients(t).to(free)
        flat = c[0] * curve.bends[0].detach() + c[1] * free[0] + c[2] * curve.bends[2].detach()
        return F.cross_entropy(curve.forward_flat(x, flat), y)

    g = torch.func.grad(loss)(bends)
    g2 = torch.func.grad(loss)(bends + 0.5 * g / g.norm())
    mc.fit_curve(curve, TensorLoader(x, y, batch_size=8), epochs=1, lr=0.2, weight_decay=0.0, momentum=0.0,
                 schedule="constant", sam=0.5)
    assert torch.allclose(curve.free_bends.detach(), bends - 0.2 * g2, atol=1e-12)


def test_bn_statistics_come_from_the_first_pass_only():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    plain = copy.deepcopy(net)
    with torch.no_grad():
        plain(x)  # one training-mode forward at w: what the running statistics must hold
    sam = SAM(net.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    step = sam_step_loss(lambda xb, yb, g: (lambda o: (o, F.cross_entropy(o, yb), F.cross_entropy(o, yb)))(net(xb)),
                         sam, net)
    run_epoch(TensorLoader(x, y, batch_size=16), 0, 0, step, sam)
    bn, ref = net[1], plain[1]
    assert torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 1 and bn.momentum == ref.momentum
    with frozen_bn_statistics(net):
        net(x + 5.0)
    assert torch.equal(bn.running_mean, ref.running_mean)


def test_sam_run_resumes_exactly_and_refuses_other_settings(digits):
    loader = digits.train_loader(256, seed=0)
    torch.manual_seed(0)
    net = mc.create_model("mlp", digits.input_shape, digits.num_classes, width=16, depth=1)
    start = copy.deepcopy(net)
    mc.train_model(net, loader, epochs=2, lr=0.05, sam=0.05)
    states = []
    first = copy.deepcopy(start)
    mc.train_model(first, loader, epochs=2, lr=0.05, sam=0.05,
                   hooks=Hooks(on_epoch_end=lambda r, s: states.append(s)))
    resumed = copy.deepcopy(start)
    mc.train_model(resumed, loader, epochs=2, lr=0.05, sam=0.05, resume=states[0])
    for p, q in zip(net.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="sam"):
        mc.train_model(copy.deepcopy(start), loader, epochs=2, lr=0.05, sam=0.1, resume=states[0])
    with pytest.raises(ValueError, match="sam"):
        mc.train_model(copy.deepcopy(start), loader, epochs=2, lr=0.05, resume=states[0])


def test_train_and_train_curve_commands_record_sam(tmp_path, capsys):
    from modeconn import train, train_curve

    out = tmp_path / "m"
    assert train.main(["--model", "mlp", "--model-kwargs", "width=16", "depth=1", "--epochs", "1", "--sam", "0.05",
                       "--sam-adaptive", "--out", str(out), "--no-progress"]) == 0
    config = mc.load_checkpoint(out / "model.pt")["config"]
    assert config["sam"] == 0.05 and config["sam_adaptive"] is True
    assert train.main(["--epochs", "1", "--sam-adaptive", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--sam-adaptive needs --sam" in capsys.readouterr().err
    assert train.main(["--epochs", "1", "--sam", "-1", "--out", str(tmp_path / "y"), "--no-progress"]) == 2
    assert train_curve.main(["--a", str(out / "model.pt"), "--b", str(out / "model.pt"), "--epochs", "1",
                             "--sam", "0.1", "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    assert mc.load_checkpoint(tmp_path / "c" / "curve.pt")["config"]["sam"] == 0.1
