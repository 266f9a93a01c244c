"""modeconn.plots: every plot writes a real PNG of the documented size, atomically, without touching pyplot."""
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure

from modeconn import plots
from modeconn.evaluation.ensembles import EnsembleResult
from modeconn.evaluation.path import PathResult
from modeconn.geometry.grid import CurvePlane, GridResult
from modeconn.training.fge import FGEResult

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------- hand-made results
def _path_result(name, bump):
    """A path whose loss and error rise by ``bump`` in the middle (a barrier) between fixed endpoints."""
    ts = np.linspace(0, 1, 11)
    hump = bump * np.sin(np.pi * ts)
    loss = 0.1 + 0.05 * ts + hump
    error = 0.02 + 0.01 * ts + 0.3 * hump
    seg = np.full(10, 0.1)
    return PathResult(ts=ts, train_loss=loss, train_nll=loss, train_acc=1 - error, train_error=error,
                      test_loss=loss + 0.1, test_nll=loss + 0.1, test_acc=1 - error - 0.01,
                      test_error=error + 0.01, segment_lengths=seg, arc_length=np.concatenate([[0], np.cumsum(seg)]),
                      name=name)


def _grid(xs, ys, with_curvature=False):
    """A quadratic bowl around (0, 0): loss = 0.05 + x² + y², accuracy falling with the loss."""
    X, Y = (xs, np.zeros_like(xs)) if ys is None else np.meshgrid(xs, ys)
    loss = 0.05 + X ** 2 + Y ** 2
    arrays = {"train_loss": loss, "train_acc": np.clip(1 - 0.2 * loss, 0, 1),
              "test_loss": loss + 0.05, "test_acc": np.clip(0.98 - 0.2 * loss, 0, 1)}
    if with_curvature:
        arrays.update(curvature_ratio=np.abs(np.tanh(X * Y)), lambda_max=2 + X ** 2)
    rows = 1 if ys is None else len(ys)
    return GridResult(np.asarray(xs, float), None if ys is None else np.asarray(ys, float), arrays,
                      rows_done=rows, num_rows=rows, bn_recomputed=False, points_per_pass=len(xs))


def _curve_plane():
    """A Bezier(3) in its own plane: start (0, 0), bend (0.5, 0.8), end (1, 0)."""
    xs, ys = np.linspace(-0.2, 1.2, 8), np.linspace(-0.3, 1.1, 7)
    ts = np.linspace(0, 1, 9)
    bends = np.array([[0.0, 0.0], [0.5, 0.8], [1.0, 0.0]])
    curve = ((1 - ts) ** 2)[:, None] * bends[0] + (2 * ts * (1 - ts))[:, None] * bends[1] + (ts ** 2)[:, None] * bends[2]
    return CurvePlane(plane=None, anchors=bends.copy(), anchor_bend=1, bend_coords=bends, bend_residuals=np.zeros(3),
                      ts=ts, curve_coords=curve, curve_residuals=np.zeros(len(ts)), xs=xs, ys=ys,
                      grid=_grid(xs, ys))


def _ensemble(acc):
    acc = np.asarray(acc, float)
    nll = 1.0 - acc
    return EnsembleResult(acc=acc, nll=nll, ece=0.1 * nll, member_acc=acc, member_nll=nll, member_ece=0.1 * nll, n=100)


def _fge():
    lr = [0.05 - 0.045 * (1 - abs(1 - 2 * ((i % 4) + 0.5) / 4)) for i in range(12)]
    return FGEResult(snapshots=[], lr_trace=lr, snapshot_iterations=[1, 5, 9], distances=[1.0, 1.5, 1.7],
                     history=[], cycle_iters=4, iters_per_epoch=2)


def _with_linear():
    curve = _path_result("bezier", 0.02)
    curve.linear = _path_result("linear", 0.5)
    return curve


# name -> (call writing the PNG at a path, (height, width) in pixels = figsize x dpi of the docstring)
CASES = {
    "history": (lambda p: plots.plot_history([{"epoch": e, "loss": 2.0 / e, "acc": 1 - 0.5 / e, "lr": 0.1 / e}
                                              for e in range(1, 6)], p, "history"), (374, 990)),
    "path": (lambda p: plots.plot_path(_with_linear(), p, "path"), (418, 1100)),
    "line": (lambda p: plots.plot_line(_grid(np.linspace(-1, 2, 9), None), p, "line",
                                       marks=[(0.0, "ckpt"), (1.0, "ckpt2")]), (504, 768)),
    "contours": (lambda p: plots.plot_contours(_grid(np.linspace(-1, 1, 9), np.linspace(-1, 1, 7)), p, "contours",
                                               points=[((0.0, 0.0), "ckpt", "o")]), (528, 1320)),
    "surface": (lambda p: plots.plot_surface(_grid(np.linspace(-1, 1, 9), np.linspace(-1, 1, 7)), p, "surface"),
                (672, 840)),
    "curvature_1d": (lambda p: plots.plot_curvature(_grid(np.linspace(-1, 1, 9), None, True), p, "c"), (504, 1320)),
    "curvature_2d": (lambda p: plots.plot_curvature(_grid(np.linspace(-1, 1, 9), np.linspace(-1, 1, 7), True), p,
                                                    "c"), (504, 1320)),
    "curve_plane": (lambda p: plots.plot_curve_plane(_curve_plane(), p, "plane"), (528, 1320)),
    "fge": (lambda p: plots.plot_fge(_fge(), _ensemble([0.90, 0.92, 0.93]), p, _ensemble([0.9]),
                                     _ensemble([0.90, 0.94, 0.95]), "fge"), (484, 1100)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_plot_writes_png_of_documented_size(name, tmp_path, capsys):
    draw, (height, width) = CASES[name]
    target = tmp_path / "sub" / f"{name}.png"  # a missing directory is created
    written = draw(target)
    assert written == target
    data = target.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(target)
    assert image.shape == (height, width, 4)
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas
    assert sorted(os.listdir(target.parent)) == [target.name]  # no temporary file left behind
    assert capsys.readouterr() == ("", "")  # plots never print


def test_failed_render_keeps_the_old_file(tmp_path, monkeypatch):
    """The PNG is written to a temporary name and renamed: a crash mid-write leaves the previous picture."""
    target = tmp_path / "history.png"
    target.write_bytes(b"old picture")

    def broken_savefig(self, f, **kwargs):
        f.write(PNG_SIGNATURE + b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        CASES["history"][0](target)
    assert target.read_bytes() == b"old picture"
    assert os.listdir(tmp_path) == ["history.png"]


def test_curve_plane_without_grid_is_refused(tmp_path):
    cp = _curve_plane()
    cp.grid = None
    with pytest.raises(ValueError, match="no grid"):
        plots.plot_curve_plane(cp, tmp_path / "plane.png")
    assert not (tmp_path / "plane.png").exists()


def test_import_leaves_backend_and_pyplot_alone():
    """Importing the plots and every drawing command keeps a user's backend and never loads pyplot."""
    code = ("import sys, matplotlib\n"
            "matplotlib.use('svg')\n"
            "before = matplotlib.get_backend()\n"
            "import modeconn.plots\n"
            "import modeconn.train, modeconn.train_curve, modeconn.eval_curve, modeconn.align, modeconn.fge\n"
            "import modeconn.plane, modeconn.landscape, modeconn.demo\n"
            "print(before, matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("MPLBACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["svg", "svg", "False"]


def test_no_backend_switch_or_pyplot_in_the_library():
    offenders = []
    for f in sorted((ROOT / "modeconn").rglob("*.py")):
        text = f.read_text(encoding="utf-8")
        for needle in ("matplotlib.use(", "import matplotlib.pyplot", "from matplotlib import pyplot"):
            if needle in text:
                offenders.append(f"{f.relative_to(ROOT)}: {needle}")
    assert offenders == []
