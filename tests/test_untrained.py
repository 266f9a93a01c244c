"""An endpoint that never learned is written but flagged, by train and by every command reading it."""
import math

import pytest

from modeconn import eval_curve, train, train_curve
from modeconn.cli.endpoints import untrained_reason
from modeconn.runtime.checkpoints import load_checkpoint

from conftest import CKPT


@pytest.mark.parametrize("metrics, classes, untrained", [
    ({"train_acc": 0.149, "train_loss": 1.0}, 10, True),     # within 5 points of chance 0.10
    ({"train_acc": 0.151, "train_loss": 1.0}, 10, False),
    ({"train_acc": 0.9, "train_loss": math.log(10)}, 10, True),  # no better than a uniform guess
    ({"train_acc": 0.9, "train_loss": math.log(10) - 1e-3}, 10, False),
    ({"train_acc": 0.54, "train_loss": 0.6}, 2, True),
    ({"train_acc": 0.56, "train_loss": 0.6}, 2, False),
    ({}, 10, False),                                          # nothing recorded: nothing to say
])
def test_untrained_means_near_chance_or_no_better_than_uniform(metrics, classes, untrained):
    assert (untrained_reason(metrics, classes) is not None) == untrained


def test_a_collapsed_run_is_saved_flagged_and_fails_under_strict(tmp_path, capsys):
    # weight decay 5 at lr 0.05 shrinks every weight and bias by 25 % a step: the logits collapse to 0,
    # the loss to log(10) -- the "dead network saved as a finished endpoint" of the issue
    argv = ["--epochs", "2", "--wd", "5", "--no-progress", "--out", str(tmp_path / "dead")]
    assert train.main(argv + ["--strict"]) == 1
    err = capsys.readouterr().err
    assert "looks untrained" in err and "--strict" in err and len(err.strip().splitlines()) == 2
    meta = load_checkpoint(tmp_path / "dead" / "model.pt", kind="model")   # written all the same
    assert meta["metrics"]["train_loss"] == pytest.approx(math.log(10), abs=0.01)
    assert train.main(argv + ["--force"]) == 0                              # without --strict: a warning only
    assert "looks untrained" in capsys.readouterr().err
    dead, good = str(tmp_path / "dead" / "model.pt"), str(CKPT / "digits_mlp_a.pt")
    assert eval_curve.main(["--a", good, "--b", dead, "--num-points", "2", "--out", str(tmp_path / "e"),
                            "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"--b {dead} looks untrained" in err and "--a" not in err
    assert train_curve.main(["--a", dead, "--b", good, "--epochs", "1", "--out", str(tmp_path / "c"),
                             "--no-progress"]) == 0
    assert f"--a {dead} looks untrained" in capsys.readouterr().err
