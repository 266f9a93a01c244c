"""What users see when a command fails: one line on stderr, a documented exit status, no traceback,
no half-written file, and whatever was finished kept (modeconn.cli.errors)."""
import errno
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import modeconn as mc
from modeconn import eval_curve, fge, train, train_curve
from modeconn.cli import main as console
from modeconn.cli.errors import run_command
from modeconn.cli.rundir import TrainingRun

from conftest import CKPT, ROOT

A, B = str(CKPT / "digits_mlp_a.pt"), str(CKPT / "digits_mlp_b.pt")
TINY = ["--model-kwargs", "width=16", "--no-progress"]


def one_line(err: str) -> str:
    """The single line a failed command printed on stderr."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def files_in(folder) -> list:
    """Every file and folder below ``folder`` (temporary files included), relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------- file system
COMMANDS = {
    "train": lambda out: ["--epochs", "1", "--out", str(out)] + TINY,
    "train_curve": lambda out: ["--a", A, "--b", B, "--epochs", "1", "--out", str(out), "--no-progress"],
    "eval_curve": lambda out: ["--a", A, "--b", B, "--num-points", "2", "--out", str(out), "--no-progress"],
    "align": lambda out: ["--a", A, "--b", B, "--num-points", "2", "--out", str(out / "b.pt"), "--no-progress"],
    "fge": lambda out: ["--ckpt", A, "--cycles", "1", "--out", str(out), "--no-progress"],
    "plane": lambda out: ["--ckpt", A, "--grid", "2", "--out", str(out), "--no-progress"],
    "landscape": lambda out: ["--ckpt", A, "--steps", "2", "--out", str(out), "--no-progress"],
    "demo": lambda out: ["--pairs", "mlp", "--epochs", "1", "--out", str(out), "--no-progress"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_an_output_path_under_a_regular_file_is_one_line_and_exit_1(name, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    out = blocker / "run"
    command = importlib.import_module(f"modeconn.{name}")
    assert command.main(COMMANDS[name](out)) == 1
    line = one_line(capsys.readouterr().err)
    assert line == f"error: cannot create directory {out}: {blocker} is a file, not a directory"
    assert files_in(tmp_path) == ["notes.txt"] and blocker.read_text() == "keep me"


@pytest.mark.parametrize("command", [train, eval_curve])
def test_an_existing_file_where_the_output_directory_must_go(command, tmp_path, capsys):
    out = tmp_path / "result"
    out.write_text("an earlier file")
    argv = COMMANDS[command.__name__.split(".")[-1]](out)
    assert command.main(argv) == 1
    line = one_line(capsys.readouterr().err)
    assert line == f"error: cannot create directory {out}: {out} is a file, not a directory"
    assert out.read_text() == "an earlier file"


def test_disk_full_while_writing_the_model_leaves_no_partial_file_and_resume_finishes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = torch.save

    def full_disk_for_the_model(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("kind") == "model":  # resume.pt fits, model.pt does not
            f.write(b"PK\x03\x04 the first bytes of a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_for_the_model)
    assert train.main(["--epochs", "2", "--out", str(out)] + TINY) == 1
    line = one_line(capsys.readouterr().err)
    assert line == f"error: cannot write {out / 'model.pt'}: No space left on device"
    assert files_in(out) == ["history.json", "resume.pt"]  # no model.pt, no temporary file
    assert mc.load_checkpoint(out / "resume.pt", kind="training_state")["epoch"] == 1

    monkeypatch.setattr(torch, "save", real_save)  # space freed: --resume writes what was missing
    assert train.main(["--epochs", "2", "--out", str(out), "--resume"] + TINY) == 0
    _, meta = mc.load_model(out / "model.pt")
    assert [r["epoch"] for r in meta["history"]] == [1, 2]


def test_disk_full_while_writing_json_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    assert eval_curve.main(COMMANDS["eval_curve"](out)) == 1
    assert one_line(capsys.readouterr().err) == f"error: cannot write {out / 'path.json'}: No space left on device"
    assert files_in(out) == []


def test_permission_denied_names_the_file_not_a_temporary_one(tmp_path, monkeypatch, capsys):
    out = tmp_path / "aligned" / "b.pt"

    def denied(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, ".b.pt.x1y2.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    assert importlib.import_module("modeconn.align").main(COMMANDS["align"](out.parent)) == 1
    assert one_line(capsys.readouterr().err) == f"error: cannot write {out}: Permission denied"
    assert files_in(out.parent) == []


def _tmpfs_available() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _tmpfs_available(), reason="needs `unshare -rm` and mount rights for a private tmpfs")
def test_a_really_full_disk_is_one_line(tmp_path):
    # a 64 kB tmpfs in a private mount namespace: the first resume.pt of the default MLP does not fit
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=64k tmpfs {mnt} && {sys.executable} -m modeconn.train --epochs 1 "
              f"--out {mnt / 'run'} --no-progress; echo \"status=$?\"; ls -A {mnt / 'run'}")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one_line(r.stderr) == f"error: cannot write {mnt / 'run' / 'resume.pt'}: No space left on device"
    assert r.stdout.split() == ["status=1"]  # exit status 1 and an empty run directory


# ---------------------------------------------------------------- NaN checkpoints
def test_a_nan_endpoint_is_refused_at_once_with_the_tensor_name(tmp_path, capsys):
    meta = torch.load(A, weights_only=True)
    weight = meta["state_dict"]["layers.0.weight"]
    weight.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    bad = tmp_path / "diverged.pt"
    torch.save(meta, bad)
    out = tmp_path / "curve"
    assert train_curve.main(["--a", str(bad), "--b", B, "--epochs", "1", "--out", str(out),
                             "--no-progress"]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"error: {bad}: tensor 'layers.0.weight' has 3 NaN/Inf values (of {weight.numel()}); "
        "refusing a diverged or damaged checkpoint")
    assert not out.exists()


def test_a_nan_training_state_is_refused_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--epochs", "1", "--out", str(out)] + TINY) == 0
    state = torch.load(out / "resume.pt", weights_only=True)
    state["model"]["layers.2.bias"][0] = float("nan")
    torch.save(state, out / "resume.pt")
    capsys.readouterr()
    assert train.main(["--epochs", "1", "--out", str(out), "--resume"] + TINY) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"error: {out / 'resume.pt'}: tensor 'model.layers.2.bias' has 1 NaN/Inf value ")


# ---------------------------------------------------------------- divergence
def test_divergence_in_the_first_epoch_is_one_line_and_saves_nothing(tmp_path, capsys):
    out = tmp_path / "curve"
    assert train_curve.main(["--a", A, "--b", B, "--lr", "1000", "--epochs", "3", "--out", str(out),
                             "--no-progress"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: training diverged") and line.endswith("nothing was saved")
    # where: the first step whose loss is not finite, at the learning rate of that step (the schedule's first)
    step = int(line.split(" at step ")[1].split()[0])
    assert 1 <= step <= 23 and "of epoch 1 (learning rate 1e+03)" in line and "lower the learning rate" in line
    assert files_in(out) == []


def test_divergence_later_keeps_the_state_of_the_last_finished_epoch(tmp_path, monkeypatch, capsys):
    from modeconn.training import loop

    real_run_epoch = loop.run_epoch

    def diverging_in_epoch_2(*args, **kwargs):
        record = real_run_epoch(*args, **kwargs)
        if record["epoch"] == 2:  # as if the loss had blown up during the second epoch
            record["loss"] = float("nan")
        return record

    monkeypatch.setattr(loop, "run_epoch", diverging_in_epoch_2)
    out = tmp_path / "run"
    assert train.main(["--epochs", "3", "--out", str(out)] + TINY) == 2
    line = one_line(capsys.readouterr().err)
    assert "epoch 2" in line and line.endswith(f"the state after epoch 1 is kept in {out / 'resume.pt'}, "
                                               "pass --force to start over")
    assert mc.load_checkpoint(out / "resume.pt", kind="training_state")["epoch"] == 0  # finite, loadable
    assert len(json.loads((out / "history.json").read_text())) == 1
    assert not (out / "model.pt").exists()


# ---------------------------------------------------------------- signals
def test_sigterm_keeps_the_last_epoch_and_resume_ends_where_an_uninterrupted_run_does(tmp_path):
    cmd = [sys.executable, "-m", "modeconn.train", "--epochs", "20", "--seed", "1"] + TINY
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    part = tmp_path / "part"
    proc = subprocess.Popen(cmd + ["--out", str(part)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    deadline = time.monotonic() + 600  # a guard against hanging, not a timing assertion
    while not (part / "resume.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err
    state = mc.load_checkpoint(part / "resume.pt", kind="training_state")
    done = int(state["epoch"]) + 1
    assert 1 <= done < 20 and not (part / "model.pt").exists()
    assert one_line(err) == (f"interrupted (SIGTERM); the state after epoch {done} is in {part / 'resume.pt'}; "
                             "rerun with --resume to continue")

    for out, extra in ((part, ["--resume"]), (tmp_path / "whole", [])):
        r = subprocess.run(cmd + ["--out", str(out)] + extra, capture_output=True, text=True, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    resumed, meta = mc.load_model(part / "model.pt")
    whole, _ = mc.load_model(tmp_path / "whole" / "model.pt")
    for (name, a), (_, b) in zip(resumed.state_dict().items(), whole.state_dict().items()):
        assert torch.equal(a, b), name
    assert [r["epoch"] for r in meta["history"]] == list(range(1, 21))


TRAINING = {
    "train_curve": (train_curve, ["--a", A, "--b", B, "--epochs", "2", "--no-progress"], "curve.pt"),
    "fge": (fge, ["--ckpt", A, "--cycles", "2", "--cycle-epochs", "1", "--no-progress"], "fge.json"),
}


@pytest.mark.parametrize("name", list(TRAINING))
def test_sigterm_in_every_training_command_exits_143_and_resume_continues(name, tmp_path, monkeypatch, capsys):
    command, argv, final = TRAINING[name]
    out = tmp_path / name
    real_saver = TrainingRun.epoch_saver

    def saver_then_sigterm(self, bar=None):
        save = real_saver(self, bar)

        def on_epoch_end(record, state):
            save(record, state)
            if record["epoch"] == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # what SLURM sends before it kills the job

        return on_epoch_end

    monkeypatch.setattr(TrainingRun, "epoch_saver", saver_then_sigterm)
    assert command.main(argv + ["--out", str(out)]) == 143
    assert one_line(capsys.readouterr().err) == (f"interrupted (SIGTERM); the state after epoch 1 is in "
                                                 f"{out / 'resume.pt'}; rerun with --resume to continue")
    assert mc.load_checkpoint(out / "resume.pt", kind="training_state")["epoch"] == 0
    assert not (out / final).exists()
    monkeypatch.setattr(TrainingRun, "epoch_saver", real_saver)
    assert command.main(argv + ["--out", str(out), "--resume"]) == 0
    assert (out / final).exists()


def test_run_command_handles_sigterm_only_while_the_command_runs(capsys):
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        def body(argv):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(6000):  # the handler runs at the next bytecode; sleep is interrupted by it
                time.sleep(0.01)
            return 0

        assert run_command(body) == 143
        assert one_line(capsys.readouterr().err) == "interrupted (SIGTERM)"
        os.kill(os.getpid(), signal.SIGTERM)  # the caller's handler is back
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------- usage
def test_usage_errors_are_one_line_exit_2(capsys):
    assert train.main(["--lr", "fast"]) == 2
    assert one_line(capsys.readouterr().err).startswith("error: argument --lr: invalid float value: 'fast'")
    assert train_curve.main(["--b", B]) == 2
    assert "--a" in one_line(capsys.readouterr().err)
    # a leading "--" (torchrun ... -m modeconn.X -- ARGS) is accepted: the arguments after it are parsed
    assert eval_curve.main(["--", "--a", A, "--b", B, "--num-points", "1"]) == 2
    assert "argument --num-points: need at least 2, got 1" in one_line(capsys.readouterr().err)
    assert console(["trian"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "'trian'" in line and "train_curve" in line


def test_help_documents_the_exit_statuses():
    r = subprocess.run([sys.executable, "-m", "modeconn.train", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "exit status: 0 done 1 the run failed" in text and "2 bad arguments or input" in text
    assert "130 interrupted by Ctrl-C, 143 by SIGTERM" in text


def test_a_signal_during_a_state_write_is_delivered_after_it():
    # the race of the SIGTERM test: a signal between resume.pt's rename and the epoch count's update would
    # report the epoch before; held, it is raised only once the file and the count agree
    from modeconn.cli.errors import Interrupted, signals_held, sigterm_interrupts

    steps = []
    with pytest.raises(Interrupted) as stopped:
        with sigterm_interrupts():
            with signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)           # the handler would have run by now if it were not held
                steps.append("written")
            steps.append("after")          # not reached: delivered on leaving the block
    assert steps == ["written"] and stopped.value.signum == signal.SIGTERM
    # Python's own Ctrl-C handler, also where the suite runs as a background job (a shell starts those
    # with SIGINT ignored, and Python then leaves it ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                steps.append("written again")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert steps == ["written", "written again"]
