"""Grid points share the products of the layers that read the raw input (evaluation.input_span).

Checked against a float64 point-by-point reference (weights written into a copy
of the network), with the layer products counted: one per vector and batch for
a whole grid, and recomputed whenever the data or the plane change.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import vector_to_parameters

from modeconn.evaluation import input_span, stacked
from modeconn.evaluation.input_span import Span
from modeconn.evaluation.points import evaluate_points
from modeconn.geometry import evaluate_grid, flatten_parameters, random_plane
from modeconn.geometry.grid import evaluator_for


@pytest.fixture(autouse=True)
def _small_layers_too(monkeypatch):
    """The tests' layers are small: let every fan-in use the span (one test sets the measured default)."""
    monkeypatch.setattr(input_span, "MIN_FAN_IN", 1)


class _Counted:
    """Counts calls of ``torch.nn.functional.<name>`` whose weight has ``shape``."""

    def __init__(self, monkeypatch, name, shape):
        self.calls, self.shape, own = 0, tuple(shape), getattr(F, name)

        def counted(inp, weight, *args, **kwargs):
            self.calls += tuple(weight.shape) == self.shape
            return own(inp, weight, *args, **kwargs)
        monkeypatch.setattr(F, name, counted)


def _mlp():
    """Flatten (a view of the batch) -> Linear reads the raw input."""
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 1, 3))


def _conv1d():
    return nn.Sequential(nn.Conv1d(2, 3, 2, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 2, 3))


CASES = {"mlp": (_mlp, (2, 3), "linear", (5, 6)), "cnn": (_cnn, (2, 3, 1), "conv2d", (4, 2, 3, 3)),
         "conv1d": (_conv1d, (2, 3), "conv1d", (3, 2, 2))}


def _data(shape, n=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def _net(make, seed=0):
    torch.manual_seed(seed)
    return make().double().eval()


def _reference(net, points, x, y):
    """Mean cross-entropy and accuracy of each flat point, written into a copy of ``net``."""
    ref, loss, acc = copy.deepcopy(net), [], []
    for theta in points:
        vector_to_parameters(theta, ref.parameters())
        with torch.no_grad():
            out = ref(x)
        loss.append(F.cross_entropy(out, y).item())
        acc.append((out.argmax(1) == y).double().mean().item())
    return np.array(loss), np.array(acc)


@pytest.mark.parametrize("case", sorted(CASES))
def test_grid_through_shared_input_products_equals_point_by_point_float64(monkeypatch, case):
    make, shape, fn, wshape = CASES[case]
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)            # points one after another (also the MLP)
    net = _net(make)
    x, y = _data(shape)
    plane = random_plane(flatten_parameters(net), net, dims=2, seed=1)
    xs, ys = np.linspace(-1.0, 0.7, 5), np.linspace(-0.4, 1.3, 3)
    loader = [(x[:10], y[:10]), (x[10:], y[10:])]
    counted = _Counted(monkeypatch, fn, wshape)
    grid = evaluate_grid(net, plane, xs, ys, train_loader=loader, points_per_pass=8)
    # 3 vectors (origin, d1, d2) x 2 batches for the whole grid (15 points, rows of 5 in 3 passes)
    assert counted.calls == 3 * 2
    coords = grid.coords().reshape(-1, 2)
    points = [plane.origin + a * plane.d1 + b * plane.d2 for a, b in coords]
    loss, acc = _reference(net, points, x, y)
    np.testing.assert_allclose(grid.arrays["train_loss"].reshape(-1), loss, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(grid.arrays["train_acc"].reshape(-1), acc)


def test_a_line_shares_two_products_per_batch(monkeypatch):
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    net = _net(_mlp)
    x, y = _data((2, 3))
    plane = random_plane(flatten_parameters(net), net, dims=1, seed=2)
    xs = np.linspace(-2.0, 1.0, 9)
    counted = _Counted(monkeypatch, "linear", (5, 6))
    grid = evaluate_grid(net, plane, xs, train_loader=[(x, y)], points_per_pass=3)
    assert counted.calls == 2                                     # origin and d1, once
    loss, _ = _reference(net, [plane.origin + a * plane.d1 for a in xs], x, y)
    np.testing.assert_allclose(grid.arrays["train_loss"], loss, rtol=0, atol=1e-12)


def _span_case(seed=0, K=5):
    net = _net(_mlp, seed)
    curve = evaluator_for(net)
    plane = random_plane(flatten_parameters(net), net, dims=2, seed=3)
    coords = np.random.default_rng(seed).uniform(-1, 1, (K, 2))
    flats = plane.points(coords)
    span = Span(torch.from_numpy(np.concatenate([np.ones((K, 1)), coords], 1)), [plane.origin, plane.d1, plane.d2])
    return net, curve, plane, flats, span


def _loss(curve, flats, loader, span, scratch):
    return evaluate_points(curve, flats, loader, None, span=span, scratch=scratch)["train_loss"]


def test_kept_products_follow_changes_of_the_data_and_of_the_vectors(monkeypatch):
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    net, curve, plane, flats, span = _span_case()
    x, y = _data((2, 3))
    loader, scratch = [(x, y)], {}
    counted = _Counted(monkeypatch, "linear", (5, 6))
    first = _loss(curve, flats, loader, span, scratch)
    again = _loss(curve, flats, loader, span, scratch)
    assert counted.calls == 3                                     # the second pass reused the products
    np.testing.assert_array_equal(again, first)
    np.testing.assert_allclose(first, _reference(net, flats, x, y)[0], rtol=0, atol=1e-12)

    x.mul_(1.5)                                                   # the data changed in place: recomputed
    counted.calls = 0
    moved = _loss(curve, flats, loader, span, scratch)
    assert counted.calls == 3
    np.testing.assert_allclose(moved, _reference(net, flats, x, y)[0], rtol=0, atol=1e-12)
    assert np.abs(moved - first).max() > 1e-3

    with torch.no_grad():                                         # the plane changed in place: recomputed
        plane.d1.mul_(-0.5)
    flats = plane.points(np.asarray(span.coefficients[:, 1:]))
    counted.calls = 0
    turned = _loss(curve, flats, loader, span, scratch)
    assert counted.calls == 3
    np.testing.assert_allclose(turned, _reference(net, flats, x, y)[0], rtol=0, atol=1e-12)


def test_slices_of_the_same_data_reuse_the_products_and_copies_do_not(monkeypatch):
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    net, curve, plane, flats, span = _span_case(seed=1)
    x, y = _data((2, 3))
    scratch = {}
    counted = _Counted(monkeypatch, "linear", (5, 6))
    for _ in range(2):   # a loader that slices its data anew every pass (like TensorLoader)
        got = _loss(curve, flats, [(x[0:9], y[0:9]), (x[9:], y[9:])], span, scratch)
    assert counted.calls == 3 * 2
    for _ in range(2):   # copies: the values could differ, so the products are made again every pass
        _loss(curve, flats, [(x[0:9].clone(), y[0:9]), (x[9:].clone(), y[9:])], span, scratch)
    assert counted.calls == 3 * 2 + 2 * 3 * 2
    np.testing.assert_allclose(got, _reference(net, flats, x, y)[0], rtol=0, atol=1e-12)


def test_without_room_to_keep_them_the_products_are_made_once_per_pass(monkeypatch):
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    monkeypatch.setattr(input_span, "SPAN_CACHE_BYTES", 0)
    net, curve, plane, flats, span = _span_case(seed=2)
    x, y = _data((2, 3))
    scratch = {}
    counted = _Counted(monkeypatch, "linear", (5, 6))
    for _ in range(2):
        got = _loss(curve, flats, [(x, y)], span, scratch)
    assert counted.calls == 3 * 2 and scratch["input span"]["products"] == {}
    np.testing.assert_allclose(got, _reference(net, flats, x, y)[0], rtol=0, atol=1e-12)


class _Scaled(nn.Module):
    """The first layer reads a tensor computed from the batch, not the batch's memory."""

    def __init__(self):
        super().__init__()
        self.body = _mlp()

    def forward(self, x):
        return self.body(x * 2.0)


class _MyLinear(nn.Linear):
    pass


@pytest.mark.parametrize("kind", ["computed input", "subclass", "hook", "few points", "small fan-in"])
def test_layers_that_cannot_answer_from_the_span_compute_their_own_products(monkeypatch, kind):
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    monkeypatch.setattr(input_span, "MIN_FAN_IN", 7 if kind == "small fan-in" else 1)   # the layer's: 6
    torch.manual_seed(0)
    net = _Scaled() if kind == "computed input" else _mlp()
    if kind == "subclass":
        net[1] = _MyLinear(6, 5)
    net = net.double().eval()
    first = net.body[1] if kind == "computed input" else net[1]
    if kind == "hook":
        first.register_forward_hook(lambda m, i, o: o * 3.0)
    K = 3 if kind == "few points" else 5                          # 3 points, 3 vectors: nothing to share
    x, y = _data((2, 3))
    plane = random_plane(flatten_parameters(net), net, dims=2, seed=3)
    coords = np.random.default_rng(0).uniform(-1, 1, (K, 2))
    flats = plane.points(coords)
    span = Span(torch.from_numpy(np.concatenate([np.ones((K, 1)), coords], 1)), [plane.origin, plane.d1, plane.d2])
    counted = _Counted(monkeypatch, "linear", (5, 6))
    got = evaluate_points(evaluator_for(net), flats, [(x, y)], None, span=span, scratch={})["train_loss"]
    assert counted.calls == K                                      # one product per point
    np.testing.assert_allclose(got, _reference(net, flats, x, y)[0], rtol=0, atol=1e-12)


def test_a_span_that_does_not_give_the_points_is_refused(monkeypatch):
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    net, curve, plane, flats, span = _span_case(seed=4)
    x, y = _data((2, 3))
    wrong = Span(span.coefficients.clone(), span.vectors)
    wrong.coefficients[3, 2] += 0.01
    with pytest.raises(ValueError, match="span: point 3 is not the combination"):
        _loss(curve, flats, [(x, y)], wrong, {})
    bent = flats.clone()
    bent[1, 7] *= 1 + 1e-13                            # one weight entry of the first layer, by 1e-13 (float64)
    with pytest.raises(ValueError, match=r"span: point 1 .*\(entry 7: "):
        _loss(curve, bent, [(x, y)], span, {})
    with pytest.raises(ValueError, match=r"span: coefficients \(5, 2\) and vectors \[\(\d+,\), \(\d+,\), \(\d+,\)\]"):
        _loss(curve, flats, [(x, y)], Span(span.coefficients[:, :2], span.vectors), {})


@pytest.mark.parametrize("first,shape,fn,fan_in", [
    (lambda: nn.Linear(6, 5), (6,), "linear", 6),
    (lambda: nn.Conv2d(4, 6, (3, 2), groups=2), (4, 3, 2), "conv2d", 2 * 3 * 2),
    (lambda: nn.Conv1d(3, 2, 2), (3, 4), "conv1d", 3 * 2)])
def test_the_fan_in_threshold_counts_the_products_summed_into_each_output(monkeypatch, first, shape, fn, fan_in):
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    torch.manual_seed(0)
    layer = first()
    out = layer(torch.zeros(1, *shape)).numel()
    net = nn.Sequential(layer, nn.Flatten(), nn.Tanh(), nn.Linear(out, 3)).double().eval()
    x, y = _data(shape)
    plane = random_plane(flatten_parameters(net), net, dims=2, seed=5)
    row = np.random.default_rng(1).uniform(-1, 1, (5, 2))
    row[:, 1] = 0.3                  # a grid row: one add per point; elsewhere three passes per point
    for coords, per_pass in ((row, 1), (np.random.default_rng(1).uniform(-1, 1, (5, 2)), 3)):
        flats = plane.points(coords)
        span = Span(torch.from_numpy(np.concatenate([np.ones((5, 1)), coords], 1)),
                    [plane.origin, plane.d1, plane.d2])
        at_most = fan_in // per_pass     # the largest MIN_FAN_IN with fan_in >= MIN_FAN_IN * passes
        for threshold, calls in ((at_most, 3), (at_most + 1, 5)):
            monkeypatch.setattr(input_span, "MIN_FAN_IN", threshold)
            counted = _Counted(monkeypatch, fn, layer.weight.shape)
            got = evaluate_points(evaluator_for(net), flats, [(x, y)], None, span=span, scratch={})["train_loss"]
            assert counted.calls == calls, (threshold, per_pass)
            np.testing.assert_allclose(got, _reference(net, flats, x, y)[0], rtol=0, atol=1e-12)


class _Views(nn.Module):
    """One layer read three times: two different views of the batch and a tensor computed from it."""

    def __init__(self, shift=2):
        super().__init__()
        self.lin, self.out, self.shift = nn.Linear(6, 5), nn.Linear(5, 3), shift

    def forward(self, x):
        s = self.shift
        return self.out(torch.tanh(self.lin(x[:, :6]) + self.lin(x[:, s:s + 6]) + self.lin(x[:, :6] * 2.0)))


def _plane_span(net, K=5, seed=0, first=1.0):
    plane = random_plane(flatten_parameters(net), net, dims=2, seed=seed)
    coords = np.random.default_rng(seed).uniform(-1, 1, (K, 2))
    c = np.concatenate([np.full((K, 1), first), coords], 1)
    flats = first * plane.origin + torch.from_numpy(coords[:, :1]) * plane.d1 + torch.from_numpy(coords[:, 1:]) * plane.d2
    return flats, Span(torch.from_numpy(c), [plane.origin, plane.d1, plane.d2])


def test_each_view_of_the_batch_gets_its_own_products_and_other_inputs_the_points_weights(monkeypatch):
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    torch.manual_seed(0)
    net = _Views().double().eval()
    x, y = _data((8,))
    flats, span = _plane_span(net)
    counted = _Counted(monkeypatch, "linear", (5, 6))
    scratch = {}
    got = evaluate_points(evaluator_for(net), flats, [(x, y)], None, span=span, scratch=scratch)["train_loss"]
    assert counted.calls == 2 * 3 + 5                  # two views x three vectors, the computed input per point
    np.testing.assert_allclose(got, _reference(net, flats, x, y)[0], rtol=0, atol=1e-12)
    net.shift = 1                                      # the next pass reads another view: new products
    counted.calls = 0
    got = evaluate_points(evaluator_for(net), flats, [(x, y)], None, span=span, scratch=scratch)["train_loss"]
    assert counted.calls == 3 + 5                      # the first view's products were kept
    np.testing.assert_allclose(got, _reference(net, flats, x, y)[0], rtol=0, atol=1e-12)


def test_a_batch_slot_refilled_with_another_part_of_the_same_data_gets_new_products(monkeypatch):
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    net, curve, plane, flats, span = _span_case(seed=5)
    x, y = _data((2, 3))
    scratch = {}
    _loss(curve, flats, [(x[0:9], y[0:9])], span, scratch)
    got = _loss(curve, flats, [(x[8:17], y[8:17])], span, scratch)     # same memory, batch 0, other rows
    np.testing.assert_allclose(got, _reference(net, flats, x[8:17], y[8:17])[0], rtol=0, atol=1e-12)


class _Rewrites(nn.Module):
    """Writes into its input before reading it (the values stay; the batch's memory is no longer trusted)."""

    def __init__(self):
        super().__init__()
        self.body = _mlp()

    def forward(self, x):
        return self.body(x.add_(0.0))


def test_a_batch_written_to_since_it_came_is_not_trusted(monkeypatch):
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    torch.manual_seed(0)
    net = _Rewrites().double().eval()
    x, y = _data((2, 3))
    flats, span = _plane_span(net)
    counted = _Counted(monkeypatch, "linear", (5, 6))
    got = evaluate_points(evaluator_for(net), flats, [(x, y)], None, span=span, scratch={})["train_loss"]
    assert counted.calls == 5
    np.testing.assert_allclose(got, _reference(net, flats, x, y)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("first", [1.0, 0.5, -2.0])
def test_any_first_coefficient_and_a_single_vector(monkeypatch, first):
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double().eval()
    x, y = _data((2, 3))
    flats, span = _plane_span(net, first=first)
    got = evaluate_points(evaluator_for(net), flats, [(x, y)], None, span=span, scratch={})["train_loss"]
    np.testing.assert_allclose(got, _reference(net, flats, x, y)[0], rtol=0, atol=1e-12)
    # one vector: the points are multiples of it (the in-place ReLU must not reach the kept product)
    scales = torch.tensor([[first], [1.5], [0.25]], dtype=torch.float64)
    origin = flatten_parameters(net)
    counted = _Counted(monkeypatch, "linear", (5, 6))
    flats = scales * origin
    got = evaluate_points(evaluator_for(net), flats, [(x, y)], None, span=Span(scales, [origin]),
                          scratch={})["train_loss"]
    assert counted.calls == 1
    np.testing.assert_allclose(got, _reference(net, flats, x, y)[0], rtol=0, atol=1e-12)


def _eligible(net):
    curve = evaluator_for(net)
    flats = flatten_parameters(net)[None].repeat(4, 1)
    span = Span(torch.ones(4, 1, dtype=flats.dtype), [flats[0]])
    return [name for name, _, _ in input_span.InputLayers(curve.net, curve.layout.names, curve.layout.numels,
                                                          span, flats, {}).layers]


def test_which_layers_may_answer_from_a_span(monkeypatch):
    monkeypatch.setattr(input_span, "MIN_FAN_IN", 0)   # the other rules; the fan-in has its own test
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    def make(kind):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Conv1d(1, 2, 3), nn.Linear(2, 2, bias=False))
        first = net[0]
        if kind == "pre-hook":
            first.register_forward_pre_hook(lambda m, i: None)
        elif kind == "buffer":
            first.register_buffer("scale", torch.ones(1))
        elif kind == "own forward":
            first.forward = first.forward
        elif kind == "extra parameter":
            first.register_parameter("gain", nn.Parameter(torch.ones(1)))
        elif kind == "parametrized":
            parametrize.register_parametrization(first, "weight", nn.Identity())
        elif kind == "weight norm":
            net[0] = weight_norm(first)
        elif kind == "subclass":
            net[0] = _MyLinear(6, 5)
        return net.double()

    assert _eligible(make("plain")) == ["0", "2", "3"]
    for kind in ("pre-hook", "buffer", "own forward", "extra parameter", "parametrized", "weight norm", "subclass"):
        assert _eligible(make(kind)) == ["2", "3"], kind
    nested = nn.Sequential(nn.Sequential(nn.Linear(6, 5), nn.Tanh()), nn.Linear(5, 2)).double()
    assert _eligible(nested) == ["0.0", "1"]
    # a layout without the first layer's weight (held fixed): its output is not linear in the point
    net = make("plain")
    names = [n for n, _ in net.named_parameters() if n != "0.weight"]
    numels = [p.numel() for n, p in net.named_parameters() if n != "0.weight"]
    flats = torch.randn(4, sum(numels), dtype=torch.float64)
    span = Span(torch.eye(4, dtype=torch.float64), list(flats))
    assert [n for n, _, _ in input_span.InputLayers(net, names, numels, span, flats, {}).layers] == ["2", "3"]
    names, numels = names[1:], numels[1:]                   # and without any of its parameters
    flats = flats[:, 5:]
    span = Span(torch.eye(4, dtype=torch.float64), list(flats))
    assert [n for n, _, _ in input_span.InputLayers(net, names, numels, span, flats, {}).layers] == ["2", "3"]


def test_a_refilled_slot_of_images_gets_new_products_though_the_layer_reads_a_fresh_copy(monkeypatch):
    """4-D batches are copied channels-last before the forward: only the loader's tensor tells them apart."""
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 2, 3)).double().eval()
    x, y = _data((2, 3, 2))
    flats, span = _plane_span(net)
    curve, scratch = evaluator_for(net), {}
    evaluate_points(curve, flats, [(x[0:9], y[0:9])], None, span=span, scratch=scratch)
    got = evaluate_points(curve, flats, [(x[8:17], y[8:17])], None, span=span, scratch=scratch)["train_loss"]
    np.testing.assert_allclose(got, _reference(net, flats, x[8:17], y[8:17])[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("bends", [2, 3, 4])
def test_path_points_share_the_products_of_their_bends(monkeypatch, bends):
    """θ(t) = Σ_k c_k(t) bend_k: a path's chunks share one product per bend and batch."""
    from modeconn.core.curve_model import CurveModel
    from modeconn.core.curves import Bezier
    from modeconn.evaluation.path import evaluate_path
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    a, b = _net(_mlp, 0), _net(_mlp, 1)
    curve = CurveModel(a, a, b, Bezier(bends)).double()
    with torch.no_grad():
        curve.free_bends.add_(0.3 * torch.randn_like(curve.free_bends))
    x, y = _data((2, 3))
    train, test = [(x[:9], y[:9]), (x[9:], y[9:])], [(x, y)]
    counted = _Counted(monkeypatch, "linear", (5, 6))
    ts = np.linspace(0.0, 1.0, 11)
    res = evaluate_path(curve, train, test, ts=ts, points_per_pass=5)
    # chunks of 5, 5, 1 points over 3 batches: one product per bend and batch for the first two chunks
    # (kept across them), and the last point (fewer points than bends) runs its own
    assert counted.calls == bends * 3 + 1 * 3
    with torch.no_grad():
        points = curve.flat_weights_at(torch.tensor(ts))
    np.testing.assert_allclose(res.train_nll, _reference(a, points, x, y)[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.test_acc, _reference(a, points, x, y)[1], rtol=0, atol=0)


def test_train_and_test_batches_of_one_shape_keep_their_own_products(monkeypatch):
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    net, curve, plane, flats, span = _span_case(seed=6)
    x, y = _data((2, 3), n=16)
    u, v = _data((2, 3), n=8, seed=1)
    train, test, scratch = [(x[:8], y[:8]), (x[8:], y[8:])], [(u, v)], {}
    counted = _Counted(monkeypatch, "linear", (5, 6))
    for _ in range(3):
        got = evaluate_points(curve, flats, train, test, span=span, scratch=scratch)
    assert counted.calls == 3 * 3                      # 3 vectors x 3 batches, once for the three calls
    np.testing.assert_allclose(got["test_loss"], _reference(net, flats, u, v)[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["train_loss"], _reference(net, flats, x, y)[0], rtol=0, atol=1e-12)


def test_a_network_that_is_one_layer_and_a_float32_network_on_a_float64_plane(monkeypatch):
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    torch.manual_seed(0)
    x, y = _data((6,))
    bare = nn.Linear(6, 3).double()                            # the eligible layer is the network itself
    flats, span = _plane_span(bare)
    got = evaluate_points(evaluator_for(bare), flats, [(x, y)], None, span=span, scratch={})["train_loss"]
    np.testing.assert_allclose(got, _reference(bare, flats, x, y)[0], rtol=0, atol=1e-12)
    # a curve plane's axes are float64 while the network is float32; coordinates far from the origin
    net = _mlp().float().eval()
    plane = random_plane(flatten_parameters(net), net, dims=2, seed=7)
    vectors = [plane.origin.double(), plane.d1.double(), plane.d2.double()]
    coords = np.random.default_rng(2).uniform(-100, 100, (5, 2))   # float32 rounding well above eps
    c = torch.from_numpy(np.concatenate([np.ones((5, 1)), coords], 1))
    flats = (c @ torch.stack(vectors)).float()                 # the points rounded to float32
    counted = _Counted(monkeypatch, "linear", (5, 6))
    got = evaluate_points(evaluator_for(net), flats, [(x.float(), y)], None, span=Span(c, vectors),
                          scratch={})["train_loss"]
    assert counted.calls == 3
    want = _reference(net.double(), flats.double(), x, y)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_products_are_kept_while_they_fit_the_budget(monkeypatch):
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    net, curve, plane, flats, span = _span_case(seed=8)
    x, y = _data((2, 3), n=16)
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    # one batch's three products: 3 x [8, 5] float64 = 960 bytes; a budget of exactly that keeps batch 0
    monkeypatch.setattr(input_span, "SPAN_CACHE_BYTES", 3 * 8 * 5 * 8)
    counted, scratch = _Counted(monkeypatch, "linear", (5, 6)), {}
    for _ in range(2):
        got = _loss(curve, flats, loader, span, scratch)
    assert counted.calls == 3 * 2 + 3                  # the second pass remakes batch 1's products only
    np.testing.assert_allclose(got, _reference(net, flats, x, y)[0], rtol=0, atol=1e-12)
    for budget, calls in ((3 * 8 * 5 * 8 - 1, 3 * 2 * 2),     # a byte short of one batch: nothing kept
                          (2 * 3 * 8 * 5 * 8 - 1, 3 * 2 + 3)):  # a byte short of both: batch 0 kept
        monkeypatch.setattr(input_span, "SPAN_CACHE_BYTES", budget)
        counted.calls, scratch = 0, {}
        for _ in range(2):
            _loss(curve, flats, loader, span, scratch)
        assert counted.calls == calls, budget


def test_the_span_is_checked_at_evenly_spaced_entries_of_every_parameter(monkeypatch):
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    monkeypatch.setattr(input_span, "CHECKED_ENTRIES", 2)
    net, curve, plane, flats, span = _span_case(seed=9)
    x, y = _data((2, 3))
    # layer 1: weight entries 0..29 (every 15th checked), bias 30..34 (every 2nd: 30, 32, 34)
    bent = flats.clone()
    bent[2, 32] += 1e-3
    with pytest.raises(ValueError, match=r"span: point 2 .*\(entry 32: "):
        _loss(curve, bent, [(x, y)], span, {})
    with pytest.raises(ValueError, match=r"span: coefficients \(4, 3\)"):
        _loss(curve, flats, [(x, y)], Span(span.coefficients[:4], span.vectors), {})   # 4 rows for 5 points
