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
