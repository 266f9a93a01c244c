"""The commands end to end, called in-process (same code path as python -m)."""
import json
import subprocess
import sys

import pytest
import torch

import modeconn as mc
from modeconn import eval_curve, train, train_curve
from modeconn.cli.rundir import TrainingRun
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


def test_train_curve_resume_after_interruption(tmp_path, monkeypatch):
    args = ["--start", str(CKPT / "digits_mlp_a.pt"), "--end", str(CKPT / "digits_mlp_b.pt"),
            "--epochs", "4", "--lr", "0.03", "--no-progress"]
    assert train_curve.main(args + ["--out", str(tmp_path / "full")]) == 0

    real_saver = TrainingRun.epoch_saver

    def interrupting_saver(self, bar=None):
        save = real_saver(self, bar)

        def wrapped(record, state):
            save(record, state)
            if record["epoch"] == 2:
                raise KeyboardInterrupt

        return wrapped

    monkeypatch.setattr(TrainingRun, "epoch_saver", interrupting_saver)
    part = tmp_path / "part"
    assert train_curve.main(args + ["--out", str(part)]) == 130
    assert (part / "resume.pt").exists() and not (part / "curve.pt").exists()
    monkeypatch.setattr(TrainingRun, "epoch_saver", real_saver)
    assert train_curve.main(args + ["--out", str(part), "--lr", "0.1", "--resume"]) == 2  # changed args refused
    assert train_curve.main(args + ["--out", str(part), "--resume"]) == 0
    full, _ = mc.load_curve(tmp_path / "full" / "curve.pt")
    resumed, meta = mc.load_curve(part / "curve.pt")
    assert torch.equal(full.bends, resumed.bends)
    assert [r["epoch"] for r in meta["history"]] == [1, 2, 3, 4]


def test_eval_curve_end_to_end(tmp_path, capsys):
    assert train_curve.main(["--start", str(CKPT / "digits_cnn_a.pt"), "--end", str(CKPT / "digits_cnn_b.pt"),
                             "--epochs", "1", "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    out = tmp_path / "eval"
    assert eval_curve.main(["--ckpt", str(tmp_path / "c" / "curve.pt"), "--num-points", "5", "--with-linear",
                            "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "path.json").read_text())
    assert (out / "path.png").stat().st_size > 1000
    lines = (out / "path.csv").read_text().splitlines()
    assert len(lines) == 6 and lines[0].startswith("t,train_loss")
    assert data["bn_recomputed"] is True and data["run"]["argv"][1] == "--ckpt"
    # the JSON barrier is the PathResult's barrier
    ts = data["ts"]
    res = PathResult(**{k: __import__("numpy").array(data[k]) for k in
                        ("ts", "train_loss", "train_nll", "train_acc", "train_error", "test_loss", "test_nll",
                         "test_acc", "test_error", "segment_lengths", "arc_length")})
    assert data["barriers"]["test_loss"]["interp"]["barrier"] == pytest.approx(res.barrier("test_loss"))
    assert data["linear"]["barriers"]["test_loss"]["interp"]["barrier"] > 0
    assert len(ts) == 5
    assert "test_loss" in capsys.readouterr().out


def test_eval_curve_bad_input(tmp_path, capsys):
    assert eval_curve.main(["--ckpt", str(CKPT / "digits_mlp_a.pt")]) == 2
    assert "not a curve" in capsys.readouterr().err
    assert eval_curve.main(["--start", str(CKPT / "digits_mlp_a.pt"), "--end", str(CKPT / "digits_mlp_b.pt"),
                            "--num-points", "1"]) == 2
    assert "--num-points" in capsys.readouterr().err
    assert eval_curve.main(["--start", str(CKPT / "digits_mlp_a.pt"), "--end", str(CKPT / "digits_mlp_b.pt"),
                            "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--download" in capsys.readouterr().err
    assert eval_curve.main(["--start", str(CKPT / "digits_mlp_a.pt"), "--end", str(CKPT / "digits_cnn_b.pt")]) == 2
    assert "--start is mlp" in capsys.readouterr().err


def test_console_script_and_help():
    out = subprocess.run([sys.executable, "-m", "modeconn", "train", "--help"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0 and "example:" in out.stdout and "--resume" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "modeconn", "nonsense"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "train_curve" in bad.stderr


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
    assert eval_curve.main(["--start", str(CKPT / "digits_mlp_a.pt"), "--end", str(CKPT / "digits_mlp_b.pt"),
                            "--num-points", "3", "--hessian", "--hessian-points", "3", "--hessian-samples", "200",
                            "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "path.json").read_text())
    assert data["hessian_ts"] == [0.0, 0.5, 1.0]
    a, _ = mc.load_model(CKPT / "digits_mlp_a.pt")
    ds = mc.get_dataset("digits")
    ref = hessian_extreme_eigenvalues(a, "cross_entropy", [(ds.x_train[:200], ds.y_train[:200])])
    assert data["lambda_max"][0] == pytest.approx(ref.lambda_max, rel=1e-2)
    assert data["lambda_max"][1] > 2 * data["lambda_max"][0]  # the middle of the line is sharper
