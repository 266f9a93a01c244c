"""Endpoints given as plain state dicts (.safetensors or .pt, e.g. written by another tool): the command is
told the model and the data, and then works as with modeconn checkpoints."""
import importlib
import json

import torch
from safetensors.torch import save_file

import modeconn as mc
from modeconn import eval_curve, train_curve

from conftest import CKPT

align_cmd = importlib.import_module("modeconn.align")
MLP_A, MLP_B = CKPT / "digits_mlp_a.pt", CKPT / "digits_mlp_b.pt"


def _plain(tmp_path):
    """The shipped MLP pair re-written as a plain .safetensors and a plain .pt state dict."""
    (a, _), (b, _) = mc.load_model(MLP_A), mc.load_model(MLP_B)
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(tmp_path / "a.safetensors"))
    torch.save(b.state_dict(), tmp_path / "b.pt")
    return str(tmp_path / "a.safetensors"), str(tmp_path / "b.pt")


def test_plain_state_dicts_give_the_numbers_of_the_checkpoints(tmp_path):
    a, b = _plain(tmp_path)
    described = ["--model", "mlp", "--dataset", "digits"]
    for name, ends in (("plain", [a, b]), ("ckpt", [str(MLP_A), str(MLP_B)])):
        argv = ["--a", ends[0], "--b", ends[1], "--num-points", "3", "--out", str(tmp_path / name), "--no-progress"]
        assert eval_curve.main(argv + (described if name == "plain" else [])) == 0
    plain, ckpt = (json.loads((tmp_path / n / "path.json").read_text()) for n in ("plain", "ckpt"))
    assert plain["test_loss"] == ckpt["test_loss"] and plain["train_acc"] == ckpt["train_acc"]
    assert align_cmd.main(["--a", a, "--b", b, *described, "--num-points", "0", "--out",
                           str(tmp_path / "b_aligned.pt"), "--no-progress"]) == 0
    aligned, meta = mc.load_model(tmp_path / "b_aligned.pt")   # a self-describing checkpoint comes out
    assert meta["arch"] == "mlp" and meta["dataset"] == "digits"
    assert train_curve.main(["--a", a, "--b", b, *described, "--epochs", "1", "--out", str(tmp_path / "curve"),
                             "--no-progress"]) == 0


def test_a_plain_state_dict_without_its_description_is_one_line_exit_2(tmp_path, capsys):
    a, b = _plain(tmp_path)
    assert eval_curve.main(["--a", a, "--b", b, "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "plain state dict" in err and "--model" in err and a in err
    # described, but as another architecture: the file and the mismatch are named
    assert eval_curve.main(["--a", a, "--b", b, "--model", "mlp", "--model-kwargs", "width=7", "--dataset",
                            "digits", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and a in err and "do not fit" in err
