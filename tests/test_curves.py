import math

import pytest
import torch

import modeconn as mc


def test_bezier_coefficients_by_hand():
    c = mc.Bezier(3).coefficients(0.3)
    assert torch.allclose(c, torch.tensor([0.49, 0.42, 0.09]))
    c4 = mc.Bezier(4).coefficients(0.5)
    assert torch.allclose(c4, torch.tensor([1 / 8, 3 / 8, 3 / 8, 1 / 8]))
    c5 = mc.Bezier(5).coefficients(0.2)
    expected = [math.comb(4, k) * 0.2 ** k * 0.8 ** (4 - k) for k in range(5)]
    assert torch.allclose(c5, torch.tensor(expected))


def test_polychain_coefficients_by_hand():
    p3 = mc.PolyChain(3)
    assert torch.allclose(p3.coefficients(0.25), torch.tensor([0.5, 0.5, 0.0]))
    assert torch.allclose(p3.coefficients(0.75), torch.tensor([0.0, 0.5, 0.5]))
    assert torch.allclose(mc.PolyChain(4).coefficients(1 / 3), torch.tensor([0.0, 1.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(mc.PolyChain(4).coefficients(0.5), torch.tensor([0.0, 0.5, 0.5, 0.0]), atol=1e-6)


@pytest.mark.parametrize("curve", [mc.Bezier(2), mc.Bezier(3), mc.Bezier(6), mc.PolyChain(2), mc.PolyChain(5)])
def test_coefficients_sum_to_one_and_batch(curve):
    t = torch.linspace(0, 1, 37)
    c = curve.coefficients(t)
    assert c.shape == (37, curve.num_bends)
    assert torch.allclose(c.sum(-1), torch.ones(37), atol=1e-6)
    assert (c >= 0).all()
    for i in (0, 17, 36):
        assert torch.allclose(c[i], curve.coefficients(float(t[i])), atol=1e-7)


def test_curves_pass_through_their_bends():
    for K in (2, 3, 5):
        assert torch.equal(mc.Bezier(K).coefficients(0.0), torch.eye(K)[0])
        assert torch.equal(mc.Bezier(K).coefficients(1.0), torch.eye(K)[-1])
        for k in range(K):  # a polygonal chain passes through every bend
            assert torch.allclose(mc.PolyChain(K).coefficients(k / (K - 1)), torch.eye(K)[k], atol=1e-6)


def test_straight_line_is_both_families():
    t = torch.rand(20)
    assert torch.allclose(mc.Bezier(2).coefficients(t), mc.PolyChain(2).coefficients(t))
    assert torch.allclose(mc.Bezier(2).coefficients(t)[:, 1], t)


@pytest.mark.parametrize("bad", [1, 0, -3])
def test_too_few_bends(bad):
    with pytest.raises(ValueError, match="at least 2 bends"):
        mc.Bezier(bad)
    with pytest.raises(ValueError, match="at least 2 bends"):
        mc.PolyChain(bad)


@pytest.mark.parametrize("t", [1.5, -0.1, float("nan")])
def test_t_outside_unit_interval(t):
    with pytest.raises(ValueError, match=r"outside \[0, 1\]|NaN"):
        mc.Bezier(3).coefficients(t)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]|NaN"):
        mc.PolyChain(3).coefficients(torch.tensor([0.2, t]))
