"""experiments/ensembles.py --quick: its files, its budgets, and its metrics checked against independent computations."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import modeconn as mc
from modeconn.evaluation.model import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


EXPERIMENT = "ensembles"  # what the conftest fixture quick_run runs


def _row(result, method, members, seed=0):
    return next(r for r in result["runs"] if (r["method"], r["members"], r["seed"]) == (method, members, seed))


def test_files(quick_run):
    _, out, result = quick_run
    assert (out / "ensembles.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "results.json").read_text())["runs"] == json.loads(json.dumps(result["runs"]))
    assert "| method | members | budget (B) | test accuracy % | test NLL | ECE % |" in (out / "results.md").read_text()


def test_ece_of_perfect_and_of_constant_predictors():
    """ECE (15 bins) is 0 for a one-hot correct predictor; |accuracy - confidence| when every sample falls
    in one bin (a constant predictor: confidence 0.7, accuracy 1/2)."""
    y = torch.arange(40) % 4
    perfect = mc.evaluate_ensemble([nn.Identity()], mc.TensorLoader(50.0 * nn.functional.one_hot(y).float(), y, 16))
    assert perfect.acc[-1] == 1.0 and perfect.ece[-1] == pytest.approx(0.0, abs=1e-12)
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1])).expand(40, 3).contiguous()
    labels = torch.tensor([0, 1] * 20)
    const = mc.evaluate_ensemble([nn.Identity()], mc.TensorLoader(logits, labels, 16))
    assert const.acc[-1] == pytest.approx(0.5) and const.ece[-1] == pytest.approx(0.2, abs=1e-6)
    assert const.nll[-1] == pytest.approx(-(math.log(0.7) + math.log(0.2)) / 2, rel=1e-6)


def test_one_member_is_the_network_evaluated_alone(quick_run):
    """The independent ensemble of one member is network 0, retrained here and evaluated by ``evaluate``."""
    ensembles, _, result = quick_run
    c = ensembles.PRESETS["quick"]["cells"][0]
    ds = mc.get_dataset(c["dataset"])
    for seed in (0, 1):
        net, start = ensembles.train_member(ds, c, 10 * seed, None)
        ref = evaluate(mc.recompute_bn(copy.deepcopy(net), ds.eval_loader("train", 512)), ds.eval_loader("test"))
        row = _row(result, "independent", 1, seed)
        assert row["acc"] == pytest.approx(ref["acc"], abs=1e-12)
        assert row["nll"] == pytest.approx(ref["nll"], rel=1e-9)
        assert sorted(start) == sorted(net.state_dict())  # FGE's start: a whole state of the network


def test_distances(quick_run):
    """The distance between independent networks 0 and 1 is ||θ_0 - θ_1|| of the networks retrained here."""
    ensembles, _, result = quick_run
    c = ensembles.PRESETS["quick"]["cells"][0]
    ds = mc.get_dataset(c["dataset"])
    a, b = (ensembles.train_member(ds, c, j)[0] for j in (0, 1))
    with torch.no_grad():
        flat = [torch.cat([p.double().flatten() for p in n.parameters()]) for n in (a, b)]
    far = next(d for d in result["distances"] if d["seed"] == 0)
    assert far["independent"] == pytest.approx(float((flat[0] - flat[1]).norm()), rel=1e-9)
    assert far["fge_from_start"] > 0 and far["fge_consecutive"] > 0


def test_curve_and_simplex_begin_with_the_two_independent_networks(quick_run):
    """t = 0 and 1 of the curve, and the complex's two modes, are networks 0 and 1: their 2-member ensembles
    equal the independent one's, to the last digit."""
    _, _, result = quick_run
    for seed in (0, 1):
        ind = _row(result, "independent", 2, seed)
        for method in ("curve", "simplex"):
            row = _row(result, method, 2, seed)
            assert (row["acc"], row["ece"]) == (ind["acc"], ind["ece"])
            assert row["nll"] == pytest.approx(ind["nll"], rel=1e-12)


def test_budgets(quick_run):
    """FGE: fge_epochs / fge_cycle snapshots per run, a run costs one budget; the curve's third member pays for
    the fit (2B + curve epochs)."""
    ensembles, _, result = quick_run
    cfg = ensembles.PRESETS["quick"]
    c, K = cfg["cells"][0], cfg["independent"]
    per_run = c["fge_epochs"] // c["fge_cycle"]
    fge = [r for r in result["runs"] if r["method"] == "fge" and r["seed"] == 0]
    assert len(fge) == K * per_run
    assert [r["budget_epochs"] for r in fge[per_run - 1::per_run]] == [c["epochs"] * (k + 1) for k in range(K)]
    assert all(a["budget_epochs"] < b["budget_epochs"] for a, b in zip(fge, fge[1:]))
    assert [r["budget"] for r in result["runs"] if r["method"] == "independent" and r["seed"] == 0] == \
        [float(k + 1) for k in range(K)]
    assert _row(result, "curve", 3)["budget_epochs"] == 2 * c["epochs"] + c["curve_epochs"]


def test_markdown_means_match_the_runs(quick_run):
    """Every accuracy / NLL in results.md is the mean and population std over the seeds in results.json."""
    ensembles, out, result = quick_run
    md = (out / "results.md").read_text().splitlines()
    c = ensembles.PRESETS["quick"]["cells"][0]
    for method, members in (("independent", 2), ("fge", c["fge_epochs"] // c["fge_cycle"]),
                            ("curve", c["members"]), ("simplex", c["members"])):
        rows = [r for r in result["runs"] if (r["method"], r["members"]) == (method, members)]
        assert len(rows) == 2
        acc = [100 * r["acc"] for r in rows]
        nll = [r["nll"] for r in rows]
        cells = f"{np.mean(acc):.2f} ± {np.std(acc):.2f} | {np.mean(nll):.4f} ± {np.std(nll):.4f}"
        assert any(l.startswith(f"| {method} | {members} |") and cells in l for l in md), (method, cells)
