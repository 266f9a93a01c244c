"""Spec inference through functional ops and tensor methods (mutation run 9, function_rules.py): F.linear,
F.conv*, F.batch_norm/layer_norm/group_norm on module attributes, F.pad/interpolate/pooling, permute/transpose/
t, view_as, dropout/softmax/clone. Each model's groups and fixed entries are the ones a reader derives from the
architecture, and three random permutations leave the function unchanged."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from modeconn.alignment import infer_permutation_spec
from tests.test_module_rules import _axes, _randomize, _same_function

pytestmark = pytest.mark.usefixtures("one_thread")


def _spec(model, x):
    return infer_permutation_spec(_randomize(model), x[:1])


# ----------------------------------------------------------------------------------------------- F.linear
class FLinear(nn.Module):
    """F.linear(4 -> 6) -> relu -> F.linear(6 -> 3); the first weight is a bare parameter ``w`` when ``bare``."""

    def __init__(self, bias=True, bare=False, kw=False):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6, bias=bias), nn.Linear(6, 3)
        self.bare, self.kw = bare, kw
        if bare:
            self.w = nn.Parameter(torch.randn(6, 4))

    def forward(self, x):
        w = self.w if self.bare else self.a.weight
        if self.kw:
            h = F.linear(x, weight=w, bias=self.a.bias)
        else:
            h = F.linear(x, w, self.a.bias)
        return F.linear(torch.relu(h), self.b.weight, self.b.bias)


@pytest.mark.parametrize("kw,entries", [({}, {("a.bias", 0), ("a.weight", 0)}), ({"bias": False}, {("a.weight", 0)}),
                                        ({"kw": True}, {("a.bias", 0), ("a.weight", 0)})])
def test_functional_linear_on_module_attributes(kw, entries):
    model, x = FLinear(**kw), torch.randn(3, 4)
    spec = _spec(model, x)
    assert list(spec.groups) == ["a"] and spec.groups["a"].size == 6
    assert _axes(spec, "a") == entries | {("b.weight", 1)}
    assert set(spec.fixed) == {"b.bias"}
    _same_function(model, spec, x)


def test_functional_linear_group_named_after_a_bare_weight():
    model, x = FLinear(bare=True), torch.randn(3, 4)
    spec = _spec(model, x)
    assert list(spec.groups) == ["w"]
    assert _axes(spec, "w") == {("w", 0), ("a.bias", 0), ("b.weight", 1)}
    _same_function(model, spec, x)


class FLinearComputedWeight(nn.Module):
    def __init__(self, which):
        super().__init__()
        self.p, self.a, self.b, self.which = nn.Linear(4, 4), nn.Linear(4, 6), nn.Linear(6, 3), which

    def forward(self, x):
        w, b = self.a.weight, self.a.bias
        if self.which == "weight":
            w = w * 2
        else:
            b = b * 2
        return self.b(torch.relu(F.linear(torch.relu(self.p(x)), w, b)))


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_functional_linear_with_computed_weights_is_unsupported(which):
    model, x = FLinearComputedWeight(which), torch.randn(3, 4)
    spec = _spec(model, x)
    assert list(spec.groups) == []
    assert any("F.linear with weights that are not module attributes" in r for r in spec.reasons)


# ----------------------------------------------------------------------------------------------- F.conv
class FConv(nn.Module):
    """F.conv(1 -> 6) -> relu -> F.conv(6 -> 6, groups) -> relu -> mean -> fc."""

    def __init__(self, spatial=2, groups=1, bias=True, kw=False):
        super().__init__()
        conv = nn.Conv2d if spatial == 2 else nn.Conv1d
        self.f = F.conv2d if spatial == 2 else F.conv1d
        self.c1, self.c2 = conv(1, 6, 3, padding=1, bias=bias), conv(6, 6, 3, padding=1, groups=groups)
        self.fc, self.groups, self.kw = nn.Linear(6, 3), groups, kw
        self.dims = tuple(range(2, 2 + spatial))

    def forward(self, x):
        h = torch.relu(self.f(x, self.c1.weight, self.c1.bias, 1, 1))
        if self.kw == "names":
            h = self.f(h, weight=self.c2.weight, bias=self.c2.bias, padding=1)
        elif self.kw:
            h = self.f(h, self.c2.weight, self.c2.bias, padding=1, groups=self.groups)
        else:
            h = self.f(h, self.c2.weight, self.c2.bias, 1, 1, 1, self.groups)
        return self.fc(torch.relu(h).mean(self.dims))


@pytest.mark.parametrize("spatial,bias,kw", [(2, True, False), (1, True, False), (2, False, True), (2, True, "names"),
                                             (1, False, "names")])
def test_functional_conv_dense(spatial, bias, kw):
    model = FConv(spatial=spatial, bias=bias, kw=kw)
    x = torch.randn(3, 1, *([5] * spatial))
    spec = _spec(model, x)
    assert list(spec.groups) == ["c1", "c2"]
    assert _axes(spec, "c1") == {("c1.weight", 0), ("c2.weight", 1)} | ({("c1.bias", 0)} if bias else set())
    assert _axes(spec, "c2") == {("c2.weight", 0), ("c2.bias", 0), ("fc.weight", 1)}
    _same_function(model, spec, x)


@pytest.mark.parametrize("kw", [False, True])
def test_functional_depthwise_conv_shares_the_group(kw):
    model, x = FConv(groups=6, kw=kw), torch.randn(3, 1, 5, 5)
    spec = _spec(model, x)
    assert list(spec.groups) == ["c1"]
    assert _axes(spec, "c1") == {("c1.weight", 0), ("c1.bias", 0), ("c2.weight", 0), ("c2.bias", 0),
                                 ("fc.weight", 1)}
    _same_function(model, spec, x)


class FConvComputed(nn.Module):
    def __init__(self, which):
        super().__init__()
        self.c1, self.c2, self.which = nn.Conv2d(1, 6, 3), nn.Conv2d(6, 4, 3), which

    def forward(self, x):
        w, b = self.c2.weight, self.c2.bias
        if self.which == "weight":
            w = w * 2
        elif self.which == "bias":
            b = b * 2
        return F.conv2d(torch.relu(self.c1(x)), w, b).mean((2, 3))


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_functional_conv_with_computed_weights_is_unsupported(which):
    model, x = FConvComputed(which), torch.randn(3, 1, 6, 6)
    spec = _spec(model, x)
    assert list(spec.groups) == []
    assert any("functional convolution with weights that are not module attributes" in r for r in spec.reasons)


# ----------------------------------------------------------------------------------------------- norms
class FNorm(nn.Module):
    """conv(1 -> 6) -> functional norm ``kind`` -> relu -> conv(6 -> 4) -> mean -> fc."""

    def __init__(self, kind, affine=True, groups=1, kw=False):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1), nn.Linear(4, 3)
        self.kind, self.groups, self.kw = kind, groups, kw
        if kind == "batch":
            self.n = nn.BatchNorm2d(6, affine=affine)
        elif kind == "layer":
            self.n = nn.LayerNorm(6, elementwise_affine=affine)
        else:
            self.n = nn.GroupNorm(groups, 6, affine=affine)

    def norm(self, h):
        n = self.n
        if self.kind == "batch":
            if self.kw:
                return F.batch_norm(h, running_mean=n.running_mean, running_var=n.running_var, weight=n.weight,
                                    bias=n.bias, training=False, eps=1e-5)
            return F.batch_norm(h, n.running_mean, n.running_var, n.weight, n.bias, False, 0.1, 1e-5)
        if self.kind == "layer":
            h = h.permute(0, 2, 3, 1)
            if self.kw:
                h = F.layer_norm(h, normalized_shape=(6,), weight=n.weight, bias=n.bias)
            else:
                h = F.layer_norm(h, (6,), n.weight, n.bias, 1e-5)
            return h.permute(0, 3, 1, 2)
        if self.kw:
            return F.group_norm(h, num_groups=self.groups, weight=n.weight, bias=n.bias)
        return F.group_norm(h, self.groups, n.weight, n.bias, 1e-5)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.norm(self.c1(x))))).mean((2, 3)))


NORMS = {  # kind, affine, groups -> the norm's entries that move with c1
    "batch": (("batch", True, 1), {"n.weight", "n.bias", "n.running_mean", "n.running_var"}),
    "batch_stats": (("batch", False, 1), {"n.running_mean", "n.running_var"}),
    "layer": (("layer", True, 1), {"n.weight", "n.bias"}),
    "layer_plain": (("layer", False, 1), set()),
    "group_1": (("group", True, 1), {"n.weight", "n.bias"}),
    "group_6": (("group", True, 6), {"n.weight", "n.bias"}),
    "group_6_plain": (("group", False, 6), set()),
}


@pytest.mark.parametrize("kw", [False, True])
@pytest.mark.parametrize("name", sorted(NORMS))
def test_functional_norms_move_with_the_channels(name, kw):
    (kind, affine, groups), entries = NORMS[name]
    model, x = FNorm(kind, affine, groups, kw), torch.randn(3, 1, 5, 5)
    spec = _spec(model, x)
    assert list(spec.groups) == ["c1", "c2"]
    assert _axes(spec, "c1") == {("c1.weight", 0), ("c1.bias", 0), ("c2.weight", 1)} | {(e, 0) for e in entries}
    assert {e for e in spec.fixed if e.startswith("n.")} <= {"n.num_batches_tracked"}
    _same_function(model, spec, x)


@pytest.mark.parametrize("kw", [False, True])
def test_group_norm_mixing_a_subset_of_channels_is_unsupported(kw):
    model, x = FNorm("group", True, 2, kw), torch.randn(3, 1, 5, 5)
    spec = _spec(model, x)
    assert list(spec.groups) == ["c2"]
    assert {"c1.weight", "c1.bias", "n.weight", "n.bias"} <= set(spec.fixed)
    assert any("group_norm with 2 groups (statistics mix a subset of channels)" in r for r in spec.reasons)
    _same_function(model, spec, x)


class FNormComputed(FNorm):
    """The norm's weight (or a non-persistent buffer) is not a state-dict entry of the model."""

    def __init__(self, kind, how):
        super().__init__(kind, True, 6)
        self.how = how
        if how == "buffer":
            self.register_buffer("scale", torch.rand(6) + 0.5, persistent=False)

    def norm(self, h):
        n = self.n
        w = n.weight * 2 if self.how == "computed" else self.scale
        if self.kind == "batch":
            return F.batch_norm(h, n.running_mean, n.running_var, w, n.bias, False, 0.1, 1e-5)
        if self.kind == "layer":
            return F.layer_norm(h.permute(0, 2, 3, 1), (6,), w, n.bias).permute(0, 3, 1, 2)
        return F.group_norm(h, 6, w, n.bias)


WHAT = {"batch": "F.batch_norm", "layer": "F.layer_norm", "group": "F.group_norm"}


@pytest.mark.parametrize("how", ["computed", "buffer"])
@pytest.mark.parametrize("kind", sorted(WHAT))
def test_functional_norm_with_parameters_that_are_not_state_entries_is_unsupported(kind, how):
    model, x = FNormComputed(kind, how), torch.randn(3, 1, 5, 5)
    spec = _spec(model, x)
    assert list(spec.groups) == ["c2"]
    assert {"c1.weight", "c1.bias", "n.bias"} <= set(spec.fixed)
    assert any(f"{WHAT[kind]} with statistics or affine parameters that are not module attributes" in r
               for r in spec.reasons)
    _same_function(model, spec, x)


class FNormBiasOnly(FNorm):
    """The norm is called with no weight (None) but with a bias: the bias after the None still moves."""

    def __init__(self, kind):
        super().__init__(kind, True, 6)

    def norm(self, h):
        n = self.n
        if self.kind == "batch":
            return F.batch_norm(h, n.running_mean, n.running_var, None, n.bias, False, 0.1, 1e-5)
        if self.kind == "layer":
            return F.layer_norm(h.permute(0, 2, 3, 1), (6,), None, n.bias).permute(0, 3, 1, 2)
        return F.group_norm(h, 6, None, n.bias)


@pytest.mark.parametrize("kind", sorted(WHAT))
def test_functional_norm_without_a_weight_still_moves_its_bias(kind):
    model, x = FNormBiasOnly(kind), torch.randn(3, 1, 5, 5)
    spec = _spec(model, x)
    stats = {"n.running_mean", "n.running_var"} if kind == "batch" else set()
    assert _axes(spec, "c1") == {("c1.weight", 0), ("c1.bias", 0), ("c2.weight", 1), ("n.bias", 0)} | \
        {(e, 0) for e in stats}
    assert "n.weight" in spec.fixed  # never read by the forward pass
    _same_function(model, spec, x)


class LayerNormDynamicShape(FNorm):
    def __init__(self):
        super().__init__("layer", True)

    def norm(self, h):
        h = h.permute(0, 2, 3, 1)
        return F.layer_norm(h, h.shape[-1:], self.n.weight, self.n.bias).permute(0, 3, 1, 2)


def test_layer_norm_with_a_traced_shape_is_unsupported():
    model, x = LayerNormDynamicShape(), torch.randn(3, 1, 5, 5)
    spec = _spec(model, x)
    assert list(spec.groups) == ["c2"]
    assert any("F.layer_norm with a non-constant normalized_shape" in r for r in spec.reasons)
    _same_function(model, spec, x)


# ----------------------------------------------------------------------------------------------- shape ops
class Mid(nn.Module):
    """conv(1 -> 6) -> relu -> ``op`` (back to N, 6, H', W') -> conv(6 -> 4) -> mean -> fc."""

    def __init__(self, op):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1), nn.Linear(4, 3)
        self.op = op

    def forward(self, x):
        return self.fc(torch.relu(self.c2(self.op(torch.relu(self.c1(x))))).mean((2, 3)))


def _cl(f):
    """``f`` applied channels-last."""
    return lambda h: f(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


OPS = {
    "pad": lambda h: F.pad(h, (1, 2, 0, 1)),
    "pad_kw": lambda h: F.pad(h, pad=[1, 1]),
    "pad_traced_value": lambda h: F.pad(h, [h.shape[2] - 5, 0]),
    "interpolate": lambda h: F.interpolate(h, scale_factor=2),
    "interpolate_kw": lambda h: F.interpolate(input=h, size=(7, 6), mode="bilinear"),
    "max_pool": lambda h: F.max_pool2d(h, 2),
    "avg_pool": lambda h: F.avg_pool2d(h, 2, stride=1),
    "max_pool1d": lambda h: F.max_pool1d(h.flatten(2), 3).unflatten(2, (1, -1)),
    "adaptive": lambda h: F.adaptive_avg_pool2d(h, 3),
    "permute": lambda h: h.permute(0, 2, 3, 1).permute(0, 3, 1, 2),
    "permute_list": lambda h: h.permute([0, 3, 2, 1]).permute([0, 3, 1, 2]),
    "torch_permute": lambda h: torch.permute(torch.permute(h, (0, 2, 3, 1)), dims=(0, 3, 1, 2)),
    "transpose": lambda h: h.transpose(1, 3).transpose(2, 3).transpose(1, 2),
    "transpose_kw": lambda h: torch.transpose(h, dim0=1, dim1=3).transpose(3, 1),
    "swapaxes": lambda h: torch.swapaxes(h.swapdims(1, 3), 1, 3),
    "transpose_neg": lambda h: h.transpose(-3, -1).transpose(-1, -3),
    "transpose_mixed": lambda h: torch.transpose(h.transpose(1, dim1=3), 3, dim1=1),  # a dim by position, one by keyword
    "dropout": lambda h: F.dropout(h, 0.5, training=False),
    "dropout2d": lambda h: F.dropout2d(h, p=0.3, training=False),
    "softmax": lambda h: F.softmax(h, dim=1),
    "softmax_method": lambda h: h.softmax(-1),
    "log_softmax": lambda h: torch.log_softmax(h, 2),
    "clone": lambda h: h.clone().contiguous().detach(),
    "getitem": lambda h: h[:, :, 1:, :-1],
    "getitem_ellipsis": lambda h: h[..., None][..., 0],
    "t": lambda h: (h.flatten(2).mean(2).t().t())[:, :, None, None] + h,
    "torch_t": lambda h: torch.t(torch.t(h.flatten(2).mean(2)))[:, :, None, None] * h,
}


OBSERVED = {  # where c1's units are read: after the last op that changes values per channel, not after a move
    "adaptive": ['adaptive_avg_pool2d'],
    "avg_pool": ['avg_pool2d'],
    "clone": ['relu'],
    "dropout": ['dropout'],
    "dropout2d": ['dropout2d'],
    "getitem": ['relu'],
    "getitem_ellipsis": ['relu'],
    "interpolate": ['interpolate'],
    "interpolate_kw": ['interpolate'],
    "log_softmax": ['log_softmax'],
    "max_pool": ['max_pool2d'],
    "max_pool1d": ['relu', 'max_pool1d'],
    "pad": ['pad'],
    "pad_kw": ['pad'],
    "pad_traced_value": ['relu', 'pad'],
    "permute": ['relu'],
    "permute_list": ['relu'],
    "softmax": ['softmax'],
    "softmax_method": ['softmax'],
    "swapaxes": ['relu'],
    "t": ['relu'],
    "torch_permute": ['relu'],
    "torch_t": ['relu'],
    "transpose": ['relu'],
    "transpose_kw": ['relu'],
    "transpose_neg": ['relu'],
    "transpose_mixed": ['relu'],
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_ops_between_convolutions_move_with_the_channels(name):
    model, x = Mid(OPS[name]), torch.randn(3, 1, 6, 6)
    spec = _spec(model, x)
    assert list(spec.groups) == ["c1", "c2"]
    assert _axes(spec, "c1") == {("c1.weight", 0), ("c1.bias", 0), ("c2.weight", 1)}
    assert set(spec.fixed) == {"fc.bias"}
    assert [p.node for p in spec.groups["c1"].observe] == OBSERVED[name]
    _same_function(model, spec, x)


BAD_OPS = {  # op that touches the channel dimension -> reason fragment
    "pad_channels": (lambda h: F.pad(h, (0, 0, 0, 0, 1, -1)), None),
    "pad_cl_channels": (_cl(lambda h: F.pad(h, (1, -1))), None),
    "pool_indices": (lambda h: F.max_pool2d(h, 2, return_indices=True)[0], "unsupported operation"),
    "interpolate_cl": (_cl(lambda h: F.interpolate(h, size=(3, 6), mode="bilinear")), None),
    "interpolate_mid": (lambda h: F.interpolate(h.transpose(1, 2), size=(6, 6), mode="bilinear").transpose(1, 2), None),
    "pool_cl": (_cl(lambda h: F.avg_pool2d(h, 3, stride=1, padding=1)), None),
    "pool1d_cl": (lambda h: F.avg_pool1d(h.flatten(2).transpose(1, 2), 3, 1, 1).transpose(1, 2).unflatten(2, (6, 6)), None),
    "pad_dynamic": (lambda h: F.pad(h, h.shape[2:]), "F.pad with non-constant padding"),
    "view_as": (lambda h: h.flatten(2).view_as(h),
                "permuted tensor used as a secondary argument of node 'view_as' (method .view_as())"),
    "reshape_as": (lambda h: h.flatten(2).reshape_as(h),
                   "permuted tensor used as a secondary argument of node 'reshape_as' (method .reshape_as())"),
    "unknown_function": (lambda h: torch.roll(h, 1, 1),
                         "left unpermuted: unsupported operation at node 'roll' (function roll)"),
    "unknown_method": (lambda h: h.roll(1, 1), "left unpermuted: unsupported operation at node 'roll' (method .roll())"),
}


@pytest.mark.parametrize("name", sorted(BAD_OPS))
def test_ops_that_touch_the_channels_leave_them_fixed(name):
    op, reason = BAD_OPS[name]
    model, x = Mid(op), torch.randn(3, 1, 6, 6)
    spec = _spec(model, x)
    assert list(spec.groups) == ["c2"]
    assert {"c1.weight", "c1.bias"} <= set(spec.fixed)
    if reason is not None:
        assert any(reason in r for r in spec.reasons), spec.reasons
    _same_function(model, spec, x)


class ViewAsInput(nn.Module):
    """The shape template of ``view_as`` is built from the (unpermuted) input: c1's units move through it."""

    def __init__(self):
        super().__init__()
        self.m = Mid(lambda h: h)

    def forward(self, x):
        m = self.m
        h = torch.relu(m.c1(x)).flatten(2).view_as(torch.cat([x] * 6, 1))
        return m.fc(torch.relu(m.c2(h)).mean((2, 3)))


def test_view_as_an_unpermuted_template_moves_the_units():
    model, x = ViewAsInput(), torch.randn(3, 1, 6, 6)
    spec = _spec(model, x)
    assert list(spec.groups) == ["m.c1", "m.c2"]
    assert _axes(spec, "m.c1") == {("m.c1.weight", 0), ("m.c1.bias", 0), ("m.c2.weight", 1)}
    assert [p.node for p in spec.groups["m.c1"].observe] == ["relu"]      # a reshape is a move, not a new reading
    _same_function(model, spec, x)


class SoftmaxBranch(nn.Module):
    """relu(c1) feeds a softmax branch and a plain branch: the units are read after the activation only."""

    def __init__(self, method):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 6, 3), nn.Conv2d(6, 4, 3), nn.Conv2d(6, 4, 3)
        self.fc, self.method = nn.Linear(4, 3), method

    def forward(self, x):
        h = torch.relu(self.c1(x))
        s = h.softmax(1) if self.method else F.softmax(h, 1)
        return self.fc((self.c2(s) + self.c3(h)).mean((2, 3)))


@pytest.mark.parametrize("method", [False, True])
def test_a_softmax_output_is_not_an_activation_reading(method):
    model, x = SoftmaxBranch(method), torch.randn(3, 1, 7, 7)
    spec = _spec(model, x)
    assert list(spec.groups) == ["c1", "c2"]
    assert [p.node for p in spec.groups["c1"].observe] == ["relu"]
    _same_function(model, spec, x)


class AttentionItem(nn.Module):
    """Linear -> relu -> nn.MultiheadAttention -> item 0 of its tuple output -> mean -> head."""

    def __init__(self):
        super().__init__()
        self.a, self.attn, self.head = nn.Linear(4, 12), nn.MultiheadAttention(12, 3, batch_first=True), nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.head(self.attn(h, h, h)[0].mean(1))


def test_an_item_of_a_tuple_output_is_a_move():
    model, x = AttentionItem(), torch.randn(3, 5, 4)
    spec = _spec(model, x)
    assert {g: [p.node for p in spec.groups[g].observe] for g in spec.groups} == {
        "a": ["relu"], "attn.heads": ["attn"], "attn.qk": [], "attn.v": [], "attn.out_proj": ["mean"]}
    _same_function(model, spec, x)
