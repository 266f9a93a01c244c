"""modeconn as users install it: a regular wheel (``pip install <path>``) carries the shipped endpoints.

The wheel is built the way pip builds it for ``pip install <path>`` (with build
isolation, which fetches setuptools from the package registry), installed into a
target folder, and used from another working directory with only that folder on
``PYTHONPATH``, so the installed copy is imported, not this source tree.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENDPOINTS = ("digits_mlp_a", "digits_mlp_b", "digits_cnn_a", "digits_cnn_b")
SHIPPED_FILES = {f"{name}.pt" for name in ENDPOINTS} | {"README.md"}
# what a build reads; copied to a clean folder so that no build/ or *.egg-info left in the
# checkout (stale files in build/lib end up in wheels) can stand in for a missing declaration
BUILD_INPUTS = ("pyproject.toml", "README.md", "MANIFEST.in", "setup.py", "setup.cfg", "modeconn", "checkpoints")


def _readme_rows() -> dict:
    """``{file name: (test accuracy, sha256)}`` from the table in checkpoints/README.md."""
    rows = {}
    for line in (ROOT / "checkpoints" / "README.md").read_text().splitlines():
        m = re.match(r"\| `(digits_\w+)\.pt` \|.*\| \d \| ([\d.]+) \| [\d.]+ \| `([0-9a-f]{64})` \|", line)
        if m:
            rows[m.group(1)] = (float(m.group(2)), m.group(3))
    return rows


def _run(cmd, cwd, env=None, timeout=240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _clean_source(dest: Path) -> Path:
    dest.mkdir()
    for name in BUILD_INPUTS:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = _clean_source(tmp_path_factory.mktemp("build") / "modeconn-src")
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(src)], cwd=dist)
    (whl,) = dist.glob("modeconn-*.whl")
    return whl


def test_readme_table_names_the_shipped_endpoints():
    assert set(_readme_rows()) == set(ENDPOINTS)


def test_wheel_carries_the_shipped_endpoints_and_every_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"modeconn/checkpoints/{f}" for f in SHIPPED_FILES} <= names
    # pyproject.toml lists the packages by hand: a new folder of modeconn/ must be added there
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "modeconn").rglob("*.py")}
    assert not sources - names, f"modules missing from the wheel: {sorted(sources - names)}"


def test_sdist_carries_the_shipped_endpoints(tmp_path):
    src = _clean_source(tmp_path / "modeconn-src")
    code = "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))"
    name = _run([sys.executable, "-c", code, str(tmp_path / "sdist")], cwd=src).stdout.split()[-1]
    with tarfile.open(tmp_path / "sdist" / name) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    assert {f"checkpoints/{f}" for f in SHIPPED_FILES} <= members


LOAD_ALL = """
import json, sys
import modeconn as mc
out = {"modeconn": mc.__file__, "endpoints": {}}
for name in sys.argv[1:]:
    path = mc.shipped_checkpoint(name)
    model, meta = mc.load_model(path)
    out["endpoints"][name] = {"path": str(path), "test_acc": meta["metrics"]["test_acc"],
                              "parameters": sum(p.numel() for p in model.parameters())}
print(json.dumps(out))
"""


def test_installed_wheel_works_from_another_directory(wheel, tmp_path):
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
         cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    found = json.loads(_run([sys.executable, "-c", LOAD_ALL, *ENDPOINTS], cwd=elsewhere, env=env).stdout)
    assert Path(found["modeconn"]).is_relative_to(target), f"imported {found['modeconn']}, not the installed copy"
    rows = _readme_rows()
    for name, got in found["endpoints"].items():
        path = Path(got["path"])
        assert path.is_relative_to(target / "modeconn" / "checkpoints"), path
        acc, sha = rows[name]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha, name
        assert got["test_acc"] == pytest.approx(acc, abs=6e-5) and got["parameters"] > 10_000, name
    assert (target / "modeconn" / "checkpoints" / "README.md").read_text() == \
        (ROOT / "checkpoints" / "README.md").read_text()
    help_ = _run([sys.executable, "-m", "modeconn.demo", "--help"], cwd=elsewhere, env=env).stdout
    assert help_.startswith("usage: python -m modeconn.demo") and "--checkpoints" in help_
