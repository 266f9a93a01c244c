"""CurveModel's "linear" start with four and more bends, checked by hand.

With three bends the middle weight is 1/2, so a swapped (1 - w, w) would go
unnoticed; with K >= 4 bends, bend k must sit at fraction k/(K-1) of the way
from start to end, or the "straight" start zig-zags. Control points equally
spaced on a segment make a Bezier curve trace the segment at uniform speed
(Bernstein polynomials reproduce t: sum_k (k/n) B_k^n(t) = t), and a
polygonal chain through them is the segment itself, so for both families
θ(t) = (1 - t) a + t b exactly.
"""
import pytest
import torch

import modeconn as mc


def _endpoints():
    """Two different float64 MLPs (float64 so the hand formulas are tight)."""
    torch.manual_seed(11)
    a = mc.create_model("mlp", (6,), 3, depth=2, width=5).double()
    torch.manual_seed(12)
    b = mc.create_model("mlp", (6,), 3, depth=2, width=5).double()
    return a, b


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])


CURVES = [mc.Bezier(4), mc.Bezier(5), mc.PolyChain(4), mc.PolyChain(5)]


@pytest.mark.parametrize("curve", CURVES, ids=repr)
def test_linear_init_places_bend_k_at_fraction_k_over_K_minus_1(curve):
    a, b = _endpoints()
    model = mc.CurveModel(a, a, b, curve, init="linear")
    fa, fb = _flat(a), _flat(b)
    K = curve.num_bends
    bends = model.bends
    assert bends.shape == (K, fa.numel())
    for k in range(K):
        w = k / (K - 1)
        expected = (1 - w) * fa + w * fb
        assert torch.allclose(bends[k], expected, rtol=0, atol=1e-12), f"bend {k} of {curve!r}"
    # the same through the by-name view: bend k of every parameter
    for name, p_a in a.named_parameters():
        p_b = dict(b.named_parameters())[name]
        got = model.bends_by_name()[name]
        for k in range(K):
            w = k / (K - 1)
            assert torch.allclose(got[k], (1 - w) * p_a.detach() + w * p_b.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("curve", CURVES, ids=repr)
@pytest.mark.parametrize("fix", [(True, True), (False, True), (False, False)])
def test_linear_start_is_the_uniform_straight_segment(curve, fix):
    """θ(t) = (1-t) a + t b at several t, whichever bends are free (init ignores the fixing)."""
    a, b = _endpoints()
    model = mc.CurveModel(a, a, b, curve, init="linear", fix_start=fix[0], fix_end=fix[1])
    fa, fb = _flat(a), _flat(b)
    ts = [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.62, 0.8, 1.0]
    for t in ts:  # t as a float64 tensor: a Python float is taken as float32 (curves._as_t)
        got = model.flat_weights_at(torch.tensor(t, dtype=torch.float64)).detach()
        assert torch.allclose(got, (1 - t) * fa + t * fb, rtol=0, atol=1e-12), f"t={t} on {curve!r}"
    # batched ts give the same points
    batch = model.flat_weights_at(torch.tensor(ts, dtype=torch.float64)).detach()
    expected = torch.stack([(1 - t) * fa + t * fb for t in ts])
    assert torch.allclose(batch, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("curve", CURVES, ids=repr)
def test_linear_start_points_lie_on_the_segment(curve):
    """Collinearity without the uniform-speed claim: θ(t) - a is s (b - a) with 0 <= s <= 1."""
    a, b = _endpoints()
    model = mc.CurveModel(a, a, b, curve, init="linear")
    fa, fb = _flat(a), _flat(b)
    d = fb - fa
    for t in torch.linspace(0, 1, 9, dtype=torch.float64):
        r = model.flat_weights_at(t).detach() - fa
        s = float(r @ d / (d @ d))
        assert -1e-12 <= s <= 1 + 1e-12
        assert torch.allclose(r, s * d, rtol=0, atol=1e-12)


def test_linear_init_in_float32_matches_the_float64_hand_formula():
    """The default dtype: bends within float32 rounding of the float64 formula."""
    torch.manual_seed(3)
    a = mc.create_model("convnet", (1, 8, 8), 4, width=4)
    torch.manual_seed(4)
    b = mc.create_model("convnet", (1, 8, 8), 4, width=4)
    curve = mc.Bezier(5)
    model = mc.CurveModel(a, a, b, curve)
    fa, fb = _flat(a).double(), _flat(b).double()
    scale = float(torch.maximum(fa.abs(), fb.abs()).max())
    for k in range(5):
        w = k / 4
        assert torch.allclose(model.bends[k].double(), (1 - w) * fa + w * fb, rtol=0, atol=1e-6 * scale)
