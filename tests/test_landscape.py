"""Tests for modeconn.landscape (directions, planes, grids, resume) and the
``modeconn.landscape`` / ``modeconn.plane`` commands."""
import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import update_bn

import modeconn as mc
from modeconn.runtime.checkpoints import save_model
from modeconn.core.curve_model import CurveModel, linear_path, save_curve
from modeconn.core.curves import Bezier
from modeconn.evaluation.model import evaluate
from modeconn.geometry import (GridResult, Plane, curvature_metrics, curve_plane, curve_plane_geometry,
                               evaluate_grid, flatten_parameters, model_direction, normalize_direction,
                               orthogonalize, plane_through, random_direction, random_plane)
from modeconn.geometry.hessian import sharpness_along
from modeconn.evaluation.path import evaluate_path
from modeconn.runtime import Hooks, Runtime


@pytest.fixture(scope="module")
def digits():
    return mc.get_dataset("digits")


@pytest.fixture(scope="module")
def loaders(digits):
    # a small subset keeps the direct (one point at a time) references fast
    x, y = digits.x_train[:300], digits.y_train[:300]
    train = mc.TensorLoader(x, y, batch_size=100)
    test = mc.TensorLoader(digits.x_test[:200], digits.y_test[:200], batch_size=128)
    return train, test


def _bn_net(seed=0):
    torch.manual_seed(seed)
    return mc.create_model("convnet", (1, 8, 8), 10, bn=True, width=4)


def _mlp(seed=0, width=16):
    torch.manual_seed(seed)
    return mc.create_model("mlp", (1, 8, 8), 10, width=width)


def _with_flat(model, flat):
    m = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(flat, m.parameters())
    return m


# ---------------------------------------------------------------- directions
def test_filter_normalisation_matches_weight_filters():
    net = _bn_net()
    theta = flatten_parameters(net)
    d = random_direction(theta, net, norm="filter", seed=3)
    assert d.shape == theta.shape
    parts = dict(zip([n for n, _ in net.named_parameters()],
                     torch.split(d, [p.numel() for p in net.parameters()])))
    checked_2d = checked_1d = 0
    for name, p in net.named_parameters():
        dp = parts[name].view(p.shape)
        if p.dim() >= 2:
            dn = dp.reshape(p.shape[0], -1).norm(dim=1)
            wn = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(dn, wn, rtol=1e-5, atol=1e-7)
            checked_2d += 1
        else:
            assert torch.count_nonzero(dp) == 0, f"1-D parameter {name} must be zero by default"
            checked_1d += 1
    assert checked_2d >= 3 and checked_1d >= 3  # convs, classifier; BN weights/biases, classifier bias

    # 1-D parameters included on request: their direction is the parameter itself (Li et al.'s net_plotter)
    d_all = random_direction(theta, net, norm="filter", ignore_1d=False, seed=3)
    parts_all = dict(zip([n for n, _ in net.named_parameters()],
                         torch.split(d_all, [p.numel() for p in net.parameters()])))
    for name, p in net.named_parameters():
        if p.dim() == 1:
            assert torch.equal(parts_all[name], p.detach()), name
        else:  # the filters are those drawn with the 1-D parameters ignored
            assert torch.equal(parts_all[name], parts[name].view(-1)), name

    # seeded: same seed same direction, other seed another one
    assert torch.equal(random_direction(theta, net, seed=3), d)
    assert not torch.equal(random_direction(theta, net, seed=4), d)


def _hand_net():
    """Linear(2, 2) -> BatchNorm1d(2) -> Linear(2, 1) with round weights; θ has 13 entries."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 1))
    values = {"0.weight": [[3.0, 4.0], [0.0, 1.0]], "0.bias": [1.0, -2.0], "1.weight": [2.0, 0.5],
              "1.bias": [0.1, 0.2], "2.weight": [[1.0, 2.0]], "2.bias": [-3.0]}
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.tensor(values[name]))
    return net


def test_1d_directions_by_hand_follow_li_et_al():
    """ignore_1d=False: a 1-D parameter's direction is the parameter itself (net_plotter without
    ignore='biasbn'); the >= 2-D ones are normalised as usual. Expected vectors written out by hand."""
    net = _hand_net()
    theta = flatten_parameters(net)
    #                 0.weight rows        0.bias      1.weight    1.bias      2.weight    2.bias
    raw = torch.tensor([1.0, 0.0, 0.0, 2.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0, 3.0, 4.0, 9.0])
    own_1d = [1.0, -2.0, 2.0, 0.5, 0.1, 0.2]
    r5, r26_5, r31_30 = math.sqrt(5.0), math.sqrt(26 / 5), math.sqrt(31 / 30)
    # filter: row [1, 0] -> norm 5 = |[3, 4]|; row [0, 2] -> norm 1; row [3, 4] -> norm sqrt(5) = |[1, 2]|
    filt = [5.0, 0.0, 0.0, 1.0] + own_1d + [3 / 5 * r5, 4 / 5 * r5, -3.0]
    # layer: the first weight has norm sqrt(26), its direction sqrt(5); the last as under filter
    layer = [r26_5, 0.0, 0.0, 2 * r26_5] + own_1d + [3 / 5 * r5, 4 / 5 * r5, -3.0]
    # model: all >= 2-D entries by one factor |[3,4,0,1,1,2]| / |[1,0,0,2,3,4]| = sqrt(31/30)
    model = [r31_30, 0.0, 0.0, 2 * r31_30] + own_1d + [3 * r31_30, 4 * r31_30, -3.0]
    for norm, expected in (("filter", filt), ("layer", layer), ("model", model)):
        got = normalize_direction(raw, theta, net, norm, ignore_1d=False)
        torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-7, msg=norm)
        ignored = normalize_direction(raw, theta, net, norm)  # default: the 1-D entries are zero
        expected_ignored = torch.tensor(expected)
        expected_ignored[4:10] = 0.0
        expected_ignored[12] = 0.0
        torch.testing.assert_close(ignored, expected_ignored, rtol=1e-6, atol=1e-7, msg=norm)
    # model with the 1-D weights included has the norm of the whole θ
    torch.testing.assert_close(normalize_direction(raw, theta, net, "model", ignore_1d=False).norm(),
                               theta.norm(), rtol=1e-6, atol=0)
    # "none" normalises nothing: the raw vector, 1-D entries included
    assert torch.equal(normalize_direction(raw, theta, net, "none", ignore_1d=False), raw)


def test_layer_model_none_normalisation_and_helpers():
    net = _mlp()
    theta = flatten_parameters(net)
    raw = torch.randn(theta.shape, generator=torch.Generator().manual_seed(0))
    lay = normalize_direction(raw, theta, net, "layer")
    off = 0
    for p in net.parameters():
        seg = lay[off:off + p.numel()]
        if p.dim() >= 2:
            torch.testing.assert_close(seg.norm(), p.detach().norm(), rtol=1e-5, atol=0)
        else:
            assert torch.count_nonzero(seg) == 0
        off += p.numel()
    mod = normalize_direction(raw, theta, net, "model")
    w2 = sum(p.detach().pow(2).sum() for p in net.parameters() if p.dim() >= 2)
    torch.testing.assert_close(mod.norm(), w2.sqrt(), rtol=1e-5, atol=0)
    none = normalize_direction(raw, theta, net, "none", ignore_1d=False)
    assert torch.equal(none, raw)
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalize_direction(raw, theta, net, "filters")
    with pytest.raises(ValueError, match="length P"):
        normalize_direction(raw[:-1], theta, net)

    d1, d2 = random_direction(theta, net, seed=1), random_direction(theta, net, seed=2)
    o = orthogonalize(d2, d1)
    assert abs(float(o.double().dot(d1.double()))) < 1e-4 * float(o.norm() * d1.norm())
    torch.testing.assert_close(o.norm(), d2.norm(), rtol=1e-5, atol=0)
    other = _mlp(seed=1)
    torch.testing.assert_close(model_direction(net, other), flatten_parameters(other) - theta)


# --------------------------------------------------------------------- plane
def test_plane_through_curve_points_and_bends():
    a, b = _mlp(0), _mlp(1)
    curve = CurveModel(_mlp(), a, b, Bezier(3), init="random", seed=5)
    bends = curve.bends.double()
    s, m, e = bends[0], bends[1], bends[2]
    cp = curve_plane_geometry(curve, grid=(4, 3), margin=0.2, num_points=61)

    # by hand: x of the bend = <m - s, e - s> / |e - s|, y = the rest of its length
    dx = float((e - s).norm())
    bx = float((m - s).dot(e - s)) / dx
    by = math.sqrt(float((m - s).pow(2).sum()) - bx ** 2)
    np.testing.assert_allclose(cp.anchors[0], [0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(cp.anchors[2], [dx, 0.0], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(cp.anchors[1], [bx, by], rtol=1e-7)
    np.testing.assert_allclose(cp.bend_coords, cp.anchors, rtol=1e-7, atol=1e-6)  # 3 bends: start, bend, end

    # a 3-bend Bezier lies in its plane: coordinates reconstruct the points
    pts = curve.flat_weights_at(torch.tensor(cp.ts, dtype=torch.float32)).detach()
    rec = cp.plane.points(cp.curve_coords, dtype=torch.float64)
    assert rec.shape == pts.shape
    assert float((rec - pts.double()).abs().max()) < 1e-5
    assert cp.curve_residuals.max() < 1e-4
    # the Bezier midpoint is (s + 2m + e)/4
    np.testing.assert_allclose(cp.curve_coords[30], [(2 * bx + dx) / 4, by / 2], rtol=1e-6, atol=1e-6)

    # the grid rectangle: bounding box of the bends (the curve is inside), widened by the margin
    np.testing.assert_allclose([cp.xs[0], cp.xs[-1]], [min(0, bx) - 0.2 * (max(dx, bx) - min(0, bx)),
                                                       max(dx, bx) + 0.2 * (max(dx, bx) - min(0, bx))], rtol=1e-6)
    np.testing.assert_allclose([cp.ys[0], cp.ys[-1]], [-0.2 * by, 1.2 * by], rtol=1e-6)
    assert len(cp.xs) == 4 and len(cp.ys) == 3

    # off-plane points: project is the orthogonal projection, residual its distance
    perp = torch.randn(s.shape, dtype=torch.float64)
    perp -= perp.dot(cp.plane.d1) * cp.plane.d1 + perp.dot(cp.plane.d2) * cp.plane.d2
    q = cp.plane.point(0.3, -0.7) + perp
    np.testing.assert_allclose(cp.plane.project(q), [0.3, -0.7], atol=1e-8)
    np.testing.assert_allclose(cp.plane.residual(q), float(perp.norm()), rtol=1e-8)

    with pytest.raises(ValueError, match="collinear"):
        plane_through(s, e, 0.5 * (s + e))
    with pytest.raises(ValueError, match="middle bend"):
        curve_plane_geometry(linear_path(a, b))


# ---------------------------------------------------------------------- grid
@pytest.mark.parametrize("bn", [True, False])
def test_grid_non_square_orientation_matches_direct_evaluation(bn, loaders):
    train, test = loaders
    net = _bn_net() if bn else _mlp()
    theta = flatten_parameters(net)
    plane = random_plane(theta, net, dims=2, norm="filter", seed=0)
    xs, ys = np.linspace(-1.0, 2.0, 3), np.linspace(0.0, 1.0, 5)
    g = evaluate_grid(net, plane, xs, ys, train, test, points_per_pass=4)
    assert g.arrays["train_loss"].shape == (5, 3) and g.shape == (5, 3)
    assert g.bn_recomputed == bn and g.complete
    assert all(np.isfinite(v).all() for v in g.arrays.values())
    for j, i in [(0, 0), (4, 0), (1, 2), (3, 1), (4, 2)]:
        a, b = xs[i], ys[j]
        m = _with_flat(net, theta + a * plane.d1 + b * plane.d2)
        if bn:
            update_bn(train, m)
        ref_tr, ref_te = evaluate(m, train), evaluate(m, test)
        assert g.arrays["train_loss"][j, i] == pytest.approx(ref_tr["loss"], rel=1e-5, abs=1e-6), (j, i)
        assert g.arrays["test_loss"][j, i] == pytest.approx(ref_te["loss"], rel=1e-5, abs=1e-6), (j, i)
        assert g.arrays["train_acc"][j, i] == pytest.approx(ref_tr["acc"], abs=1e-12)
        assert g.arrays["test_acc"][j, i] == pytest.approx(ref_te["acc"], abs=1e-12)
    # values vary across the grid (an orientation mix-up could not hide behind a flat field)
    assert np.ptp(g.arrays["train_loss"][:, 0]) > 1e-3 and np.ptp(g.arrays["train_loss"][0, :]) > 1e-3

    if bn:  # kept statistics: every point uses the network's own buffers
        kept = evaluate_grid(net, plane, xs[:2], ys[:1], train, None, recompute_bn=False)
        assert not kept.bn_recomputed and "test_loss" not in kept.arrays
        m = _with_flat(net, theta + xs[1] * plane.d1 + ys[0] * plane.d2)
        assert kept.arrays["train_loss"][0, 1] == pytest.approx(evaluate(m, train)["loss"], rel=1e-5)


def test_line_towards_second_model_equals_linear_path(loaders):
    train, test = loaders
    a, b = _bn_net(0), _bn_net(1)
    plane = random_plane(flatten_parameters(a), a, dims=1, first=model_direction(a, b))
    ts = np.linspace(0.0, 1.0, 5)
    g = evaluate_grid(a, plane, ts, None, train, test, points_per_pass=3)
    ref = evaluate_path(linear_path(a, b), train, test, ts=ts)
    assert g.shape == (5,)
    np.testing.assert_allclose(g.arrays["train_loss"], ref.train_loss, rtol=1e-5)
    np.testing.assert_allclose(g.arrays["test_acc"], ref.test_acc, atol=1e-12)


def test_grid_resume_after_interruption_equals_uninterrupted(loaders, tmp_path):
    train, test = loaders
    net = _bn_net()
    theta = flatten_parameters(net)
    plane = random_plane(theta, net, dims=2, seed=1)
    xs, ys = np.linspace(-0.5, 0.5, 3), np.linspace(-0.5, 0.5, 4)
    full = evaluate_grid(net, plane, xs, ys, train, test, points_per_pass=4)

    saved = {}

    class Crash(Exception):
        pass

    def on_row(r, res):
        np.savez(tmp_path / "partial.npz", **res.to_arrays())  # what the command does, atomically
        saved["rows"] = res.rows_done
        if r == 1:
            raise Crash

    with pytest.raises(Crash):
        evaluate_grid(net, plane, xs, ys, train, test, points_per_pass=4, on_row=on_row)
    assert saved["rows"] == 2
    partial = GridResult.from_arrays(dict(np.load(tmp_path / "partial.npz")))
    assert not partial.complete and np.isnan(partial.arrays["train_loss"][2:]).all()
    assert np.isfinite(partial.arrays["train_loss"][:2]).all()

    done, told = [], []
    resumed = evaluate_grid(net, plane, xs, ys, train, test, points_per_pass=4, resume=partial,
                            on_row=lambda r, res: done.append(r), hooks=Hooks(progress=told.append))
    assert done == [2, 3]  # only the missing rows were evaluated
    assert told == [6, 3, 3]  # the 2 rows of 3 points already done, then each new row
    for k in full.arrays:
        np.testing.assert_array_equal(resumed.arrays[k], full.arrays[k])

    # a 1-D grid resumes by blocks of points_per_pass points
    line = random_plane(theta, net, dims=1, seed=2)
    xl = np.linspace(-1, 1, 7)
    full1 = evaluate_grid(net, line, xl, None, train, test, points_per_pass=3)
    box = {}

    def crash_first(r, res):
        box["res"] = copy.deepcopy(res)
        raise Crash

    with pytest.raises(Crash):
        evaluate_grid(net, line, xl, None, train, test, points_per_pass=3, on_row=crash_first)
    res1 = evaluate_grid(net, line, xl, None, train, test, points_per_pass=3, resume=box["res"])
    np.testing.assert_array_equal(res1.arrays["test_loss"], full1.arrays["test_loss"])

    # resuming on another plane or grid is refused
    with pytest.raises(ValueError, match="plane"):
        evaluate_grid(net, random_plane(theta, net, dims=2, seed=9), xs, ys, train, test,
                      points_per_pass=4, resume=partial)
    with pytest.raises(ValueError, match="xs differ"):
        evaluate_grid(net, plane, xs + 1, ys, train, test, points_per_pass=4, resume=partial)
    # the grid runs where the network is: another runtime device is refused, not silently ignored
    with pytest.raises(ValueError, match="runtime.device is meta"):
        evaluate_grid(net, plane, xs, ys, train, test, runtime=Runtime(device="meta"))


def test_point_curvature_network_and_grid_agree_at_one_flat_point(loaders, monkeypatch):
    """CurveModel.point, the network curvature_metrics hands to the Hessian and the grid evaluator (of a
    curve or of a plain module) are one network at one flat point."""
    train, _ = loaders
    a, b = _bn_net(0), _bn_net(1)
    for m in (a, b):
        update_bn(train, m)  # distinct statistics at the two ends
    curve = CurveModel(_bn_net(2), a, b, Bezier(3), init="random", seed=3).eval()
    flat = curve.flat_weights_at(0.3).detach()
    point = curve.point(0.3).eval()
    assert torch.equal(flatten_parameters(point), flat)
    ref = evaluate(point, train)["loss"]
    d1 = torch.randn(flat.shape, generator=torch.Generator().manual_seed(0))
    on_curve = evaluate_grid(curve, Plane(flat, d1), [0.0], None, train, recompute_bn=False)
    on_point = evaluate_grid(point, Plane(flat, d1), [0.0], None, train, recompute_bn=False)
    assert on_curve.arrays["train_loss"][0] == pytest.approx(ref, rel=1e-5)
    assert on_point.arrays["train_loss"][0] == pytest.approx(ref, rel=1e-5)

    # the networks curvature_metrics builds (captured where the Hessian would get them): the point, its BN
    # statistics recomputed (update_bn as the reference) or kept as they are
    import modeconn.geometry.hessian as hessian

    captured = []

    def capture(models, *args, **kwargs):
        captured.extend(models)
        n = len(captured)
        return hessian.Sharpness(np.zeros(n), np.zeros(n), np.zeros(n))

    monkeypatch.setattr(hessian, "sharpness_along", capture)
    recomputed = copy.deepcopy(point)
    update_bn(train, recomputed)
    x = train.x[:32]
    with torch.no_grad():
        for net in (curve, point):
            for recompute, expected in ((True, recomputed.eval()), (False, point)):
                captured.clear()
                curvature_metrics(net, [(x, train.y[:32])], bn_loader=train, recompute_bn=recompute)(flat[None])
                (built,) = captured
                assert not built.training and torch.equal(flatten_parameters(built), flat)
                torch.testing.assert_close(built(x), expected(x), rtol=1e-4, atol=1e-5)


def test_curve_plane_grid_contains_the_curve_values(loaders):
    train, test = loaders
    a, b = _mlp(0), _mlp(1)
    curve = CurveModel(_mlp(), a, b, Bezier(3), init="random", seed=5)
    cp = curve_plane(curve, train, test, grid=(3, 2), margin=0.0, num_points=5)
    assert cp.grid.shape == (2, 3)
    # with margin 0 the lower-left corner is (0, 0) = the start model when the bend's x >= 0
    if cp.anchors[1][0] >= 0:
        assert cp.grid.arrays["train_loss"][0, 0] == pytest.approx(evaluate(a, train)["loss"], rel=1e-4)


# ------------------------------------------------------------------ commands
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("ckpts")
    paths = []
    for seed in (0, 1):
        model = _mlp(seed, width=16)
        mc.train_model(model, digits.train_loader(128, seed=seed), epochs=2, lr=0.05, seed=seed)
        paths.append(save_model(root / f"mlp{seed}.pt", model, "mlp", {"width": 16}, digits.input_shape, 10,
                                dataset="digits", seed=seed))
    a, _ = mc.load_model(paths[0])
    b, _ = mc.load_model(paths[1])
    curve = CurveModel(_mlp(), a, b, Bezier(3))
    mc.fit_curve(curve, digits.train_loader(128), epochs=1, lr=0.05)
    meta = {"arch": "mlp", "arch_kwargs": {"width": 16}, "input_shape": list(digits.input_shape),
            "num_classes": 10}
    cpath = save_curve(root / "curve.pt", curve, meta, dataset="digits")
    return paths[0], paths[1], cpath


def test_landscape_command_2d_1d_and_resume(checkpoints, tmp_path, monkeypatch, capsys):
    from modeconn.cli.rundir import GridRun
    from modeconn.landscape import main

    a, b, _ = checkpoints
    out = tmp_path / "land2"
    args = ["--ckpt", str(a), "--dims", "2", "--range", "-1:1", "--range-y", "-0.5:0.5", "--steps", "4",
            "--steps-y", "3", "--no-progress"]
    assert main(args + ["--out", str(out)]) == 0
    for f in ("landscape.npz", "landscape.json", "landscape.png", "landscape_surface.png", "directions.npz"):
        assert (out / f).stat().st_size > 0, f
    assert not (out / "landscape.partial.npz").exists()
    z = np.load(out / "landscape.npz")
    assert z["train_loss"].shape == (3, 4) and z["xs"].tolist() == pytest.approx([-1, -1 / 3, 1 / 3, 1])
    info = json.loads((out / "landscape.json").read_text())
    assert info["directions"]["norm"] == "filter" and info["bn_recomputed"] is False
    assert np.array(info["metrics"]["test_loss"]).shape == (3, 4)
    d = np.load(out / "directions.npz")
    assert d["d1"].shape == d["d2"].shape and d["d1"].ndim == 1

    # an existing run is not overwritten silently
    assert main(args + ["--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err

    # interrupted after the second row, then resumed: same numbers as the uninterrupted run
    out2 = tmp_path / "land2b"
    real = GridRun.save_state

    def save_then_stop(self, grid):
        real(self, grid)
        if grid.rows_done == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(GridRun, "save_state", save_then_stop)
    assert main(args + ["--out", str(out2)]) == 130
    assert (out2 / "landscape.partial.npz").exists() and not (out2 / "landscape.npz").exists()
    monkeypatch.setattr(GridRun, "save_state", real)
    assert main(args[:-1] + ["--steps", "5", "--out", str(out2), "--resume", "--no-progress"]) == 2
    assert "differ" in capsys.readouterr().err
    assert main(args + ["--out", str(out2), "--resume"]) == 0
    z2 = np.load(out2 / "landscape.npz")
    for k in ("train_loss", "train_acc", "test_loss", "test_acc"):
        np.testing.assert_array_equal(z2[k], z[k])

    # 1-D towards the second checkpoint: x = 0 is the first model, x = 1 the second
    out1 = tmp_path / "land1"
    assert main(["--ckpt", str(a), "--ckpt2", str(b), "--dims", "1", "--range", "0:1", "--steps", "3",
                 "--split", "test", "--out", str(out1), "--no-progress"]) == 0
    z1 = np.load(out1 / "landscape.npz")
    ma, meta_a = mc.load_model(a)
    mb, _ = mc.load_model(b)
    digits = mc.get_dataset("digits")
    assert z1["test_loss"][0] == pytest.approx(evaluate(ma, digits.eval_loader("test"))["loss"], rel=1e-5)
    assert z1["test_loss"][-1] == pytest.approx(evaluate(mb, digits.eval_loader("test"))["loss"], rel=1e-5)
    assert "train_loss" not in z1.files and (out1 / "landscape.png").exists()


def test_landscape_command_resumes_after_a_hard_crash(checkpoints, tmp_path):
    from modeconn.landscape import main

    fault_run = [sys.executable, str(Path(__file__).resolve().parent / "fault_run.py")]
    a, _, _ = checkpoints
    common = ["--ckpt", str(a), "--dims", "2", "--range", "-1:1", "--steps", "4", "--steps-y", "3",
              "--points-per-pass", "2", "--no-progress"]
    cmd = [sys.executable, "-m", "modeconn.landscape"] + common + ["--out", str(tmp_path / "crash")]
    # the process dies abruptly after 6 points: row 0 (4 points) was saved, row 1 was half done
    r = subprocess.run(fault_run + ["6"] + cmd[2:], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 17, r.stderr
    assert not (tmp_path / "crash" / "landscape.npz").exists()
    with np.load(tmp_path / "crash" / "landscape.partial.npz") as z:
        assert int(z["rows_done"]) == 1 and np.isnan(z["train_loss"][1:]).all()
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert main(common + ["--out", str(tmp_path / "whole")]) == 0
    z1, z2 = np.load(tmp_path / "crash" / "landscape.npz"), np.load(tmp_path / "whole" / "landscape.npz")
    for k in ("train_loss", "train_acc", "test_loss", "test_acc"):
        np.testing.assert_array_equal(z1[k], z2[k])


def test_landscape_command_hessian_and_errors(checkpoints, tmp_path, capsys):
    from modeconn.landscape import main

    a, _, curve = checkpoints
    out = tmp_path / "hess"
    assert main(["--ckpt", str(a), "--dims", "1", "--range", "-0.2:0.2", "--steps", "2", "--hessian",
                 "--hessian-samples", "64", "--out", str(out), "--no-progress"]) == 0
    z = np.load(out / "landscape.npz")
    assert z["lambda_max"].shape == (2,) and (z["lambda_max"] >= z["lambda_min"]).all()
    assert (out / "curvature.png").exists()
    assert main(["--ckpt", str(curve), "--out", str(tmp_path / "x")]) == 2
    assert "expected 'model'" in capsys.readouterr().err
    assert main(["--ckpt", str(a), "--range", "1:-1", "--out", str(tmp_path / "y")]) == 2
    assert "LO < HI" in capsys.readouterr().err


def test_plane_command_writes_its_files(checkpoints, tmp_path):
    from modeconn.plane import main

    _, _, curve = checkpoints
    out = tmp_path / "plane"
    assert main(["--ckpt", str(curve), "--grid", "4", "--grid-y", "3", "--margin", "0.2", "--num-points", "11",
                 "--out", str(out), "--no-progress"]) == 0
    for f in ("plane.npz", "plane.json", "plane.png"):
        assert (out / f).stat().st_size > 0, f
    z = np.load(out / "plane.npz")
    assert z["train_loss"].shape == (3, 4) and z["curve_coords"].shape == (11, 2)
    info = json.loads((out / "plane.json").read_text())
    assert info["geometry"]["start"] == [0.0, 0.0] and info["geometry"]["end"][1] == 0.0
    assert info["geometry"]["max_curve_residual"] < 1e-3
    assert np.isfinite(np.array(info["metrics"]["test_acc"], dtype=float)).all()


def test_help_explains_every_flag(capsys):
    from modeconn.landscape import build_parser as land
    from modeconn.plane import build_parser as plane

    for build in (land, plane):
        p = build()
        for action in p._actions:
            assert action.help, f"{action.option_strings} has no help"
        text = p.format_help()
        assert "example:" in text and "python -m modeconn." in text
    from modeconn.cli import main  # the console script reaches both commands
    for name in ("landscape", "plane"):
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert f"python -m modeconn.{name}" in capsys.readouterr().out
