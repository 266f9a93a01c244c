"""The grid's fast paths (point loop with per-point sums, vmap, reused point buffer) against a float64
point-by-point reference, the caller's model left untouched, and the pieces they are built from."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import vector_to_parameters

from modeconn.evaluation import stacked
from modeconn.evaluation.model import MetricSums
from modeconn.geometry import evaluate_grid, flatten_parameters, random_plane


def _tiny(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype).eval()
    x = torch.randn(23, 5, dtype=dtype)
    y = torch.randint(0, 3, (23,))
    return net, x, y


def _reference(net, plane, xs, ys, x, y):
    """Point by point: θ = origin + xs[i]·d1 + ys[j]·d2 written into a copy, cross-entropy over all data."""
    loss, acc = np.zeros((len(ys), len(xs))), np.zeros((len(ys), len(xs)))
    ref = copy.deepcopy(net)
    for j, b in enumerate(ys):
        for i, a in enumerate(xs):
            theta = plane.origin + float(a) * plane.d1 + float(b) * plane.d2
            vector_to_parameters(theta, ref.parameters())
            with torch.no_grad():
                out = ref(x)
            loss[j, i] = F.cross_entropy(out, y).item()
            acc[j, i] = (out.argmax(1) == y).double().mean().item()
    return loss, acc


@pytest.mark.parametrize("max_work", [0, 10 ** 12])          # point loop / vmap for every batch
@pytest.mark.parametrize("nx,ny,k", [(5, 3, 8), (4, 7, 3), (3, 1, 1)])
def test_fast_grid_equals_point_by_point_float64(monkeypatch, max_work, nx, ny, k):
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", max_work)
    net, x, y = _tiny()
    plane = random_plane(flatten_parameters(net), net, dims=2, seed=1)
    xs, ys = np.linspace(-1.0, 0.7, nx), np.linspace(-0.4, 1.3, ny)   # odd sizes, not symmetric
    loader = [(x[:10], y[:10]), (x[10:], y[10:])]
    grid = evaluate_grid(net, plane, xs, ys, train_loader=loader, points_per_pass=k)
    loss, acc = _reference(net, plane, xs, ys, x, y)
    assert grid.arrays["train_loss"].shape == (ny, nx)
    np.testing.assert_allclose(grid.arrays["train_loss"], loss, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(grid.arrays["train_acc"], acc)
    # the coordinates of every entry are exactly (xs[i], ys[j]): no shifted columns
    assert np.array_equal(grid.coords()[..., 0], np.broadcast_to(xs, (ny, nx)))
    assert np.array_equal(grid.coords()[..., 1], np.broadcast_to(ys[:, None], (ny, nx)))


def test_grid_leaves_the_callers_model_untouched():
    net, x, y = _tiny(torch.float32)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    plane = random_plane(flatten_parameters(net), net, dims=2, seed=0)
    evaluate_grid(net, plane, [-1.0, 0.0, 1.0], [-0.5, 0.5], train_loader=[(x, y)], points_per_pass=2)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.training and all(m.training for m in net.modules())


def test_points_into_a_buffer_are_bitwise_the_points():
    net, _, _ = _tiny(torch.float32)
    plane = random_plane(flatten_parameters(net), net, dims=2, seed=2)
    c = np.random.default_rng(0).normal(size=(6, 2))
    buf = torch.full((6, plane.origin.numel()), float("nan"))
    assert plane.points(c, out=buf) is buf
    assert torch.equal(buf, plane.points(c))
    wide = plane.to(dtype=torch.float64)          # another dtype: computed there, then cast
    assert torch.equal(wide.points(c, out=torch.empty(6, plane.origin.numel())), wide.points(c).float())
    line = random_plane(flatten_parameters(net), net, dims=1, seed=2)
    assert torch.equal(line.points(c[:, 0], out=torch.empty(6, plane.origin.numel())), line.points(c[:, 0]))
    with pytest.raises(ValueError, match="out must have shape"):
        plane.points(c, out=torch.empty(5, plane.origin.numel()))


def test_add_logits_equals_the_float64_log_softmax_sums():
    torch.manual_seed(0)
    logits, y = 4 * torch.randn(3, 50, 6), torch.randint(0, 6, (50,))
    fast, ref = MetricSums(num_bins=5), MetricSums(num_bins=5)
    fast.add_logits(logits, y)
    ref.add(F.log_softmax(logits.double(), -1), y)
    a, b = fast.means(), ref.means()
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-14)
    np.testing.assert_array_equal(a["acc"], b["acc"])
    np.testing.assert_allclose(a["ece"], b["ece"], rtol=1e-12, atol=1e-15)
    by_hand = [F.cross_entropy(logits[m].double(), y).item() for m in range(3)]
    np.testing.assert_allclose(a["loss"], by_hand, rtol=1e-14)


def test_vmap_or_loop_rule():
    dense = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    conv = nn.Sequential(nn.Conv2d(1, 2, 3))
    assert stacked.vectorize_by_default(dense, "cpu")                      # no batch known: vmap
    assert stacked.vectorize_by_default(dense, "cpu", stacked.VMAP_MAX_WORK - 1)
    assert not stacked.vectorize_by_default(dense, "cpu", stacked.VMAP_MAX_WORK)
    assert not stacked.vectorize_by_default(conv, "cpu", 1)


def test_each_point_is_the_stacked_loop():
    net, x, _ = _tiny()
    theta = flatten_parameters(net)
    flats = torch.stack([theta, 2 * theta, -theta])
    params = {n: v for n, v in zip([n for n, _ in net.named_parameters()],
                                   [flats[:, a:b].reshape(3, *p.shape) for (a, b), p in
                                    zip(_offsets(net), net.parameters())])}
    outs = list(stacked.each_point(net, params, {}, x))
    for k in range(3):
        ref = copy.deepcopy(net)
        vector_to_parameters(flats[k], ref.parameters())
        assert torch.allclose(outs[k], ref(x), rtol=0, atol=1e-13)
    assert torch.equal(torch.stack(outs), stacked.batched_forward(net, vectorize=False)(params, {}, x))


def _offsets(net):
    out, start = [], 0
    for p in net.parameters():
        out.append((start, start + p.numel()))
        start += p.numel()
    return out


@pytest.mark.parametrize("max_work", [0, 10 ** 12])          # BN pass: point loop / vmap
def test_bn_recomputed_grid_equals_update_bn_per_point(monkeypatch, max_work):
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", max_work)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    loader = [(x[:16], y[:16]), (x[16:], y[16:])]
    plane = random_plane(flatten_parameters(net), net, dims=2, seed=0)
    xs, ys = [-0.5, 0.25, 1.0], [0.0, 0.75]
    grid = evaluate_grid(net, plane, xs, ys, train_loader=loader, points_per_pass=4)
    for j, b in enumerate(ys):
        for i, a in enumerate(xs):
            ref = copy.deepcopy(net)
            vector_to_parameters(plane.point(a, b), ref.parameters())
            torch.optim.swa_utils.update_bn(loader, ref)
            with torch.no_grad():
                want = F.cross_entropy(ref.eval()(x), y).item()
            assert abs(grid.arrays["train_loss"][j, i] - want) < 1e-12


@pytest.mark.parametrize("block_entries", [1, 50, 1 << 20])      # one point, a few points, all points per block
def test_point_loop_blocks_equal_point_by_point_float64(monkeypatch, block_entries):
    from modeconn.evaluation import points
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    monkeypatch.setattr(points, "BLOCK_ENTRIES", block_entries)
    net, x, y = _tiny()
    plane = random_plane(flatten_parameters(net), net, dims=2, seed=3)
    xs, ys = np.linspace(-0.8, 1.1, 5), np.linspace(-1.2, 0.3, 3)
    loader = [(x[:9], y[:9]), (x[9:18], y[9:18]), (x[18:], y[18:])]   # a ragged last batch
    grid = evaluate_grid(net, plane, xs, ys, train_loader=loader, test_loader=[(x[:7], y[:7])], points_per_pass=4)
    loss, acc = _reference(net, plane, xs, ys, x, y)
    np.testing.assert_allclose(grid.arrays["train_loss"], loss, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(grid.arrays["train_acc"], acc)
    test_loss, _ = _reference(net, plane, xs, ys, x[:7], y[:7])
    np.testing.assert_allclose(grid.arrays["test_loss"], test_loss, rtol=0, atol=1e-12)


def test_each_point_gives_the_template_its_tensors_back():
    from modeconn.geometry.grid import evaluator_for
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)).eval()
    curve = evaluator_for(net)
    template = curve.net
    bufs = dict(template.named_buffers())
    flats = torch.stack([curve.flat_weights_at(0.0)] * 3)
    p = curve.unflatten(flats)
    b = {n: v.unsqueeze(0).expand(3, *v.shape) for n, v in bufs.items()}
    outs = stacked.each_point(template, p, b, torch.randn(6, 4))
    next(outs)
    assert len(list(template.parameters())) == len(p) == 6    # point 0's views sit in the slots
    outs.close()                                           # left early: everything back
    assert list(template.parameters()) == []
    assert all(v is bufs[n] for n, v in template.named_buffers())
    with torch.no_grad():
        got = list(stacked.each_point(template, p, b, torch.ones(6, 4)))
    assert torch.allclose(got[2], net(torch.ones(6, 4)), atol=1e-6) and list(template.parameters()) == []


def test_add_logits_with_infinite_logits_is_torch_logsumexp():
    logits = torch.tensor([[[float("inf"), 0.0, 1.0], [-float("inf"), 2.0, 3.0], [1.0, 5.0, -2.0]]])
    y = torch.tensor([1, 2, 1])
    sums = MetricSums()
    sums.add_logits(logits, y)
    want = (torch.logsumexp(logits.double(), -1) - logits[0, [0, 1, 2], y].double()).sum() / 3
    assert np.isnan(want.item()) == np.isnan(sums.means()["loss"][0])
    finite = MetricSums()
    finite.add_logits(logits[:, 1:], y[1:])
    ref = (torch.logsumexp(logits[0, 1:].double(), -1) - logits[0, [1, 2], y[1:]].double()).mean()
    assert abs(finite.means()["loss"][0] - ref.item()) < 1e-15


class _CountingLoader(list):
    """A list of batches that counts the passes over it (``batch_size`` as a DataLoader says it)."""

    def __init__(self, batches, batch_size=None):
        super().__init__(batches)
        self.passes = 0
        if batch_size is not None:
            self.batch_size = batch_size

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


class _Unsized:
    """Batches from an iterable that does not tell its batch size."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


@pytest.mark.parametrize("max_work,loader_kind,row_bytes_points,passes", [
    (0, "list", None, 3),            # one after another: a whole row (5 points) per pass, 3 rows
    (0, "sized", None, 3),           # the loader's batch_size attribute
    (10 ** 12, "list", None, 9),     # vmapped: points_per_pass=2 -> 3 passes per row
    (0, "list", 3, 6),               # weights of 3 points fit the cap: 2 passes per row
    (0, "unsized", None, 9),         # batch size unknown: points_per_pass
])
def test_rows_share_passes_when_points_run_one_after_another(monkeypatch, max_work, loader_kind, row_bytes_points,
                                                            passes):
    from modeconn.geometry import grid as grid_module
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", max_work)
    net, x, y = _tiny()
    if row_bytes_points is not None:
        monkeypatch.setattr(grid_module, "ROW_PASS_BYTES", row_bytes_points * 8 * sum(p.numel() for p in net.parameters()))
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    loader = {"list": lambda: _CountingLoader(batches), "sized": lambda: _CountingLoader(batches, batch_size=10),
              "unsized": lambda: _Unsized(batches)}[loader_kind]()
    plane = random_plane(flatten_parameters(net), net, dims=2, seed=1)
    xs, ys = np.linspace(-1.0, 0.7, 5), np.linspace(-0.4, 1.3, 3)
    grid = evaluate_grid(net, plane, xs, ys, train_loader=loader, points_per_pass=2)
    assert loader.passes == passes
    loss, acc = _reference(net, plane, xs, ys, x, y)
    np.testing.assert_allclose(grid.arrays["train_loss"], loss, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(grid.arrays["train_acc"], acc)


def test_with_ranks_each_gets_a_share_of_a_row(monkeypatch):
    from modeconn.geometry import grid as grid_module
    from modeconn.runtime import Runtime
    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    net, x, y = _tiny()
    curve = grid_module.evaluator_for(net)
    one = Runtime(distributed=False)
    assert grid_module._row_pass(curve, 21, 8, [(x, y)], one) == 21
    assert grid_module._row_pass(curve, 21, 8, [(x, y)], Runtime(compile=True)) == 8
    monkeypatch.setattr(Runtime, "sharded", lambda self: True)
    monkeypatch.setattr(grid_module._dist, "get_world_size", lambda: 2)
    assert grid_module._row_pass(curve, 21, 8, [(x, y)], one) == 11
    monkeypatch.setattr(grid_module._dist, "get_world_size", lambda: 4)
    assert grid_module._row_pass(curve, 21, 8, [(x, y)], one) == 6


def test_a_loader_without_a_length_is_not_asked_for_one(monkeypatch):
    """An iterable-style DataLoader has no len(): the row pass must not take its truth value."""
    from torch.utils.data import DataLoader, IterableDataset

    class Stream(IterableDataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __iter__(self):
            return iter(zip(self.x, self.y))

    monkeypatch.setattr(stacked, "VMAP_MAX_WORK", 0)
    net, x, y = _tiny()
    loader = DataLoader(Stream(x, y), batch_size=10)
    with pytest.raises(TypeError):
        len(loader)
    plane = random_plane(flatten_parameters(net), net, dims=2, seed=1)
    xs, ys = np.linspace(-1.0, 0.7, 5), np.linspace(-0.4, 1.3, 3)
    grid = evaluate_grid(net, plane, xs, ys, train_loader=loader, points_per_pass=2)
    loss, _ = _reference(net, plane, xs, ys, x, y)
    np.testing.assert_allclose(grid.arrays["train_loss"], loss, rtol=0, atol=1e-12)
