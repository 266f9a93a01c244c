"""experiments/alignment.py --quick: files, and its numbers checked against computations made here.

The run keeps its models (``--keep-models``); the checks reload them and recompute by hand (plain
forward passes on the whole test set, float64 cross-entropy, state dicts interpolated here), not
through the path-evaluation code the experiment used.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import modeconn as mc

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = ("none", "weight", "activation")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from experiments import alignment

    out = tmp_path_factory.mktemp("alignment")
    result = alignment.main(["--quick", "--out", str(out), "--keep-models"])
    data = {f["name"]: mc.get_dataset(f["dataset"], **f.get("data_kwargs", {})) for f in result["config"]["families"]}
    return out, result, data


def _test_loss(model, ds) -> float:
    """Mean test cross-entropy of ``model``: one forward pass, float64."""
    with torch.no_grad():
        return float(F.cross_entropy(model.eval()(ds.x_test).double(), ds.y_test))


def _point(template, a, b, t: float):
    """``template`` loaded with (1-t) θ_a + t θ_b, interpolated here (integer/bool buffers from a)."""
    sa, sb = a.state_dict(), b.state_dict()
    template.load_state_dict({k: (1 - t) * v + t * sb[k] if v.is_floating_point() else v for k, v in sa.items()})
    return template.eval()


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def _pair(out, result, model, width):
    """(rows by method, A, {method: B'}, the pair's model directory) of the first pair."""
    rows = {r["method"]: r for r in result["runs"] if r["model"] == model and r["width"] == width}
    where = out / "models" / f"{model}_w{width}_s{rows['none']['pair']}"
    load = lambda name: mc.load_model(where / f"{name}.pt")[0].eval()
    ends = {"none": load("b"), "weight": load("b_weight"), "activation": load("b_activation")}
    return rows, load("a"), ends, where


def test_files_and_rows(run):
    out, result, _ = run
    assert (out / "alignment.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "results.json").read_text())["config"]["preset"] == "quick"
    md = (out / "results.md").read_text()
    assert "| model | width | pairs |" in md and "| gpt | 8 |" in md and "| mlp | 64 |" in md
    keys = {(r["model"], r["width"], r["method"]) for r in result["runs"]}
    assert keys == {(m, w, x) for m, w in (("mlp", 4), ("mlp", 64), ("gpt", 8)) for x in METHODS}
    assert all(r["seeds"] == [1, 2] for r in result["runs"])  # pair s = seeds (2s-1, 2s)


@pytest.mark.parametrize("model,width", [("mlp", 64), ("gpt", 8)])
def test_aligned_b_is_b_and_the_lines_ends_are_the_endpoints(run, model, width):
    out, result, data = run
    ds = data[model]
    rows, a, ends, _ = _pair(out, result, model, width)
    losses = {m: _test_loss(e, ds) for m, e in ends.items()}
    # alignment permutes: B's function is unchanged, and each tensor holds the same values
    assert losses["weight"] == pytest.approx(losses["none"], abs=1e-5)
    assert losses["activation"] == pytest.approx(losses["none"], abs=1e-5)
    for m in ("weight", "activation"):
        for p, q in zip(ends["none"].parameters(), ends[m].parameters()):
            assert torch.equal(p.detach().flatten().sort().values, q.detach().flatten().sort().values)
    assert not torch.equal(_flat(ends["weight"]), _flat(ends["none"]))  # ... but something moved
    loss_a = _test_loss(a, ds)
    for m in METHODS:
        for path in ("line", "curve"):  # both paths have A and B' at their ends
            assert rows[m][path]["test_loss"][0] == pytest.approx(loss_a, abs=1e-5)
            assert rows[m][path]["test_loss"][-1] == pytest.approx(losses[m], abs=1e-5)


@pytest.mark.parametrize("model,width", [("mlp", 64), ("gpt", 8)])
def test_line_barriers_recomputed_here(run, model, width):
    out, result, data = run
    ds = data[model]
    rows, a, ends, where = _pair(out, result, model, width)
    template = mc.load_model(where / "a.pt")[0]
    for m in ("none", "weight"):
        ts = np.array(rows[m]["line"]["ts"])
        loss = np.array([_test_loss(_point(template, a, ends[m], t), ds) for t in ts])
        np.testing.assert_allclose(rows[m]["line"]["test_loss"], loss, atol=1e-5)
        by_hand = float(np.max(loss - ((1 - ts) * loss[0] + ts * loss[-1])))  # interp barrier
        assert rows[m]["line_barrier"] == pytest.approx(by_hand, abs=1e-5)
        assert rows[m]["line_barrier"] >= 0


@pytest.mark.parametrize("method", METHODS)
def test_bend_offset_and_distance_by_hand(run, method):
    out, result, _ = run
    rows, a, ends, where = _pair(out, result, "mlp", 64)
    curve, _ = mc.load_curve(where / f"curve_{method}.pt")
    ta, tb = _flat(a), _flat(ends[method])
    # Bezier(3): θ(½) = ¼θ_A + ½θ_mid + ¼θ_B', so θ(½) − midpoint = ½(θ_mid − midpoint)
    half = curve.weights_at(0.5)
    th = torch.cat([half[n].detach().double().flatten() for n, _ in a.named_parameters()])
    offset = 2 * float((th - (ta + tb) / 2).norm()) / float((ta - tb).norm())
    assert rows[method]["bend_offset"] == pytest.approx(offset, rel=1e-4)
    assert rows[method]["ends_distance"] == pytest.approx(float((ta - tb).norm()), rel=1e-6)
    assert rows[method]["bend_offset"] > 0  # the curve was trained: the bend left the midpoint


def test_alignment_brings_b_closer(run):
    _, result, _ = run
    for model, width in (("mlp", 4), ("mlp", 64), ("gpt", 8)):
        d = {r["method"]: r["ends_distance"] for r in result["runs"] if (r["model"], r["width"]) == (model, width)}
        # weight matching maximises Σ <W_A, P W_B P'>; ||A−B'||² = ||A||² + ||B||² − 2<A, B'>: it can only shrink
        assert d["weight"] <= d["none"] + 1e-9


def test_tables_hold_the_runs_mean_and_std(run):
    out, result, _ = run
    md = (out / "results.md").read_text()
    for model, width in (("mlp", 64), ("gpt", 8)):
        vals = {m: [r["line_barrier"] for r in result["runs"] if (r["model"], r["width"], r["method"])
                    == (model, width, m)] for m in METHODS}
        cells = " | ".join(f"{np.mean(v):.3f} ± {np.std(v):.3f}" for v in vals.values())
        assert cells in md
