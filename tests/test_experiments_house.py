"""experiments/ holds science scripts built on modeconn's public API, and `make experiments` runs the seven."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "experiments").glob("*.py") if p.name != "__init__.py")
SEVEN = ["curves", "alignment", "ensembles", "sharp_flat", "skip_connections", "spawning", "simplex"]


def _imports(path: Path):
    """(module, imported name) for every import statement of a file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield from ((node.module, a.name) for a in node.names)
        elif isinstance(node, ast.Import):
            yield from ((a.name, None) for a in node.names)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_experiments_use_only_the_public_api(path):
    private = [f"{m}.{n}" if n else m for m, n in _imports(path) if m.startswith("modeconn")
               and (any(part.startswith("_") for part in m.split(".")) or (n or "").startswith("_"))]
    assert not private, f"{path.name} imports private modeconn names: {private}"


def test_make_experiments_runs_the_seven_and_each_has_its_quick_test():
    listed = re.search(r"^EXPERIMENTS \?= (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    assert listed == SEVEN
    for name in SEVEN:
        assert (ROOT / "experiments" / f"{name}.py").exists(), name
        test = (ROOT / "tests" / f"test_exp_{name}.py").read_text()
        runs_it = re.search(rf"from experiments import {name}\b", test) or f'EXPERIMENT = "{name}"' in test
        assert runs_it and ("--quick" in test or "quick_run" in test), name


def test_no_speed_benchmark_is_left_in_experiments():
    assert not list((ROOT / "experiments").glob("bench_*.py"))
    assert {"curve_step.py", "landscape.py", "align.py"} <= {p.name for p in (ROOT / "benchmarks").glob("*.py")}
