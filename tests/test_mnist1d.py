"""MNIST-1D (generated offline, deterministic per data seed) and the cnn1d zoo model."""
import random
import socket

import numpy as np
import pytest
import torch

import modeconn as mc
from modeconn.data.mnist1d import mnist1d_arrays

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mnist1d_shapes_and_determinism_per_data_seed():
    ds = mc.get_dataset("mnist1d", num_samples=500, data_seed=3)
    assert ds.input_shape == (1, 40) and ds.num_classes == 10
    assert ds.x_train.shape == (400, 1, 40) and ds.x_test.shape == (100, 1, 40)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert set(ds.y_train.tolist()) == set(range(10))
    mnist1d_arrays.cache_clear()  # regenerate, not the cached arrays
    again = mc.get_dataset("mnist1d", num_samples=500, data_seed=3, seed=7)  # the run's seed does not matter
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_test, again.y_test)
    other = mc.get_dataset("mnist1d", num_samples=500, data_seed=4)
    assert not torch.equal(ds.x_train, other.x_train)
    x, y = next(iter(ds.train_loader(32)))
    assert x.shape == (32, 1, 40) and y.shape == (32,)


def test_mnist1d_downloads_nothing_and_leaves_global_randomness_alone(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    random.seed(11)
    np.random.seed(11)
    expected_py, expected_np = random.random(), np.random.rand()
    random.seed(11)
    np.random.seed(11)
    mnist1d_arrays.cache_clear()
    xtr, ytr, xte, yte = mnist1d_arrays(5, 100)
    assert xtr.shape == (80, 40) and xte.shape == (20, 40)
    assert random.random() == expected_py and np.random.rand() == expected_np
    with pytest.raises(ValueError, match="num_samples"):
        mnist1d_arrays(5, 3)


def test_cnn1d_traces_aligns_and_permutes_without_changing_its_function():
    torch.manual_seed(0)
    model = mc.create_model("cnn1d", (1, 40), 10, width=6, bn=True).eval()
    torch.fx.symbolic_trace(model)
    x = torch.randn(5, 1, 40)
    spec = mc.infer_permutation_spec(model, x[:1])
    assert list(spec.groups) == ["features.0", "features.3", "features.7"]
    assert [g.size for g in spec.groups.values()] == [6, 6, 12]
    permuted = mc.apply_permutation(model, spec, spec.random_permutation(seed=1))
    assert not torch.equal(permuted.features[0].weight, model.features[0].weight)
    with torch.no_grad():
        assert torch.allclose(model(x), permuted(x), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(C, L\)"):
        mc.create_model("cnn1d", (1, 8, 8), 10)


def test_train_command_on_mnist1d_with_cnn1d(tmp_path, capsys):
    from modeconn import train

    out = tmp_path / "run"
    assert train.main(["--dataset", "mnist1d", "--model", "cnn1d", "--model-kwargs", "width=4", "--epochs", "1",
                       "--batch-size", "256", "--out", str(out), "--no-progress"]) == 0
    model, meta = mc.load_model(out / "model.pt")
    assert meta["arch"] == "cnn1d" and tuple(meta["input_shape"]) == (1, 40) and meta["dataset"] == "mnist1d"
    assert 0.0 <= meta["metrics"]["test_acc"] <= 1.0
    assert "test loss" in capsys.readouterr().out
