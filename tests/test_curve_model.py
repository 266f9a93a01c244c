import copy

import pytest
import torch
from torch import nn

import modeconn as mc


class EmbedLN(nn.Module):
    """Tokens -> Embedding -> LayerNorm -> GroupNorm over features -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.ln = nn.LayerNorm(12)
        self.gn = nn.GroupNorm(3, 12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        h = self.ln(self.emb(x)).mean(1)
        return self.fc(self.gn(h))


def randomize_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def make(kind, seed):
    torch.manual_seed(seed)
    if kind == "mlp":
        return mc.create_model("mlp", (1, 8, 8), 10), torch.randn(7, 1, 8, 8)
    if kind == "cnn_bn":
        return randomize_bn(mc.create_model("convnet", (1, 8, 8), 10, bn=True, width=8), seed), torch.randn(7, 1, 8, 8)
    if kind == "preresnet":
        return randomize_bn(mc.create_model("preresnet", (3, 16, 16), 10, depth=20), seed), torch.randn(3, 3, 16, 16)
    return EmbedLN(), torch.randint(0, 20, (7, 6))


@pytest.mark.parametrize("kind", ["mlp", "cnn_bn", "preresnet", "embed_ln"])
def test_endpoints_reproduced_exactly(kind):
    a, x = make(kind, 1)
    b, _ = make(kind, 2)
    a.eval(), b.eval()
    curve = mc.CurveModel(a, a, b, mc.Bezier(3)).eval()
    with torch.no_grad():
        assert torch.equal(curve(x, 0.0), a(x))
        assert torch.equal(curve.point(0.0)(x), a(x))
        assert torch.equal(curve.point(1.0)(x), b(x))  # end's own buffers at t = 1
        assert not torch.allclose(curve(x, 0.5), a(x))


def test_weights_at_half_is_the_bernstein_combination(mlp_pair):
    a, b = mlp_pair
    torch.manual_seed(3)
    middle = copy.deepcopy(a)
    for p in middle.parameters():
        p.data.normal_()
    curve = mc.CurveModel(a, a, b, mc.Bezier(3), middle=[middle])
    w = curve.weights_at(0.5)
    sa, sm, sb = a.state_dict(), middle.state_dict(), b.state_dict()
    assert set(w) == {n for n, _ in a.named_parameters()}
    for name, value in w.items():
        assert torch.allclose(value, 0.25 * sa[name] + 0.5 * sm[name] + 0.25 * sb[name], atol=1e-6)
    # t=0.3 on PolyChain(3) is 0.4*start + 0.6*middle
    chain = mc.CurveModel(a, a, b, mc.PolyChain(3), middle=[middle])
    for name, value in chain.weights_at(0.3).items():
        assert torch.allclose(value, 0.4 * sa[name] + 0.6 * sm[name], atol=1e-6)


def test_middle_bend_initialisation(mlp_pair):
    a, b = mlp_pair
    lin = mc.CurveModel(a, a, b, mc.Bezier(3))
    for name, bends in lin.bends_by_name().items():
        assert torch.allclose(bends[1], 0.5 * (a.state_dict()[name] + b.state_dict()[name]), atol=1e-6)
    rnd = mc.CurveModel(a, a, b, mc.Bezier(4), init="random", seed=5)
    bends = rnd.bends
    assert not torch.allclose(bends[1], bends[2])  # each middle bend its own fresh init
    assert not torch.allclose(bends[1], 0.5 * (bends[0] + bends[3]))
    assert torch.equal(mc.CurveModel(a, a, b, mc.Bezier(4), init="random", seed=5).bends, bends)


def test_only_free_bends_are_parameters(mlp_pair):
    a, b = mlp_pair
    c = mc.CurveModel(a, a, b, mc.Bezier(4), fix_start=True, fix_end=False)
    params = list(c.parameters())
    assert len(params) == 1 and params[0].shape == (3, c.num_parameters)
    assert c.free_idx == [1, 2, 3] and c.fixed_idx == [0]


def test_mismatched_architectures_name_the_parameter():
    a = mc.create_model("mlp", (1, 8, 8), 10, width=32)
    b = mc.create_model("mlp", (1, 8, 8), 10, width=16)
    with pytest.raises(ValueError, match=r"layers\.0\.weight.*\(32, 64\).*\(16, 64\)"):
        mc.CurveModel(a, a, b)
    c = mc.create_model("mlp", (1, 8, 8), 10, depth=1, width=32)
    with pytest.raises(ValueError, match=r"layers\.2\.weight.*\(32, 32\).*\(10, 32\)"):
        mc.CurveModel(a, a, c)


def test_point_is_a_standalone_saveable_model(cnn_pair, digits):
    a, b = cnn_pair
    curve = mc.CurveModel(a, a, b, mc.Bezier(3)).eval()
    p = curve.point(0.3).eval()
    fresh = copy.deepcopy(a)
    fresh.load_state_dict(p.state_dict())
    x = digits.x_test[:16]
    with torch.no_grad():
        assert torch.allclose(fresh(x), curve(x, 0.3), atol=1e-6)
    assert sum(q.numel() for q in p.parameters()) == curve.num_parameters


def test_forward_samples_t_when_none(mlp_pair, digits):
    a, b = mlp_pair
    curve = mc.CurveModel(a, a, b, mc.PolyChain(2)).eval()
    x = digits.x_test[:4]
    torch.manual_seed(11)
    out = curve(x)
    torch.manual_seed(11)
    t = torch.rand(())
    assert torch.allclose(out, curve(x, t))


def test_chain_path_passes_through_every_checkpoint(mlp_pair):
    a, b = mlp_pair
    mid = copy.deepcopy(a)
    for p in mid.parameters():
        p.data.mul_(0.5)
    chain = mc.chain_path([a, mid, b], template=a)
    assert list(chain.parameters())[0].numel() == 0  # nothing to train
    for name, value in chain.weights_at(0.5).items():
        assert torch.equal(value, mid.state_dict()[name])


def test_curve_checkpoint_roundtrip(tmp_path, cnn_pair, digits):
    a, b = cnn_pair
    curve = mc.CurveModel(a, a, b, mc.Bezier(3), fix_end=False)
    with torch.no_grad():
        curve.free_bends.add_(0.01)
    meta = {"arch": "convnet", "arch_kwargs": {"bn": True, "width": 16}, "input_shape": [1, 8, 8], "num_classes": 10}
    mc.save_curve(tmp_path / "c.pt", curve, meta, dataset="digits")
    back, m = mc.load_curve(tmp_path / "c.pt")
    assert m["dataset"] == "digits" and back.fix_end is False and back.curve == mc.Bezier(3)
    assert torch.equal(back.bends, curve.bends)
    x = digits.x_test[:8]
    curve.eval(), back.eval()
    with torch.no_grad():
        assert torch.equal(back(x, 0.7), curve(x, 0.7))
        assert torch.equal(back.point(0.0)(x), curve.point(0.0)(x))


def test_flat_layout_round_trip_on_a_bn_cnn():
    from modeconn.core.layout import FlatLayout

    net, x = make("cnn_bn", 1)
    other, _ = make("cnn_bn", 2)  # same architecture, other weights and BN statistics
    net.eval(), other.eval()
    layout = FlatLayout.of(net)
    theta = layout.flatten(net)
    # flatten: the parameters in named_parameters order, each flattened
    torch.testing.assert_close(theta, torch.cat([p.detach().reshape(-1) for p in net.parameters()]),
                               rtol=0, atol=0)
    parts = layout.unflatten(theta)
    assert list(parts) == [n for n, _ in net.named_parameters()]
    assert all(torch.equal(parts[n], p) for n, p in net.named_parameters())
    stacked = layout.unflatten(torch.stack([theta, 2 * theta]))  # leading dimensions are kept
    assert all(torch.equal(stacked[n][1], 2 * p) for n, p in net.named_parameters())

    # module_at: other's architecture at net's point, with net's buffers, computes net's function
    buffers = dict(net.named_buffers())
    with torch.no_grad():
        rebuilt = layout.module_at(other, theta, buffers)
        assert torch.equal(rebuilt(x), net(x))
        assert all(torch.equal(rebuilt.get_buffer(n), b) for n, b in buffers.items())
        # without buffers the template's statistics stay, and BN eval outputs then differ
        assert not torch.allclose(layout.module_at(other, theta)(x), net(x))
        # the template itself is not touched
        assert torch.equal(FlatLayout.of(other).flatten(other), layout.flatten(make("cnn_bn", 2)[0]))
        # a template without parameters (a CurveModel's net) works the same way
        stripped = mc.CurveModel(other, other, other).net
        assert torch.equal(layout.module_at(stripped, theta, buffers)(x), net(x))
    with pytest.raises(ValueError, match="P="):
        layout.module_at(other, theta[:-1])
    with pytest.raises(ValueError, match="one point"):
        layout.module_at(other, torch.stack([theta, theta]))


def test_curve_layout_is_the_templates():
    from modeconn.core.layout import FlatLayout

    a, x = make("cnn_bn", 1)
    b, _ = make("cnn_bn", 2)
    curve = mc.CurveModel(a, a, b, mc.Bezier(3))
    assert curve.layout == FlatLayout.of(a)
    assert torch.equal(curve.bends[0], curve.layout.flatten(a))
    assert torch.equal(curve.bends[-1], curve.layout.flatten(b))
    # the constant path at a module: every point is that module
    const = mc.CurveModel.constant(a).eval()
    a.eval()
    with torch.no_grad():
        assert torch.equal(const(x, 0.0), a(x))
        torch.testing.assert_close(const(x, 0.6), a(x), rtol=1e-5, atol=1e-5)
    assert list(const.parameters())[0].numel() == 0  # nothing to train
