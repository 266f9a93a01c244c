"""preresnet(shortcut=False): Li et al. 2018's ResNet-noshort. Checked against hand-composed forwards:
without shortcuts a block is its residual branch alone, with them (the default) branch + identity path."""
import operator

import pytest
import torch
import torch.fx

import modeconn as mc
from modeconn import train
from modeconn.cli.args import parse_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")


def _branch(block, x):
    """A basic block's residual branch, composed by hand from its layers."""
    pre = torch.relu(block.bn1(x))
    return block.conv2(torch.relu(block.bn2(block.conv1(pre)))), pre


def _by_hand(net, x, shortcut: bool):
    """The whole PreResNet forward composed by hand: identity paths added only when ``shortcut``."""
    h = net.conv1(x)
    for stage in (net.layer1, net.layer2, net.layer3):
        for block in stage:
            out, pre = _branch(block, h)
            if shortcut:
                out = out + (h if block.downsample is None else block.downsample(pre))
            h = out
    h = torch.relu(net.bn(h)).mean(dim=(2, 3))
    return net.fc(h)


def _randomise_bn(net):
    """Non-trivial BN statistics and affine weights, so an identity BN cannot hide a mistake."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return net.eval()


@pytest.mark.parametrize("shortcut", [True, False])
def test_forward_equals_hand_composition(shortcut):
    torch.manual_seed(0)
    net = _randomise_bn(mc.create_model("preresnet", (1, 8, 8), 7, depth=14, shortcut=shortcut))
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        got, want, bare = net(x), _by_hand(net, x, shortcut), _by_hand(net, x, False)
    assert torch.allclose(got, want, atol=1e-5)
    if shortcut:  # the identity paths really change the function (a no-shortcut net has no downsample to add)
        assert not torch.allclose(got, bare, atol=1e-3)


def test_zero_branch_gives_zero_only_without_shortcut():
    """conv2 = 0 zeroes a block's branch: its output is 0 without shortcut, x (or downsample(pre)) with it."""
    x = torch.randn(3, 16, 8, 8)
    for shortcut in (True, False):
        torch.manual_seed(0)
        net = mc.create_model("preresnet", (1, 8, 8), 7, depth=8, shortcut=shortcut).eval()
        plain, down = net.layer1[0], net.layer2[0]
        with torch.no_grad():
            plain.conv2.weight.zero_()
            down.conv2.weight.zero_()
            y_plain, y_down = plain(x), down(x)
            pre = torch.relu(down.bn1(x))
        if shortcut:
            assert torch.equal(y_plain, x)
            assert torch.allclose(y_down, down.downsample(pre)) and y_down.abs().sum() > 0
        else:
            assert torch.count_nonzero(y_plain) == 0 and torch.count_nonzero(y_down) == 0


def test_default_unchanged_and_noshort_has_no_unused_parameter():
    torch.manual_seed(3)
    default = mc.create_model("preresnet", (1, 8, 8), 7, depth=20)
    torch.manual_seed(3)
    explicit = mc.create_model("preresnet", (1, 8, 8), 7, depth=20, shortcut=True)
    noshort = mc.create_model("preresnet", (1, 8, 8), 7, depth=20, shortcut=False)
    sd_d, sd_e, sd_n = default.state_dict(), explicit.state_dict(), noshort.state_dict()
    assert list(sd_d) == list(sd_e) and all(torch.equal(sd_d[k], sd_e[k]) for k in sd_d)
    # the same layers less the two 1x1 downsample convs, which nothing would read
    assert sorted(set(sd_d) - set(sd_n)) == ["layer2.0.downsample.0.weight", "layer3.0.downsample.0.weight"]
    assert set(sd_n) < set(sd_d)
    x = torch.randn(4, 1, 8, 8)
    default.eval(), explicit.eval(), noshort.eval()
    with torch.no_grad():
        assert torch.equal(default(x), explicit(x))
    # every parameter reaches the output (DistributedDataParallel needs no find_unused_parameters)
    noshort.train()
    noshort(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in noshort.parameters())
    # traced graphs: one residual add per block with shortcuts, none without
    adds = [sum(n.op == "call_function" and n.target is operator.add for n in torch.fx.symbolic_trace(m).graph.nodes)
            for m in (default, noshort)]
    assert adds == [9, 0]


def test_bad_shortcut_value_names_the_parameter():
    with pytest.raises(ValueError, match="shortcut"):
        mc.create_model("preresnet", (1, 8, 8), 7, depth=8, shortcut="no")


def test_checkpoint_describes_shortcut(tmp_path):
    """--model-kwargs shortcut=false reaches the model and the checkpoint; load_model rebuilds the same net."""
    assert parse_kwargs(["shortcut=false"]) == {"shortcut": False}
    out = tmp_path / "noshort"
    assert train.main(["--model", "preresnet", "--model-kwargs", "depth=8", "shortcut=false", "--epochs", "1",
                       "--out", str(out), "--no-progress"]) == 0
    model, meta = mc.load_model(out / "model.pt")
    assert meta["arch_kwargs"] == {"depth": 8, "shortcut": False}
    assert model.shortcut is False and all(b.shortcut is False for b in model.layer2)
    x = mc.get_dataset("digits").x_test[:16]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), _by_hand(model, x, shortcut=False), atol=1e-5)
