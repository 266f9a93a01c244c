"""What the training loops promise beyond their numbers (mutation run 10, training/loop.py): the settings a resume
state records (and so refuses to resume under other ones), SAM's variants reaching the curve's optimizer, a
repeatable adversarial curve run, the warm-up's length, and the divergence message naming the learning rate."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import modeconn as mc
from modeconn.data import TensorLoader
from modeconn.evaluation.adversarial import PGD
from modeconn.runtime import Hooks
from modeconn.training.loop import fit_curve, train_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=40, batch=8):
    g = torch.Generator().manual_seed(0)
    return TensorLoader(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g), batch_size=batch,
                        shuffle=True, seed=1)


def _curve():
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)) for _ in range(2))
    return mc.CurveModel(a, a, b, mc.Bezier(3))


def _states():
    states = []
    return states, Hooks(on_epoch_end=lambda record, state: states.append(state))


def test_a_curve_run_records_every_setting_it_depends_on():
    states, hooks = _states()
    attack = PGD(eps=0.1, steps=1)
    fit_curve(_curve(), _data(), epochs=1, lr=0.02, weight_decay=1e-3, momentum=0.5, schedule="cosine", seed=3,
              sam=0.05, sam_adaptive=True, sam_sparsity=0.5, sam_mask="random", adversarial=attack, hooks=hooks)
    assert states[0]["settings"] == {
        "loop": "fit_curve", "epochs": 1, "lr": 0.02, "weight_decay": 1e-3, "momentum": 0.5, "schedule": "cosine",
        "seed": 3, "sam": 0.05, "sam_adaptive": True, "sam_sparsity": 0.5, "sam_mask": "random",
        "adversarial": attack.as_dict()}


def test_a_plain_run_records_no_optional_setting_and_the_documented_defaults():
    states, hooks = _states()
    history = train_model(nn.Linear(4, 3), _data(), hooks=hooks)
    assert len(history) == 20
    assert states[0]["settings"] == {"loop": "train_model", "epochs": 20, "lr": 0.05, "weight_decay": 5e-4,
                                     "momentum": 0.9, "schedule": "reference", "seed": 0}
    states, hooks = _states()
    assert len(fit_curve(_curve(), _data(), hooks=hooks)) == 20
    assert states[0]["settings"] == {"loop": "fit_curve", "epochs": 20, "lr": 0.03, "weight_decay": 5e-4,
                                     "momentum": 0.9, "schedule": "reference", "seed": 0}


@pytest.mark.parametrize("warmup_epochs,steps", [(0.1, 1), (0.5, 2), (2, 10)])
def test_the_warm_up_lasts_its_epochs_of_steps_at_least_one(warmup_epochs, steps):
    states, hooks = _states()
    train_model(nn.Linear(4, 3), _data(), epochs=3, lr=0.05, warmup_epochs=warmup_epochs, hooks=hooks)  # 5 steps
    assert states[0]["settings"]["warmup_steps"] == steps


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_a_bad_warm_up_is_refused(bad):
    with pytest.raises(ValueError, match="warmup_epochs must be a number >= 0"):
        train_model(nn.Linear(4, 3), _data(), epochs=1, warmup_epochs=bad)


def _bends_after(global_seed=None, **kw):
    curve = _curve()
    if global_seed is not None:
        torch.manual_seed(global_seed)
    fit_curve(curve, _data(), epochs=1, lr=0.1, seed=2, **kw)
    return curve.free_bends.detach().clone()


def test_sam_variants_reach_the_curves_optimizer():
    plain = _bends_after(sam=0.2)
    assert not torch.allclose(_bends_after(sam=0.2, sam_adaptive=True), plain)
    assert not torch.allclose(_bends_after(sam=0.2, sam_sparsity=0.5, sam_mask="random"), plain)


def test_an_adversarial_curve_run_is_repeatable_whatever_the_global_generator():
    attack = PGD(eps=0.2, steps=2, random_start=True)
    first = _bends_after(global_seed=11, adversarial=attack)
    assert torch.equal(_bends_after(global_seed=12, adversarial=attack), first)


def test_a_diverging_curve_names_its_learning_rate():
    with pytest.raises(FloatingPointError, match=r"lower the learning rate \(lr=1e\+30\)"):
        fit_curve(_curve(), _data(), epochs=1, lr=1e30)


def test_with_amp_the_curve_step_runs_the_network_in_bf16_and_returns_float32():
    from modeconn.runtime import Runtime
    from modeconn.training.loop import curve_training

    curve = _curve()
    *_, stepper, ddp = curve_training(curve, _data(), 1, 0.1, 0.9, "constant", 0.0, Runtime(amp=True))
    x, t = torch.randn(5, 4), torch.tensor(0.3)
    out, _ = stepper(x, t)
    weights = curve.weights_at(t)  # θ(t) stays float32; only the network runs under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = curve.forward_weights(x, weights)
    assert not ddp and out.dtype == torch.float32 and want.dtype == torch.bfloat16
    assert torch.equal(out, want.float())


def test_a_network_of_one_parameter_tensor_trains():
    net = nn.Linear(4, 3, bias=False)
    before = net.weight.detach().clone()
    history = train_model(net, _data(), epochs=1, lr=0.05)
    assert len(history) == 1 and not torch.equal(net.weight, before)


def test_compile_wraps_the_network_and_the_curve_step(monkeypatch):
    """With ``Runtime(compile=True)`` the trained module goes through ``torch.compile`` (recorded here by a
    stand-in that returns the module itself, so no compiler is needed)."""
    from modeconn.runtime import Runtime
    from modeconn.training.loop import _CurveStep

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    net = nn.Linear(4, 3)
    train_model(net, _data(), epochs=1, runtime=Runtime(compile=True))
    assert compiled == [net]
    fit_curve(_curve(), _data(), epochs=1, runtime=Runtime(compile=True))
    assert len(compiled) == 2 and isinstance(compiled[1], _CurveStep)


def test_a_network_run_records_every_setting_it_depends_on():
    states, hooks = _states()
    attack = PGD(eps=0.1, steps=1)
    train_model(nn.Linear(4, 3), _data(), epochs=2, lr=0.02, weight_decay=1e-3, momentum=0.5, schedule="cosine",
                seed=3, sam=0.05, sam_adaptive=True, sam_sparsity=0.5, sam_mask="random", adversarial=attack,
                warmup_epochs=1, hooks=hooks)
    assert states[0]["settings"] == {
        "loop": "train_model", "epochs": 2, "lr": 0.02, "weight_decay": 1e-3, "momentum": 0.5, "schedule": "cosine",
        "seed": 3, "sam": 0.05, "sam_adaptive": True, "sam_sparsity": 0.5, "sam_mask": "random", "warmup_steps": 5,
        "adversarial": attack.as_dict()}


class _Counter:
    """An ``epoch_fields`` with a resume state (as ``NTKTracker``): its record entry and its state."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return {"calls": self.calls}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_epoch_fields_join_the_records_and_their_state_the_resume_state():
    states, hooks = _states()
    history = train_model(nn.Linear(4, 3), _data(), epochs=2, lr=0.05, epoch_fields=_Counter(), hooks=hooks)
    assert [r["calls"] for r in history] == [1, 2]
    assert [s["epoch_fields"] for s in states] == [{"calls": 1}, {"calls": 2}]
    resumed = _Counter()
    again = train_model(nn.Linear(4, 3), _data(), epochs=2, lr=0.05, epoch_fields=resumed, resume=states[0])
    assert [r["calls"] for r in again] == [1, 2] and resumed.calls == 2


def test_a_diverging_network_names_its_learning_rate_and_the_warm_up():
    with pytest.raises(FloatingPointError, match=r"lower the learning rate \(lr=1e\+30\) or warm it up longer"):
        train_model(nn.Linear(4, 3), _data(), epochs=1, lr=1e30)


def test_a_curve_follows_the_reference_schedule_without_a_warm_up():
    from tests.test_training import REFERENCE_4

    history = fit_curve(_curve(), _data(), epochs=4, lr=0.2)
    assert [r["lr"] for r in history] == pytest.approx([0.2 * f for f in REFERENCE_4], abs=1e-12)


def test_the_losses_by_name_and_a_callable():
    from modeconn.training.loop import get_loss

    def mine(out, y):
        return out.sum()

    assert get_loss(mine) is mine
    out, y = torch.randn(5, 1), torch.randn(5, dtype=torch.float64)
    assert torch.equal(get_loss("mse")(out, y), ((out[:, 0] - y.float()) ** 2).mean())
    logits, labels = torch.randn(5, 3), torch.randint(0, 3, (5,))
    assert torch.equal(get_loss("cross_entropy")(logits, labels), torch.nn.functional.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        get_loss("hinge")


def test_with_amp_a_network_step_takes_its_loss_in_float32():
    from modeconn.runtime import Runtime
    from modeconn.training.loop import model_step

    net = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    out, value, logged = model_step(net, "cross_entropy", Runtime(amp=True), torch.device("cpu"))(x, y, None)
    assert out.dtype == torch.bfloat16 and value.dtype == torch.float32 and logged is value
    assert torch.equal(value, torch.nn.functional.cross_entropy(out.float(), y))


@pytest.mark.parametrize("kw,message", [({"epochs": 1.5}, "epochs must be an integer"),
                                        ({"epochs": True}, "epochs must be an integer"),
                                        ({"lr": 0.0}, "lr must be a positive number"),
                                        ({"lr": -0.1}, "lr must be a positive number"),
                                        ({"lr": float("inf")}, "lr must be a positive number")])
def test_bad_epochs_and_rates_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        train_model(nn.Linear(4, 3), _data(), **{"epochs": 1, **kw})


def test_sam_runs_take_the_momentum_and_the_weight_decay():
    def weights(**kw):
        net = nn.Linear(4, 3)
        with torch.no_grad():
            net.weight.fill_(0.1), net.bias.zero_()
        train_model(net, _data(), epochs=2, lr=0.05, sam=0.05, **kw)
        return net.weight.detach().clone()

    base = weights(momentum=0.9, weight_decay=0.0)
    assert not torch.allclose(weights(momentum=0.0, weight_decay=0.0), base)
    assert not torch.allclose(weights(momentum=0.9, weight_decay=0.1), base)


def test_the_resume_state_holds_the_model_optimizer_and_scheduler_by_name():
    states, hooks = _states()
    net = nn.Linear(4, 3)
    train_model(net, _data(), epochs=1, lr=0.05, hooks=hooks)
    assert {"model", "optimizer", "scheduler", "epoch", "history", "settings", "rng"} <= set(states[0])
    assert all(torch.equal(states[0]["model"][k], v) for k, v in net.state_dict().items())


def test_a_mask_without_sparsity_is_still_ssam():
    states, hooks = _states()
    train_model(nn.Linear(4, 3), _data(), epochs=1, sam=0.05, sam_mask="random", hooks=hooks)
    assert states[0]["settings"]["sam_mask"] == "random" and states[0]["settings"]["sam_sparsity"] == 0.0


@pytest.mark.parametrize("out_shape,y,expected", [
    ((5, 3), torch.zeros(5, dtype=torch.long), True),            # logits and class labels
    ((5, 3), torch.zeros(5), False),                              # float targets: regression
    ((2, 4, 7), torch.zeros(2, 4, dtype=torch.long), True),      # tokens: [B, T, V] and [B, T]
    ((2, 4, 7), torch.zeros(2, 4), False),
    ((2, 4, 7), torch.zeros(2, dtype=torch.long), False),        # 3-D output, one label per sequence
    ((2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), False),  # per-pixel labels: not counted
    ((5,), torch.zeros(5, dtype=torch.long), False),
])
def test_accuracy_is_reported_for_class_logits_and_token_logits_only(out_shape, y, expected):
    from modeconn.training.loop import _is_classification

    assert _is_classification(torch.zeros(out_shape), y) is expected


def test_a_resumed_run_counts_its_finished_steps_first():
    states, hooks = _states()
    train_model(nn.Linear(4, 3), _data(), epochs=2, lr=0.05, hooks=hooks)
    steps = []
    train_model(nn.Linear(4, 3), _data(), epochs=2, lr=0.05, resume=states[0], hooks=Hooks(progress=steps.append))
    assert steps[0] == 5 and sum(steps) == 10 and len(steps) == 6  # the first epoch's 5 steps, then one by one


def test_each_record_carries_its_epochs_duration():
    import time

    t0 = time.perf_counter()
    history = train_model(nn.Linear(4, 3), _data(), epochs=2, lr=0.05)
    elapsed = time.perf_counter() - t0
    assert all(isinstance(r["seconds"], float) and 0 <= r["seconds"] for r in history)
    assert sum(r["seconds"] for r in history) <= elapsed  # a part of the call, not a clock reading


def test_an_epochs_loss_and_accuracy_are_the_means_over_its_samples():
    net = nn.Linear(4, 3)
    data = _data()
    x, y = data.x, data.y
    with torch.no_grad():
        out = net(x)
    want_loss = float(torch.nn.functional.cross_entropy(out.double(), y))
    want_acc = float((out.argmax(1) == y).double().mean())
    record = train_model(net, data, epochs=1, lr=1e-30, momentum=0.0, weight_decay=0.0, schedule="constant")[0]
    assert record["loss"] == pytest.approx(want_loss, rel=1e-6)  # steps of 1e-30 leave the network as it was
    assert record["acc"] == pytest.approx(want_acc, abs=1e-12)


def test_a_regression_run_reports_no_accuracy():
    g = torch.Generator().manual_seed(0)
    data = TensorLoader(torch.randn(20, 4, generator=g), torch.randn(20, generator=g), batch_size=5)
    record = train_model(nn.Linear(4, 1), data, epochs=1, lr=0.01, loss="mse")[0]
    assert record["acc"] != record["acc"] and record["loss"] > 0  # NaN
