"""experiments/curves.py --quick: its files, and its numbers checked against independent computations."""
import copy
import json

import numpy as np
import pytest
import torch

import modeconn as mc
from modeconn.evaluation.model import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


EXPERIMENT = "curves"  # what the conftest fixture quick_run runs


def _rows(result, model, path=None):
    return [r for r in result["runs"] if r["model"] == model and (path is None or r["path"] == path)]


def test_files_and_tables(quick_run):
    curves, out, result = quick_run
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    stored = json.loads((out / "results.json").read_text())
    cfg = curves.PRESETS["quick"]
    assert len(stored["runs"]) == len(cfg["cells"]) * len(cfg["seeds"]) * len(curves.PATHS)
    md = (out / "results.md").read_text()
    assert "| dataset | model | path | pairs | train loss | test loss | train error % | test error % |" in md
    assert md.count("| digits | convnet_bn | bezier5 |") == 2  # one row in each of the two tables


def test_every_path_starts_at_a_and_ends_at_b(quick_run):
    """t=0 and t=1 of every path are the endpoints, evaluated here by ``evaluate`` (BN statistics recomputed)."""
    curves, _, result = quick_run
    ds = mc.get_dataset("digits")
    train, test = ds.eval_loader("train", 512), ds.eval_loader("test", 512)
    for c in curves.PRESETS["quick"]["cells"]:
        for seed, index in ((0, 0), (1, -1)):  # pair 0: endpoints trained with seeds 0 and 1
            net = mc.recompute_bn(copy.deepcopy(curves.train_endpoint(ds, c, seed)), train)
            ref = evaluate(net, test)
            for row in _rows(result, c["model"]):
                if row["pair"] == 0:
                    assert row["curves"]["test_loss"][index] == pytest.approx(ref["nll"], rel=1e-5)
                    assert row["curves"]["test_error"][index] == pytest.approx(ref["error"], abs=1e-9)


def test_barriers_and_summaries_follow_from_the_stored_curves(quick_run):
    """Barrier = max_t (M(t) - chord), min/mean/max over t: recomputed by hand from the arrays."""
    _, _, result = quick_run
    for row in result["runs"]:
        ts = np.asarray(row["curves"]["ts"])
        for m in ("train_loss", "test_loss", "train_error", "test_error"):
            v = np.asarray(row["curves"][m])
            chord = (1 - ts) * v[0] + ts * v[-1]
            assert row[f"{m}_barrier"] == pytest.approx(float(np.max(v - chord)), abs=1e-12)
        e = np.asarray(row["curves"]["test_error"])
        assert (row["test_error_min"], row["test_error_max"]) == (e.min(), e.max())
        assert row["test_error_mean"] == pytest.approx(e.mean(), abs=1e-12)
        # the l2 term only raises the loss: the paper's regularised train loss >= the cross-entropy
        assert np.all(np.asarray(row["curves"]["train_reg_loss"]) >= np.asarray(row["curves"]["train_loss"]))


def test_arc_lengths(quick_run):
    """The line's length is ||θ_A - θ_B|| (by hand, float64); no path between A and B is shorter."""
    curves, _, result = quick_run
    ds = mc.get_dataset("digits")
    c = curves.PRESETS["quick"]["cells"][0]
    a, b = curves.train_endpoint(ds, c, 0), curves.train_endpoint(ds, c, 1)
    with torch.no_grad():
        by_hand = torch.sqrt(sum(((p.double() - q.double()) ** 2).sum() for p, q in zip(a.parameters(),
                                                                                        b.parameters())))
    assert _rows(result, c["model"], "line")[0]["arc_length"] == pytest.approx(float(by_hand), rel=1e-6)
    for row in result["runs"]:
        assert row["arc_ratio"] >= 1 - 1e-9


def test_degenerate_paths(quick_run):
    """A line from a network to itself has no barrier and no length; an unfitted PolyChain(3), whose bend
    sits on the midpoint, is the line."""
    curves, _, _ = quick_run
    ds = mc.get_dataset("digits")
    c = curves.PRESETS["quick"]["cells"][1]  # convnet_bn: BN recomputed at every point
    a, b = curves.train_endpoint(ds, c, 0), curves.train_endpoint(ds, c, 1)
    train, test = ds.eval_loader("train", 512), ds.eval_loader("test", 512)
    same = curves.path_metrics(mc.linear_path(a, a), train, test, 5, c["wd"])
    assert same["arc_length"] == 0.0
    for m in ("train_loss", "test_loss", "train_error", "test_error"):
        assert same[f"{m}_barrier"] == pytest.approx(0.0, abs=1e-6)
    line = curves.path_metrics(mc.linear_path(a, b), train, test, 5, c["wd"])
    chain = curves.path_metrics(mc.CurveModel(a, a, b, mc.PolyChain(3)), train, test, 5, c["wd"])
    np.testing.assert_allclose(chain["curves"]["test_loss"], line["curves"]["test_loss"], rtol=1e-5)
    assert chain["arc_length"] == pytest.approx(line["arc_length"], rel=1e-6)


def test_markdown_means_match_the_runs(quick_run):
    """Every mean ± std in results.md is the mean and population std over the pairs in results.json."""
    curves, out, result = quick_run
    md = (out / "results.md").read_text()
    for c in curves.PRESETS["quick"]["cells"]:
        for kind, _, _ in curves.PATHS:
            rows = _rows(result, c["model"], kind)
            assert len(rows) == 2
            cells = []
            for m, scale, digits in (("train_loss", 1, 4), ("test_loss", 1, 4), ("train_error", 100, 2),
                                     ("test_error", 100, 2)):
                v = [scale * r[f"{m}_barrier"] for r in rows]
                cells.append(f"{np.mean(v):.{digits}f} ± {np.std(v):.{digits}f}")
            line = next(l for l in md.splitlines() if l.startswith(f"| digits | {c['model']} | {kind} | 2 |"))
            assert line == f"| digits | {c['model']} | {kind} | 2 | " + " | ".join(cells) + " |"
