"""The --quick presets of the NTK-vs-spawning and SAM-vs-SSAM experiments run and write consistent results."""
import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ntk_spawn_quick(tmp_path):
    from experiments import ntk_spawn

    result = ntk_spawn.main(["--quick", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "ntk_spawn_quick.json").read_text())["config"]["epochs"] == 3
    assert (tmp_path / "ntk_spawn_quick.png").read_bytes()[:4] == b"\x89PNG"
    assert "Spearman" in (tmp_path / "ntk_spawn_quick.md").read_text()
    run = result["runs"][0]
    hist = run["parent_history"]
    # after one epoch the previous kernel is the initial one: velocity = distance from init
    assert hist[0]["ntk_velocity"] == pytest.approx(hist[0]["ntk_distance"], rel=1e-12) and hist[0]["ntk_velocity"] > 0
    assert [r["k"] for r in run["spawn"]] == [0, 1]
    for r in run["spawn"]:
        assert r["barrier_test_loss"] >= 0 and 0 <= r["children_kernel_distance"] <= 2
        assert r["velocity_after_k"] == hist[r["k"]]["ntk_velocity"]


def test_sam_ssam_quick(tmp_path):
    from experiments import sam_ssam

    result = sam_ssam.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "sam_ssam_quick.png").read_bytes()[:4] == b"\x89PNG"
    assert set(result["summary"]) == {"sgd", "sam", "ssam_fisher", "ssam_random"}
    runs = {r["method"]: r for r in result["runs"]}
    assert all(0 <= r["test_acc"] <= 1 and r["seconds_per_step"] > 0 for r in runs.values())
    # four different optimisers from one start: four different endpoints
    assert len({round(r["train_loss"], 10) for r in runs.values()}) == 4
