"""train --adv pgd, eval_curve --adversarial pgd and train_curve --align pam from the command line."""
import json

import numpy as np
import pytest
import torch

import modeconn as mc
from modeconn import eval_curve, train, train_curve
from modeconn.evaluation.adversarial import PGD, robust_evaluate

from conftest import CKPT


def test_train_adv_records_the_attack_and_eval_curve_reports_the_robust_barrier(tmp_path, capsys, digits):
    out = tmp_path / "adv"
    assert train.main(["--model", "mlp", "--model-kwargs", "width=16", "--epochs", "1", "--adv", "pgd", "--eps",
                       "0.3", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    meta = torch.load(out / "model.pt", weights_only=False)
    assert meta["config"]["adv"]["eps"] == 0.3 and meta["config"]["adv"]["steps"] == 2
    ev = tmp_path / "ev"
    assert eval_curve.main(["--a", str(CKPT / "digits_mlp_a.pt"), "--b", str(CKPT / "digits_mlp_b.pt"),
                            "--num-points", "3", "--adversarial", "pgd", "--eps", "0.2", "--steps", "3",
                            "--adv-samples", "100", "--out", str(ev), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "robust_test_loss" in printed
    data = json.loads((ev / "path.json").read_text())
    # t = 0 is network a: its robust loss equals robust_evaluate of a on the first 100 test samples
    a, _ = mc.load_model(CKPT / "digits_mlp_a.pt")
    first = digits.eval_loader("test", 1024, samples=100)
    assert data["robust_test_loss"][0] == pytest.approx(robust_evaluate(a, first, PGD(0.2, 3))["loss"], abs=1e-6)
    assert np.all(np.array(data["robust_test_loss"]) > np.array(data["test_nll"]))
    assert "robust_test_loss" in data["barriers"] and data["attack"]["eps"] == 0.2
    header = (ev / "path.csv").read_text().splitlines()[0]
    assert "robust_test_error" in header


def test_attack_flags_are_checked(tmp_path, capsys):
    ends = ["--a", str(CKPT / "digits_mlp_a.pt"), "--b", str(CKPT / "digits_mlp_b.pt"), "--out", str(tmp_path)]
    assert eval_curve.main(ends + ["--adversarial", "pgd"]) == 2
    assert "--eps" in capsys.readouterr().err
    assert eval_curve.main(ends + ["--eps", "0.1"]) == 2
    assert eval_curve.main(ends + ["--adversarial", "pgd", "--eps", "-1"]) == 2
    assert "eps" in capsys.readouterr().err


def test_train_curve_align_pam_writes_rounds(tmp_path, capsys):
    out = tmp_path / "pam"
    assert train_curve.main(["--a", str(CKPT / "digits_mlp_a.pt"), "--b", str(CKPT / "digits_mlp_b.pt"),
                             "--align", "pam", "--pam-rounds", "2", "--epochs", "1", "--pam-points", "3",
                             "--out", str(out), "--no-progress"]) == 0
    rounds = json.loads((out / "pam.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(0.0 <= r["moved"]["total"] <= 1.0 and r["barrier"] == r["barrier"] for r in rounds)
    assert "PAM round 2" in capsys.readouterr().out
    curve, meta = mc.load_curve(out / "curve.pt")
    assert meta["alignment"]["method"] == "pam"
    # the end bend is --b permuted: the same function as --b
    b, _ = mc.load_model(CKPT / "digits_mlp_b.pt")
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(curve.point(1.0).eval()(x), b.eval()(x), atol=1e-5)
    assert train_curve.main(["--a", str(CKPT / "digits_mlp_a.pt"), "--b", str(CKPT / "digits_mlp_b.pt"),
                             "--align", "pam", "--out", str(out), "--resume", "--no-progress"]) == 2


def test_train_curve_adv_records_the_attack(tmp_path):
    out = tmp_path / "rc"
    assert train_curve.main(["--a", str(CKPT / "digits_mlp_a.pt"), "--b", str(CKPT / "digits_mlp_b.pt"),
                             "--epochs", "1", "--adv", "pgd", "--eps", "0.2", "--steps", "1",
                             "--out", str(out), "--no-progress"]) == 0
    _, meta = mc.load_curve(out / "curve.pt")
    assert meta["config"]["adv"] == PGD(0.2, 1).as_dict()
