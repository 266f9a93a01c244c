"""A torchvision dataset read from --data-dir once is found again by every later command.

MNIST itself is not on this machine: a few dozen images are written in its
own file format (IDX), which torchvision's reader parses like the real files.
"""
import json
import struct

import numpy as np
import pytest

import modeconn as mc
from modeconn import eval_curve, train, train_curve
from modeconn.runtime.checkpoints import load_checkpoint


def _idx(path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the IDX format: magic (0, 0, 0x08 = uint8, ndim), big-endian dims, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]))
        f.write(struct.pack(f">{array.ndim}i", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def fake_mnist(root, n_train: int = 96, n_test: int = 32):
    """MNIST-format files under ``root/MNIST/raw``: class c is a bright bar in row band c, plus noise."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, size=(n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c + 4:2 * c + 6, 4:24] = 250
        _idx(root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", images)
        _idx(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def test_the_idx_files_read_back_as_written(tmp_path):
    ds = mc.get_dataset("mnist", data_dir=str(fake_mnist(tmp_path / "d")))
    assert ds.x_train.shape == (96, 1, 28, 28) and ds.x_test.shape == (32, 1, 28, 28)
    assert ds.y_train[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert int(ds.x_train[3, 0, 10, 10]) == 250 and int(ds.x_train[3, 0, 2, 10]) < 40


def test_downstream_commands_find_the_recorded_data_dir(tmp_path, monkeypatch):
    data = fake_mnist(tmp_path / "elsewhere" / "mnist_files")
    monkeypatch.chdir(tmp_path)
    common = ["--dataset", "mnist", "--epochs", "1", "--batch-size", "32", "--model-kwargs", "width=16"]
    for seed in (1, 2):
        assert train.main([*common, "--seed", str(seed), "--data-dir", str(data), "--out", f"m{seed}"]) == 0
    assert load_checkpoint(tmp_path / "m1" / "model.pt")["data_dir"] == str(data.resolve())
    work = tmp_path / "work"  # another directory, where no ./data exists, and no --data-dir from here on
    work.mkdir()
    monkeypatch.chdir(work)
    a, b = str(tmp_path / "m1" / "model.pt"), str(tmp_path / "m2" / "model.pt")
    assert eval_curve.main(["--a", a, "--b", b, "--num-points", "3", "--out", "line"]) == 0
    assert json.loads((work / "line" / "path.json").read_text())["test_loss"]
    assert train_curve.main(["--a", a, "--b", b, "--epochs", "1", "--batch-size", "32", "--out", "curve"]) == 0
    assert load_checkpoint(work / "curve" / "curve.pt")["data_dir"] == str(data.resolve())
    assert eval_curve.main(["--ckpt", "curve/curve.pt", "--num-points", "3", "--out", "ev"]) == 0


def test_data_dir_overrides_the_recorded_one(tmp_path, monkeypatch, capsys):
    data = fake_mnist(tmp_path / "mnist_files")
    monkeypatch.chdir(tmp_path)
    assert train.main(["--dataset", "mnist", "--epochs", "1", "--model-kwargs", "width=8", "--data-dir", str(data),
                       "--out", "m"]) == 0
    capsys.readouterr()
    status = eval_curve.main(["--a", "m/model.pt", "--b", "m/model.pt", "--num-points", "2",
                              "--data-dir", str(tmp_path / "empty"), "--out", "line"])
    assert status == 2 and str((tmp_path / "empty").resolve()) in capsys.readouterr().err


def test_bn_samples_covering_the_data_is_exact_and_fewer_is_an_estimate(tmp_path):
    from conftest import CKPT

    a, b = str(CKPT / "digits_cnn_a.pt"), str(CKPT / "digits_cnn_b.pt")   # a BatchNorm CNN pair
    runs = {}
    for label, extra in (("all", []), ("covering", ["--bn-samples", "100000"]), ("few", ["--bn-samples", "64"])):
        out = tmp_path / label
        assert eval_curve.main(["--a", a, "--b", b, "--num-points", "3", "--out", str(out), "--no-progress",
                                *extra]) == 0
        runs[label] = json.loads((out / "path.json").read_text())
    assert runs["covering"]["test_loss"] == runs["all"]["test_loss"]        # every sample: the same numbers
    mid_all, mid_few = runs["all"]["test_loss"][1], runs["few"]["test_loss"][1]
    assert mid_few != mid_all and abs(mid_few - mid_all) < 0.5 * mid_all    # an estimate, not a different path
    assert runs["few"]["test_loss"][0] == pytest.approx(runs["all"]["test_loss"][0], rel=0.2)
