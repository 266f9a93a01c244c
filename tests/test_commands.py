"""The commands end to end, called in-process (same code path as python -m)."""
import json
import subprocess
import sys

import pytest
import torch

import modeconn as mc
from modeconn import eval_curve, train, train_curve
from modeconn.evaluation.path import PathResult

from conftest import CKPT, ROOT


def test_train_writes_a_self_describing_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--model", "mlp", "--model-kwargs", "width=16", "--epochs", "2", "--seed", "4",
                       "--out", str(out), "--no-progress"]) == 0
    model, meta = mc.load_model(out / "model.pt")
    assert meta["arch"] == "mlp" and meta["arch_kwargs"] == {"width": 16} and meta["seed"] == 4
    assert meta["dataset"] == "digits" and 0 < meta["metrics"]["test_acc"] <= 1
    assert len(json.loads((out / "history.json").read_text())) == 2
    assert (out / "history.png").stat().st_size > 1000
    # a second run into the same folder neither overwrites nor crashes
    assert train.main(["--epochs", "2", "--out", str(out), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_train_curve_resume_after_interruption(tmp_path, interrupt_after_epoch):
    args = ["--a", str(CKPT / "digits_mlp_a.pt"), "--b", str(CKPT / "digits_mlp_b.pt"),
            "--epochs", "4", "--lr", "0.03", "--no-progress"]
    assert train_curve.main(args + ["--out", str(tmp_path / "full")]) == 0

    interrupt_after_epoch.arm(2)
    part = tmp_path / "part"
    assert train_curve.main(args + ["--out", str(part)]) == 130
    assert (part / "resume.pt").exists() and not (part / "curve.pt").exists()
    interrupt_after_epoch.disarm()
    assert train_curve.main(args + ["--out", str(part), "--lr", "0.1", "--resume"]) == 2  # changed args refused
    assert train_curve.main(args + ["--out", str(part), "--resume"]) == 0
    full, _ = mc.load_curve(tmp_path / "full" / "curve.pt")
    resumed, meta = mc.load_curve(part / "curve.pt")
    assert torch.equal(full.bends, resumed.bends)
    assert [r["epoch"] for r in meta["history"]] == [1, 2, 3, 4]


def _by_hand_along(state_at, template, ds, ts, batch_size):
    """Train/test loss and error of the networks ``state_at(t)`` (weights only), BN statistics
    recomputed by hand: BN layers in training mode with momentum=None (a cumulative average,
    equal weight per batch, unbiased variance) over the training data cut into ``batch_size``
    batches in order; then a plain evaluation loop."""
    import copy
    import math

    import torch.nn.functional as F

    def batches(x, y):
        return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]

    rows = []
    for t in ts:
        net = copy.deepcopy(template)
        net.load_state_dict(state_at(t), strict=False)
        bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        net.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for x, _ in batches(ds.x_train, ds.y_train):
                net(x)
        net.eval()
        row = {}
        for split, x_all, y_all in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
            loss, wrong = 0.0, 0
            with torch.no_grad():
                for x, y in batches(x_all, y_all):
                    out = net(x)
                    loss += float(F.cross_entropy(out.double(), y, reduction="sum"))
                    wrong += int((out.argmax(1) != y).sum())
            row[f"{split}_loss"], row[f"{split}_error"] = loss / len(y_all), wrong / len(y_all)
        rows.append(row)
    assert not math.isnan(rows[0]["test_loss"])
    return {k: [r[k] for r in rows] for k in rows[0]}


def _interp_barrier_by_hand(ts, m):
    """max_t [M(t) - ((1-t) M(0) + t M(1))] and where it sits (README's 'interp')."""
    excess = [mi - ((1 - t) * m[0] + t * m[-1]) for t, mi in zip(ts, m)]
    i = max(range(len(ts)), key=lambda j: excess[j])
    return excess[i], ts[i]


def test_eval_curve_end_to_end(tmp_path, capsys, digits):
    """The command's numbers against an independent computation: θ(t) from the checkpoint's bends
    with Bernstein weights written out, BN statistics and metrics by plain loops, barriers by hand."""
    import math

    assert train_curve.main(["--a", str(CKPT / "digits_cnn_a.pt"), "--b", str(CKPT / "digits_cnn_b.pt"),
                             "--epochs", "1", "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    out = tmp_path / "eval"
    assert eval_curve.main(["--ckpt", str(tmp_path / "c" / "curve.pt"), "--num-points", "5", "--with-linear",
                            "--batch-size", "256", "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "path.json").read_text())
    assert (out / "path.png").stat().st_size > 1000
    lines = (out / "path.csv").read_text().splitlines()
    assert len(lines) == 6 and lines[0].startswith("t,train_loss")
    assert data["bn_recomputed"] is True and data["run"]["argv"][1] == "--ckpt"
    assert "test_loss" in capsys.readouterr().out
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert data["ts"] == ts

    # the fitted bends as stored in the checkpoint; the curve is Bezier(3): θ(t) = Σ C(2,k) t^k (1-t)^(2-k) θ_k
    state = mc.load_checkpoint(tmp_path / "c" / "curve.pt")["curve_state"]
    assert (state["curve"], state["num_bends"]) == ("bezier", 3)
    bends = {n: v.double() for n, v in state["bends"].items()}
    template, _ = mc.load_model(CKPT / "digits_cnn_a.pt")

    def on_curve(t):
        w = [math.comb(2, k) * t ** k * (1 - t) ** (2 - k) for k in range(3)]
        return {n: sum(w[k] * v[k] for k in range(3)).float() for n, v in bends.items()}

    def on_line(t):
        return {n: ((1 - t) * v[0] + t * v[-1]).float() for n, v in bends.items()}

    for key, state_at in ((None, on_curve), ("linear", on_line)):
        got = data if key is None else data[key]
        hand = _by_hand_along(state_at, template, digits, ts, batch_size=256)
        for metric in ("train_loss", "test_loss"):
            assert got[metric] == pytest.approx(hand[metric], rel=1e-4, abs=1e-6), (key, metric)
            assert got[metric.replace("loss", "nll")] == pytest.approx(hand[metric], rel=1e-4, abs=1e-6)
        for metric in ("train_error", "test_error"):
            assert got[metric] == pytest.approx(hand[metric], abs=1e-9), (key, metric)
        for metric in ("test_loss", "test_error"):
            height, t_max = _interp_barrier_by_hand(ts, hand[metric])
            assert got["barriers"][metric]["interp"]["barrier"] == pytest.approx(height, rel=1e-3, abs=1e-5)
            m = hand[metric]
            assert got["barriers"][metric]["mean"]["barrier"] == pytest.approx(max(m) - (m[0] + m[-1]) / 2,
                                                                              rel=1e-3, abs=1e-5)
            assert got["barriers"][metric]["max"]["barrier"] == pytest.approx(max(m) - max(m[0], m[-1]),
                                                                             rel=1e-3, abs=1e-5)
        t_loss = _interp_barrier_by_hand(ts, hand["test_loss"])[1]
        assert got["barriers"]["test_loss"]["interp"]["t"] == t_loss
    assert data["linear"]["barriers"]["test_loss"]["interp"]["barrier"] > 0  # two CNNs: the line has a barrier


def test_eval_curve_bad_input(tmp_path, capsys):
    assert eval_curve.main(["--ckpt", str(CKPT / "digits_mlp_a.pt")]) == 2
    assert "not a curve" in capsys.readouterr().err
    assert eval_curve.main(["--a", str(CKPT / "digits_mlp_a.pt"), "--b", str(CKPT / "digits_mlp_b.pt"),
                            "--num-points", "1"]) == 2
    assert "--num-points" in capsys.readouterr().err
    assert eval_curve.main(["--a", str(CKPT / "digits_mlp_a.pt"), "--b", str(CKPT / "digits_mlp_b.pt"),
                            "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--download" in capsys.readouterr().err
    assert eval_curve.main(["--a", str(CKPT / "digits_mlp_a.pt"), "--b", str(CKPT / "digits_cnn_b.pt")]) == 2
    assert "--a is mlp" in capsys.readouterr().err


def test_console_script_and_help():
    out = subprocess.run([sys.executable, "-m", "modeconn", "train", "--help"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0 and "example:" in out.stdout and "--resume" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "modeconn", "nonsense"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "train_curve" in bad.stderr
    version = subprocess.run([sys.executable, "-m", "modeconn", "--version"], capture_output=True, text=True,
                             cwd=ROOT)
    assert version.returncode == 0 and version.stdout.split() == ["modeconn", mc.__version__]


def test_importing_every_command_leaves_the_public_api_unchanged():
    import importlib
    import types

    from modeconn.cli import COMMANDS

    before = {name: getattr(mc, name) for name in mc.__all__}
    for name in COMMANDS:
        module = importlib.import_module(f"modeconn.{name}")
        assert type(module) is types.ModuleType and hasattr(module, "main")
    for name in mc.__all__:
        assert getattr(mc, name) is before[name], name


def test_eval_curve_hessian_matches_the_endpoint(tmp_path):
    from modeconn.geometry.hessian import hessian_extreme_eigenvalues

    out = tmp_path / "h"
    assert eval_curve.main(["--a", str(CKPT / "digits_mlp_a.pt"), "--b", str(CKPT / "digits_mlp_b.pt"),
                            "--num-points", "3", "--hessian", "--hessian-points", "3", "--hessian-samples", "200",
                            "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "path.json").read_text())
    assert data["hessian_ts"] == [0.0, 0.5, 1.0]
    a, _ = mc.load_model(CKPT / "digits_mlp_a.pt")
    ds = mc.get_dataset("digits")
    ref = hessian_extreme_eigenvalues(a, "cross_entropy", [(ds.x_train[:200], ds.y_train[:200])])
    assert data["lambda_max"][0] == pytest.approx(ref.lambda_max, rel=1e-2)
    assert data["lambda_max"][1] > 2 * data["lambda_max"][0]  # the middle of the line is sharper
