"""Empirical NTK: closed forms for a linear model, a float64 autograd reference, distances, tracking in training."""
import copy
import json

import pytest
import torch
from torch import nn

import modeconn as mc
from modeconn.geometry.ntk import NTKTracker, empirical_ntk, kernel_alignment, kernel_distance, kernel_velocity
from modeconn.runtime import Hooks

pytestmark = pytest.mark.usefixtures("one_thread")


def test_linear_model_ntk_is_the_closed_form():
    """f(x) = Wx + b: ∂f_a/∂W_a = x, ∂f_a/∂b_a = 1, so Θ[i,j,a,b] = δ_ab (x_i·x_j + 1)."""
    torch.manual_seed(0)
    net, x = nn.Linear(5, 3).double(), torch.randn(7, 5, dtype=torch.float64)
    base = x @ x.T + 1
    full = empirical_ntk(net, x, kind="full", chunk_size=3)
    assert full.shape == (7, 7, 3, 3)
    assert torch.allclose(full, base[:, :, None, None] * torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(empirical_ntk(net, x, kind="trace"), 3 * base, atol=1e-12)
    assert torch.allclose(empirical_ntk(net, x, kind="sum", chunk_size=2), 3 * base, atol=1e-12)


def test_mlp_ntk_matches_an_autograd_jacobian_and_ignores_the_chunking():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    rows = []
    for xi in x:  # J[i, a, :] by one backward per output, the independent reference
        out = net(xi.unsqueeze(0)).squeeze(0)
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[a], net.parameters(),
                                                                                        retain_graph=True)])
                                 for a in range(3)]))
    jac = torch.stack(rows)  # [N, K, P]
    expected = torch.einsum("iap,jbp->ijab", jac, jac)
    assert torch.allclose(empirical_ntk(net, x, kind="full", chunk_size=2), expected, atol=1e-12)
    assert torch.allclose(empirical_ntk(net, x, kind="trace", chunk_size=5),
                          expected.diagonal(dim1=2, dim2=3).sum(-1), atol=1e-12)
    assert torch.allclose(empirical_ntk(net, x, kind="sum", chunk_size=1), expected.sum((2, 3)), atol=1e-12)


def test_kernel_distance_velocity_and_alignment():
    torch.manual_seed(2)
    a = torch.randn(6, 6)
    k = a @ a.T
    assert abs(kernel_distance(k, k)) < 1e-12 and abs(kernel_distance(k, 3 * k)) < 1e-12
    e1, e2 = torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0]))
    assert kernel_distance(e1, e2) == pytest.approx(1.0)
    assert kernel_distance(e1, e1 + e2) == pytest.approx(1 - 1 / 2 ** 0.5)
    assert kernel_velocity(e1, e1 + e2, dt=2.0) == pytest.approx((1 - 1 / 2 ** 0.5) / 2)
    labels = torch.tensor([0, 1, 0, 2])
    y = nn.functional.one_hot(labels).double()
    assert kernel_alignment(2 * y @ y.T, labels) == pytest.approx(1.0)
    assert kernel_alignment(torch.eye(4), labels) == pytest.approx(4 / (2 * 6 ** 0.5))  # ⟨I,YYᵀ⟩=4, ‖YYᵀ‖=√6
    with pytest.raises(ValueError, match="shapes"):
        kernel_distance(k, e1)
    with pytest.raises(ValueError, match="kind"):
        empirical_ntk(nn.Linear(2, 2), torch.randn(3, 2), kind="diag")


def test_tracker_in_training_records_the_kernel_series_and_resumes_exactly(digits):
    loader = digits.train_loader(128, seed=0)
    x, y = next(iter(digits.eval_loader("train", batch_size=24, samples=24)))
    torch.manual_seed(0)
    start = mc.create_model("mlp", digits.input_shape, digits.num_classes, width=16, depth=1)
    net, weights = copy.deepcopy(start), []
    tracker = NTKTracker(net, x, y)
    history = mc.train_model(net, loader, epochs=3, lr=0.05, epoch_fields=tracker,
                             hooks=Hooks(on_epoch_end=lambda r, s: weights.append(s)))
    kernels = [empirical_ntk(start, x)]
    for state in weights:
        m = copy.deepcopy(start)
        m.load_state_dict(state["model"])
        kernels.append(empirical_ntk(m, x))
    for e, r in enumerate(history, 1):
        assert r["ntk_distance"] == pytest.approx(kernel_distance(kernels[0], kernels[e]), abs=1e-6)
        assert r["ntk_velocity"] == pytest.approx(kernel_distance(kernels[e - 1], kernels[e]), abs=1e-6)
        assert r["ntk_alignment"] == pytest.approx(kernel_alignment(kernels[e], y), abs=1e-6)
    assert history[0]["ntk_distance"] > 1e-4
    resumed = copy.deepcopy(start)
    again = mc.train_model(resumed, loader, epochs=3, lr=0.05, epoch_fields=NTKTracker(resumed, x, y),
                           resume=weights[0])
    for r, s in zip(history, again):
        assert r["ntk_velocity"] == s["ntk_velocity"] and r["ntk_distance"] == s["ntk_distance"]


def test_train_command_tracks_the_ntk(tmp_path):
    from modeconn import train

    out = tmp_path / "m"
    assert train.main(["--model", "mlp", "--model-kwargs", "width=16", "depth=1", "--epochs", "2",
                       "--track-ntk", "16", "--out", str(out), "--no-progress"]) == 0
    history = json.loads((out / "history.json").read_text())
    records = history if isinstance(history, list) else history["history"]
    assert all(0 < r["ntk_distance"] < 2 and r["ntk_velocity"] > 0 for r in records)
    assert (out / "ntk.png").read_bytes()[:4] == b"\x89PNG"
    assert mc.load_checkpoint(out / "model.pt")["config"]["track_ntk"] == 16


def test_spawning_tracks_the_ntk_of_parent_and_children():
    from modeconn.data import TensorLoader
    from modeconn.training.spawn import PARENT, child_key, spawn_key, spawn_children

    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    data = TensorLoader(x, y, batch_size=64)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    res = spawn_children(net, lambda s: TensorLoader(x, y, 16, shuffle=True, seed=s), data, data, epochs=3,
                         spawn_at=[0, 1], num_points=3, ntk_inputs=x[:10], ntk_labels=y[:10])
    parent = res.store[PARENT]["history"]
    assert [r["epoch"] for r in parent] == [1, 2, 3] and all(r["ntk_velocity"] > 0 for r in parent)

    def kernel(key):
        m = copy.deepcopy(net)
        m.load_state_dict(res.store[key]["model"])
        return empirical_ntk(m, x[:10])

    k0 = empirical_ntk(net, x[:10])
    for k in (0, 1):
        child = res.store[child_key(k, 0)]["history"]
        assert child[:k] == parent[:k]  # a child spawned at k continues the parent's series
        assert child[-1]["ntk_distance"] == pytest.approx(kernel_distance(k0, kernel(child_key(k, 0))), abs=1e-6)
        pair = res.points[k].pairs[0]
        assert pair.ntk_distance == pytest.approx(kernel_distance(kernel(child_key(k, 0)), kernel(child_key(k, 1))),
                                                  abs=1e-6)
        assert res.points[k].children[1].ntk_distance_from_spawn == pytest.approx(
            kernel_distance(kernel(spawn_key(k)), kernel(child_key(k, 1))), abs=1e-6)
    assert "ntk_distance" in res.to_dict()["spawn"][0]["mean"]


def test_spawn_command_tracks_the_ntk(tmp_path, capsys):
    from modeconn import spawn

    out = tmp_path / "s"
    assert spawn.main(["--model", "mlp", "--model-kwargs", "width=16", "depth=1", "--epochs", "2", "--spawn-at", "0",
                       "1", "--track-ntk", "8", "--num-points", "3", "--out", str(out), "--no-progress"]) == 0
    assert "NTK dist child-child" in capsys.readouterr().out
    data = json.loads((out / "spawn.json").read_text())
    assert data["config"]["track_ntk"] == 8
    assert all(r["ntk_velocity"] > 0 for r in data["parent_history"])
    for point in data["spawn"]:
        for child in point["children"]:
            assert [r["epoch"] for r in child["ntk_history"]] == [1, 2]
            assert child["ntk_history"][:point["epoch"]] == [
                {k: v for k, v in r.items() if k == "epoch" or k.startswith("ntk_")}
                for r in data["parent_history"][:point["epoch"]]]
        assert 0 <= point["pairs"][0]["ntk_distance"] <= 2
