"""The house rules of the redesign, checked on the source tree itself.

A newcomer relies on them: files short enough to read, functions that fit on
a screen, no command hacks (callable modules, rewritten ``sys.modules``), no
test hooks and no import side effects in the library.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "modeconn"
SOURCES = sorted(PACKAGE.rglob("*.py"))
MAX_FILE_LINES = 500
MAX_BODY_LINES = 60


def _body_lines(fn: ast.AST) -> int:
    """Lines of a function body, its docstring left out."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if not body:
        return 0
    return body[-1].end_lineno - body[0].lineno + 1


def test_the_rules_see_the_package():
    assert len(SOURCES) > 30 and (PACKAGE / "core" / "layout.py") in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_file_and_function_sizes(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{path} has more than {MAX_FILE_LINES} lines"
    functions = [node for node in ast.walk(ast.parse(text)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    long = [(f.name, _body_lines(f)) for f in functions if _body_lines(f) > MAX_BODY_LINES]
    assert not long, f"{path}: function bodies over {MAX_BODY_LINES} lines: {long}"
    # the whole function too, docstring and signature included: a reader sees it at once
    whole = [(f.name, f.end_lineno - f.lineno + 1) for f in functions if f.end_lineno - f.lineno + 1 > MAX_BODY_LINES]
    assert not whole, f"{path}: functions over {MAX_BODY_LINES} lines: {whole}"


def test_body_counter_counts_what_it_should():
    tree = ast.parse('def f():\n    """doc\n    more"""\n    a = 1\n\n    return a\n')
    assert _body_lines(tree.body[0]) == 3


@pytest.mark.parametrize("forbidden", ["matplotlib.use(", "import matplotlib.pyplot", "__class__ =",
                                       "MODECONN_FAULT", "os._exit(", "._actions", "share_name_with"])
def test_no_hacks_in_the_library(forbidden):
    offenders = [str(p.relative_to(ROOT)) for p in SOURCES if forbidden in p.read_text()]
    assert not offenders, f"{forbidden!r} in {offenders}"


def test_every_command_answers_help():
    from modeconn.cli import COMMANDS

    for name in COMMANDS:
        proc = subprocess.run([sys.executable, "-m", f"modeconn.{name}", "--help"], capture_output=True,
                              text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0 and "usage:" in proc.stdout and f"modeconn.{name}" in proc.stdout, name


def test_no_command_flag_is_taken_by_torchrun():
    """torchrun parses with abbreviations before the module's arguments: a modeconn flag equal to, or a
    prefix of, one of torchrun's (``--start`` vs ``--start-method``) stops ``torchrun -m modeconn.X FLAGS``."""
    import importlib

    from torch.distributed.run import get_args_parser

    from modeconn.cli import COMMANDS

    theirs = [o for a in get_args_parser()._actions for o in a.option_strings if o.startswith("--")]
    clashes = []
    for name in COMMANDS:
        ours = importlib.import_module(f"modeconn.{name}").build_parser()
        for action in ours._actions:
            clashes += [(name, o, t) for o in action.option_strings if o.startswith("--") and o != "--help"
                        for t in theirs if t.startswith(o)]
    assert not clashes, f"command flags torchrun would take for its own: {clashes}"
