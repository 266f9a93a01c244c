"""The curve front's baseline (benchmarks/_garipov_curves.py) computes what CurveModel computes.

Same bends -> same outputs at a fixed t and the same gradients w.r.t. the free
bend (loss = CE + 0.5 * wd * ||θ(t)||² on the baseline, the penalty inside
``training_weights``' backward on ours), so the benchmark compares equal work.
The reference plain models reproduce the zoo models from the same state dict.
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import modeconn as mc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._garipov_curves import (CurvePreResNet, CurveVGG16, RefPreResNet, RefVGG16,  # noqa: E402
                                        bezier_coefficients, load_bends)

WD = 5e-4


def _pair(arch):
    torch.manual_seed(0)
    if arch == "vgg":
        kw, shape = {"width_multiplier": 1 / 16}, (3, 8, 8)
        a, b, m = (mc.create_model("vgg16", shape, 10, **kw) for _ in range(3))
        return a, b, m, CurveVGG16(shape, **kw), shape
    shape = (3, 8, 8)
    a, b, m = (mc.create_model("preresnet", shape, 10, depth=8) for _ in range(3))
    return a, b, m, CurvePreResNet(shape, depth=8), shape


@pytest.mark.parametrize("arch", ["vgg", "preresnet"])
def test_baseline_matches_curve_model(arch):
    a, b, middle, peer, shape = _pair(arch)
    curve = mc.CurveModel(a, a, b, mc.Bezier(3), middle=[middle]).double()  # a middle bend off the segment
    load_bends(peer.double(), curve.bends_by_name())
    curve.train(), peer.train()
    for m in (*curve.modules(), *peer.modules()):
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # dropout draws differ between the two; everything else must agree
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 10, (6,))
    t = torch.tensor(0.3, dtype=torch.float64)
    out = curve.forward_weights(x, curve.training_weights(t, weight_decay=WD))  # fit_curve's step
    F.cross_entropy(out, y).backward()
    peer_out = peer(x, t)
    (F.cross_entropy(peer_out, y) + 0.5 * WD * peer.l2()).backward()
    assert torch.allclose(out, peer_out, rtol=1e-10, atol=1e-10)
    grads = curve.layout.unflatten(curve.free_bends.grad[0])
    own = dict(peer.named_parameters())
    for name, g in grads.items():
        mod, _, attr = name.rpartition(".")
        assert own[f"{mod}.{attr}_0"].grad is None and own[f"{mod}.{attr}_2"].grad is None  # ends fixed
        assert torch.allclose(own[f"{mod}.{attr}_1"].grad, g, rtol=1e-8, atol=1e-12), name
    # the penalty is there: without it the middle bend's gradient differs by wd * c_1(t) * θ(t)
    theta = curve.layout.unflatten(curve.flat_weights_at(t).detach())
    name = next(iter(grads))
    c1 = bezier_coefficients(t, 3)[1]
    assert torch.allclose(grads[name] - WD * c1 * theta[name], _grad_without_penalty(curve, x, y, t)[name])


def _grad_without_penalty(curve, x, y, t):
    curve.free_bends.grad = None
    F.cross_entropy(curve.forward_flat(x, curve.flat_weights_at(t)), y).backward()
    return curve.layout.unflatten(curve.free_bends.grad[0])


def test_reference_plain_models_are_the_zoo_models():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    for zoo, ref in ((mc.create_model("vgg16", (3, 32, 32), 10, width_multiplier=1 / 16),
                      RefVGG16(width_multiplier=1 / 16)),
                     (mc.create_model("preresnet", (3, 32, 32), 10, depth=8), RefPreResNet(depth=8))):
        ref.load_state_dict(zoo.state_dict())
        zoo.eval(), ref.eval()
        with torch.no_grad():
            assert torch.allclose(zoo(x), ref(x), atol=1e-6)
