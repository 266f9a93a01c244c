"""Sharpness report: checked against a full float64 Hessian, finite differences, hessian.py and closed forms."""
import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import modeconn as mc
from conftest import CKPT as ROOT_CKPT
from modeconn.core.layout import FlatLayout
from modeconn.evaluation.model import evaluate
from modeconn.geometry.directions import flatten_parameters, random_plane
from modeconn.geometry.hessian import HessianOperator, hessian_extreme_eigenvalues, hessian_trace
from modeconn.geometry.sharpness import epsilon_sharpness, slice_curvature

pytestmark = pytest.mark.usefixtures("one_thread")


def _classifier():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(40, 3, dtype=torch.float64), torch.randint(0, 3, (40,))
    return net, [(x[:24], y[:24]), (x[24:], y[24:])], [(torch.randn(20, 3, dtype=torch.float64),
                                                       torch.randint(0, 3, (20,)))]


def _flat_loss(net, data):
    layout = FlatLayout.of(net)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    return lambda flat: F.cross_entropy(functional_call(net, layout.unflatten(flat), (x,)), y)


def test_report_matches_the_full_hessian_finite_differences_and_hessian_py():
    net, train, test = _classifier()
    report = mc.sharpness_report(net, train, test, tol=1e-10, trace_samples=50, epsilon=1e-3, ascent_steps=5,
                                 slice_xs=np.linspace(-1e-3, 1e-3, 5), fit_radius=1e-3, seed=2)
    theta = flatten_parameters(net)
    loss = _flat_loss(net, train)
    H = torch.func.hessian(loss)(theta)
    evals, evecs = torch.linalg.eigh(H)
    assert report.lambda_max == pytest.approx(float(evals[-1]), rel=1e-8)
    assert report.lambda_min == pytest.approx(float(evals[0]), rel=1e-6, abs=1e-9)
    assert report.ratio == pytest.approx(abs(float(evals[0] / evals[-1])), rel=1e-6, abs=1e-9)
    v, h = evecs[:, -1], 1e-4  # finite differences along the top eigenvector: λmax
    fd = (loss(theta + h * v) - 2 * loss(theta) + loss(theta - h * v)) / h ** 2
    assert report.lambda_max == pytest.approx(float(fd), rel=1e-5)
    # the same numbers as hessian.py's own functions with the same settings
    eig = hessian_extreme_eigenvalues(net, None, train, tol=1e-10, seed=2)
    assert (report.lambda_max, report.lambda_min) == (eig.lambda_max, eig.lambda_min)
    assert (report.trace, report.trace_stderr) == hessian_trace(net, None, train, 50, seed=2)
    assert report.trace == pytest.approx(float(torch.trace(H)), abs=4 * report.trace_stderr)
    # slice curvature = dᵀHd for the filter-normalised direction of the same seed
    d = random_plane(theta, net, dims=1, norm="filter", seed=2).d1
    assert d[12:16].abs().sum() == 0 and d[-3:].abs().sum() == 0  # biases left out
    assert report.slice_curvature == pytest.approx(float(d @ H @ d), rel=1e-4)


def test_report_metrics_and_gap():
    net, train, test = _classifier()
    report = mc.sharpness_report(net, train, test, trace_samples=4, ascent_steps=2, slice_xs=np.linspace(-1, 1, 5),
                                 fit_radius=1.0)
    tr, te = evaluate(net, train), evaluate(net, test)
    assert report.train_loss == pytest.approx(tr["loss"]) and report.test_acc == pytest.approx(te["acc"])
    assert report.gap["loss"] == pytest.approx(te["loss"] - tr["loss"])
    assert report.gap["acc"] == pytest.approx(tr["acc"] - te["acc"])
    row = report.row()
    assert row["epsilon_sharpness"] == pytest.approx(100 * report.epsilon.increase / (1 + report.epsilon.loss))
    assert report.epsilon.loss == pytest.approx(tr["loss"], rel=1e-10)  # L(θ) over the same data
    assert report.epsilon.increase >= 0 and row["num_params"] == 31
    assert report.slice.arrays["train_loss"][2] == pytest.approx(tr["loss"], rel=1e-10)  # a = 0 is the model


def _quadratic(h, w_star, w):
    """L(w) = ½ Σ h_i (w_i − w*_i)², as half the mean squared error of a linear model on n = P rows."""
    n = len(h)
    net = nn.Linear(n, 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(w[None])
    X = torch.diag(torch.sqrt(n * h))
    y = X @ w_star

    def half_mse(out, target):
        return 0.5 * (out.squeeze(-1) - target).pow(2).mean()

    return HessianOperator(net, half_mse, [(X, y)], dtype=torch.float64)


def test_epsilon_sharpness_of_a_quadratic_is_the_box_maximum():
    torch.manual_seed(0)
    h = torch.tensor([0.5, 2.0, 3.0, 1.0, 4.0, 0.1], dtype=torch.float64)
    w = torch.randn(6, dtype=torch.float64)
    w_star = w.clone()
    w_star[:3] += torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)  # the minimum outside the box ...
    op = _quadratic(h, w_star, w)                                      # ... and at w in the other three
    eps = 1e-2
    res = epsilon_sharpness(op, epsilon=eps, steps=20, seed=3)
    b = eps * (w.abs() + 1)
    r = w - w_star
    closed = 0.5 * float((h * ((r.abs() + b) ** 2 - r ** 2)).sum())  # each coordinate at its far vertex
    assert res.loss == pytest.approx(0.5 * float((h * r ** 2).sum()), rel=1e-12)
    assert res.increase == pytest.approx(closed, rel=1e-10)
    assert res.keskar == pytest.approx(100 * closed / (1 + res.loss), rel=1e-10)
    with pytest.raises(ValueError, match="epsilon"):
        epsilon_sharpness(op, epsilon=0.0)
    with pytest.raises(ValueError, match="steps"):
        epsilon_sharpness(op, steps=0)


def test_trace_standard_error_shrinks_with_more_probes():
    net, train, _ = _classifier()
    _, se_few = hessian_trace(net, None, train, 16, seed=0)
    _, se_many = hessian_trace(net, None, train, 256, seed=0)
    assert se_many < 0.5 * se_few  # ~ 1/sqrt(probes): a factor 4 expected


def test_slice_curvature_of_a_parabola_and_bad_input():
    xs = np.linspace(-1, 1, 11)
    assert slice_curvature(xs, 3.0 * xs ** 2 - xs + 2.0, 0.3) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="at least 3"):
        slice_curvature(xs, xs ** 2, 0.1)


def test_sharpness_command_writes_table_csv_and_figure(tmp_path, capsys):
    from modeconn import sharpness

    a, b = str(ROOT_CKPT / "digits_mlp_a.pt"), str(ROOT_CKPT / "digits_mlp_b.pt")
    args = ["--ckpt", a, b, "--hessian-samples", "64", "--trace-samples", "3", "--ascent-steps", "2",
            "--steps", "5", "--fit-radius", "1", "--hessian-tol", "1e-2", "--out", str(tmp_path), "--no-progress"]
    assert sharpness.main(args) == 0
    printed = capsys.readouterr().out
    assert "digits_mlp_a" in printed and "digits_mlp_b" in printed and "λmax" in printed
    rows = list(csv.DictReader(open(tmp_path / "sharpness.csv")))
    assert [r["label"] for r in rows] == ["digits_mlp_a", "digits_mlp_b"]
    result = json.loads((tmp_path / "sharpness.json").read_text())
    assert result["models"][0]["lambda_max"] > 0 and len(result["slices"]["digits_mlp_a"]["xs"]) == 5
    assert (tmp_path / "sharpness.png").stat().st_size > 0
    assert sharpness.main(args) == 2  # no overwrite without --force
    assert "--force" in capsys.readouterr().err
    assert sharpness.main(args[:-3] + ["--labels", "one", "--out", str(tmp_path / "x")]) == 2
    assert sharpness.main(args[:-3] + ["--epsilon", "0", "--out", str(tmp_path / "y")]) == 2


def test_loss_and_grad_is_the_sample_weighted_mean_over_batches():
    net, train, _ = _classifier()  # batches of 24 and 16 samples: weighted by their sizes
    op = HessianOperator(net, None, train)
    theta = flatten_parameters(net) + 0.01
    value, g = op.loss_and_grad(theta)
    loss = _flat_loss(net, train)
    assert float(value) == pytest.approx(float(loss(theta)), rel=1e-12)
    assert torch.allclose(g, torch.func.grad(loss)(theta), atol=1e-12)
