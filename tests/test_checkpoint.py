import hashlib
import re
from pathlib import Path

import pytest
import torch

import modeconn as mc
from modeconn.runtime.checkpoints import atomic_save
from modeconn.evaluation.model import evaluate

from conftest import CKPT


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_truncated_checkpoint_names_the_file(tmp_path):
    src = (CKPT / "digits_mlp_a.pt").read_bytes()
    bad = tmp_path / "half.pt"
    bad.write_bytes(src[: len(src) // 2])
    with pytest.raises(mc.CheckpointError, match=re.escape(str(bad)) + ".*truncated"):
        mc.load_model(bad)


def test_pickled_object_is_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"format": "modeconn", "kind": "model", "x": Evil()}, bad)
    with pytest.raises(mc.CheckpointError, match="refused to load.*pickled"):
        mc.load_checkpoint(bad)


def test_foreign_and_wrong_kind_files(tmp_path, mlp_pair):
    a, _ = mlp_pair
    plain = tmp_path / "plain.pt"
    torch.save(a.state_dict(), plain)
    with pytest.raises(mc.CheckpointError, match="not a modeconn checkpoint"):
        mc.load_checkpoint(plain)
    assert set(mc.load_state_dict(plain)) == set(a.state_dict())  # usable as a CurveModel endpoint
    with pytest.raises(mc.CheckpointError, match="expected 'curve'"):
        mc.load_curve(CKPT / "digits_mlp_a.pt")
    with pytest.raises(mc.CheckpointError, match="no such checkpoint"):
        mc.load_model(tmp_path / "missing.pt")


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "ckpt.pt"
    atomic_save({"a": torch.ones(3)}, target)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"a": Boom()}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


def _readme_rows():
    rows = {}
    for line in (CKPT / "README.md").read_text().splitlines():
        m = re.match(r"\| `(digits_\w+\.pt)` \|.*\| (\d) \| ([\d.]+) \| ([\d.]+) \| `([0-9a-f]{64})` \|", line)
        if m:
            rows[m.group(1)] = (int(m.group(2)), float(m.group(3)), float(m.group(4)), m.group(5))
    return rows


def test_shipped_checkpoints_match_readme_and_reach_recorded_accuracy(digits):
    rows = _readme_rows()
    assert set(rows) == {"digits_mlp_a.pt", "digits_mlp_b.pt", "digits_cnn_a.pt", "digits_cnn_b.pt"}
    for name, (seed, acc, loss, sha) in rows.items():
        path = CKPT / name
        assert path.stat().st_size < 1_000_000
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha, name
        model, meta = mc.load_model(path)
        assert meta["dataset"] == "digits" and meta["seed"] == seed
        res = evaluate(model, digits.eval_loader("test"))
        assert res["acc"] == pytest.approx(acc, abs=6e-5), name
        assert res["loss"] == pytest.approx(loss, abs=6e-5), name
        assert res["acc"] == pytest.approx(meta["metrics"]["test_acc"], abs=1e-9)
