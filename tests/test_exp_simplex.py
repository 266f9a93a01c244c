"""experiments/simplex.py: the --quick run writes consistent files, and what it measures is what it says."""
import copy
import json
import re

import numpy as np
import pytest
import torch

import modeconn as mc
from modeconn.evaluation.model import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_run_files_and_tables(tmp_path):
    from experiments import simplex

    result = simplex.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "simplex.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "results.md").read_text()
    assert saved["config"]["preset"] == "quick" and "| model/dataset | surface |" in md
    for surface in {r["surface"] for r in saved["surfaces"]}:  # the table's mean ± std is the seeds'
        values = [r["worst_test_loss"] for r in saved["surfaces"] if r["surface"] == surface]
        assert len(values) == 2
        cell = f"{np.mean(values):.4f} ± {np.std(values):.4f}"
        assert re.search(rf"\| {re.escape(surface)} \| [^|]+ \| {re.escape(cell)} \|", md), (surface, cell)
    for r in saved["surfaces"]:  # a grid's worst point is at least its vertices' values
        assert r["worst_test_loss"] >= r["modes_test_loss"] and r["barrier_test_loss"] >= 0
    for seed in (0, 1):
        rows = {r["method"]: r for r in saved["ensembles"] if r["seed"] == seed}
        fge = rows["FGE from the 3 modes"]
        for name, r in rows.items():  # equal budget and equal size: every simplex ensemble against FGE
            if name.startswith("simplex ensemble"):
                assert (r["members"], r["budget_epochs"]) == (fge["members"], fge["budget_epochs"])
    assert len(result["surfaces"]) == 2 * (1 + len(simplex.COMPLEXES))


@pytest.fixture(scope="module")
def tiny():
    """Three 1-epoch modes of the quick preset, a grid of resolution 3, the data."""
    from experiments import simplex

    cfg = dict(simplex.PRESETS["quick"], resolution=3)
    run = dict(cfg["runs"][0], epochs=1, simplex_epochs=1)
    ds = mc.get_dataset(run["dataset"])
    return simplex, cfg, run, ds, simplex.train_modes(ds, run, seed=5)


def _alone(net, ds):
    """``net`` evaluated on the test set on its own, BN statistics recomputed over the training data."""
    return evaluate(mc.recompute_bn(copy.deepcopy(net), ds.eval_loader("train")), ds.eval_loader("test"))


def test_triangle_vertices_centroid_and_edges(tiny):
    """The triangle's vertex values are the modes evaluated alone, its centroid the averaged weights, and the
    worst-line barrier the largest edge's interp barrier computed by hand."""
    simplex, cfg, run, ds, modes = tiny
    loaders = (ds.eval_loader("train"), ds.eval_loader("test"))
    res = simplex.evaluate_surface(mc.SimplexModel(copy.deepcopy(modes[0]), modes), loaders, cfg)
    alone = [_alone(m, ds)["loss"] for m in modes]
    np.testing.assert_allclose(res.vertex_values("test_loss"), alone, rtol=1e-6)
    mean = copy.deepcopy(modes[0])
    states = [m.state_dict() for m in modes]
    mean.load_state_dict({n: sum(s[n] for s in states) / 3 if n in dict(mean.named_parameters()) else states[0][n]
                          for n in states[0]})
    centre = int(np.flatnonzero(np.all(np.isclose(res.coords, 1 / 3), axis=1))[0])
    assert res.test_loss[centre] == pytest.approx(_alone(mean, ds)["loss"], rel=1e-5)
    row = simplex.surface_row(res, "triangle", "line")
    by_hand = []
    for path in res.paths.values():
        v, t = path.test_loss, path.ts
        by_hand.append(float(np.max(v - ((1 - t) * v[0] + t * v[-1]))))
    assert len(by_hand) == 3 and row["worst_path_barrier_test_loss"] == pytest.approx(max(by_hand), abs=1e-12)
    assert row["worst_test_loss"] == pytest.approx(float(res.test_loss.max()))


def test_complex_keeps_the_modes_and_its_worst_point_bounds_them(tiny):
    simplex, cfg, run, ds, modes = tiny
    loaders = (ds.eval_loader("train"), ds.eval_loader("test"))
    cplx = simplex.fit_complex(ds, run, modes, simplex.COMPLEXES[1], seed=5)
    assert all(torch.equal(cplx.vertex_model(j).state_dict()[n], modes[j].state_dict()[n])
               for j in range(3) for n, _ in modes[j].named_parameters())  # the modes stay fixed in training
    res = simplex.evaluate_surface(cplx, loaders, cfg)
    np.testing.assert_allclose(res.vertex_values("test_loss"), [_alone(m, ds)["loss"] for m in modes], rtol=1e-6)
    free = cplx.num_bends - 1  # a shared free vertex is a grid point too: its value is the network there
    at_free = int(np.flatnonzero(res.coords[:, free] == 1.0)[0])
    assert res.test_loss[at_free] == pytest.approx(_alone(cplx.vertex_model(free), ds)["loss"], rel=1e-5)
    assert res.worst("test_loss")["value"] >= max(res.vertex_values("test_loss")) - 1e-12
    assert len(res.coords) == 3 * 10 - 2 * 4  # three triangles of C(5, 2) points sharing the free edge's 4
