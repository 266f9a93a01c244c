import errno
import hashlib
import os
import re
from pathlib import Path

import pytest
import torch

import modeconn as mc
from modeconn.runtime.checkpoints import WriteError, atomic_save, atomic_write
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


def test_non_finite_weights_are_refused_on_load_naming_the_tensor(tmp_path, mlp_pair):
    meta = torch.load(CKPT / "digits_mlp_a.pt", weights_only=True)
    meta["state_dict"]["layers.2.weight"][1, :2] = float("inf")
    bad = tmp_path / "inf.pt"
    torch.save(meta, bad)
    message = re.escape(f"{bad}: tensor 'layers.2.weight' has 2 NaN/Inf values (of "
                        f"{meta['state_dict']['layers.2.weight'].numel()})")
    for load in (mc.load_model, mc.load_checkpoint, mc.load_state_dict):
        with pytest.raises(mc.CheckpointError, match=message):
            load(bad)
    plain = {k: v.clone() for k, v in mlp_pair[0].state_dict().items()}
    plain["layers.0.bias"][0] = float("nan")
    torch.save(plain, tmp_path / "plain.pt")
    with pytest.raises(mc.CheckpointError, match="tensor 'layers.0.bias' has 1 NaN/Inf value "):
        mc.load_state_dict(tmp_path / "plain.pt")
    assert mc.load_state_dict(plain) == plain  # what is already in memory is the caller's to judge


def test_failed_writes_name_the_target_and_leave_no_temporary_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WriteError, match=re.escape(f"cannot create directory {blocker / 'sub'}: {blocker} is a "
                                                   "file, not a directory")):
        atomic_write(blocker / "sub" / "a.json", lambda f: f.write(b"{}"))

    def full(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def torch_style(f):  # torch.save reports a full disk as a RuntimeError raised while handling the OSError
        try:
            full(f)
        except OSError:
            raise RuntimeError("unexpected pos 704 vs 598")

    target = tmp_path / "out" / "ckpt.pt"
    atomic_save({"a": torch.ones(1)}, target)
    for write in (full, torch_style):
        with pytest.raises(WriteError) as e:
            atomic_write(target, write)
        assert str(e.value) == f"cannot write {target}: No space left on device"
        assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    with pytest.raises(KeyboardInterrupt):  # an interruption stays what it is
        atomic_write(target, lambda f: (_ for _ in ()).throw(KeyboardInterrupt))
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(1))  # the old file, whole
    assert [p.name for p in target.parent.iterdir()] == ["ckpt.pt"]
