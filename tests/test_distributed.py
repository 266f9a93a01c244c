"""Several processes under torchrun (CPU, gloo, 2 ranks started by the tests themselves).

The torchrun jobs run once per module (a fixture) and are compared with one
process run in-process: same bends, same history, same path.json; a job
whose rank 1 dies mid-epoch resumes under torchrun and ends where the
uninterrupted job does; only rank 0 writes, and only the usual files.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import modeconn as mc
from modeconn.cli.data import train_loader
from modeconn.cli.errors import CommandError
from modeconn.runtime import Runtime, distributed
from modeconn import eval_curve as eval_cmd
from modeconn import train_curve as curve_cmd
from modeconn.core.curve_model import load_curve

ROOT = Path(__file__).resolve().parent.parent
MLP_A, MLP_B = str(ROOT / "checkpoints/digits_mlp_a.pt"), str(ROOT / "checkpoints/digits_mlp_b.pt")
CNN_A, CNN_B = str(ROOT / "checkpoints/digits_cnn_a.pt"), str(ROOT / "checkpoints/digits_cnn_b.pt")
CURVE_ARGS = ["--a", MLP_A, "--b", MLP_B, "--epochs", "2", "--batch-size", "64", "--lr", "0.05",
              "--seed", "3", "--no-progress"]
LANDSCAPE_ARGS = ["--ckpt", MLP_A, "--dims", "2", "--steps", "5", "--steps-y", "3", "--points-per-pass", "2",
                  "--no-progress"]
EVAL_ARGS = ["--a", CNN_A, "--b", CNN_B, "--num-points", "7", "--points-per-pass", "2", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(module, args, cwd, fault=None, check=True):
    """``python -m torch.distributed.run --nproc_per_node 2 -m MODULE ARGS`` (no ``--``: no flag of ours is a torchrun flag prefix) with one thread per rank;
    with ``fault="N:RANK"`` through tests/fault_run.py (that rank dies abruptly after N steps)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1")
    target = ["-m", module] if fault is None else [str(ROOT / "tests" / "fault_run.py"), fault, module]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), *target, *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The torchrun jobs: curve training, its interruption and resumption, path evaluation."""
    cwd = tmp_path_factory.mktemp("torchrun")
    torchrun("modeconn.train_curve", [*CURVE_ARGS, "--out", "ddp"], cwd)
    torchrun("modeconn.eval_curve", [*EVAL_ARGS, "--out", "eval"], cwd)
    torchrun("modeconn.landscape", [*LANDSCAPE_ARGS, "--out", "landscape"], cwd)
    # rank 1 exits abruptly after 30 steps: 7 steps into epoch 2 (23 steps per epoch)
    crashed = torchrun("modeconn.train_curve", [*CURVE_ARGS, "--out", "crash"], cwd,
                       fault="30:1", check=False)
    after_crash = sorted(p.name for p in (cwd / "crash").iterdir())
    history_at_crash = json.loads((cwd / "crash" / "history.json").read_text())
    resumed = torchrun("modeconn.train_curve", [*CURVE_ARGS, "--out", "crash", "--resume"], cwd)
    return {"cwd": cwd, "crashed": crashed, "after_crash": after_crash, "history_at_crash": history_at_crash,
            "resumed": resumed}


def test_two_ranks_fit_the_curve_of_one_process_with_the_global_batch(jobs, tmp_path):
    # one process, batch 64 = the union of the two ranks' batches of 32 at every step
    assert curve_cmd.main([*CURVE_ARGS, "--out", str(tmp_path / "single")]) == 0
    single, meta1 = load_curve(tmp_path / "single" / "curve.pt")
    ddp, meta2 = load_curve(jobs["cwd"] / "ddp" / "curve.pt")
    assert meta2["run"]["processes"] == 2 and meta1["run"]["processes"] == 1
    moved = (single.bends[1] - 0.5 * (single.bends[0] + single.bends[2])).abs().max()
    assert moved > 1e-2  # the middle bend left the segment, so the agreement below is not trivial
    assert torch.allclose(ddp.bends, single.bends, atol=1e-5, rtol=0)
    assert torch.equal(ddp.bends[[0, 2]], single.bends[[0, 2]])  # fixed endpoints untouched
    # the epoch loss / accuracy are all-reduced: the history of the one process
    h1 = json.loads((tmp_path / "single" / "history.json").read_text())
    h2 = json.loads((jobs["cwd"] / "ddp" / "history.json").read_text())
    assert [r["acc"] for r in h1] == [r["acc"] for r in h2]
    assert [r["loss"] for r in h2] == pytest.approx([r["loss"] for r in h1], rel=1e-6)


def test_every_rank_draws_the_same_t_at_every_step(mlp_pair, digits):
    # t comes from the (seed, epoch) generator only: the two shards of a 2-rank run see the same t sequence
    a, b = mlp_pair
    drawn = []
    for rank in (0, 1):
        curve = mc.CurveModel(a, a, b, mc.Bezier(3))
        ts = []
        original = curve.training_weights
        curve.training_weights = lambda t, wd=0.0, _o=original, _ts=ts: (_ts.append(float(t)), _o(t, wd))[1]
        loader = digits.train_loader(32, seed=3, rank=rank, world_size=2)
        mc.fit_curve(curve, loader, epochs=2, lr=0.05, seed=3, runtime=Runtime(distributed=False))
        assert len(ts) == 2 * len(loader) == 46
        drawn.append(ts)
    assert drawn[0] == drawn[1] and len(set(drawn[0])) == len(drawn[0])


def assert_same_numbers(a, b, path="path.json"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_numbers(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_numbers(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), path
    else:
        assert a == b, path


def test_sharded_path_evaluation_equals_one_rank(jobs, tmp_path):
    # the line between the CNN endpoints: BatchNorm statistics recomputed at every point (by the rank owning it)
    assert eval_cmd.main([*EVAL_ARGS, "--out", str(tmp_path / "eval")]) == 0
    one = json.loads((tmp_path / "eval" / "path.json").read_text())
    two = json.loads((jobs["cwd"] / "eval" / "path.json").read_text())
    assert one.pop("run")["processes"] == 1 and two.pop("run")["processes"] == 2
    assert one["bn_recomputed"] is True and len(two["ts"]) == 7
    # every number, the barrier table included; equal up to float rounding (the ranks run one thread
    # each, the in-process run two, and convolution kernels sum in a thread-dependent order)
    assert_same_numbers(two, one)
    assert len((jobs["cwd"] / "eval" / "path.csv").read_text().splitlines()) == 8


def test_sharded_landscape_grid_equals_one_rank(jobs, tmp_path):
    import numpy as np

    from modeconn.landscape import main as landscape_main

    assert landscape_main([*LANDSCAPE_ARGS, "--out", str(tmp_path / "one")]) == 0
    one = np.load(tmp_path / "one" / "landscape.npz")
    two = np.load(jobs["cwd"] / "landscape" / "landscape.npz")
    for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
        assert one[key].shape == (3, 5) and np.isfinite(two[key]).all()
        assert np.allclose(two[key], one[key], rtol=1e-5, atol=1e-7), key
    assert not (jobs["cwd"] / "landscape" / "landscape.partial.npz").exists()


def test_a_job_killed_mid_epoch_resumes_under_torchrun(jobs):
    crashed = jobs["crashed"]
    assert crashed.returncode != 0 and "rank 1 exits now" in crashed.stderr
    # killed in epoch 2: the state of epoch 1 was saved, nothing else
    assert jobs["after_crash"] == ["history.json", "resume.pt"]
    assert [r["epoch"] for r in jobs["history_at_crash"]] == [1]
    resumed, _ = load_curve(jobs["cwd"] / "crash" / "curve.pt")
    uninterrupted, _ = load_curve(jobs["cwd"] / "ddp" / "curve.pt")
    assert torch.allclose(resumed.bends, uninterrupted.bends, atol=1e-6, rtol=0)
    h1 = json.loads((jobs["cwd"] / "crash" / "history.json").read_text())
    h2 = json.loads((jobs["cwd"] / "ddp" / "history.json").read_text())
    assert [r["loss"] for r in h1] == pytest.approx([r["loss"] for r in h2], rel=1e-9)


def test_only_rank_0_writes_one_set_of_files(jobs):
    cwd = jobs["cwd"]
    assert sorted(p.name for p in cwd.iterdir()) == ["crash", "ddp", "eval", "landscape"]  # nothing stray in the cwd
    training = ["curve.pt", "history.json", "history.png", "resume.pt"]
    assert sorted(p.name for p in (cwd / "ddp").iterdir()) == training
    assert sorted(p.name for p in (cwd / "crash").iterdir()) == training
    assert sorted(p.name for p in (cwd / "eval").iterdir()) == ["path.csv", "path.json", "path.png"]
    # one "wrote ..." line: rank 1 prints no results
    assert jobs["resumed"].stdout.count("wrote ") == 1


def test_global_batch_must_divide_among_the_processes(digits):
    assert distributed.per_rank_batch(64, 2) == 32
    args = type("Args", (), {"batch_size": 63, "seed": 0})()
    with pytest.raises(CommandError, match="global batch .* divisible by the number of processes"):
        train_loader(digits, args, distributed.DistInfo(rank=1, world_size=2))
    loader = train_loader(digits, type("Args", (), {"batch_size": 64, "seed": 0})(),
                               distributed.DistInfo(rank=1, world_size=2))
    assert (loader.batch_size, loader.rank, loader.world_size) == (32, 1, 2)
    # a single process: no process group, everything as before
    info = distributed.init_from_env()
    assert not distributed.is_initialized() and (info.rank, info.world_size, info.is_main) == (0, 1, True)


def test_a_streamed_image_folder_trains_the_same_on_two_ranks_as_on_one(tmp_path):
    # the StreamLoader's index plan and per-(seed, epoch, sample) augmentation: two ranks with batch 8 each
    # take exactly the global batches of 16 that one process takes, random crops and flips included
    from modeconn import train as train_cmd
    from modeconn.runtime.checkpoints import load_checkpoint
    from test_external_data import write_image_folder

    root = write_image_folder(tmp_path / "imgs")
    argv = ["--dataset", f"imagefolder:{root}", "--image-size", "16", "--model", "mlp", "--model-kwargs",
            "width=32", "--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--no-progress"]
    torchrun("modeconn.train", [*argv, "--out", "ddp"], tmp_path)
    assert train_cmd.main([*argv, "--out", str(tmp_path / "one")]) == 0
    one, two = (load_checkpoint(tmp_path / d / "model.pt", kind="model") for d in ("one", "ddp"))
    assert two["run"]["processes"] == 2 and one["run"]["processes"] == 1
    assert one["metrics"]["train_acc"] > 0.9    # it learned: the agreement below is not that of two inits
    for k, v in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][k], v, rtol=1e-4, atol=1e-5)
