"""Your own model on the command line: a file or module spec, or torchvision's, rebuilt downstream from
the checkpoint alone (no model flags after train)."""
import importlib
import sys

import pytest
import torch

import modeconn as mc
from modeconn import eval_curve, train, train_curve
from modeconn.runtime.checkpoints import load_checkpoint

align_cmd = importlib.import_module("modeconn.align")

NET = '''
import torch
from torch import nn

def build(input_shape, num_classes, width=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, num_classes))
'''
FAST = ["--epochs", "1", "--batch-size", "64", "--no-progress"]


def _chain(tmp_path, monkeypatch, spec, kwargs=()):
    """train twice with ``spec``; then, from another directory, train_curve, eval_curve and align."""
    for seed in (1, 2):
        argv = [*FAST, "--model", spec, "--seed", str(seed), "--out", str(tmp_path / f"m{seed}")]
        assert train.main(argv + (["--model-kwargs", *kwargs] if kwargs else [])) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    a, b = str(tmp_path / "m1" / "model.pt"), str(tmp_path / "m2" / "model.pt")
    assert train_curve.main(["--a", a, "--b", b, *FAST, "--out", "curve"]) == 0
    assert eval_curve.main(["--ckpt", "curve/curve.pt", "--num-points", "3", "--out", "ev"]) == 0
    assert align_cmd.main(["--a", a, "--b", b, "--num-points", "0", "--out", "b_aligned.pt", "--no-progress"]) == 0
    return a, b, elsewhere


def _same_function(path_a, path_b):
    """The two checkpoints' models give the same outputs on digits."""
    (ma, _), (mb, _) = mc.load_model(path_a), mc.load_model(path_b)
    x = mc.get_dataset("digits").x_test[:64]
    with torch.no_grad():
        torch.testing.assert_close(ma.eval()(x), mb.eval()(x), rtol=1e-4, atol=1e-5)


def test_a_model_from_a_file_runs_through_every_command(tmp_path, monkeypatch):
    (tmp_path / "mynet.py").write_text(NET)
    monkeypatch.chdir(tmp_path)
    a, b, where = _chain(tmp_path, monkeypatch, "mynet.py:build", ["width=12"])
    meta = load_checkpoint(a, kind="model")
    assert meta["arch"] == f"{tmp_path / 'mynet.py'}:build" and meta["arch_kwargs"] == {"width": 12}
    assert meta["state_dict"]["1.weight"].shape == (12, 64)       # the file's architecture, with the kwargs
    _same_function(b, where / "b_aligned.pt")                       # aligned: permuted, the same function


def test_a_model_from_an_importable_module(tmp_path, monkeypatch):
    (tmp_path / "usernets").mkdir()
    (tmp_path / "usernets" / "__init__.py").write_text("")
    (tmp_path / "usernets" / "small.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    net = mc.create_model("usernets.small:build", (1, 8, 8), 10, width=5)
    assert net[1].out_features == 5 and net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_torchvision_resnet18_on_gray_digits(tmp_path, monkeypatch):
    net = mc.create_model("torchvision:resnet18", (1, 8, 8), 10)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():   # the gray image is the same image on all three channels
        torch.testing.assert_close(net.eval()(x), net.net(x.repeat(1, 3, 1, 1)))
    a, b, where = _chain(tmp_path, monkeypatch, "torchvision:resnet18")
    assert load_checkpoint(a, kind="model")["arch"] == "torchvision:resnet18"
    _same_function(b, where / "b_aligned.pt")


@pytest.mark.parametrize("spec, words", [
    ("nowhere.py:build", ["nowhere.py", "no such file"]),
    ("mynet.py:missing", ["mynet.py:missing", "no callable 'missing'"]),
    ("no_such_package_x.mod:build", ["no_such_package_x.mod:build", "cannot import"]),
    ("torchvision:not_a_net", ["torchvision:not_a_net", "no model"]),
    ("timm:resnet18", ["timm", "not installed"]),
    ("broken.py:build", ["broken.py", "ZeroDivisionError"]),
])
def test_a_bad_model_spec_is_one_line_exit_2(spec, words, tmp_path, monkeypatch, capsys):
    (tmp_path / "mynet.py").write_text(NET)
    (tmp_path / "broken.py").write_text("1 / 0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "timm", None)  # as on a machine without the optional timm
    assert train.main([*FAST, "--model", spec, "--out", "m"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "m" / "model.pt").exists()


def test_a_model_file_is_loaded_once_and_sys_modules_is_left_alone(tmp_path):
    from modeconn.runtime.user_code import load_attribute

    (tmp_path / "counted.py").write_text("CALLS = []\nCALLS.append(1)\n\ndef build(input_shape, num_classes):\n"
                                         "    return __import__('torch').nn.Linear(64, num_classes)\n")
    before = set(sys.modules)
    first = load_attribute(f"{tmp_path / 'counted.py'}:build", "model")
    second = load_attribute(f"{tmp_path / 'counted.py'}:build", "model")
    assert first is second and first.__globals__["CALLS"] == [1]   # executed once, then reused
    assert set(sys.modules) == before
