"""One evaluation core: BN statistics, metric sums and barriers agree wherever they are used.

References are independent of the code under test: BN statistics by hand
(``bn_by_hand``: eval-mode forward up to each BN layer, mean and unbiased
variance of its input), NLL/accuracy by hand, barrier heights worked out on
paper, the weight-decay term from the point's own parameters.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn

import modeconn as mc
from bn_by_hand import bn_by_hand, nll_and_acc
from modeconn.data import TensorLoader
from modeconn.evaluation.barriers import barrier
from modeconn.evaluation.bn import bn_statistics, recompute_bn
from modeconn.evaluation.ensembles import curve_ensemble, evaluate_ensemble
from modeconn.evaluation.model import evaluate
from modeconn.evaluation.path import PathResult, evaluate_path, points_of_this_rank
from modeconn.runtime import Hooks


def _dropout_bn_net(ds, seed: int) -> nn.Module:
    """Dropout *before* BatchNorm: BN statistics depend on whether dropout is on. One epoch of SGD."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.3), nn.BatchNorm1d(32), nn.ReLU(),
                        nn.Linear(32, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for x, y in ds.train_loader(64, seed=seed):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def dropout_line(digits):
    return mc.linear_path(_dropout_bn_net(digits, 0), _dropout_bn_net(digits, 1))


def test_path_ensemble_and_fge_bn_agree_with_hand_statistics(dropout_line, digits):
    line = dropout_line
    x_train, y_train, x_test, y_test = digits.x_train, digits.y_train, digits.x_test, digits.y_test
    whole = TensorLoader(x_train, y_train, batch_size=len(x_train))  # one batch: whole-set statistics
    test = digits.eval_loader("test", 128)

    reference = bn_by_hand(line.point(0.5), [x_train])
    ref_nll, ref_acc = nll_and_acc(reference, x_test, y_test)

    # evaluate_path: three points stacked in one pass, t=0.5 in the middle
    path = evaluate_path(line, digits.eval_loader("train"), test, ts=[0.0, 0.5, 1.0], bn_loader=whole,
                         points_per_pass=3)
    # curve_ensemble + evaluate_ensemble
    ens = evaluate_ensemble(curve_ensemble(line, [0.5], whole), test)
    # the routine FGE runs on a snapshot: recompute_bn on a module holding these weights
    snapshot = recompute_bn(line.point(0.5).train(), whole)
    fge = evaluate(snapshot, test)

    for nll, acc in ((path.test_nll[1], path.test_acc[1]), (ens.nll[0], ens.acc[0]), (fge["nll"], fge["acc"])):
        assert nll == pytest.approx(ref_nll, abs=1e-5)
        assert acc == pytest.approx(ref_acc, abs=1e-12)
    for name, buf in reference.named_buffers():
        assert torch.allclose(snapshot.get_buffer(name).to(buf.dtype), buf, rtol=1e-5, atol=1e-6), name
    # the model does tell the two apart: torch's update_bn (dropout on during the pass) gives other numbers
    with_dropout = line.point(0.5)
    update_bn(whole, with_dropout)
    assert abs(nll_and_acc(with_dropout, x_test, y_test)[0] - ref_nll) > 1e-3
    assert snapshot.training and snapshot[2].training  # recompute_bn left every mode as it was


def test_bn_statistics_of_stacked_points_equal_hand_averages_over_batches(dropout_line, digits):
    line = dropout_line
    loader = digits.eval_loader("train", 500)  # batches of 500, 500, 438: equal weight per batch
    ts = [0.0, 0.3, 1.0]
    stats = bn_statistics(line, line.flat_weights_at(torch.tensor(ts)), loader)
    for k, t in enumerate(ts):
        ref = bn_by_hand(line.point(t), [x for x, _ in loader])
        for name, buf in ref.named_buffers():
            assert torch.allclose(stats[name][k].to(buf.dtype), buf, rtol=1e-5, atol=1e-6), (t, name)


def test_recompute_bn_contract(digits):
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, momentum=0.25))
    net[1].eval()
    recompute_bn(net, [torch.randn(8, 4)])
    assert net[1].momentum == 0.25 and net.training and not net[1].training
    with pytest.raises(ValueError, match="no batches"):
        recompute_bn(net, [])
    plain = nn.Linear(4, 3)
    assert recompute_bn(plain, []) is plain  # no BatchNorm: no pass over the data at all


# ------------------------------------------------------------------ barriers
def _result(ts, test_loss, test_acc=None) -> PathResult:
    ts, v = np.asarray(ts, float), np.asarray(test_loss, float)
    acc = np.full_like(v, 0.5) if test_acc is None else np.asarray(test_acc, float)
    return PathResult(ts, v, v, acc, 1 - acc, v, v, acc, 1 - acc, np.ones(len(ts) - 1),
                      np.arange(len(ts), dtype=float))


def test_barrier_t_where_the_profile_peaks_not_the_metric():
    # M peaks at t=0.75 (3.5); above the line from M(0)=0 to M(1)=1 it rises most at t=0.5:
    # interp profile = M - t = [0, 1.75, 2.9, 2.75, 0]
    res = _result([0.0, 0.25, 0.5, 0.75, 1.0], [0.0, 2.0, 3.4, 3.5, 1.0])
    assert res.barrier("test_loss", "interp") == pytest.approx(3.4 - 0.5)
    assert res.barrier_t("test_loss", "interp") == 0.5
    assert res.barrier("test_loss", "mean") == pytest.approx(3.5 - 0.5)
    assert res.barrier_t("test_loss", "mean") == 0.75
    assert res.barrier("test_loss", "max") == pytest.approx(3.5 - 1.0)
    assert res.barrier_t("test_loss", "max") == 0.75


def test_barrier_sorts_unsorted_ts():
    order = [4, 2, 0, 3, 1]
    ts, m = np.array([0.0, 0.25, 0.5, 0.75, 1.0]), np.array([0.0, 2.0, 3.4, 3.5, 1.0])
    res = _result(ts[order], m[order])
    assert res.barrier("test_loss") == pytest.approx(2.9) and res.barrier_t("test_loss") == 0.5
    # an exactly linear M given from t=1 down to t=0 has no barrier (read in the given order it had 2)
    assert barrier([1.0, 0.5, 0.0], [3.0, 2.0, 1.0]) == (0.0, 0.0)


def test_barrier_needs_both_endpoints():
    linear = _result([0.2, 0.5, 0.8], [1.4, 2.0, 2.6])  # exactly linear; the old code said 0.40
    with pytest.raises(ValueError, match="missing t=0 and t=1"):
        linear.barrier("test_loss")
    with pytest.raises(ValueError, match="missing t=1"):
        barrier([0.0, 0.5], [1.0, 2.0])
    assert "barriers" not in linear.to_dict()  # no endpoints: no barriers in the plain data either


def test_barrier_of_an_accuracy_is_refused():
    res = _result([0.0, 0.5, 1.0], [0.1, 0.9, 0.2], test_acc=[0.9, 0.2, 0.8])
    for call in (res.barrier, res.barrier_t):
        with pytest.raises(ValueError, match="barrier of an accuracy.*'test_error'"):
            call("test_acc")
    with pytest.raises(ValueError, match="barrier of an accuracy.*'train_error'"):
        res.barrier_table(("train_acc",))
    assert res.barrier("test_error") == pytest.approx(0.8 - 0.15)  # 1 - 0.2 above the line (0.1 + 0.2) / 2
    assert set(res.to_dict()["barriers"]) == {"train_loss", "train_nll", "train_error",
                                               "test_loss", "test_nll", "test_error"}


# -------------------------------------------------------------- path details
def test_weight_decay_term_of_path_evaluation(mlp_pair, digits):
    a, b = mlp_pair
    line = mc.linear_path(a, b)
    wd, ts = 3e-3, [0.0, 0.3, 1.0]
    res = evaluate_path(line, digits.eval_loader("train"), digits.eval_loader("test"), ts=ts, weight_decay=wd)
    plain = evaluate_path(line, digits.eval_loader("train"), digits.eval_loader("test"), ts=ts)
    for k, t in enumerate(ts):
        sq = sum(float(p.detach().double().pow(2).sum()) for p in line.point(t).parameters())
        assert res.train_loss[k] - res.train_nll[k] == pytest.approx(0.5 * wd * sq, rel=1e-6)
        assert res.test_loss[k] - res.test_nll[k] == pytest.approx(0.5 * wd * sq, rel=1e-6)
    assert np.array_equal(res.test_nll, plain.test_nll) and np.array_equal(plain.test_loss, plain.test_nll)


def test_hooks_hear_every_point(mlp_pair, digits):
    a, b = mlp_pair
    heard = []
    evaluate_path(mc.linear_path(a, b), digits.eval_loader("train"), digits.eval_loader("test"), num_points=5,
                  points_per_pass=2, with_linear=True, hooks=Hooks(progress=heard.append))
    assert heard == [2, 2, 1, 2, 2, 1]  # chunks of the path, then of its straight line
    assert points_of_this_rank(5, 2) == 5
