import numpy as np
import pytest
import torch
from torch.optim.swa_utils import update_bn

import modeconn as mc
from bn_by_hand import bn_by_hand, nll_and_acc
from modeconn.evaluation.barriers import barrier
from modeconn.evaluation.bn import bn_statistics
from modeconn.evaluation.model import evaluate
from modeconn.evaluation.path import evaluate_path


def test_barrier_definitions_by_hand():
    ts = np.array([0, 0.25, 0.5, 0.75, 1.0])
    flat = np.full(5, 0.7)
    for ref in ("interp", "mean", "max"):
        assert barrier(ts, flat, ref) == (0.0, 0.0)
    bump = np.array([1.0, 1.0, 4.0, 1.0, 1.0])
    assert barrier(ts, bump, "interp") == (3.0, 0.5)
    skew = np.array([1.0, 3.5, 2.0, 3.2, 3.0])
    assert barrier(ts, skew, "interp") == pytest.approx((3.5 - (0.75 * 1 + 0.25 * 3), 0.25))
    assert barrier(ts, skew, "mean") == pytest.approx((3.5 - 2.0, 0.25))
    assert barrier(ts, skew, "max") == pytest.approx((0.5, 0.25))
    # a monotone path: no barrier above the line, but above the mean of the ends
    mono = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    assert barrier(ts, mono, "interp")[0] == pytest.approx(0.0)
    assert barrier(ts, mono, "mean") == pytest.approx((2.0, 1.0))
    with pytest.raises(ValueError, match="reference"):
        barrier(ts, bump, "median")


def _loop_reference(curve, ts, train, test):
    """The plain one-point-at-a-time loop: point(t), BN statistics and metrics by hand."""
    train_x, train_y = (torch.cat(v) for v in zip(*train))
    test_x, test_y = (torch.cat(v) for v in zip(*test))
    rows = []
    for t in ts:
        m = curve.point(float(t))
        if mc.has_batchnorm(m):
            m = bn_by_hand(m, [x for x, _ in train])
        rows.append([*nll_and_acc(m, train_x, train_y), *nll_and_acc(m, test_x, test_y)])
    return np.array(rows)


@pytest.mark.parametrize("pair", ["mlp_pair", "cnn_pair"])
def test_batched_evaluation_equals_the_point_loop(pair, request, digits):
    a, b = request.getfixturevalue(pair)
    curve = mc.CurveModel(a, a, b, mc.Bezier(3))
    with torch.no_grad():
        curve.free_bends.add_(0.02 * torch.randn_like(curve.free_bends))
    train, test = digits.eval_loader("train", 512), digits.eval_loader("test", 512)
    ts = np.linspace(0, 1, 7)
    res = evaluate_path(curve, train, test, ts=ts, points_per_pass=3)
    ref = _loop_reference(curve, ts, train, test)
    got = np.stack([res.train_loss, res.train_acc, res.test_loss, res.test_acc], 1)
    assert np.abs(got - ref).max() <= 1e-4
    assert res.bn_recomputed == (pair == "cnn_pair")


def test_bn_statistics_at_t0_equal_update_bn_of_the_start(cnn_pair, digits):
    a, b = cnn_pair
    curve = mc.CurveModel(a, a, b, mc.Bezier(3))
    train = digits.eval_loader("train", 256)
    stats = bn_statistics(curve, curve.flat_weights_at(torch.tensor([0.0, 0.5])), train)
    start = curve.point(0.0)
    update_bn(train, start)
    for name, buf in start.named_buffers():
        assert torch.allclose(stats[name][0].to(buf.dtype), buf, atol=1e-6, rtol=1e-5), name
    # and the recomputed start reproduces the start model's test accuracy
    res = evaluate_path(curve, train, digits.eval_loader("test"), ts=[0.0])
    assert res.test_acc[0] == pytest.approx(evaluate(start, digits.eval_loader("test"))["acc"])
    assert res.test_acc[0] == pytest.approx(evaluate(a, digits.eval_loader("test"))["acc"], abs=0.006)


def test_arc_length_of_a_line(mlp_pair, digits):
    a, b = mlp_pair
    line = mc.linear_path(a, b)
    res = evaluate_path(line, digits.eval_loader("train"), digits.eval_loader("test"), num_points=5)
    dist = torch.cat([(p - q).flatten() for p, q in zip(b.parameters(), a.parameters())]).norm().item()
    assert np.allclose(res.segment_lengths, dist / 4, rtol=1e-4)
    assert res.arc_length[-1] == pytest.approx(dist, rel=1e-4)
    s = res.summary("test_loss")
    assert s["min"] <= s["weighted_mean"] <= s["max"]


def test_curve_barrier_is_a_fraction_of_the_lines(mlp_pair, digits):
    a, b = mlp_pair
    curve = mc.CurveModel(a, a, b, mc.Bezier(3))
    mc.fit_curve(curve, digits.train_loader(64, seed=0), epochs=10, lr=0.05)
    res = evaluate_path(curve, digits.eval_loader("train"), digits.eval_loader("test"), num_points=21,
                        with_linear=True)
    line_barrier = res.linear.barrier("test_loss")
    assert line_barrier > 0.15  # the straight line has a clear bump on this pair
    assert res.barrier("test_loss") <= 0.25 * line_barrier
    table = res.barrier_table()
    assert {r["path"] for r in table} == {"curve", "linear"}
    assert len(table) == 2 * 4 * 3  # two paths x four metrics x three definitions


def test_bad_path_arguments(mlp_pair, digits):
    a, b = mlp_pair
    line = mc.linear_path(a, b)
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_path(line, digits.eval_loader("train"), digits.eval_loader("test"), num_points=1)
    with pytest.raises(ValueError, match="outside"):
        evaluate_path(line, digits.eval_loader("train"), digits.eval_loader("test"), ts=[0.5, 1.2])
