"""PathResult's plain data (what eval_curve writes as JSON) and its defaults, checked by hand, and
the straight companion line of a curve (mutation run 7: evaluation/path.py)."""
import numpy as np
import pytest
import torch
from torch import nn

from modeconn.core.curve_model import CurveModel
from modeconn.core.curves import Bezier, PolyChain
from modeconn.evaluation.path import METRICS, PathResult, endpoint_line

TS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])


def _result(ts=TS, extra=None, linear=None, name="curve"):
    """A result whose every metric is a different, known array."""
    n = len(ts)
    arrays = {m: np.arange(n, dtype=float) * (i + 1) / 10 for i, m in enumerate(METRICS)}
    arrays["test_loss"] = np.array([1.0, 3.0, 2.0, 2.5, 1.5])[:n]
    arrays["train_error"] = np.array([0.1, 0.1, 0.4, 0.2, 0.3])[:n]
    seg = np.array([0.5, 1.0, 1.5, 2.0])[:n - 1]
    return PathResult(ts=np.asarray(ts, float), segment_lengths=seg, arc_length=np.concatenate([[0.0], np.cumsum(seg)]),
                      name=name, bn_recomputed=True, linear=linear, extra=dict(extra or {}), **arrays)


def test_barrier_defaults_to_the_test_loss_above_the_line_between_the_ends():
    res = _result()
    # test_loss [1, 3, 2, 2.5, 1.5]; the line between the ends: 1 + 0.5 t -> rises 3 - 1.125 at t = 0.25
    assert res.barrier() == pytest.approx(1.875)
    assert res.barrier_t() == 0.25
    assert res.barrier("test_loss", "max") == pytest.approx(1.5)         # 3 - max(1, 1.5)
    assert res.barrier("train_error", "mean") == pytest.approx(0.2)     # 0.4 - (0.1 + 0.3) / 2
    assert res.barrier_t("train_error", "mean") == 0.5


def test_to_dict_holds_every_array_summary_and_barrier_under_its_name():
    extra = {"robust_test_loss": np.array([0.0, 2.0, 1.0, 0.5, 0.0]),   # a curve: barriers apply
             "robust_test_error": np.array([0.2, 0.2, 0.2, 0.6, 0.2]),
             "robust_test_acc": np.array([0.8, 0.8, 0.8, 0.4, 0.8]),     # an accuracy: no barrier
             "flat_loss": np.ones((2, 5)),                                # not one value per t
             "short_loss": np.ones(3),                                    # not one value per t
             "sharpness": np.arange(5.0)}                                 # neither a loss nor an error
    line = _result(name="line")
    res = _result(extra=extra, linear=line)
    d = res.to_dict()
    assert set(d) == {"name", "bn_recomputed", "ts", "segment_lengths", "arc_length", *METRICS, *extra,
                      "summary", "barriers", "linear"}
    assert d["name"] == "curve" and d["bn_recomputed"] is True
    assert d["ts"] == TS.tolist() and d["segment_lengths"] == [0.5, 1.0, 1.5, 2.0]
    assert d["arc_length"] == [0.0, 0.5, 1.5, 3.0, 5.0]
    for m in METRICS:
        assert d[m] == getattr(res, m).tolist()
    for k, v in extra.items():
        assert d[k] == v.tolist()
    assert set(d["summary"]) == set(METRICS)
    # test_loss [1, 3, 2, 2.5, 1.5] with segment lengths [0.5, 1, 1.5, 2]: midpoints [2, 2.5, 2.25, 2]
    assert d["summary"]["test_loss"] == pytest.approx(
        {"min": 1.0, "max": 3.0, "mean": 2.0, "weighted_mean": (2 * 0.5 + 2.5 + 2.25 * 1.5 + 2 * 2) / 5})
    assert set(d["barriers"]) == {m for m in METRICS if not m.endswith("_acc")} | {"robust_test_loss",
                                                                                      "robust_test_error"}
    assert d["barriers"]["test_loss"]["interp"] == {"barrier": pytest.approx(1.875), "t": 0.25}
    assert d["barriers"]["test_loss"]["max"]["barrier"] == pytest.approx(1.5)
    assert d["barriers"]["robust_test_loss"]["interp"] == {"barrier": pytest.approx(2.0), "t": 0.25}
    assert d["barriers"]["robust_test_error"]["mean"] == {"barrier": pytest.approx(0.4), "t": 0.75}
    assert d["linear"]["name"] == "line" and "linear" not in d["linear"]


def test_to_dict_of_a_path_without_both_ends_has_no_barriers():
    d = _result(ts=np.array([0.0, 0.3, 0.6, 0.9, 0.95])).to_dict()
    assert "barriers" not in d and "linear" not in d
    assert d["summary"]["test_loss"]["max"] == 3.0


def _bn_net(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2.0)
    net[1].num_batches_tracked.fill_(seed + 1)
    return net.eval()


def test_the_companion_line_joins_the_curves_current_ends_with_their_buffers():
    a, b = _bn_net(0), _bn_net(1)
    curve = CurveModel(a, a, b, Bezier(4), fix_start=False)
    with torch.no_grad():
        curve.free_bends.add_(0.25)              # the ends move with training: the line follows them
    line = endpoint_line(curve)
    assert line.curve == PolyChain(2) and line.num_bends == 2 and line.free_idx == []
    ends = curve.flat_weights_at(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(line.flat_weights_at(torch.tensor([0.0, 0.5, 1.0])),
                               torch.stack([ends[0], (ends[0] + ends[1]) / 2, ends[1]]), rtol=0, atol=1e-6)
    for name, buf in a.named_buffers():          # the line's live buffers: the start's, as the curve's at t=0
        assert torch.equal(line.net.get_buffer(name), buf), name
    for which, model in ((0, a), (1, b)):
        got = line.endpoint_buffers(which)
        assert set(got) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
        for name, buf in model.named_buffers():
            assert torch.equal(got[name], buf), (which, name)


def test_the_barrier_table_has_a_row_per_path_metric_and_reference():
    line = _result(name="line")
    line.test_loss = np.array([1.0, 1.5, 2.5, 2.0, 1.5])
    rows = _result(linear=line).barrier_table(metrics=("test_loss", "train_error"))
    assert [(r["path"], r["metric"], r["reference"]) for r in rows] == [
        (p, m, ref) for p in ("curve", "line") for m in ("test_loss", "train_error") for ref in ("interp", "mean", "max")]
    got = {(r["path"], r["metric"], r["reference"]): (r["barrier"], r["t"]) for r in rows}
    assert got["curve", "test_loss", "interp"] == (pytest.approx(1.875), 0.25)
    assert got["curve", "test_loss", "mean"] == (pytest.approx(1.75), 0.25)     # 3 - (1 + 1.5) / 2
    assert got["curve", "test_loss", "max"] == (pytest.approx(1.5), 0.25)
    assert got["line", "test_loss", "interp"] == (pytest.approx(1.25), 0.5)     # 2.5 - 1.25
    assert got["line", "test_loss", "max"] == (pytest.approx(1.0), 0.5)
    assert got["curve", "train_error", "mean"] == (pytest.approx(0.2), 0.5)
    with pytest.raises(ValueError, match="barrier of an accuracy"):
        _result().barrier_table(metrics=("test_acc",))


def test_summary_of_a_path_of_zero_length_weighs_every_point_alike():
    res = _result()
    res.segment_lengths = np.zeros(4)
    assert res.summary("test_loss") == {"min": 1.0, "max": 3.0, "mean": 2.0, "weighted_mean": 2.0}


def test_the_barrier_table_of_a_path_without_its_line_and_a_short_path_summary():
    rows = _result().barrier_table(metrics=("test_loss",))
    assert [(r["path"], r["reference"]) for r in rows] == [("curve", "interp"), ("curve", "mean"), ("curve", "max")]
    res = _result()
    res.segment_lengths = np.array([0.1, 0.2, 0.3, 0.4])         # total length 1: still weighted
    assert res.summary("test_loss")["weighted_mean"] == pytest.approx((2 * 0.1 + 2.5 * 0.2 + 2.25 * 0.3 + 2 * 0.4) / 1.0)


def _bn_line():
    from modeconn.core.curve_model import linear_path
    a, b = _bn_net(0), _bn_net(1)
    return a, b, linear_path(a, b)


def test_evaluate_path_at_its_two_ends_with_the_stored_bn_statistics():
    """num_points=2 is the two endpoints; recompute_bn=False keeps the live (start's) statistics at every t."""
    import copy

    from modeconn.evaluation.path import evaluate_path
    a, b, line = _bn_line()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 3, generator=g), torch.randint(0, 2, (20,), generator=g)
    res = evaluate_path(line, [(x, y)], [(x, y)], num_points=2, recompute_bn=False)
    b_with_a_stats = copy.deepcopy(b)
    for name, buf in a.named_buffers():
        b_with_a_stats.get_buffer(name).copy_(buf)
    with torch.no_grad():
        want = [nn.functional.cross_entropy(m.eval()(x), y).item() for m in (a, b_with_a_stats)]
    assert res.ts.tolist() == [0.0, 1.0] and not res.bn_recomputed
    np.testing.assert_allclose(res.train_nll, want, rtol=1e-6)
    assert res.arc_length[0] == 0.0
    assert res.arc_length[1] == pytest.approx(float((line.flat_weights_at(1.0) - line.flat_weights_at(0.0)).norm()))


def test_evaluate_path_runs_the_points_under_the_runtime_it_is_given():
    """bf16 autocast reaches the point engine: values move by bf16 rounding, not more."""
    from modeconn.evaluation.path import evaluate_path
    from modeconn.runtime import Runtime
    _, _, line = _bn_line()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, generator=g), torch.randint(0, 2, (64,), generator=g)
    plain = evaluate_path(line, [(x, y)], [(x, y)], num_points=5, recompute_bn=False)
    amp = evaluate_path(line, [(x, y)], [(x, y)], num_points=5, recompute_bn=False, runtime=Runtime(amp=True))
    diff = np.abs(amp.train_nll - plain.train_nll).max()
    assert 0 < diff < 0.05


@pytest.mark.parametrize("world,rank,want_ppp,want_mine,want_points", [
    (3, 0, 4, [0], 4), (3, 1, 4, [1], 4), (3, 2, 4, [2], 2),   # 10 points: chunks of ceil(10/3) = 4, 4, 2
    (2, 1, 5, [1], 5),                                          # chunks of ceil(10/2) = 5, one per rank
])
def test_with_ranks_every_rank_gets_whole_chunks_of_the_path(monkeypatch, world, rank, want_ppp, want_mine,
                                                             want_points):
    from modeconn.evaluation import path as path_module
    from modeconn.runtime import Runtime
    monkeypatch.setattr(path_module._dist, "get_world_size", lambda: world)
    monkeypatch.setattr(path_module._dist, "get_rank", lambda: rank)
    ppp, starts, mine = path_module._chunk_plan(10, 8, sharded=True)
    assert ppp == want_ppp and starts == list(range(0, 10, want_ppp)) and list(mine) == want_mine
    assert path_module._chunk_plan(10, 8, sharded=False) == (8, [0, 8], range(0, 2))
    monkeypatch.setattr(Runtime, "sharded", lambda self: True)
    assert path_module.points_of_this_rank(10, 8) == want_points
    if world == 2:   # the default pass, evaluate_path's 8: 40 points in 5 chunks of 8, rank 1 has the last 2
        assert path_module.points_of_this_rank(40) == 16
