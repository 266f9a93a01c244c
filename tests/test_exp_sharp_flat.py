"""experiments/sharp_flat.py in --quick mode: files, and numbers checked against independent computations."""
import copy
import json

import numpy as np
import pytest
import torch

import modeconn as mc
from experiments import sharp_flat as sf
from experiments.common import parse
from modeconn.evaluation.model import evaluate
from modeconn.geometry import GridResult

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharp_flat")
    result = sf.main(["--quick", "--out", str(out)])
    return out, result


def _ranks(v):
    """Average ranks (ties share the mean of their positions), by hand."""
    v = np.asarray(v, float)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(1, len(v) + 1)
    for x in np.unique(v):
        ranks[v == x] = ranks[v == x].mean()
    return ranks


def test_files(run):
    out, result = run
    assert (out / "sharp_flat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["runs"]) == 8 and saved["config"]["preset"] == "quick"
    md = (out / "results.md").read_text()
    assert "| setting | test error %" in md and "| SB -> LB line |" in md and "Spearman" in md


def test_line_ends_are_the_endpoints_trained_again(run):
    """α = 0 / α = 1 of the SB -> LB line equal SB / LB retrained here and evaluated on their own."""
    _, result = run
    args, cfg = parse("sharp_flat", "", sf.PRESETS, ["--quick"])
    ds = mc.get_dataset("digits")
    init = sf.initial_model(ds, cfg, 0)
    line = result["lines"][0]["wd=0 SGD"]
    xs = np.asarray(line["xs"])
    for batch, alpha in (("SB", 0.0), ("LB", 1.0)):
        s = next(s for s in sf.settings(cfg) if s["label"] == f"{batch} wd=0 SGD")
        model = sf.train(ds, cfg, s, 0, init, "cpu")
        i = int(np.argmin(np.abs(xs - alpha)))
        assert abs(xs[i] - alpha) < 1e-9
        for split in ("train", "test"):
            want = evaluate(model, ds.eval_loader(split))
            assert line[f"{split}_loss"][i] == pytest.approx(want["loss"], rel=1e-4, abs=1e-6)
            assert line[f"{split}_acc"][i] == pytest.approx(want["acc"], abs=1e-9)


def test_slice_centres_are_the_models_losses(run):
    _, result = run
    for row in (r for r in result["runs"] if r["seed"] == 0):
        for kind in ("raw", "filter"):
            c = result["slices_first_seed"][row["label"]][kind]
            centre = int(np.argmin(np.abs(np.asarray(c["xs"]))))
            assert c["train_loss"][centre] == pytest.approx(row["train_loss"], rel=1e-4, abs=1e-6)


def test_directions_filter_norms_and_a_shared_raw_vector():
    torch.manual_seed(0)
    init = mc.create_model("convnet", (1, 8, 8), 10, width=4, bn=True)
    a = mc.create_model("convnet", (1, 8, 8), 10, width=4, bn=True)
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(3.0)  # a rescaled network: filter norms change, the raw direction must not
    da, db = sf.directions(a, init, seed=7), sf.directions(b, init, seed=7)
    assert torch.equal(da["raw"], db["raw"])
    multi = [p for p in init.parameters() if p.dim() >= 2]
    assert da["raw"].norm().item() == pytest.approx(torch.cat([p.reshape(-1) for p in multi]).norm().item(),
                                                    rel=1e-5)
    for model, d in ((a, da["filter"]), (b, db["filter"])):
        offset = 0
        for p in model.parameters():
            part = d[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.dim() >= 2:
                assert torch.allclose(part.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), rtol=1e-5)
            else:
                assert torch.count_nonzero(part) == 0
    assert torch.allclose(db["filter"], 3.0 * da["filter"], rtol=1e-5)


def test_slice_numbers_of_a_parabola():
    xs = np.linspace(-1, 1, 21)
    grid = GridResult(xs, None, {"train_loss": 0.3 + 2.5 * xs ** 2}, 1, 1, False, 21)
    nums = sf.slice_numbers(grid, fit_radius=0.2, rise_at=0.5)
    assert nums["curvature"] == pytest.approx(5.0, rel=1e-9)
    assert nums["rise"] == pytest.approx(2.5 * 0.25, rel=1e-9)


def test_correlations_and_table_match_the_runs(run):
    out, result = run
    rows = result["runs"]
    for c in result["correlations"]:
        x, y = _ranks([r[c["measure"]] for r in rows]), _ranks([r[c["target"]] for r in rows])
        if np.std(x) == 0 or np.std(y) == 0:
            continue
        assert c["spearman_pooled"] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-9)
    md = (out / "results.md").read_text()
    for s in result["summary"]:
        mine = [r for r in rows if r["label"] == s["label"]]
        err = 100 * np.asarray([r["test_error"] for r in mine])
        assert f"| {s['label']} | {err.mean():.3f} ± {err.std():.3f} |" in md
