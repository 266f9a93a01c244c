"""experiments/skip_connections.py in --quick mode: files, and numbers checked against independent computations."""
import json

import numpy as np
import pytest

import modeconn as mc
from experiments import skip_connections as sk
from experiments.common import parse
from modeconn.evaluation.model import evaluate
from modeconn.geometry import GridResult
from modeconn.geometry.hessian import hessian_extreme_eigenvalues

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("skip_connections")
    return out, sk.main(["--quick", "--out", str(out)])


@pytest.fixture(scope="module")
def retrained():
    """The first quick run's no-shortcut network, trained again here, with its config and data."""
    _, cfg = parse("skip_connections", "", sk.PRESETS, ["--quick"])
    ds = mc.get_dataset("digits")
    data = sk.loaders(ds, cfg, "cpu")
    return sk.train(ds, cfg, 8, False, 0, data, "cpu"), cfg, data


def test_files(run):
    out, result = run
    for png in ("skip_connections.png", "contours_PreResNet-8.png", "contours_PreResNet-8-noshort.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert [(r["depth"], r["shortcut"]) for r in saved["runs"]] == [(8, True), (8, False)]
    md = (out / "results.md").read_text()
    assert "| network | test error %" in md and "| PreResNet-8-noshort |" in md


def test_lattice_centre_and_curvature_are_the_retrained_models(run, retrained):
    """The lattice centre is the loss of the network trained again and evaluated on its own; the curvature
    at the centre is that network's Hessian, by Lanczos at a much tighter tolerance."""
    _, result = run
    model, cfg, data = retrained
    row = next(r for r in result["runs"] if not r["shortcut"])
    lattice = np.asarray(row["lattice"])
    centre = lattice[lattice.shape[0] // 2, lattice.shape[1] // 2]
    assert centre == pytest.approx(evaluate(model, data["bn"])["loss"], rel=1e-4, abs=1e-6)
    assert row["test_error"] == pytest.approx(evaluate(model, data["test"])["error"], abs=1e-9)
    eig = hessian_extreme_eigenvalues(model, None, data["hessian"], tol=1e-6, seed=5)
    assert row["lambda_max_centre"] == pytest.approx(eig.lambda_max, rel=2e-2)
    assert row["ratio_centre"] == pytest.approx(abs(eig.lambda_min / eig.lambda_max), abs=2e-2)


def test_plane_is_filter_normalised(retrained):
    model, cfg, data = retrained
    plane, grid, curv = sk.landscape(model, dict(cfg, grid=3), 0, data)
    assert grid.arrays["train_loss"].shape == (3, 3) and len(curv["lambda_max"]) == 1
    for d in (plane.d1, plane.d2):
        offset = 0
        for p in model.parameters():
            part = d[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.dim() >= 2:
                assert np.allclose(part.flatten(1).norm(dim=1).numpy(), p.detach().flatten(1).norm(dim=1).numpy(),
                                   rtol=1e-5)


@pytest.mark.parametrize("surface, share", [(lambda x, y: x ** 2 + 2 * y ** 2, 1.0),
                                            (lambda x, y: x ** 2 - y ** 2, 0.0),
                                            (lambda x, y: -(x ** 2) - y ** 2, 0.0),
                                            (lambda x, y: 3 * x + y ** 2, 1.0),
                                            (lambda x, y: x ** 2 - 0.05 * y ** 2, 1.0)])
def test_plane_convex_share_of_known_surfaces(surface, share):
    axis = np.linspace(-1, 1, 9)
    X, Y = np.meshgrid(axis, axis)
    grid = GridResult(axis, axis, {"train_loss": surface(X, Y)}, 9, 9, False, 9)
    assert sk.plane_convex_share(grid, threshold=0.1) == pytest.approx(share)


def test_table_matches_the_runs(run):
    out, result = run
    md = (out / "results.md").read_text()
    for r in result["runs"]:
        assert f"| {sk.label(r['depth'], r['shortcut'])} | {100 * r['test_error']:.3f} ± 0.000 |" in md


def test_local_minima_of_known_surfaces():
    axis = np.linspace(-1, 1, 13)
    X, Y = np.meshgrid(axis, axis)
    bowl = GridResult(axis, axis, {"train_loss": X ** 2 + Y ** 2}, 13, 13, False, 13)
    assert sk.local_minima(bowl) == 1
    # an egg crate cos(2πx)cos(2πy) + 2 on [-1, 1]^2 at spacing 1/6: its minima at (±0.5, 0), (0, ±0.5)
    crate = GridResult(axis, axis, {"train_loss": np.cos(2 * np.pi * X) * np.cos(2 * np.pi * Y) + 2}, 13, 13, False, 13)
    assert sk.local_minima(crate) == 4
    assert sk.local_minima(GridResult(axis, axis, {"train_loss": -(X ** 2) - Y ** 2}, 13, 13, False, 13)) == 0
