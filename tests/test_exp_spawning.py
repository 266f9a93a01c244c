"""experiments/spawning.py: the --quick run writes consistent files, and what it measures is what it says."""
import copy
import json
import re

import numpy as np
import pytest
import torch

import modeconn as mc
from modeconn.evaluation.model import evaluate
from modeconn.training.spawn import PARENT, child_key, spawn_key

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_run_files_and_tables(tmp_path):
    from experiments import spawning

    result = spawning.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "spawning.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "results.md").read_text()
    assert saved["config"]["preset"] == "quick" and "| model/dataset | k |" in md
    runs = {r["run"] for r in saved["rows"]}
    assert runs == {"convnet_bn/digits", "mlp/mnist1d"}
    for run in runs:
        for k in (0, 1, 2):  # the table's mean ± std of every k is that of the per-seed numbers in the json
            values = [r["barrier_test_loss"] for r in saved["rows"] if r["run"] == run and r["k"] == k]
            assert len(values) == 2
            cell = f"{np.mean(values):.4f} ± {np.std(values):.4f}"
            assert re.search(rf"\| {re.escape(run)} \| {k} \| \d+ \| {re.escape(cell)} \|", md), (run, k, cell)
    for seed in saved["seeds"]:  # k* follows from the seed's own rows
        rows = [r for r in saved["rows"] if r["run"] == seed["run"] and r["seed"] == seed["seed"]]
        b0 = rows[0]["barrier_test_error"]
        expected = next((r["k"] for r in rows if r["barrier_test_error"] <= 0.1 * b0), None)
        assert seed["crossing"]["test_error"]["k_star"] == expected
        assert all(r["barrier_test_loss"] >= 0 for r in rows)  # interp barrier: the ends give 0 at least
    assert result["summary"][0]["n"] == 2


def test_first_below_by_hand():
    from experiments.spawning import first_below

    assert first_below([0, 1, 2, 4], [1.0, 0.5, 0.1, 0.0]) == 2      # 0.1 <= 10% of 1.0
    assert first_below([0, 1, 2, 4], [1.0, 0.5, 0.11, 0.09]) == 4
    assert first_below([0, 1, 2], [1.0, 0.5, 0.2]) is None           # never below 10%
    assert first_below([0, 1], [0.0, 0.3]) == 0                       # connected from the start


def _tiny_run():
    from experiments.spawning import PRESETS

    run = copy.deepcopy(PRESETS["quick"]["runs"][0])
    run.update(epochs=2, spawn_at=[0, 1])
    return run


def test_line_ends_are_the_children_and_same_data_order_reproduces_the_parent():
    """Child 0 gets the parent's own data seed: it must end exactly where the parent ends, so the line between
    it and the parent has barrier 0; the line's t=0 test loss is that child evaluated on its own."""
    from experiments.spawning import seed_rows, spawn_run

    ds = mc.get_dataset("digits")
    run = _tiny_run()
    res = spawn_run(ds, run, seed=3, num_points=5, child_seeds=[3, 77])
    store = res.store
    for k in (0, 1):
        child = store[child_key(k, 0)]["model"]
        assert all(torch.equal(child[n], store[PARENT]["model"][n]) for n in child)
    net = mc.create_model(run["model"], ds.input_shape, ds.num_classes, **run["model_kwargs"])
    net.load_state_dict(store[PARENT]["model"])
    twin = copy.deepcopy(net)
    line = mc.evaluate_path(mc.linear_path(net, twin), ds.eval_loader("train"), ds.eval_loader("test"), num_points=5)
    assert line.barrier("test_loss") == pytest.approx(0.0, abs=1e-12)
    # the pair's t=0 end is child 0 with BN statistics recomputed over the training data
    alone = evaluate(mc.recompute_bn(copy.deepcopy(net), ds.eval_loader("train")), ds.eval_loader("test"))
    path = res.points[1].pairs[0].path
    assert path.test_loss[0] == pytest.approx(alone["loss"], rel=1e-5)  # batched engine vs one model: float32 sums
    # the rows carry the pair's barrier, and the child's distance from the spawn point is the flat L2 norm
    rows = seed_rows(res, run)
    assert rows[1]["barrier_test_error"] == pytest.approx(path.barrier("test_error"), abs=1e-12)
    names = [n for n, _ in net.named_parameters()]
    diff = torch.cat([(store[child_key(1, 1)]["model"][n] - store[spawn_key(1)]["model"][n]).double().flatten()
                      for n in names])
    assert res.points[1].children[1].distance_from_spawn == pytest.approx(float(diff.norm()), rel=1e-9)
