"""FlatLayout, the one flat parameter layout, against vectors written out by hand."""
import pytest
import torch
from torch import nn

from modeconn.core.layout import FlatLayout


class TwoLayer(nn.Module):
    """Linear(2 -> 3) with a bias, BatchNorm1d(3), Linear(3 -> 1) without a bias."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 3)
        self.bn = nn.BatchNorm1d(3)
        self.out = nn.Linear(3, 1, bias=False)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


def _numbered():
    """TwoLayer whose parameters are 1, 2, 3, ... in named_parameters order, row-major."""
    net = TwoLayer()
    with torch.no_grad():
        start = 1.0
        for p in net.parameters():
            p.copy_(torch.arange(start, start + p.numel()).reshape(p.shape))
            start += p.numel()
    return net


NAMES = ("fc.weight", "fc.bias", "bn.weight", "bn.bias", "out.weight")
SHAPES = ((3, 2), (3,), (3,), (3,), (1, 3))


def test_layout_of_a_module_is_named_parameters_order():
    layout = FlatLayout.of(_numbered())
    assert layout.names == NAMES and layout.shapes == SHAPES
    assert layout.numels == [6, 3, 3, 3, 3] and layout.num_parameters == 18
    sub = FlatLayout.of(_numbered(), names=["out.weight", "fc.bias"])  # the given order, not the module's
    assert sub.names == ("out.weight", "fc.bias") and sub.shapes == ((1, 3), (3,)) and sub.num_parameters == 6


def test_layout_of_rejects_unknown_names_and_parameterless_modules():
    with pytest.raises(ValueError, match="unknown parameter name.*nope"):
        FlatLayout.of(_numbered(), names=["fc.weight", "nope"])
    with pytest.raises(ValueError, match="no parameters"):
        FlatLayout.of(nn.ReLU())


def test_flatten_concatenates_row_major_in_layout_order():
    net = _numbered()
    flat = FlatLayout.of(net).flatten(net)
    assert torch.equal(flat, torch.arange(1.0, 19.0))  # numbered in that order, so 1..18
    assert not flat.requires_grad
    # from a state dict (buffers are ignored), in another order, in another dtype
    sub = FlatLayout.of(net, names=["out.weight", "fc.bias"])
    got = sub.flatten(net.state_dict(), dtype=torch.float64)
    assert got.dtype == torch.float64 and got.tolist() == [16.0, 17.0, 18.0, 7.0, 8.0, 9.0]
    # on the device asked for (the meta device stands in for a GPU)
    assert sub.flatten(net, device="meta").device.type == "meta"


def test_flatten_names_missing_and_misshapen_parameters():
    layout = FlatLayout.of(_numbered())
    state = dict(_numbered().state_dict())
    del state["bn.bias"]
    with pytest.raises(ValueError, match="missing parameter.*bn.bias"):
        layout.flatten(state)
    state = dict(_numbered().state_dict())
    state["fc.bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"fc.bias: \(4,\) != \(3,\)"):
        layout.flatten(state)


def test_check_demands_P_entries_in_the_last_dimension():
    layout = FlatLayout.of(_numbered())
    ok = torch.zeros(2, 18)
    assert layout.check(ok) is ok
    for bad in (torch.zeros(17), torch.zeros(18, 2), torch.tensor(1.0)):
        with pytest.raises(ValueError, match="P=18"):
            layout.check(bad, what="direction")
    with pytest.raises(TypeError, match="direction must be a torch.Tensor"):
        layout.check([0.0] * 18, what="direction")
    with pytest.raises(ValueError, match="^flat vector must have P=18"):  # the default name
        layout.check(torch.zeros(3))


def test_unflatten_splits_into_views_and_keeps_leading_dimensions():
    layout = FlatLayout.of(_numbered())
    flat = torch.arange(1.0, 19.0)
    parts = layout.unflatten(flat)
    assert list(parts) == list(NAMES)
    assert torch.equal(parts["fc.weight"], torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    assert parts["bn.bias"].tolist() == [13.0, 14.0, 15.0]
    assert torch.equal(parts["out.weight"], torch.tensor([[16.0, 17.0, 18.0]]))
    flat[0] = -1.0  # views of the vector, not copies
    assert parts["fc.weight"][0, 0] == -1.0
    batch = torch.stack([torch.arange(1.0, 19.0), -torch.arange(1.0, 19.0)])
    parts = layout.unflatten(batch)
    assert parts["fc.weight"].shape == (2, 3, 2) and parts["out.weight"].shape == (2, 1, 3)
    assert torch.equal(parts["fc.bias"], torch.tensor([[7.0, 8.0, 9.0], [-7.0, -8.0, -9.0]]))
    with pytest.raises(ValueError, match="P=18"):
        layout.unflatten(torch.zeros(19))


def test_module_at_is_a_standalone_copy_holding_the_point():
    net = _numbered().eval()
    layout = FlatLayout.of(net)
    theta = torch.linspace(-1, 1, 18)
    running_mean = torch.tensor([0.5, -0.5, 2.0])
    copy = layout.module_at(net, theta, buffers={"bn.running_mean": running_mean})
    assert copy is not net and not copy.training  # the template's mode
    assert torch.equal(layout.flatten(copy), theta)
    assert torch.equal(copy.bn.running_mean, running_mean)
    assert torch.equal(layout.flatten(net), torch.arange(1.0, 19.0))  # the template is untouched
    assert torch.equal(net.bn.running_mean, torch.zeros(3))
    # its forward is the hand formula with those weights and that BN mean
    x = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
    p = layout.unflatten(theta)
    h = x @ p["fc.weight"].T + p["fc.bias"]
    h = (h - running_mean) / torch.sqrt(torch.ones(3) + net.bn.eps) * p["bn.weight"] + p["bn.bias"]
    want = torch.relu(h) @ p["out.weight"].T
    with torch.no_grad():
        assert torch.allclose(copy(x), want, rtol=1e-6, atol=1e-6)
    theta[0] = 100.0  # the copy owns its parameters
    assert copy.fc.weight[0, 0] != 100.0
    assert layout.module_at(net.train(), theta).training
    with pytest.raises(ValueError, match="one point"):
        layout.module_at(net, torch.zeros(2, 18))


def test_module_at_reaches_parameters_of_nested_modules():
    """Names with several dots ("0.1.weight"): the parameter lives in the innermost module."""
    net = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)), nn.Tanh())
    layout = FlatLayout.of(net)
    assert layout.names == ("0.0.weight", "0.0.bias", "0.1.weight", "0.1.bias")
    theta = torch.arange(1.0, 10.0)
    copy = layout.module_at(net, theta)
    assert torch.equal(copy[0][1].weight, torch.tensor([[7.0, 8.0]])) and copy[0][1].bias.item() == 9.0
    assert torch.equal(layout.flatten(copy), theta)
