"""Tests for modeconn.alignment: spec inference, permutation, weight/activation matching."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from modeconn.alignment import (
    AlignmentReport,
    AxisRef,
    PermutationGroup,
    PermutationSpec,
    activation_matching,
    align_models,
    apply_permutation,
    infer_permutation_spec,
    weight_matching,
)
from modeconn.models import create_model


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- models
class CatNet(nn.Module):
    """Two conv branches concatenated along channels, BN over the concatenation."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_stem = nn.BatchNorm2d(8)
        self.branch_a = nn.Conv2d(8, 6, 3, padding=1)
        self.branch_b = nn.Conv2d(8, 10, 1)
        self.bn_cat = nn.BatchNorm2d(16)
        self.conv_out = nn.Conv2d(16, 12, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu(self.bn_stem(self.stem(x)))
        a = torch.relu(self.branch_a(x))
        b = self.branch_b(x).relu()
        x = torch.cat([a, b], dim=1)
        x = F.relu(self.bn_cat(x))
        x = F.relu(self.conv_out(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class ViewFlattenNet(nn.Module):
    """conv -> relu -> maxpool -> x.view(x.size(0), -1) -> Linear -> tanh -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(6 * 4 * 4, 20)
        self.fc2 = nn.Linear(20, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv(x)))
        x = x.view(x.size(0), -1)
        return self.fc2(torch.tanh(self.fc1(x)))


class ResidualLNNet(nn.Module):
    """Residual MLP block with LayerNorm and GELU; the add merges fc_in's and fc2's groups."""

    def __init__(self):
        super().__init__()
        self.fc_in = nn.Linear(12, 16)
        self.fc1 = nn.Linear(16, 32)
        self.ln = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = self.fc_in(x)
        h = torch.add(h, self.fc2(F.gelu(self.ln(self.fc1(h)))))
        return self.head(torch.relu(h))


class SelfLoopNet(nn.Module):
    """h = h + mix(relu(h)): the stream's group permutes both axes of mix.weight."""

    def __init__(self):
        super().__init__()
        self.fc_in = nn.Linear(12, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = self.fc_in(x)
        h = h + self.mix(F.relu(h))
        return self.head(F.relu(h))


class GroupedConvNet(nn.Module):
    """A grouped conv (groups=2) in the middle; global pooling with x.mean((2, 3))."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


class ChannelLastNet(nn.Module):
    """conv -> permute to channels-last -> flatten: channels end up interleaved."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 20)
        self.fc2 = nn.Linear(20, 10)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        return self.fc2(F.relu(self.fc1(x)))


class MixerNet(nn.Module):
    """MLP-Mixer-like: transposes the model understands, and a token-mixing Linear that
    is applied over a dimension other than the permuted channels (that group is fixed)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 2, stride=2)   # [N, 16, 4, 4]
        self.fc1 = nn.Linear(16, 32)                  # channel mixing
        self.fc2 = nn.Linear(32, 16)
        self.token = nn.Linear(16, 16)                # token mixing (over the 16 patches)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # [N, T, C]
        x = self.fc2(F.gelu(self.fc1(x)))             # [N, T, C]
        x = self.token(x.transpose(1, 2))             # [N, C, T]
        return self.head(x.mean(1))                   # [N, T] -> classes


class FunctionalNet(nn.Module):
    """F.conv2d / F.linear on the module's own parameters (get_attr nodes in fx)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(16) * 0.1)
        self.w2 = nn.Parameter(torch.randn(12, 16) * 0.3)
        self.w3 = nn.Parameter(torch.randn(10, 12) * 0.3)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return F.linear(F.silu(F.linear(x, self.w2)), self.w3)


class UnsafeNormAttentionNet(nn.Module):
    """GroupNorm with 2 groups (stops the groups flowing in), then self-attention (followed)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.gn(self.conv1(x)))
        x = F.relu(self.conv2(x)).flatten(2).transpose(1, 2)  # [N, HW, C]
        x = self.attn(x, x, x, need_weights=False)[0]
        return self.fc2(F.relu(self.fc1(x.mean(1))))


def _zoo(name, shape, **kw):
    return lambda: create_model(name, shape, 10, **kw)


def _resnet18():
    import torchvision
    return torchvision.models.resnet18(num_classes=10)


# name -> (builder, one input sample shape, expected number of groups)
MODELS = {
    "mlp": (_zoo("mlp", (1, 8, 8), depth=3, width=32), (1, 8, 8), 3),
    "convnet": (_zoo("convnet", (3, 16, 16), width=8), (3, 16, 16), 3),
    "convnet_bn": (_zoo("convnet_bn", (3, 16, 16), width=8), (3, 16, 16), 3),
    "vgg11_bn": (_zoo("vgg11_bn", (3, 32, 32), width_multiplier=0.125), (3, 32, 32), 10),
    "preresnet20": (_zoo("preresnet", (3, 16, 16), depth=20), (3, 16, 16), 12),
    "cat": (CatNet, (3, 8, 8), 4),
    "view_flatten": (ViewFlattenNet, (3, 8, 8), 2),
    "residual_ln": (ResidualLNNet, (12,), 2),
    "self_loop": (SelfLoopNet, (12,), 1),
    "resnet18": (_resnet18, (3, 32, 32), 12),
    "grouped_conv": (GroupedConvNet, (3, 8, 8), 3),
    "channel_last": (ChannelLastNet, (3, 8, 8), 1),
    "mixer": (MixerNet, (3, 8, 8), 3),
    "functional": (FunctionalNet, (3, 8, 8), 2),
    "groupnorm_attention": (UnsafeNormAttentionNet, (3, 8, 8), 6),
}


def _randomize_bn(model, seed=0):
    """Give BN layers non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
    return model


def _calibrate(model, x):
    """Centre every hidden Linear/Conv output on the data and take BN statistics from it,
    so that no ReLU unit is dead (dead units cannot be matched from activations)."""
    model.train()  # BN normalises with batch statistics while the biases are centred
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None]
    with torch.no_grad():
        for layer in layers:
            seen = {}
            handle = layer.register_forward_hook(lambda mod, inp, out: seen.setdefault("out", out))
            model(x)
            handle.remove()
            out = seen["out"]
            layer.bias -= out.transpose(0, 1).reshape(out.shape[1], -1).mean(1)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        model(x)
    return model.eval()


def _build(name, seed=0):
    builder, shape, _ = MODELS[name]
    torch.manual_seed(seed)
    model = _randomize_bn(builder(), seed).eval()
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(seed + 100))
    return model, x


def _assert_same_function(m1, m2, x):
    with torch.no_grad():
        y1, y2 = m1(x), m2(x)
    scale = max(1.0, float(y1.abs().max()))
    assert torch.allclose(y1, y2, atol=1e-5 * scale, rtol=0), float((y1 - y2).abs().max())


# -------------------------------------------------------------- function preservation
@pytest.mark.parametrize("name", list(MODELS))
def test_random_permutation_preserves_function(name):
    model, x = _build(name)
    spec = infer_permutation_spec(model, x[:1])
    sd = model.state_dict()
    assert len(spec.groups) == MODELS[name][2], spec.summary()
    # every state-dict entry is either permuted by a group or listed as fixed, never both
    covered = set(spec.covered())
    assert covered | set(spec.fixed) == set(sd)
    assert not covered & set(spec.fixed)
    assert all(not k.endswith("num_batches_tracked") for k in covered)
    # the heads inside nn.MultiheadAttention run in one fused call: no point to observe them
    assert all(g.observe for k, g in spec.groups.items() if not k.endswith((".heads", ".qk", ".v")))

    perm = spec.random_permutation(seed=1)
    before = copy.deepcopy(sd)
    permuted = apply_permutation(model, spec, perm)
    assert type(permuted) is type(model) and permuted is not model
    # the input is untouched, the copy really moved something
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    psd = permuted.state_dict()
    assert any(not torch.equal(psd[k], sd[k]) for k in covered)
    assert all(torch.equal(psd[k], sd[k]) for k in spec.fixed)
    _assert_same_function(model, permuted, x)

    # the same through a state dict
    psd2 = apply_permutation(sd, spec, perm)
    assert isinstance(psd2, dict) and all(torch.equal(psd2[k], psd[k]) for k in sd)


def test_mlp_every_hidden_layer_is_a_group():
    model, x = _build("mlp")
    spec = infer_permutation_spec(model, x[:1])
    hidden = [f"layers.{i}" for i in (0, 2, 4)]  # Linear, ReLU, Linear, ReLU, Linear, ReLU, Linear
    assert list(spec.groups) == hidden
    assert [g.size for g in spec.groups.values()] == [32, 32, 32]
    assert spec.fixed == ["layers.6.bias"]
    assert any("layers.6" in r and "output" in r for r in spec.reasons)


def test_flatten_and_cat_are_blockwise():
    spec = infer_permutation_spec(*_build("view_flatten"))
    assert AxisRef("fc1.weight", 1, 0, 16) in spec.groups["conv"].axes  # 6 channels x (4x4)
    spec = infer_permutation_spec(*_build("cat"))
    assert AxisRef("conv_out.weight", 1, 0, 1) in spec.groups["branch_a"].axes
    assert AxisRef("conv_out.weight", 1, 6, 1) in spec.groups["branch_b"].axes
    assert AxisRef("bn_cat.running_var", 0, 6, 1) in spec.groups["branch_b"].axes
    spec = infer_permutation_spec(*_build("residual_ln"))
    assert set(spec.groups) == {"fc_in", "fc1"}  # fc2 merged into fc_in by the add
    assert AxisRef("fc2.weight", 0) in spec.groups["fc_in"].axes
    assert AxisRef("ln.weight", 0) in spec.groups["fc1"].axes
    spec = infer_permutation_spec(*_build("self_loop"))
    assert {AxisRef("mix.weight", 0), AxisRef("mix.weight", 1)} <= set(spec.groups["fc_in"].axes)


# ----------------------------------------------------------------- unsafe parts fixed
def test_grouped_conv_permutes_within_blocks():
    model, x = _build("grouped_conv")
    spec = infer_permutation_spec(model, x[:1])
    assert list(spec.groups) == ["conv1", "conv2", "conv3"]
    # 8 channels in 2 blocks of 4, on both sides: one permutation of 4 units, the same in both blocks
    assert spec.groups["conv1"].size == spec.groups["conv2"].size == 4
    assert AxisRef("conv1.weight", 0, 0, 1, 2) in spec.groups["conv1"].axes
    assert AxisRef("conv2.weight", 1) in spec.groups["conv1"].axes
    assert AxisRef("conv2.weight", 0, 0, 1, 2) in spec.groups["conv2"].axes
    _assert_same_function(model, apply_permutation(model, spec, spec.random_permutation(3)), x)


def test_channels_last_permute_is_left_fixed():
    model, x = _build("channel_last")
    spec = infer_permutation_spec(model, x[:1])
    assert list(spec.groups) == ["fc1"]
    assert "conv.weight" in spec.fixed and "conv.bias" in spec.fixed
    assert any("'conv'" in r and "reshape" in r for r in spec.reasons), spec.reasons
    _assert_same_function(model, apply_permutation(model, spec, spec.random_permutation(3)), x)


def test_groupnorm_is_left_fixed_and_attention_is_followed():
    model, x = _build("groupnorm_attention")
    spec = infer_permutation_spec(model, x[:1])
    assert list(spec.groups) == ["conv2", "attn.heads", "attn.qk", "attn.v", "attn.out_proj", "fc1"]
    assert ("attn.in_proj_weight", 1, 0, 1, 1) in spec.groups["conv2"].axes
    assert {"conv1.weight", "gn.weight", "conv2.weight"} <= set(spec.fixed) | set(spec.covered())
    assert {"conv1.weight", "gn.weight"} <= set(spec.fixed) and "conv2.weight" not in spec.fixed
    assert any("'conv1'" in r and "GroupNorm with 2 groups" in r for r in spec.reasons), spec.reasons


def test_linear_over_another_dim_passes_the_units_through():
    model, x = _build("mixer")
    spec = infer_permutation_spec(model, x[:1])
    # patch channels survive flatten(2) + transpose(1, 2); fc2's channels then pass through a
    # Linear applied over the token dimension (the same map on every channel), whose own
    # output units (tokens) would be a second permuted dimension: they stay fixed
    assert list(spec.groups) == ["patch", "fc1", "fc2"]
    assert "token.weight" in spec.fixed and "token.bias" in spec.fixed
    assert any("'token'" in r and "other than the permuted units" in r for r in spec.reasons)
    _assert_same_function(model, apply_permutation(model, spec, spec.random_permutation(2)), x)


# ----------------------------------------------------------------------- self-recovery
RECOVERY = ["mlp", "preresnet20", "cat", "self_loop"]


@pytest.mark.parametrize("name", RECOVERY)
@pytest.mark.parametrize("method", ["weight", "activation"])
def test_self_recovery(name, method):
    model, _ = _build(name)
    shape = MODELS[name][1]
    x = torch.randn(64, *shape, generator=torch.Generator().manual_seed(7))
    _calibrate(model, x)
    spec = infer_permutation_spec(model, x[:1])
    p = spec.random_permutation(seed=5)
    shuffled = apply_permutation(model, spec, p)
    loader = [(x[i:i + 16], torch.zeros(16)) for i in range(0, 64, 16)]
    aligned, perm, report = align_models(model, shuffled, method=method, loader=loader, spec=spec)
    for k in spec.groups:
        assert torch.equal(perm[k], torch.argsort(p[k])), k
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in aligned.state_dict().items())
    assert isinstance(report, AlignmentReport) and report.method == method
    for g in report.groups.values():
        assert g.after == pytest.approx(1.0, abs=1e-6)
    assert report.mean_after > report.mean_before


def test_activation_matching_with_plain_tensors_and_module_hooks():
    model, _ = _build("mlp")
    x = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    _calibrate(model, x)
    spec = infer_permutation_spec(model, x[:1])
    # a hand-written spec observing through module names (forward hooks)
    hand = PermutationSpec({
        k: PermutationGroup(g.size, g.axes, [f"layers.{int(k.split('.')[1]) + 1}"])
        for k, g in spec.groups.items()
    })
    p = hand.random_permutation(seed=2)
    shuffled = apply_permutation(model, hand, p)
    perm, info = activation_matching(model, shuffled, iter([x[:48], x[48:], x[:10]]), hand, max_batches=2)
    assert info.num_batches == 2 and info.num_samples["layers.0"] == 96
    assert all(torch.equal(perm[k], torch.argsort(p[k])) for k in hand.groups)


def test_weight_matching_on_state_dicts():
    model, x = _build("convnet_bn")
    spec = infer_permutation_spec(model, x[:1])
    p = spec.random_permutation(seed=4)
    sd_b = apply_permutation(model.state_dict(), spec, p)
    perm, info = weight_matching(model.state_dict(), sd_b, spec, seed=3)
    assert info.converged
    assert all(torch.equal(perm[k], torch.argsort(p[k])) for k in spec.groups)
    aligned, _, report = align_models(model.state_dict(), sd_b, spec=spec)
    assert isinstance(aligned, dict) and report.metric == "cosine"
    assert all(torch.equal(aligned[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------- objective monotonicity
@pytest.mark.parametrize("init", ["identity", "greedy"])
@pytest.mark.parametrize("name", ["vgg11_bn", "preresnet20", "self_loop"])
def test_weight_matching_objective_never_decreases(name, init):
    a, x = _build(name, seed=0)
    b, _ = _build(name, seed=1)
    spec = infer_permutation_spec(a, x[:1])
    perm, info = weight_matching(a, b, spec, seed=0, max_iter=50, init=init)
    hist = [info.start_objective] + info.objectives
    # from the identity, descent itself must climb; the greedy start may already be a local optimum
    assert len(info.objectives) == info.sweeps >= (2 if info.start == "identity" else 1)
    assert all(later >= earlier for earlier, later in zip(hist, hist[1:])), hist
    assert hist[-1] > info.initial_objective
    assert info.converged
    aligned, perm2, report = align_models(a, b, example_input=x[:1], seed=0, init=init)
    assert all(torch.equal(perm[k], perm2[k]) for k in spec.groups)
    assert report.mean_after > report.mean_before
    _assert_same_function(b, aligned, x)


# ------------------------------------------------------------- hand-written == inferred
def _as_sets(spec):
    return {k: (g.size, frozenset(g.axes)) for k, g in spec.groups.items()}


def test_inferred_mlp_spec_equals_hand_written():
    model = create_model("mlp", (1, 8, 8), 10, depth=2, width=16)
    hand = PermutationSpec({
        "layers.0": PermutationGroup(16, [("layers.0.weight", 0), ("layers.0.bias", 0),
                                          ("layers.2.weight", 1)], ["layers_1"]),
        "layers.2": PermutationGroup(16, [("layers.2.weight", 0), ("layers.2.bias", 0),
                                          ("layers.4.weight", 1)], ["layers_3"]),
    })
    hand.validate(model)
    inferred = infer_permutation_spec(model, torch.randn(1, 1, 8, 8))
    assert _as_sets(inferred) == _as_sets(hand)
    assert {k: g.observe for k, g in inferred.groups.items()} == {k: g.observe for k, g in hand.groups.items()}
    assert inferred.equivalent(hand)
    assert inferred.fixed == PermutationSpec.from_axes(
        {k: g.axes for k, g in hand.groups.items()}, model).fixed == ["layers.4.bias"]


def _bn(name):
    return [(f"{name}.{p}", 0) for p in ("weight", "bias", "running_mean", "running_var")]


def test_inferred_preresnet20_spec_equals_hand_written():
    model = create_model("preresnet", (3, 16, 16), 10, depth=20)
    axes = {}
    # one group per stage (shared by every residual add), opened by the stem conv or
    # by the stage's 1x1 downsampling shortcut
    stage_names = {1: "conv1", 2: "layer2.0.downsample.0", 3: "layer3.0.downsample.0"}
    stage = {1: [("conv1.weight", 0)], 2: [("layer2.0.downsample.0.weight", 0)],
             3: [("layer3.0.downsample.0.weight", 0)]}
    for s in (1, 2, 3):
        for i in range(3):
            blk = f"layer{s}.{i}"
            first_of_new_stage = s > 1 and i == 0
            # the block's input comes from the previous stage for a stage's first block:
            # bn1, conv1's input and the 1x1 shortcut's input
            incoming = s - 1 if first_of_new_stage else s
            stage[incoming] += _bn(f"{blk}.bn1") + [(f"{blk}.conv1.weight", 1)]
            if first_of_new_stage:
                stage[incoming].append((f"{blk}.downsample.0.weight", 1))
            stage[s].append((f"{blk}.conv2.weight", 0))  # block output joins the stage
            # inside the block: conv1 -> bn2 -> relu -> conv2
            axes[f"{blk}.conv1"] = [(f"{blk}.conv1.weight", 0)] + _bn(f"{blk}.bn2") + [(f"{blk}.conv2.weight", 1)]
    stage[3] += _bn("bn") + [("fc.weight", 1)]
    for s in (1, 2, 3):
        axes[stage_names[s]] = stage[s]
    hand = PermutationSpec.from_axes(axes, model)
    assert len(hand.groups) == 12
    inferred = infer_permutation_spec(model, torch.randn(1, 3, 16, 16))
    assert _as_sets(inferred) == _as_sets(hand)
    assert sorted(inferred.fixed) == sorted(hand.fixed)
    assert [k for k in inferred.fixed if not k.endswith("num_batches_tracked")] == ["fc.bias"]


class PostActResidualNet(nn.Module):
    """A ResNet basic block after a stem: relu(bn2(conv2(relu(bn1(conv1(h))))) + h)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        r = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(h)))))
        h = F.relu(r + h)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def test_inferred_residual_block_spec_equals_hand_written():
    model = _randomize_bn(PostActResidualNet()).eval()
    # the add lines unit i of the block's output up with unit i of its input, so the stem's
    # channels and conv2's output channels must move together: one group, named after the stem
    stream = [("stem.weight", 0)] + _bn("bn0") + [("conv1.weight", 1), ("conv2.weight", 0)] + _bn("bn2") \
        + [("fc.weight", 1)]
    inner = [("conv1.weight", 0)] + _bn("bn1") + [("conv2.weight", 1)]
    hand = PermutationSpec({"stem": PermutationGroup(8, stream), "conv1": PermutationGroup(6, inner)})
    hand.validate(model)
    x = torch.randn(2, 3, 6, 6)
    inferred = infer_permutation_spec(model, x[:1])
    assert _as_sets(inferred) == _as_sets(hand)
    assert sorted(inferred.fixed) == sorted(hand.uncovered(model)) == sorted(
        ["fc.bias"] + [f"bn{i}.num_batches_tracked" for i in range(3)])
    _assert_same_function(model, apply_permutation(model, inferred, inferred.random_permutation(2)), x)


def test_inferred_cat_spec_equals_hand_written():
    model, x = _build("cat")
    bn_cat = ["weight", "bias", "running_mean", "running_var"]
    # cat([a (6 ch), b (10 ch)], dim=1): branch_a owns channels [0, 6) and branch_b [6, 16)
    # of everything after the concatenation
    hand = PermutationSpec({
        "stem": PermutationGroup(8, [("stem.weight", 0), ("stem.bias", 0)] + _bn("bn_stem")
                                 + [("branch_a.weight", 1), ("branch_b.weight", 1)]),
        "branch_a": PermutationGroup(6, [("branch_a.weight", 0), ("branch_a.bias", 0)]
                                     + [(f"bn_cat.{p}", 0, 0, 1) for p in bn_cat] + [("conv_out.weight", 1, 0, 1)]),
        "branch_b": PermutationGroup(10, [("branch_b.weight", 0), ("branch_b.bias", 0)]
                                     + [(f"bn_cat.{p}", 0, 6, 1) for p in bn_cat] + [("conv_out.weight", 1, 6, 1)]),
        # global pooling then flatten(1): one entry of fc's input per channel
        "conv_out": PermutationGroup(12, [("conv_out.weight", 0), ("conv_out.bias", 0), ("fc.weight", 1)]),
    })
    hand.validate(model)
    inferred = infer_permutation_spec(model, x[:1])
    assert _as_sets(inferred) == _as_sets(hand)
    # units are observed after their activations (torch.relu -> node relu_1, .relu() -> relu_2)
    # and, for the branches, at their slice of the activation after bn_cat (relu_3)
    assert inferred.groups["branch_a"].observe == [("relu_1", 1, 0, 1, 1), ("relu_3", 1, 0, 1, 1)]
    assert inferred.groups["branch_b"].observe == [("relu_2", 1, 0, 1, 1), ("relu_3", 1, 6, 1, 1)]


# ----------------------------------------------------------------------- layout algebra
def _brute_force_channel_map(a, b, c):
    """Where channel dim ``c`` of shape ``a`` lands in shape ``b``, found by reshaping an index tensor.

    Returns ``(dim, block)`` when some dim of ``b`` holds every channel as a contiguous block
    of ``block`` entries, in order, and nothing else varies with the channel; else None.
    """
    view = [1] * len(a)
    view[c] = a[c]
    idx = torch.arange(a[c]).view(view).expand(*a).reshape(*b)
    for j in range(len(b)):
        if b[j] % a[c]:
            continue
        block = b[j] // a[c]
        want = torch.arange(a[c]).repeat_interleave(block)
        shape = [1] * len(b)
        shape[j] = b[j]
        if torch.equal(idx, want.view(shape).expand(*b)):
            return j, block
    return None


RESHAPES = [
    ((2, 6, 4, 4), (2, 96), 1),       # flatten after a conv: blocks of 16
    ((2, 6, 4, 4), (2, 6, 16), 1),    # flatten(2): channel dim unchanged
    ((2, 16), (2, 4, 4), 1),          # unflatten the channels: split, unsupported
    ((2, 4, 4, 6), (2, 96), 3),       # channels-last flatten: interleaved, unsupported
    ((2, 3, 4), (6, 4), 1),           # merged under the batch dim: interleaved, unsupported
    ((2, 5, 1, 1), (2, 5), 1),        # squeeze
    ((2, 5), (2, 1, 5, 1), 1),        # unsqueeze twice
    ((3, 8, 2, 3), (3, 8, 6), 1),
    ((3, 8, 2, 3), (3, 48, 1), 1),
    ((4, 7), (28,), 1),               # merged with the batch dim as the minor part
    ((2, 3, 8), (2, 6, 4), 1),        # regrouped: each channel keeps 2 whole rows of dim 1
]


@pytest.mark.parametrize("a,b,c", RESHAPES)
def test_reshape_map_agrees_with_reshaping_an_index_tensor(a, b, c):
    from modeconn.alignment.channel_layout import reshape_map
    expected = _brute_force_channel_map(a, b, c)
    got = reshape_map(a, b, c)
    if expected is None:
        assert got is None
    else:
        new_dim, mult, div = got
        assert (new_dim, mult / div) == expected


def test_dispatch_tables_give_each_operation_one_rule():
    """Every listed operation has exactly one rule: no target sits in two tables (a later
    table would silently override an earlier one)."""
    from modeconn.alignment import function_rules, module_rules, op_tables
    tables = {k: v for k, v in vars(op_tables).items() if k.isupper()}
    functions = {k: set(v) for k, v in tables.items() if k.endswith("_FUNCTIONS")}
    methods = {k: set(v) for k, v in tables.items() if k.endswith("_METHODS")}
    modules = {k: set(v) for k, v in tables.items() if k.endswith("_MODULES")}
    for group in (functions, methods, modules):
        names = sorted(group)
        for i, x in enumerate(names):
            for y in names[i + 1:]:
                assert not group[x] & group[y], (x, y, group[x] & group[y])
    assert set().union(*functions.values()) <= set(function_rules.FUNCTION_RULES)
    assert set().union(*methods.values()) <= set(function_rules.METHOD_RULES)
    assert all(module_rules.module_rule(cls.__new__(cls)) is not None
               for cls in set().union(*modules.values()))
    # subclasses follow their base class's rule
    assert module_rules.module_rule(nn.SyncBatchNorm(4)) is module_rules.MODULE_RULES[nn.modules.batchnorm._BatchNorm]
    assert module_rules.module_rule(nn.MultiheadAttention(4, 1)) is module_rules.MODULE_RULES[nn.MultiheadAttention]
    assert module_rules.module_rule(nn.TransformerDecoderLayer(4, 1)) is None


# ----------------------------------------------------------------------------- errors
def test_different_architectures_raise():
    a = create_model("mlp", (1, 8, 8), 10, depth=2, width=16)
    b = create_model("mlp", (1, 8, 8), 10, depth=2, width=24)
    with pytest.raises(ValueError, match=r"layers\.0\.weight.*\(16, 64\).*\(24, 64\)"):
        align_models(a, b, example_input=torch.randn(1, 1, 8, 8))
    spec = infer_permutation_spec(a, torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"layers\.0\.weight"):
        weight_matching(a, b, spec)
    c = create_model("mlp", (1, 8, 8), 10, depth=3, width=16)
    with pytest.raises(ValueError, match=r"layers\.4\.weight.*\(10, 16\).*\(16, 16\)"):
        align_models(a, c, example_input=torch.randn(1, 1, 8, 8))


def test_spec_that_does_not_fit_raises():
    model = create_model("mlp", (1, 8, 8), 10, depth=2, width=16)
    wrong_size = PermutationSpec({
        "hidden1": PermutationGroup(20, [("layers.0.weight", 0), ("layers.0.bias", 0), ("layers.2.weight", 1)]),
    })
    with pytest.raises(ValueError, match=r"hidden1.*size 20.*layers\.0\.weight"):
        wrong_size.validate(model)
    with pytest.raises(ValueError, match=r"hidden1"):
        apply_permutation(model, wrong_size, {"hidden1": torch.randperm(20)})
    with pytest.raises(ValueError, match=r"hidden1"):
        align_models(model, copy.deepcopy(model), spec=wrong_size)
    smaller = PermutationSpec({"h": PermutationGroup(8, [("layers.0.weight", 0), ("layers.0.bias", 0)])})
    with pytest.raises(ValueError, match=r"'h' has size 8"):
        smaller.validate(model)
    unknown = PermutationSpec({"h": PermutationGroup(16, [("layers.9.weight", 0)])})
    with pytest.raises(ValueError, match=r"layers\.9\.weight"):
        unknown.validate(model)
    bad_axis = PermutationSpec({"h": PermutationGroup(16, [("layers.0.bias", 1)])})
    with pytest.raises(ValueError, match=r"axis 1.*layers\.0\.bias"):
        bad_axis.validate(model)
    good = infer_permutation_spec(model, torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"layers\.0.*shape \(16,\)"):
        apply_permutation(model, good, {"layers.0": torch.arange(15)})
    with pytest.raises(ValueError, match=r"not a permutation"):
        apply_permutation(model, good, {"layers.0": torch.zeros(16, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"unknown group 'nope'"):
        apply_permutation(model, good, {"nope": torch.arange(3)})


def test_align_argument_errors():
    model = create_model("mlp", (1, 8, 8), 10, depth=1, width=8)
    other = create_model("mlp", (1, 8, 8), 10, depth=1, width=8)
    with pytest.raises(ValueError, match="example_input"):
        align_models(model, other)
    with pytest.raises(ValueError, match="method"):
        align_models(model, other, method="magic")
    with pytest.raises(ValueError, match="loader"):
        align_models(model, other, method="activation")
    # a one-shot loader gives both the example input and the data
    batches = iter([torch.randn(32, 1, 8, 8) for _ in range(2)])
    aligned, perm, report = align_models(model, other, method="activation", loader=batches)
    assert report.info.num_batches == 2
    assert isinstance(aligned, type(other))
