"""Your own data on the command line: factory specs (in memory or streamed), image folders, and the
StreamLoader that visits them batch for batch like the TensorLoader."""
import pytest
import torch
from torch.utils.data import TensorDataset

import modeconn as mc
from modeconn import eval_curve, train
from modeconn.data.stream import SeededTransforms, StreamLoader
from modeconn.runtime.checkpoints import load_checkpoint

FACTORIES = '''
import torch
from torch.utils.data import TensorDataset
from sklearn.datasets import load_digits

def _digits():
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y = torch.tensor(d.target)
    return x[:1200], y[:1200], x[1200:], y[1200:]

def in_memory(seed=0):
    return _digits()

def streamed():
    xtr, ytr, xte, yte = _digits()
    return TensorDataset(xtr, ytr), TensorDataset(xte, yte)
'''
FAST = ["--epochs", "3", "--lr", "0.2", "--batch-size", "64", "--no-progress", "--model-kwargs", "width=32"]


@pytest.mark.parametrize("n, batch, shuffle, drop_last, world", [
    (10, 4, False, False, 1), (37, 5, True, False, 1), (37, 5, True, True, 1), (38, 4, True, False, 2),
    (41, 3, True, True, 2), (16, 16, True, False, 1)])
def test_stream_loader_visits_the_tensor_loader_batches(n, batch, shuffle, drop_last, world):
    x, y = torch.randn(n, 3), torch.arange(n)
    for rank in range(world):
        kw = dict(shuffle=shuffle, seed=5, drop_last=drop_last, rank=rank, world_size=world)
        s, t = StreamLoader(TensorDataset(x, y), batch, **kw), mc.TensorLoader(x, y, batch, **kw)
        for epoch in (0, 3):
            s.set_epoch(epoch)
            t.set_epoch(epoch)
            got, want = list(s), list(t)
            assert len(got) == len(want) == len(s) == len(t) and s.num_samples == t.num_samples
            for (xs, ys), (xt, yt) in zip(got, want):
                assert torch.equal(ys, yt) and torch.equal(xs, xt)


class _Noisy(torch.utils.data.Dataset):
    """Sample i is i plus noise from the global RNG: a stand-in for a random crop."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return torch.tensor([float(i)]) + torch.rand(1), i


def test_random_transforms_depend_on_seed_epoch_and_sample_only():
    def batches(workers, epoch, seed=1):
        loader = StreamLoader(SeededTransforms(_Noisy(), seed), 4, shuffle=True, seed=seed, num_workers=workers)
        loader.set_epoch(epoch)
        return torch.cat([xb for xb, _ in loader])

    state = torch.get_rng_state()
    first = batches(0, epoch=0)
    assert torch.equal(torch.get_rng_state(), state)          # the caller's RNG is left alone
    assert torch.equal(first, batches(0, epoch=0)) and torch.equal(first, batches(2, epoch=0))  # workers or not
    assert not torch.equal(first, batches(0, epoch=1)) and not torch.equal(first, batches(0, epoch=0, seed=2))


def test_streamed_and_in_memory_factories_train_the_same_model(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    assert train.main([*FAST, "--dataset", "mydata.py:in_memory", "--out", "mem"]) == 0
    assert train.main([*FAST, "--dataset", "mydata.py:streamed", "--out", "stream"]) == 0
    mem, stream = (load_checkpoint(tmp_path / d / "model.pt", kind="model") for d in ("mem", "stream"))
    assert mem["dataset"] == f"{tmp_path / 'mydata.py'}:in_memory" and mem["num_classes"] == 10
    for k, v in mem["state_dict"].items():       # the same batches in the same order: the same weights
        torch.testing.assert_close(stream["state_dict"][k], v, rtol=1e-5, atol=1e-6)
    assert mem["metrics"]["test_acc"] > 0.6
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)   # downstream, from another directory, with no --dataset
    a, b = str(tmp_path / "stream" / "model.pt"), str(tmp_path / "mem" / "model.pt")
    assert eval_curve.main(["--a", a, "--b", b, "--num-points", "3", "--out", "line", "--no-progress"]) == 0


def write_image_folder(root, per_class: int = 12, size: int = 20):
    """A few dozen PNGs: class 'bright' and class 'dark', in train/ and val/."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", per_class // 2)):
        for label, level in (("bright", 200), ("dark", 40)):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(level + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_an_image_folder_trains_and_evaluates(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", f"imagefolder:{root}", "--image-size", "16", "--model", "convnet", "--epochs", "3",
            "--batch-size", "8", "--lr", "0.02", "--no-progress"]
    assert train.main([*argv, "--seed", "1", "--out", "a"]) == 0
    meta = load_checkpoint(tmp_path / "a" / "model.pt", kind="model")
    assert meta["dataset"] == f"imagefolder:{root}" and meta["dataset_kwargs"] == {"image_size": 16}
    assert meta["input_shape"] == [3, 16, 16] and meta["num_classes"] == 2
    assert meta["metrics"]["test_acc"] == 1.0       # bright vs dark: trivially separable
    ds = mc.get_dataset(f"imagefolder:{root}", image_size=16)
    assert ds.info["classes"] == ["bright", "dark"] and len(ds.test_set) == 12
    assert eval_curve.main(["--a", "a/model.pt", "--b", "a/model.pt", "--num-points", "2", "--out", "e",
                            "--no-progress"]) == 0


@pytest.mark.parametrize("spec, words", [
    ("imagefolder:/no/such/dir", ["/no/such/dir/train", "train/ and val/"]),
    ("mydata.py:nothing", ["mydata.py:nothing", "no callable"]),
    ("mydata.py:wrong", ["mydata.py:wrong", "expected (x_train, y_train, x_test, y_test)"]),
    ("mnist_typo", ["unknown dataset", "imagefolder:PATH"]),
])
def test_a_bad_dataset_spec_is_one_line_exit_2(spec, words, tmp_path, monkeypatch, capsys):
    (tmp_path / "mydata.py").write_text(FACTORIES + "\ndef wrong():\n    return 3\n")
    monkeypatch.chdir(tmp_path)
    assert train.main([*FAST, "--dataset", spec, "--out", "m"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err
