"""Neuron alignment on the shipped digits pairs, the align command, and train_curve --align."""
import contextlib
import importlib
import io
import json

import pytest
import torch

import modeconn as mc
from modeconn import train_curve
from modeconn.alignment import align_models

from conftest import CKPT

align_cmd = importlib.import_module("modeconn.align")  # the command module (modeconn.align is also a function)

MLP_A, MLP_B = CKPT / "digits_mlp_a.pt", CKPT / "digits_mlp_b.pt"
CNN_A, CNN_B = CKPT / "digits_cnn_a.pt", CKPT / "digits_cnn_b.pt"
POINTS = 11


pytestmark = pytest.mark.usefixtures("one_thread")


def _line(a, b, digits):
    return mc.evaluate_path(mc.linear_path(a, b), digits.eval_loader("train"), digits.eval_loader("test"),
                            num_points=POINTS)


def _params_equal(m1, m2):
    return all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values()))


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    """The align command run once on each shipped pair: {pair: (out.pt, out.json, stdout)}."""
    out = tmp_path_factory.mktemp("align")
    runs = {}
    for pair, (a, b, method) in {"mlp": (MLP_A, MLP_B, "weight"), "cnn": (CNN_A, CNN_B, "activation")}.items():
        ckpt = out / f"{pair}_b_aligned.pt"
        argv = ["--a", str(a), "--b", str(b), "--method", method, "--out", str(ckpt),
                "--num-points", str(POINTS), "--no-progress", "--device", "cpu"]
        if pair == "mlp":
            argv.append("--report")
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = align_cmd.main(argv)
        assert code == 0, stderr.getvalue()
        runs[pair] = (ckpt, ckpt.with_suffix(".json"), stdout.getvalue())
    return runs


# ------------------------------------------------------------------------------ library level
def test_weight_matching_halves_the_mlp_straight_line_barrier(mlp_pair, digits):
    a, b = mlp_pair
    aligned, perm, report = align_models(a, b, method="weight", loader=digits.eval_loader("train"), seed=0)
    before = _line(a, b, digits).barrier("test_loss")
    after = _line(a, aligned, digits).barrier("test_loss")
    assert before > 0.1, before                      # the unaligned pair does have a barrier
    assert after <= 0.5 * before, (before, after)
    assert report.mean_after > report.mean_before
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perm.values())


# ------------------------------------------------------------------------------ the command
@pytest.mark.parametrize("pair", ["mlp", "cnn"])
def test_aligned_checkpoint_computes_the_same_function_as_b(pair, commands, digits):
    ckpt, _, _ = commands[pair]
    aligned, meta = mc.load_model(ckpt)                  # weights_only=True underneath
    b, _ = mc.load_model(CNN_B if pair == "cnn" else MLP_B)
    assert not _params_equal(aligned, b)                 # the units did move ...
    x = digits.x_test
    with torch.no_grad():
        out_b, out_aligned = b.eval()(x), aligned.eval()(x)
    torch.testing.assert_close(out_aligned, out_b, rtol=1e-4, atol=1e-4)  # ... but the function did not
    assert (out_aligned.argmax(1) == out_b.argmax(1)).all()


@pytest.mark.parametrize("pair", ["mlp", "cnn"])
def test_align_command_end_to_end(pair, commands, digits):
    ckpt, js, stdout = commands[pair]
    a_path, b_path = (CNN_A, CNN_B) if pair == "cnn" else (MLP_A, MLP_B)
    method = "activation" if pair == "cnn" else "weight"
    assert ckpt.exists() and js.exists() and ckpt.with_suffix(".png").stat().st_size > 1000
    data = json.loads(js.read_text())
    aligned, meta = mc.load_model(ckpt)
    _, meta_b = mc.load_model(b_path)
    # B's metadata, plus what was done
    for key in ("arch", "arch_kwargs", "input_shape", "num_classes", "dataset", "seed", "metrics", "history"):
        assert meta[key] == meta_b[key], key
    al = meta["alignment"]
    assert al["method"] == method and al["reference"] == str(a_path) and al["source"] == str(b_path)
    assert set(al["report"]["groups"]) == set(data["report"]["groups"]) and al["report"]["groups"]
    assert al["report"]["mean_after"] > al["report"]["mean_before"]
    # the JSON's barriers are the ones of an independent evaluation of both straight lines
    a, _ = mc.load_model(a_path)
    b, _ = mc.load_model(b_path)
    before, after = _line(a, b, digits), _line(a, aligned, digits)
    for metric in ("test_loss", "test_error"):
        assert data["barriers"]["before"][metric] == pytest.approx(before.barrier(metric), rel=1e-5, abs=1e-7)
        assert data["barriers"]["after"][metric] == pytest.approx(after.barrier(metric), rel=1e-5, abs=1e-7)
    assert data["barriers"]["before"]["test_loss"] > data["barriers"]["after"]["test_loss"]
    assert len(data["paths"]["before"]["ts"]) == POINTS
    # printed: the mean before/after always, the per-group table with --report, both barriers
    assert f"mean {data['report']['metric']}" in stdout and "test loss barrier" in stdout
    assert "test error barrier" in stdout
    first_group = next(iter(data["report"]["groups"]))
    assert (first_group in stdout) == (pair == "mlp")


def test_num_points_0_skips_the_report_and_aligns_the_same(commands, tmp_path, capsys):
    out = tmp_path / "b.pt"
    assert align_cmd.main(["--a", str(MLP_A), "--b", str(MLP_B), "--num-points", "0", "--out", str(out),
                           "--no-progress", "--device", "cpu"]) == 0
    assert "skipped" in capsys.readouterr().out and not out.with_suffix(".png").exists()
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["barriers"] is None and data["paths"] == {} and data["num_points"] == 0
    full, _ = mc.load_model(commands["mlp"][0])          # the same weight matching with the report
    assert _params_equal(mc.load_model(out)[0], full)


def test_eval_samples_evaluates_a_seeded_random_subset(tmp_path, digits):
    out = tmp_path / "b.pt"
    assert align_cmd.main(["--a", str(MLP_A), "--b", str(MLP_B), "--num-points", "3", "--eval-samples", "100",
                           "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    keep_tr = torch.randperm(len(digits.y_train), generator=torch.Generator().manual_seed(0))[:100]
    keep_te = torch.randperm(len(digits.y_test), generator=torch.Generator().manual_seed(0))[:100]
    train = mc.TensorLoader(digits.x_train[keep_tr], digits.y_train[keep_tr], 1024)
    test = mc.TensorLoader(digits.x_test[keep_te], digits.y_test[keep_te], 1024)
    a, _ = mc.load_model(MLP_A)
    aligned, _ = mc.load_model(out)
    line = mc.evaluate_path(mc.linear_path(a, aligned), train, test, num_points=3)
    assert data["eval_samples"] == 100
    assert data["paths"]["after"]["test_loss"] == pytest.approx(list(line.test_loss), rel=1e-5)
    assert data["paths"]["after"]["train_acc"] == pytest.approx(list(line.train_acc), rel=1e-6)


def test_align_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        align_cmd.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and "python -m modeconn.align --a" in out


@pytest.mark.parametrize("argv, words", [
    (["--a", str(MLP_A), "--b", str(CNN_B)], ["different architectures", "'mlp'", "'convnet'"]),
    (["--a", str(MLP_A), "--b", "nowhere.pt"], ["nowhere.pt", "no such checkpoint"]),
    (["--a", str(MLP_A), "--b", str(MLP_B), "--num-points", "1"], ["--num-points", "0 or at least 2"]),
    (["--a", str(MLP_A), "--b", str(MLP_B), "--eval-samples", "0"], ["--eval-samples"]),
    (["--a", str(MLP_A), "--b", str(MLP_B), "--method", "activation", "--init", "sorted"],
     ["init='sorted'", "options of weight matching", "method='activation'"]),
    (["--a", str(MLP_A), "--b", str(MLP_B), "--method", "activation", "--restarts", "3"],
     ["restarts=3", "options of weight matching"]),
])
def test_align_command_bad_input_is_one_line_exit_2(argv, words, tmp_path, capsys):
    out = tmp_path / "x.pt"
    assert align_cmd.main(argv + ["--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_library_align_is_still_callable_after_importing_the_command(mlp_pair, digits):
    # importing the submodule rebinds the package attribute modeconn.align to the module
    assert isinstance(importlib.import_module("modeconn.align"), type(mc))
    aligned, _, report = mc.align_models(*mlp_pair, example_input=digits.x_test[:1])
    assert report.method == "weight" and isinstance(aligned, torch.nn.Module)


# ------------------------------------------------------------------------- train_curve --align
def test_train_curve_align_records_and_uses_the_aligned_end(tmp_path, digits, capsys):
    out = tmp_path / "curve"
    assert train_curve.main(["--a", str(CNN_A), "--b", str(CNN_B), "--align", "weight", "--epochs", "1",
                             "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    assert "aligned --b to --a by weight matching" in capsys.readouterr().out
    curve, meta = mc.load_curve(out / "curve.pt")      # weights_only=True: the record is plain data
    al = meta["alignment"]
    assert al["method"] == "weight" and al["aligned"] == "end" and al["reference"] == str(CNN_A)
    assert al["report"]["method"] == "weight" and al["report"]["mean_after"] > al["report"]["mean_before"]
    assert meta["config"]["align"] == "weight"

    a, _ = mc.load_model(CNN_A)
    b, _ = mc.load_model(CNN_B)
    aligned, _, _ = align_models(a, b, method="weight", loader=digits.eval_loader("train"), seed=0)
    end = {n: v[-1] for n, v in curve.bends_by_name().items()}
    params = dict(aligned.named_parameters())
    assert set(end) == set(params)
    assert all(torch.equal(end[n], params[n]) for n in params)               # the end bend is the aligned B
    assert not all(torch.equal(end[n], p) for n, p in b.named_parameters())  # not B itself
    buffers = dict(aligned.named_buffers())
    for n, v in curve.endpoint_buffers(1).items():                           # BN statistics moved with it
        assert torch.equal(v, buffers[n]), n


def test_sorted_start_is_weight_matching_from_the_signature_permutation(tmp_path, mlp_pair):
    """--init sorted: the aligned checkpoint is B under weight matching started from the sorted-weights match."""
    from modeconn.alignment import infer_permutation_spec, weight_matching
    out = tmp_path / "b.pt"
    assert align_cmd.main(["--a", str(MLP_A), "--b", str(MLP_B), "--init", "sorted", "--num-points", "0",
                           "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    a, b = mlp_pair
    spec = infer_permutation_spec(a, torch.randn(1, 64))
    perm, info = weight_matching(a, b, spec, init="sorted")
    expected = mc.apply_permutation(b, spec, perm)
    assert _params_equal(mc.load_model(out)[0], expected)
    assert json.loads(out.with_suffix(".json").read_text())["report"]["info"]["objectives"][-1] == \
        pytest.approx(info.objectives[-1], rel=1e-9)
