"""benchmarks/peers.py: the ratio convention of its table, and a run without the peer packages.

The peers (pyhessian, loss-landscapes, rebasin) are benchmark-only requirements, absent from the
test environment: there every front whose peer is missing must print a row saying so (never a silent
gap), and the curve front, whose baseline is written in benchmarks/, still runs.
"""
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks._peers import Row, missing, table

ROOT = Path(__file__).resolve().parents[1]


def test_ratio_is_ours_over_peer_for_times_and_peer_over_ours_for_objectives():
    assert Row("f", "w", 2.0, 4.0, "p").ratio == 0.5
    assert Row("f", "w", 2.0, 4.0, "p").wins is True
    assert Row("f", "w", 4.0, 2.0, "p").wins is False
    assert Row("f", "w", 270.0, 254.0, "p", unit="", higher_is_better=True).ratio == pytest.approx(254 / 270)
    assert Row("f", "w", None, 1.0, "p").ratio is None


def test_an_invalid_peer_figure_is_shown_without_a_ratio():
    row = Row("m", "objective", 88.1, 97.1, "rebasin", unit="", higher_is_better=True,
              peer_invalid="its B computes another function")
    assert row.ratio is None and row.wins is None
    text = table([row, missing("h", "λmax", "pyhessian")], "test machine")
    assert "97.1" in text and "not comparable: its B computes another function" in text
    assert "pyhessian not importable: pip install -r benchmarks/requirements-peers.txt" in text
    assert text.rstrip().endswith("Machine: test machine")


# run peers.py as if the peer packages were absent, whether or not this environment has them
HIDE_PEERS = """
import runpy, sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pyhessian", "loss_landscapes", "rebasin"):
            raise ImportError(f"hidden by the test: {name}")
sys.meta_path.insert(0, Hide())
sys.argv = ["benchmarks/peers.py", "--quick", "--threads", "1", "--reps", "1"]
runpy.run_path("benchmarks/peers.py", run_name="__main__")
"""


def test_peers_quick_without_the_peer_packages():
    r = subprocess.run([sys.executable, "-c", HIDE_PEERS], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    for peer in ("pyhessian", "loss-landscapes", "rebasin"):
        assert f"{peer} not importable" in r.stdout, r.stdout
    curve_rows = [line for line in r.stdout.splitlines() if line.startswith("| VGG16") or line.startswith("| PreResNet")]
    assert curve_rows and all("not importable" not in line for line in curve_rows)
    assert "written:" not in r.stdout          # a smoke run leaves the recorded table alone
