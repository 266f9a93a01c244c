"""Small contracts that mutation testing showed were not pinned down by any other test.

Each test states a promise a user relies on: which grids have a barrier at
all, which metrics have one, which resume states are refused, and that the
write-error finder stops on an exception chain that loops.
"""
import copy
import numpy as np
import pytest
import torch

import modeconn as mc
from modeconn.evaluation.barriers import barrier_profile, check_barrier_metric, has_endpoints
from modeconn.runtime.checkpoints import _os_error_behind
from modeconn.training.state import capture_state, restore_state


@pytest.mark.parametrize("ts, expected", [
    ([0.0, 0.5, 1.0], True), ([1.0, 0.0], True), ([0.2, 0.5, 1.0], False), ([0.0, 0.5, 0.8], False),
    ([0.5], False), ([0.0, 0.0], False), ([1.0, 1.0], False),
])
def test_a_grid_has_endpoints_only_with_both_t0_and_t1(ts, expected):
    assert has_endpoints(ts) is expected


@pytest.mark.parametrize("metric", ["acc", "test_acc", "train_acc"])
def test_accuracies_have_no_barrier(metric):
    with pytest.raises(ValueError, match="barrier of an accuracy"):
        check_barrier_metric(metric)


@pytest.mark.parametrize("metric", ["test_loss", "train_error", "test_nll", "accuracy_gap"])
def test_losses_and_errors_pass_the_metric_check(metric):
    assert check_barrier_metric(metric) == metric


def test_the_two_point_line_has_a_profile_of_zeros():
    ts, profile = barrier_profile([1.0, 0.0], [3.0, 1.0])
    assert ts.tolist() == [0.0, 1.0] and profile.tolist() == [0.0, 0.0]
    assert mc.barrier([0.0, 1.0], [1.0, 3.0])[0] == 0.0


@pytest.mark.parametrize("ts, values", [
    ([0.0, 0.5, 1.0], [1.0, 2.0]),                   # lengths differ
    ([[0.0, 0.5, 1.0]] * 2, [[1.0, 2.0, 1.0]] * 2),  # 2-D
    ([0.0], [1.0]),                                  # one point
])
def test_malformed_profiles_are_refused(ts, values):
    with pytest.raises(ValueError, match="1-D of equal length >= 2"):
        barrier_profile(ts, values)


def test_integer_ts_are_taken_as_numbers():
    ts, profile = barrier_profile(np.array([0, 1]), np.array([2, 4]))
    assert ts.dtype == np.float64 and profile.dtype == np.float64 and profile.tolist() == [0.0, 0.0]


def _part():
    return torch.nn.Linear(2, 2)


def test_a_state_without_its_rng_is_refused_before_anything_is_loaded():
    net = _part()
    state = capture_state(0, [], {"lr": 0.1}, model=net)
    del state["rng"]
    with pytest.raises(ValueError, match="lacks rng"):
        restore_state(state, {"lr": 0.1}, model=net)


def test_a_setting_on_one_side_only_is_a_difference():
    net = _part()
    state = capture_state(0, [], {"lr": 0.1}, model=net)
    with pytest.raises(ValueError, match="momentum"):
        restore_state(state, {"lr": 0.1, "momentum": 0.9}, model=net)
    state = capture_state(0, [], {"lr": 0.1, "momentum": 0.9}, model=net)
    with pytest.raises(ValueError, match="momentum"):
        restore_state(state, {"lr": 0.1}, model=net)


def test_training_on_after_a_restore_leaves_the_state_as_it_was():
    """Optimizer.load_state_dict keeps the momentum tensors it is given: without a copy, training on
    would change the state, and a second restore (a second child of one spawn point) would differ."""
    net = _part()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    state = capture_state(0, [], {}, model=net, optimizer=opt)
    kept = copy.deepcopy(state["optimizer"])
    for _ in range(2):
        restore_state(state, {}, model=net, optimizer=opt)
        opt.zero_grad()
        net(torch.ones(1, 2)).sum().backward()
        opt.step()
    assert all(torch.equal(state["optimizer"]["state"][i]["momentum_buffer"], kept["state"][i]["momentum_buffer"])
               for i in kept["state"])


def test_the_write_error_finder_stops_on_a_looping_chain():
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a  # a cycle without any OSError in it
    assert _os_error_behind(a) is None
    disk = OSError(28, "No space left on device")
    try:
        try:
            raise disk
        except OSError:
            raise RuntimeError("unexpected pos")
    except RuntimeError as e:
        assert _os_error_behind(e) is disk
    assert _os_error_behind(KeyboardInterrupt()) is None


def test_the_bn_pass_counts_its_batches():
    from modeconn.evaluation.bn import bn_pass

    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    batches = [(torch.randn(4, 2), torch.zeros(4)) for _ in range(3)]
    assert bn_pass(net, batches, net) == 3
    with pytest.raises(ValueError):
        bn_pass(net, [], net)


def test_a_checkpoint_records_its_format_and_versions(tmp_path):
    path = mc.save_checkpoint(tmp_path / "c.pt", "model", state_dict={})
    meta = mc.load_checkpoint(path)
    assert meta["format_version"] == 1 and meta["modeconn_version"] == mc.__version__
    assert meta["torch_version"] == str(torch.__version__)


def test_atomic_writes_go_through_a_hidden_temporary_file_beside_the_target(tmp_path):
    from modeconn.runtime.checkpoints import atomic_write

    seen = []
    atomic_write(tmp_path / "r.json", lambda f: seen.extend(p.name for p in tmp_path.iterdir()))
    assert len(seen) == 1 and seen[0].startswith(".r.json.") and seen[0].endswith(".tmp")
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_equal_ts_keep_their_order_when_sorted():
    # many repeated t (numpy's default sort is not stable beyond 16 elements): values stay paired in order
    inner = np.full(40, 0.5)
    ts = np.concatenate([[1.0], inner, [0.0]])
    values = np.concatenate([[0.0], np.arange(40.0), [0.0]])
    sorted_ts, profile = barrier_profile(ts, values)
    assert sorted_ts.tolist() == [0.0] + [0.5] * 40 + [1.0]
    assert profile[1:-1].tolist() == list(np.arange(40.0))


def test_a_captured_state_is_a_copy_not_a_view_of_the_live_weights():
    net = _part()
    state = capture_state(0, [], {}, model=net)
    before = state["model"]["weight"].clone()
    with torch.no_grad():
        net.weight.add_(1.0)  # training goes on after the epoch's state was handed out
    assert torch.equal(state["model"]["weight"], before)


def test_output_directories_are_made_with_their_parents(tmp_path):
    from modeconn.runtime.checkpoints import make_directory

    assert make_directory(tmp_path / "a" / "b" / "c").is_dir()


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    from modeconn.runtime.checkpoints import atomic_write

    umask = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "f.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o644


def test_a_checkpoint_from_a_newer_format_is_refused(tmp_path):
    path = mc.save_checkpoint(tmp_path / "new.pt", "model", state_dict={})
    obj = torch.load(path, weights_only=True)
    obj["format_version"] = 2
    torch.save(obj, path)
    with pytest.raises(mc.CheckpointError, match="format"):
        mc.load_checkpoint(path)


def test_a_models_weights_come_out_of_its_checkpoint_file(tmp_path):
    net = torch.nn.Linear(3, 2)
    path = mc.save_checkpoint(tmp_path / "m.pt", "model", state_dict=net.state_dict())
    sd = mc.load_state_dict(path)
    assert set(sd) == {"weight", "bias"} and torch.equal(sd["weight"], net.weight.detach())
    torch.save(net.state_dict(), tmp_path / "plain.pt")  # a bare state dict works too
    assert torch.equal(mc.load_state_dict(tmp_path / "plain.pt")["bias"], net.bias.detach())


def test_a_nan_state_dict_file_is_refused_naming_file_and_tensor(tmp_path):
    sd = torch.nn.Linear(3, 2).state_dict()
    sd["weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(mc.CheckpointError, match=r"bad\.pt.*weight|weight.*bad\.pt"):
        mc.load_state_dict(tmp_path / "bad.pt")


def test_a_model_without_recorded_kwargs_is_built_with_the_defaults():
    from modeconn.runtime.checkpoints import build_model

    net = build_model({"arch": "mlp", "input_shape": [1, 8, 8], "num_classes": 10})
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("content", [{}, {"weight": torch.zeros(2), "note": "not a tensor"}])
def test_files_that_are_not_state_dicts_are_refused(tmp_path, content):
    torch.save(content, tmp_path / "odd.pt")
    with pytest.raises(mc.CheckpointError, match="neither a modeconn model checkpoint nor a state dict"):
        mc.load_state_dict(tmp_path / "odd.pt")


def test_a_directory_that_cannot_be_made_is_reported_with_the_os_reason(tmp_path, monkeypatch):
    from pathlib import Path

    from modeconn.runtime.checkpoints import WriteError, make_directory

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(WriteError, match="Permission denied") as info:
        make_directory(tmp_path / "locked")
    assert "is a file" not in str(info.value)
