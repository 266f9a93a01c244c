"""CurveModel's promises that the curve tests did not pin (mutation run 10, core/curve_model.py): every field of a
checkpoint survives the round trip (curve family, fixed bends, the live and both endpoints' BatchNorm statistics),
a minimal description rebuilds with its documented defaults, a chain passes through each network at its own t,
the endpoints' own statistics at t = 0 and 1 whatever the live ones are, weights with other buffers, extrapolation
only when asked, and no weight decay unless asked. Expected values are built by hand from the endpoints' tensors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import modeconn as mc
from tests.test_curve_model import randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")


def _bn_net(seed):
    torch.manual_seed(seed)
    return randomize_bn(mc.create_model("convnet", (1, 8, 8), 10, bn=True, width=4), seed).eval()


def _buffers(module):
    return {n: b.clone() for n, b in module.named_buffers()}


def _set_live_buffers(curve, seed):
    """Live BN statistics unlike either endpoint's (as after a recompute at an inner point)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, b in curve.net.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand(b.shape, generator=g) + 0.25)


def _assert_same(d1, d2):
    assert d1.keys() == d2.keys()
    for k in d1:
        assert torch.equal(d1[k], d2[k]), k


def test_a_checkpoint_keeps_the_family_the_fixed_bends_and_every_set_of_statistics(tmp_path):
    a, m1, m2, b = (_bn_net(s) for s in (1, 2, 3, 4))
    curve = mc.CurveModel(a, a, b, mc.PolyChain(4), middle=[m1, m2], fix_middle=True, fix_end=False)
    assert curve.fixed_idx == [0, 1, 2] and curve.free_idx == [3]
    _set_live_buffers(curve, 5)
    meta = {"arch": "convnet", "arch_kwargs": {"bn": True, "width": 4}, "input_shape": [1, 8, 8], "num_classes": 10}
    mc.save_curve(tmp_path / "c.pt", curve, meta)
    back, _ = mc.load_curve(tmp_path / "c.pt")

    assert back.curve == mc.PolyChain(4)
    assert (back.fix_start, back.fix_middle, back.fix_end) == (True, True, False)
    assert back.fixed_idx == [0, 1, 2] and back.free_idx == [3]
    assert torch.equal(back.bends, curve.bends)
    for k, net in enumerate((a, m1, m2, b)):  # bend k is network k, parameter by parameter
        _assert_same(back.layout.unflatten(back.bends[k]), dict(net.named_parameters()))
    _assert_same(_buffers(back.net), _buffers(curve.net))  # the live statistics, not an endpoint's
    _assert_same(back.endpoint_buffers(0), _buffers(a))
    _assert_same(back.endpoint_buffers(1), _buffers(b))
    # the end is free, so t = 1 uses the live statistics; t = 0 the start's own
    _assert_same(_buffers(back.point(0.0)), _buffers(a))
    _assert_same(_buffers(back.point(1.0)), _buffers(curve.net))


def test_a_minimal_description_rebuilds_with_the_documented_defaults():
    a, b = _bn_net(1), _bn_net(2)
    template = _bn_net(3)
    mid = {n: (p + q) / 2 for (n, p), q in zip(a.named_parameters(), b.parameters())}
    bends = {n: torch.stack([p.detach(), mid[n].detach(), q.detach()])
             for (n, p), q in zip(a.named_parameters(), b.parameters())}
    desc = {"curve": "bezier", "num_bends": 3, "fix_start": True, "fix_end": True, "bends": bends}
    curve = mc.CurveModel.from_description(template, desc)
    assert curve.curve == mc.Bezier(3) and curve.fix_middle is False
    assert curve.fixed_idx == [0, 2] and curve.free_idx == [1]
    free_start = mc.CurveModel.from_description(template, {**desc, "fix_start": False})
    assert free_start.fix_start is False and free_start.fixed_idx == [2] and free_start.free_idx == [0, 1]
    for k in range(3):
        _assert_same(curve.layout.unflatten(curve.bends[k]), {n: v[k] for n, v in bends.items()})
    # no statistics in the description: the template's are the live ones and both endpoints'
    _assert_same(_buffers(curve.net), _buffers(template))
    _assert_same(curve.endpoint_buffers(0), _buffers(template))
    _assert_same(curve.endpoint_buffers(1), _buffers(template))


def test_a_chain_passes_through_each_network_at_its_own_t():
    nets = [_bn_net(s) for s in (1, 2, 3, 4)]
    chain = mc.chain_path(nets, template=nets[0])
    assert chain.curve == mc.PolyChain(4) and chain.free_idx == []
    for k, net in enumerate(nets):
        _assert_same(chain.weights_at(k / 3), {n: p.detach() for n, p in net.named_parameters()})
    # halfway between the first two networks
    half = chain.weights_at(1 / 6)
    for n, p in nets[0].named_parameters():
        torch.testing.assert_close(half[n], (p + nets[1].get_parameter(n)).detach() / 2)
    _assert_same(chain.endpoint_buffers(1), _buffers(nets[-1]))


def test_a_chain_of_two_is_the_line_and_of_one_is_refused():
    a, b = _bn_net(1), _bn_net(2)
    chain, line = mc.chain_path([a, b], template=a), mc.linear_path(a, b)
    assert torch.equal(chain.bends, line.bends) and chain.free_idx == line.free_idx == []
    with pytest.raises(ValueError, match="at least two networks"):
        mc.chain_path([a], template=a)


def test_the_endpoints_keep_their_own_statistics_whatever_the_live_ones_are():
    a, b = _bn_net(1), _bn_net(2)
    curve = mc.CurveModel(a, a, b, mc.Bezier(3)).eval()
    _set_live_buffers(curve, 7)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(curve.point(0.0)(x), a(x))
        assert torch.equal(curve.point(1.0)(x), b(x))
    _assert_same(_buffers(curve.point(0.5)), _buffers(curve.net))


def test_forward_flat_runs_with_the_buffers_it_is_given():
    a, b = _bn_net(1), _bn_net(2)
    curve = mc.CurveModel(a, a, b, mc.Bezier(3)).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        # a's weights with b's statistics: exactly the network a with b's buffers loaded
        hybrid = _bn_net(1)
        hybrid.load_state_dict({**a.state_dict(), **_buffers(b)})
        out = curve.forward_flat(x, curve.flat_weights_at(0.0), buffers=_buffers(b))
        assert torch.equal(out, hybrid(x))
        assert not torch.allclose(out, a(x))


def test_has_batchnorm_and_repr_describe_the_template():
    bn = mc.CurveModel(_bn_net(1), _bn_net(1), _bn_net(2))
    plain = mc.linear_path(nn.Linear(3, 2), nn.Linear(3, 2))
    assert bn.has_batchnorm() and not plain.has_batchnorm()
    assert "template=ConvNet" in repr(bn)
    assert "template=Linear" in repr(plain)


def test_flat_weights_extrapolate_only_when_the_check_is_off():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    curve = mc.CurveModel(a, a, b, mc.Bezier(3))
    with torch.no_grad():
        curve.free_bends.normal_()
    for outside in (curve.flat_weights_at, curve.coefficients):
        with pytest.raises(ValueError):
            outside(1.5)
    bends = curve.bends  # Bernstein polynomials at t = 1.5: (1 - t)², 2t(1 - t), t²
    want = 0.25 * bends[0] - 1.5 * bends[1] + 2.25 * bends[2]
    torch.testing.assert_close(curve.flat_weights_at(1.5, check=False), want)


def test_training_weights_carry_no_weight_decay_unless_asked():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    curve = mc.CurveModel(a, a, b, mc.Bezier(3))
    t = torch.tensor(0.25)
    c1 = 2 * 0.25 * 0.75  # the middle bend's Bernstein weight at t
    for wd, kw in ((0.0, {}), (0.1, {"weight_decay": 0.1})):
        curve.free_bends.grad = None
        weights = curve.training_weights(t, **kw)
        sum(w.sum() for w in weights.values()).backward()
        theta = curve.flat_weights_at(t).detach()
        # d/dθ [sum θ + wd/2 ||θ||²] = 1 + wd θ, times the middle bend's coefficient
        torch.testing.assert_close(curve.free_bends.grad[0], c1 * (1 + wd * theta))
    # the same through the coefficients directly (the simplexes' entry point)
    curve.free_bends.grad = None
    c = curve.coefficients(t)
    sum(w.sum() for w in curve.training_parameters(c).values()).backward()
    torch.testing.assert_close(curve.free_bends.grad[0], torch.full_like(theta, c1))


def test_a_template_with_two_parameter_dtypes_is_refused():
    mixed = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double())
    with pytest.raises(ValueError, match="one floating dtype"):
        mc.CurveModel(mixed, mixed, mixed)


def test_the_default_family_is_bezier_3_and_a_curve_without_free_bends_trains_nothing():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    assert mc.CurveModel(a, a, b).curve == mc.Bezier(3)
    line = mc.linear_path(a, b)
    assert line.free_idx == [] and not any(p.requires_grad for p in line.parameters())
    # the index buffers are rebuilt from the description, never saved
    assert set(mc.CurveModel(a, a, b).state_dict()) == {"free_bends", "fixed_bends"}


def test_endpoints_in_another_dtype_are_held_in_the_templates():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    wide_a = {k: v.double() for k, v in a.state_dict().items()}
    wide_b = {k: v.double() for k, v in b.state_dict().items()}
    curve = mc.CurveModel(a, wide_a, wide_b, mc.Bezier(4))
    assert curve.bends.dtype == torch.float32
    assert torch.equal(curve.bends[0], curve.layout.flatten(a))


@pytest.mark.parametrize("which,expected", [("start", "start endpoint"), ("end", "end endpoint"),
                                            ("middle0", "bend 1"), ("middle1", "bend 2")])
def test_a_network_that_does_not_fit_is_named(which, expected):
    a, b, other = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(4, 2)
    nets = {"start": a, "end": b, "middle0": a, "middle1": b, which: other}
    with pytest.raises(ValueError, match=f"{expected} has shape"):
        mc.CurveModel(a, nets["start"], nets["end"], mc.PolyChain(4), middle=[nets["middle0"], nets["middle1"]])


def test_live_and_endpoint_statistics_come_from_the_endpoints_not_the_template():
    template, a, b = _bn_net(1), _bn_net(2), _bn_net(3)
    curve = mc.CurveModel(template, a, b)
    _assert_same(_buffers(curve.net), _buffers(a))
    _assert_same(curve.endpoint_buffers(0), _buffers(a))
    _assert_same(curve.endpoint_buffers(1), _buffers(b))
    # endpoints given as parameters only: the template's statistics stand in
    bare_a = {n: p.detach() for n, p in a.named_parameters()}
    bare_b = {n: p.detach() for n, p in b.named_parameters()}
    bare = mc.CurveModel(template, bare_a, bare_b)
    _assert_same(bare.endpoint_buffers(0), _buffers(template))
    _assert_same(bare.endpoint_buffers(1), _buffers(template))


def test_random_middle_bends_are_fresh_initialisations_from_seed_plus_k():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    curve = mc.CurveModel(a, a, b, mc.Bezier(4), init="random", seed=5)
    for k in (1, 2):
        fresh = nn.Linear(3, 2)
        torch.manual_seed(5 + k)
        fresh.reset_parameters()
        assert torch.equal(curve.bends[k], curve.layout.flatten(fresh))


def test_fixed_middle_bends_with_free_ends():
    a, m, b = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(3, 2)
    curve = mc.CurveModel(a, a, b, mc.PolyChain(3), middle=[m], fix_middle=True, fix_start=False, fix_end=False)
    assert curve.fixed_idx == [1] and curve.free_idx == [0, 2]
