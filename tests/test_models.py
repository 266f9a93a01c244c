"""Tests for modeconn.models: registry, shapes, fx-traceability, no in-place ops,
hand-computed parameter counts."""
import operator

import pytest
import torch
import torch.fx
import torch.nn as nn
from torch.func import functional_call, stack_module_state
from torch.utils._python_dispatch import TorchDispatchMode

from modeconn.models import create_model, list_models, register_model

EXPECTED_NAMES = {
    "mlp", "convnet", "convnet_bn",
    "vgg11", "vgg16", "vgg11_bn", "vgg16_bn",
    "preresnet", "wide_resnet", "cnn1d",
}
NUM_CLASSES = 7  # deliberately not 10, to catch hard-coded heads
BATCH = 4

# Default WRN-28-10 (36.5M params) is too slow for a per-shape forward test on CPU; its
# construction is covered by test_wide_resnet_default_param_count.
FAST_KWARGS = {"wide_resnet": dict(depth=10, widen_factor=2)}
# models of other inputs than images: their sample shapes (one channel and odd lengths included)
SHAPES = {"cnn1d": [(1, 40), (3, 5)]}


# transformers read token/patch counts from their input and have no flatten: their contract
# (forward, fx trace, no in-place ops, names) is checked in tests/test_transformers.py
TRANSFORMERS = {"gpt", "vit"}


def _cases():
    cases = []
    for name in sorted((EXPECTED_NAMES | set(list_models())) - TRANSFORMERS):
        shapes = list(SHAPES.get(name, [(1, 8, 8), (3, 32, 32)]))
        if name == "mlp":
            shapes.append((2,))
        cases += [(name, s) for s in shapes]
    return cases


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _inplace_ops(gm: torch.fx.GraphModule):
    """Names of in-place operations appearing in an fx graph."""
    bad = []
    inplace_fns = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_function":
            if node.target in inplace_fns or getattr(node.target, "__name__", "").endswith("_"):
                bad.append(str(node.target))
            if node.kwargs.get("inplace", False):
                bad.append(str(node.target))
        elif node.op == "call_method" and node.target.endswith("_"):
            bad.append(node.target)
        elif node.op == "call_module" and getattr(modules[node.target], "inplace", False):
            bad.append(node.target)
    return bad


class _MutationRecorder(TorchDispatchMode):
    """Records every aten op that mutates one of its inputs (``x += y``, ``relu_``, ...).

    Except ``as_strided_`` on a tensor the forward made itself: a kernel setting
    the strides of its own fresh output (adaptive pooling of a channels-last
    input does), no value of anyone's tensor changes.
    """

    def __init__(self, owned=()):
        super().__init__()
        self.mutating = []
        self.owned = {t.data_ptr() for t in owned}   # the caller's tensors: input, parameters, buffers

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        restride_of_fresh = func is torch.ops.aten.as_strided_.default and args[0].data_ptr() not in self.owned
        if func._schema.is_mutable and not restride_of_fresh:
            self.mutating.append(str(func))
        return func(*args, **(kwargs or {}))


def test_registered_names():
    names = list_models()
    assert EXPECTED_NAMES <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name,shape", _cases())
def test_forward_shape_and_fx_trace(name, shape):
    torch.manual_seed(0)
    model = create_model(name, shape, NUM_CLASSES, **FAST_KWARGS.get(name, {})).eval()
    x = torch.randn(BATCH, *shape)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (BATCH, NUM_CLASSES)
    assert torch.isfinite(out).all()

    # no in-place ops at run time (eval mode: BN/dropout do no bookkeeping of their own), except the
    # in-place ReLUs of the reference architectures, which change nothing but the model's own tensors
    x_before = x.clone()
    with torch.no_grad(), _MutationRecorder([x, *model.parameters(), *model.buffers()]) as rec:
        model(x)
    relu_inplace = name.startswith("vgg") or name == "preresnet"
    assert set(rec.mutating) == ({"aten.relu_.default"} if relu_inplace else set()) and torch.equal(x, x_before)
    if relu_inplace:
        _check_out_of_place_twin(model, x, out)

    gm = torch.fx.symbolic_trace(model)
    gm.eval()
    with torch.no_grad():
        traced = gm(x)
    torch.testing.assert_close(traced, out, rtol=0, atol=0)
    relus = {n for n, m in model.named_modules() if isinstance(m, nn.ReLU) and m.inplace}
    assert relus == set(_inplace_ops(gm)) and bool(relus) == relu_inplace
    # and nothing in-place hidden in modules the tracer treats as leaves
    assert not [n for n, m in model.named_modules() if getattr(m, "inplace", False) and n not in relus]
    # sizes fixed at construction: no shape queries in forward; flatten via torch.flatten
    modules = dict(gm.named_modules())
    assert not [n for n in gm.graph.nodes if n.op == "call_method" and n.target in ("size", "view", "reshape")]
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target is getattr]
    assert any(
        (n.op == "call_function" and n.target is torch.flatten)
        or (n.op == "call_module" and isinstance(modules[n.target], nn.Flatten))
        for n in gm.graph.nodes
    )
    # same parameter names after tracing (order may follow the forward pass instead)
    assert sorted(k for k, _ in gm.named_parameters()) == sorted(k for k, _ in model.named_parameters())


def _check_out_of_place_twin(model, x, out):
    """The in-place ReLUs change no result: the same model with out-of-place ReLUs gives the same
    logits (eval) and the same gradients (train mode, dropout off)."""
    import copy
    model, twin = copy.deepcopy(model), copy.deepcopy(model)  # the caller's model stays as it was
    for m in twin.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    with torch.no_grad():
        torch.testing.assert_close(twin(x), out, rtol=0, atol=0)
    grads = []
    for net in (model, twin):
        net.train()
        for m in net.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        net.zero_grad()
        net(x).square().sum().backward()
        grads.append([p.grad for p in net.parameters()])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_train_mode_forward_runs():
    for name in sorted(EXPECTED_NAMES):
        shape = SHAPES.get(name, [(1, 8, 8)])[0]
        model = create_model(name, shape, NUM_CLASSES, **FAST_KWARGS.get(name, {})).train()
        out = model(torch.randn(BATCH, *shape))
        out.sum().backward()
        assert out.shape == (BATCH, NUM_CLASSES)
        assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["mlp", "convnet_bn", "vgg11_bn", "preresnet", "wide_resnet"])
def test_vmap_functional_call_ensemble(name):
    """Two independently initialised copies evaluated at once with vmap+functional_call
    give the same logits as evaluating each copy on its own."""
    kwargs = dict(FAST_KWARGS.get(name, {}))
    if name == "vgg11_bn":
        kwargs["width_multiplier"] = 0.125
    torch.manual_seed(1)
    models = [create_model(name, (1, 8, 8), NUM_CLASSES, **kwargs).eval() for _ in range(2)]
    for m in models:  # non-trivial BN statistics
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    params, buffers = stack_module_state(models)
    base = create_model(name, (1, 8, 8), NUM_CLASSES, **kwargs).to("meta").eval()
    x = torch.randn(BATCH, 1, 8, 8)

    def f(p, b):
        return functional_call(base, (p, b), (x,))

    with torch.no_grad():
        batched = torch.vmap(f)(params, buffers)
        expected = torch.stack([m(x) for m in models])
    assert batched.shape == (2, BATCH, NUM_CLASSES)
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# parameter counts computed by hand from the architecture definitions
# ---------------------------------------------------------------------------
def _bn(c):
    return 2 * c


def _preresnet_basic_count(in_ch, num_classes, n):
    """conv1 3x3 (no bias); 3 stages of n pre-act basic blocks; 1x1 conv shortcut
    when the shape changes; final BN; Linear."""
    total = 3 * 3 * in_ch * 16
    cin = 16
    for planes, stride in [(16, 1), (32, 2), (64, 2)]:
        for i in range(n):
            s = stride if i == 0 else 1
            total += _bn(cin) + 3 * 3 * cin * planes + _bn(planes) + 3 * 3 * planes * planes
            if s != 1 or cin != planes:
                total += 1 * 1 * cin * planes
            cin = planes
    return total + _bn(64) + 64 * num_classes + num_classes


def test_preresnet20_param_count():
    model = create_model("preresnet", (3, 32, 32), 10, depth=20)
    expected = _preresnet_basic_count(3, 10, n=3)
    assert expected == 272_282  # the well-known ~0.27M of PreResNet-20 on CIFAR-10
    assert _count(model) == expected
    # input channels and class count flow through
    model = create_model("preresnet", (1, 8, 8), NUM_CLASSES, depth=20)
    assert _count(model) == _preresnet_basic_count(1, NUM_CLASSES, n=3)
    # depth 56 -> 9 basic blocks per stage
    model = create_model("preresnet", (3, 32, 32), 10, depth=56)
    assert _count(model) == _preresnet_basic_count(3, 10, n=9)


def test_preresnet164_uses_bottlenecks():
    model = create_model("preresnet", (3, 32, 32), 10, depth=164)
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == 18
    assert model.layer3[0].conv3.out_channels == 256
    assert model.fc.in_features == 256
    # expected count by hand: bottleneck = bn(cin) 1x1(cin->p) bn(p) 3x3(p->p) bn(p) 1x1(p->4p)
    total, cin = 3 * 3 * 3 * 16, 16
    for planes, stride in [(16, 1), (32, 2), (64, 2)]:
        for i in range(18):
            total += _bn(cin) + cin * planes + _bn(planes) + 9 * planes * planes + _bn(planes) + planes * 4 * planes
            if i == 0:  # channels (16 -> 64) or stride change in every stage's first block
                total += cin * 4 * planes
            cin = 4 * planes
    total += _bn(256) + 256 * 10 + 10
    assert _count(model) == total


def test_wide_resnet_default_param_count():
    model = create_model("wide_resnet", (3, 32, 32), 10)  # WRN-28-10
    n, k = (28 - 4) // 6, 10
    total, cin = 3 * 3 * 3 * 16, 16
    for width in [16 * k, 32 * k, 64 * k]:
        for i in range(n):
            total += _bn(cin) + 9 * cin * width + _bn(width) + 9 * width * width
            if i == 0:
                total += cin * width  # 1x1 shortcut: channels change in every stage
            cin = width
    total += _bn(cin) + cin * 10 + 10
    assert _count(model) == total
    assert round(total / 1e6, 1) == 36.5  # the published WRN-28-10 size


def test_mlp_param_count_and_names():
    model = create_model("mlp", (1, 8, 8), NUM_CLASSES, depth=3, width=20)
    assert _count(model) == (64 * 20 + 20) + 2 * (20 * 20 + 20) + (20 * NUM_CLASSES + NUM_CLASSES)
    assert [k for k, _ in model.named_parameters()] == [
        f"layers.{i}.{p}" for i in (0, 2, 4, 6) for p in ("weight", "bias")
    ]
    linear = create_model("mlp", (2,), 3, depth=0)
    assert _count(linear) == 2 * 3 + 3


# ---------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------
def _num_pools(model):
    return sum(isinstance(m, nn.MaxPool2d) for m in model.features)


def test_vgg16_pools_and_feature_size():
    big = create_model("vgg16", (3, 32, 32), 10)
    assert _num_pools(big) == 5
    assert big.features(torch.zeros(1, 3, 32, 32)).shape == (1, 512, 1, 1)
    assert big.classifier[1].in_features == 512
    assert sum(isinstance(m, nn.Conv2d) for m in big.features) == 13
    assert [type(m) for m in big.classifier] == [
        nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Linear
    ]
    assert big.classifier[0].p == 0.5

    small = create_model("vgg16", (1, 8, 8), NUM_CLASSES)
    assert _num_pools(small) == 3  # 8 -> 4 -> 2 -> 1, last two pools skipped
    assert small.features(torch.zeros(1, 1, 8, 8)).shape == (1, 512, 1, 1)
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, NUM_CLASSES)

    odd = create_model("vgg11_bn", (3, 28, 28), NUM_CLASSES)  # 28->14->7->3->1
    assert _num_pools(odd) == 4
    assert odd.eval()(torch.randn(2, 3, 28, 28)).shape == (2, NUM_CLASSES)


def test_vgg_width_multiplier_and_dropout():
    model = create_model("vgg11_bn", (3, 32, 32), NUM_CLASSES, width_multiplier=0.25, dropout=0.1)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 64, 128, 128, 128, 128]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 8
    assert model.classifier[1].in_features == 128
    assert model.classifier[0].p == 0.1
    tiny = create_model("vgg11", (3, 8, 8), NUM_CLASSES, width_multiplier=0.001)
    assert min(m.out_channels for m in tiny.features if isinstance(m, nn.Conv2d)) == 1
    with pytest.raises(ValueError, match="width_multiplier"):
        create_model("vgg11", (3, 32, 32), 10, width_multiplier=0)
    with pytest.raises(ValueError, match="dropout"):
        create_model("vgg16", (3, 32, 32), 10, dropout=1.5)


def test_convnet_bn_variants():
    plain = create_model("convnet", (3, 32, 32), NUM_CLASSES, width=8)
    with_bn = create_model("convnet_bn", (3, 32, 32), NUM_CLASSES, width=8)
    also_bn = create_model("convnet", (3, 32, 32), NUM_CLASSES, width=8, bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules()) == 3
    assert list(with_bn.state_dict()) == list(also_bn.state_dict())
    # conv(3->8) conv(8->16) pool conv(16->16) pool -> 16*8*8 features
    assert plain.classifier.in_features == 16 * 8 * 8
    assert _count(plain) == (27 * 8 + 8) + (72 * 16 + 16) + (144 * 16 + 16) + (1024 * NUM_CLASSES + NUM_CLASSES)
    tiny = create_model("convnet", (1, 1, 1), NUM_CLASSES)  # no room for pooling
    assert tiny.num_pools == 0
    assert tiny(torch.randn(2, 1, 1, 1)).shape == (2, NUM_CLASSES)


def test_residual_adds_are_plain_add_nodes():
    for name, kwargs, blocks in [("preresnet", dict(depth=20), 9), ("wide_resnet", dict(depth=16, widen_factor=1), 6)]:
        gm = torch.fx.symbolic_trace(create_model(name, (3, 32, 32), NUM_CLASSES, **kwargs))
        adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add]
        assert len(adds) == blocks
        assert any(n.op == "call_function" and n.target is torch.flatten for n in gm.graph.nodes)


def test_parameter_names_deterministic():
    for name in sorted(EXPECTED_NAMES):
        kw = FAST_KWARGS.get(name, {})
        shape = SHAPES.get(name, [(3, 32, 32)])[0]
        a = create_model(name, shape, NUM_CLASSES, **kw)
        b = create_model(name, shape, NUM_CLASSES, **kw)
        assert list(a.state_dict()) == list(b.state_dict())
    keys = list(create_model("preresnet", (3, 32, 32), 10).state_dict())
    assert keys[0] == "conv1.weight" and keys[-2:] == ["fc.weight", "fc.bias"]
    assert "layer2.0.downsample.0.weight" in keys and "layer1.0.downsample.0.weight" not in keys
    keys = list(create_model("wide_resnet", (3, 32, 32), 10, depth=10, widen_factor=2).state_dict())
    assert "layer1.0.shortcut.0.weight" in keys and "fc.weight" in keys
    keys = [k for k, _ in create_model("vgg11", (3, 32, 32), 10).named_parameters()]
    assert keys[:2] == ["features.0.weight", "features.0.bias"]
    assert keys[-2:] == ["classifier.6.weight", "classifier.6.bias"]


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------
def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError) as info:
        create_model("resnet9000", (3, 32, 32), 10)
    msg = str(info.value)
    assert "resnet9000" in msg
    for name in list_models():
        assert name in msg


def test_bad_kwargs_raise_value_error():
    with pytest.raises(ValueError, match="depth") as info:
        create_model("preresnet", (3, 32, 32), 10, depth=21)
    assert "20" in str(info.value) and "164" in str(info.value)
    with pytest.raises(ValueError, match="depth"):
        create_model("wide_resnet", (3, 32, 32), 10, depth=27)
    with pytest.raises(ValueError, match="widen_factor"):
        create_model("wide_resnet", (3, 32, 32), 10, depth=10, widen_factor=0)
    with pytest.raises(ValueError, match="bn"):
        create_model("convnet", (3, 32, 32), 10, bn="yes")
    with pytest.raises(ValueError, match="width"):
        create_model("mlp", (2,), 2, width=0)
    with pytest.raises(ValueError, match="widht") as info:  # typo'd kwarg
        create_model("mlp", (2,), 2, widht=16)
    assert "width" in str(info.value) and "depth" in str(info.value)
    with pytest.raises(ValueError, match="input_shape"):
        create_model("convnet", (2,), 2)  # conv nets need (C, H, W)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("mlp", (2,), 0)


def test_register_model_decorator(monkeypatch):
    import modeconn.models.registry as registry

    # register into a private copy so the global registry stays clean for other tests
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    name = "_test_tiny_linear"

    @register_model(name)
    def tiny(input_shape, num_classes, scale: float = 1.0):
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], num_classes))

    assert name in list_models()
    model = create_model(name, [5], 3)
    assert model(torch.randn(2, 5)).shape == (2, 3)
    with pytest.raises(ValueError, match="already registered"):
        register_model(name)(lambda input_shape, num_classes: nn.Identity())
    monkeypatch.undo()
    assert name not in list_models()


@pytest.mark.parametrize("name", ["convnet", "convnet_bn", "vgg11_bn", "preresnet", "wide_resnet"])
def test_image_models_convolve_channels_last_with_the_values_of_the_default_layout(name, monkeypatch):
    """The image zoo runs its convolutions channels-last (faster on CPUs), and that changes no value:
    the same model with the conversion patched out gives the same outputs and gradients.

    Gradients are compared in float64: in float32 the two layouts sum in another order, and where
    two inputs of a max-pool window differ by less than that rounding, the gradient goes to the
    other one (a max's gradient is discontinuous there, in any layout).
    """
    import modeconn.models.registry as registry
    torch.manual_seed(0)
    model = create_model(name, (3, 16, 16), NUM_CLASSES, **FAST_KWARGS.get(name, {})).train()
    layouts = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(
                lambda mod, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    x, y = torch.randn(5, 3, 16, 16), torch.randint(0, NUM_CLASSES, (5,))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def loss_and_grads(dtype):
        model.load_state_dict(state)                        # BN running statistics as before
        model.to(dtype).zero_grad()
        torch.manual_seed(1)                                # the same dropout masks on both sides
        loss = nn.functional.cross_entropy(model(x.to(dtype)), y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    runs = {dtype: loss_and_grads(dtype) for dtype in (torch.float32, torch.float64)}
    assert layouts and all(layouts) and x.is_contiguous()   # every conv saw channels-last; the caller's x kept
    layouts.clear()
    for module in ("vgg", "convnet", "preresnet", "wide_resnet"):
        monkeypatch.setattr(f"modeconn.models.{module}.channels_last", lambda t: t)
    ref = {dtype: loss_and_grads(dtype) for dtype in (torch.float32, torch.float64)}
    assert layouts and not layouts[0]   # the patch reached every model module (later 1x1 maps are both layouts)
    assert registry.channels_last(x).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(runs[torch.float32][0], ref[torch.float32][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runs[torch.float64][0], ref[torch.float64][0], rtol=1e-12, atol=1e-12)
    for g, r in zip(runs[torch.float64][1], ref[torch.float64][1]):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
