"""Parent–child spawning: the command's files, its numbers against a hand computation, the children's
continuation of the parent's schedule, and resume after an interruption."""
import copy
import json

import pytest
import torch
from torch import nn

import modeconn as mc
from modeconn import spawn as spawn_command
from modeconn.cli.rundir import StateStore
from modeconn.evaluation.model import evaluate
from modeconn.training.spawn import PARENT, child_key, spawn_children, spawn_steps

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model-kwargs", "width=16", "--epochs", "3", "--spawn-at", "0", "1", "--num-points", "3",
        "--batch-size", "128", "--no-progress"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted run of the command (spawn at 0 and 1 of 3 epochs, 2 children, lines of 3 points)."""
    out = tmp_path_factory.mktemp("spawn") / "full"
    assert spawn_command.main(TINY + ["--out", str(out)]) == 0
    return out


def _params(path):
    model, _ = mc.load_model(path)
    return model, torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def test_command_writes_its_files_and_refuses_to_overwrite(finished, capsys):
    data = json.loads((finished / "spawn.json").read_text())
    assert data["spawn_at"] == [0, 1] and data["config"]["children"] == 2
    assert [len(p["pairs"]) for p in data["spawn"]] == [1, 1]
    assert (finished / "spawn.png").stat().st_size > 5000
    rows = (finished / "spawn.csv").read_text().splitlines()
    assert rows[0].startswith("spawn_epoch,child_a,child_b,barrier_test_loss,barrier_test_error") and len(rows) == 3
    assert spawn_command.main(TINY + ["--out", str(finished)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_barriers_and_distances_equal_a_hand_computation(finished, digits):
    """The midpoint of the children's checkpoints, evaluated by hand, gives the JSON's barriers (interp,
    three points: L(½) − (L(0) + L(1)) / 2, at least 0) and the distances are norms of weight differences."""
    data = json.loads((finished / "spawn.json").read_text())
    test = digits.eval_loader("test")
    for point in data["spawn"]:
        k = point["epoch"]
        (a, theta_a), (b, theta_b) = (_params(finished / "models" / f"k{k}_child{i}.pt") for i in (0, 1))
        _, theta_spawn = _params(finished / "models" / f"spawn_k{k}.pt")
        mid = copy.deepcopy(a)
        mid.load_state_dict({n: (a.state_dict()[n] + b.state_dict()[n]) / 2 for n in a.state_dict()})
        ra, rb, rm = (evaluate(m, test) for m in (a, b, mid))
        pair = point["pairs"][0]
        for metric, key in (("test_loss", "loss"), ("test_error", "error")):
            expected = max(0.0, rm[key] - (ra[key] + rb[key]) / 2)
            assert pair["barriers"][metric]["interp"] == pytest.approx(expected, abs=1e-6)
            assert pair[metric][1] == pytest.approx(rm[key], abs=1e-6)
        assert [c["test_acc"] for c in point["children"]] == pytest.approx([ra["acc"], rb["acc"]], abs=1e-9)
        assert pair["distance"] == pytest.approx(float((theta_a - theta_b).norm()), rel=1e-6)
        assert [c["distance_from_spawn"] for c in point["children"]] == pytest.approx(
            [float((theta_a - theta_spawn).norm()), float((theta_b - theta_spawn).norm())], rel=1e-6)
        assert data["spawn"][0]["mean"]["barrier_test_loss"] == data["spawn"][0]["pairs"][0]["barriers"][
            "test_loss"]["interp"]


def test_a_child_with_the_parents_data_seed_is_the_parent(digits):
    """Children continue the parent's run exactly (weights, momentum, schedule, dropout's RNG): with the
    parent's data seed a child of any spawn epoch ends bit for bit where a plain train_model run ends,
    while a child with another data seed does not."""
    def make_net():
        torch.manual_seed(3)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Dropout(0.2), nn.Linear(24, 10))

    def loader(seed):
        return digits.train_loader(128, seed=seed)

    eval_data = digits.eval_loader("test")
    settings = dict(epochs=3, lr=0.05, weight_decay=5e-4, seed=7)
    torch.manual_seed(11)
    reference = make_net()
    mc.train_model(reference, loader(7), **settings)
    torch.manual_seed(11)
    first_steps = []
    result = spawn_children(make_net(), loader, eval_data, eval_data, spawn_at=[0, 2], child_seeds=[7, 8],
                            num_points=2, hooks=mc.Hooks(progress=first_steps.append), **settings)
    want = reference.state_dict()
    parent = result.store[PARENT]["model"]
    assert all(torch.equal(parent[n], want[n]) for n in want)
    for k in (0, 2):
        same, other = (result.store[child_key(k, i)]["model"] for i in (0, 1))
        assert all(torch.equal(same[n], want[n]) for n in want), f"child of epoch {k}"
        assert not torch.equal(other["4.weight"], want["4.weight"])
    assert result.points[1].pairs[0].distance > 0 and result.barriers("test_loss").shape == (2, 1)
    # a second call with the same store trains nothing and reports the same progress as a fresh run
    steps, epochs_run = [], []
    hooks = mc.Hooks(progress=steps.append, on_epoch_end=lambda record, state: epochs_run.append(record["run"]))
    again = spawn_children(make_net(), loader, eval_data, eval_data, spawn_at=[0, 2], child_seeds=[7, 8],
                           num_points=2, store=result.store, hooks=hooks, **settings)
    assert epochs_run == [] and sum(steps) == sum(first_steps) == spawn_steps(3, [0, 2], 2, len(loader(7))) + 2 * 2
    assert again.barriers("test_loss").tolist() == result.barriers("test_loss").tolist()
    # each child starts from the spawn state as it was kept: trained second (here) or first, the same child
    torch.manual_seed(11)
    swapped = spawn_children(make_net(), loader, eval_data, eval_data, spawn_at=[2], child_seeds=[8, 7],
                             num_points=2, **settings)
    first, second = swapped.store[child_key(2, 0)]["model"], result.store[child_key(2, 1)]["model"]
    assert all(torch.equal(first[n], second[n]) for n in want)


def test_resume_after_an_interruption_equals_the_uninterrupted_run(finished, tmp_path, monkeypatch):
    """Killed in the middle of child 1 of spawn epoch 0: --resume trains neither the parent nor the
    finished child again, continues child 1 from its last epoch, and ends with the same numbers."""
    real_set = StateStore.__setitem__
    written = []

    def interrupting_set(self, name, state):
        real_set(self, name, state)
        written.append((name, int(state["epoch"])))
        if name == child_key(0, 1) and state["epoch"] == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(StateStore, "__setitem__", interrupting_set)
    part = tmp_path / "part"
    assert spawn_command.main(TINY + ["--out", str(part)]) == 130
    assert not (part / "spawn.json").exists() and (part / "states" / f"{child_key(0, 0)}.pt").exists()
    assert spawn_command.main(TINY + ["--out", str(part), "--lr", "0.1", "--resume"]) == 2  # other arguments
    written.clear()
    assert spawn_command.main(TINY + ["--out", str(part), "--resume"]) == 0
    assert written == [(child_key(0, 1), 1), (child_key(0, 1), 2)] + [(child_key(1, i), e) for i in (0, 1)
                                                                      for e in (1, 2)]
    full, resumed = (json.loads((d / "spawn.json").read_text()) for d in (finished, part))
    assert resumed["spawn"] == full["spawn"] and resumed["parent"] == full["parent"]
    for name in ("parent", "k0_child1", "k1_child0"):
        a, _ = mc.load_model(finished / "models" / f"{name}.pt")
        b, _ = mc.load_model(part / "models" / f"{name}.pt")
        assert all(torch.equal(a.state_dict()[n], b.state_dict()[n]) for n in a.state_dict())


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "3", "--spawn-at", "0", "3"], "--spawn-at"),
    (["--epochs", "3", "--spawn-at", "1", "1"], "repeats"),
    (["--epochs", "3", "--spawn-at", "1", "--child-seeds", "4", "4"], "--child-seeds"),
    (["--epochs", "3", "--spawn-at", "1", "--children", "1"], "--children"),
])
def test_bad_spawn_arguments_are_one_line_errors(tmp_path, capsys, flags, message):
    assert spawn_command.main(flags + ["--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()  # nothing trained, nothing written


def test_the_library_refuses_what_it_cannot_measure(digits):
    data = digits.eval_loader("test")
    net = nn.Linear(64, 10)
    with pytest.raises(ValueError, match="below epochs"):
        spawn_children(net, digits.train_loader, data, data, epochs=2, spawn_at=[5])
    with pytest.raises(ValueError, match="children must be"):
        spawn_children(net, digits.train_loader, data, data, epochs=2, spawn_at=[0], children=1)


def test_a_store_from_other_spawn_epochs_is_refused():
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    data = mc.TensorLoader(x, y, 32)

    def loader(seed):
        return mc.TensorLoader(x, y, 16, shuffle=True, seed=seed)

    store = {}
    spawn_children(nn.Linear(4, 3), loader, data, data, epochs=3, spawn_at=[1], store=store, num_points=2)
    with pytest.raises(ValueError, match="no parent state of epoch 2"):
        spawn_children(nn.Linear(4, 3), loader, data, data, epochs=3, spawn_at=[2], store=store, num_points=2)
