"""Shared fixtures: the shipped digits endpoints and the digits data."""
from pathlib import Path

import pytest
import torch

import modeconn as mc

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "checkpoints"


@pytest.fixture(scope="session")
def digits():
    return mc.get_dataset("digits")


@pytest.fixture(scope="session")
def mlp_pair():
    a, _ = mc.load_model(CKPT / "digits_mlp_a.pt")
    b, _ = mc.load_model(CKPT / "digits_mlp_b.pt")
    return a.eval(), b.eval()


@pytest.fixture(scope="session")
def cnn_pair():
    a, _ = mc.load_model(CKPT / "digits_cnn_a.pt")
    b, _ = mc.load_model(CKPT / "digits_cnn_b.pt")
    return a.eval(), b.eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: more threads only add overhead and contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def interrupt_after_epoch(monkeypatch):
    """``arm(epoch)``: training commands save every epoch as usual, then stop with Ctrl-C after ``epoch``;
    ``disarm()`` restores the plain saver."""
    from modeconn.cli.rundir import TrainingRun

    real = TrainingRun.epoch_saver

    class Switch:
        def arm(self, epoch):
            def saver(run, bar=None):
                save = real(run, bar)

                def wrapped(record, state):
                    save(record, state)
                    if record["epoch"] == epoch:
                        raise KeyboardInterrupt

                return wrapped

            monkeypatch.setattr(TrainingRun, "epoch_saver", saver)

        def disarm(self):
            monkeypatch.setattr(TrainingRun, "epoch_saver", real)

    return Switch()


@pytest.fixture(scope="module")
def quick_run(request, tmp_path_factory):
    """``(module, out, result)`` of ``experiments/<EXPERIMENT>.py --quick --out OUT``, ``EXPERIMENT`` being a
    global of the test module: run once per test module, with one intra-op thread."""
    import importlib

    name = request.module.EXPERIMENT
    module = importlib.import_module(f"experiments.{name}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp(name)
        return module, out, module.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
