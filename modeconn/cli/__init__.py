"""The commands' shared layer and the console script ``modeconn <command> [args]``.

``modeconn <command> [args]`` = ``python -m modeconn <command> [args]`` =
``python -m modeconn.<command> [args]``. The helpers the commands share live
in submodules, one concern each: :mod:`~modeconn.cli.args` (the parser and
the flag groups), :mod:`~modeconn.cli.session` (device, torchrun rank,
progress bars), :mod:`~modeconn.cli.data` (the dataset a checkpoint names),
:mod:`~modeconn.cli.rundir` (run directories: refuse to overwrite, resume,
atomic state), :mod:`~modeconn.cli.outputs` (JSON/CSV/npz files) and
:mod:`~modeconn.cli.errors` (one line and an exit status for every failure).
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

COMMANDS = {
    "train": "train an endpoint network",
    "train_curve": "fit a curve between two endpoints",
    "eval_curve": "loss, error and barriers along a curve or a line",
    "train_simplex": "fit a complex of simplexes connecting several modes",
    "eval_simplex": "loss, worst point, barriers and ensembles of a complex",
    "align": "permute one network's neurons to match another",
    "fge": "Fast Geometric Ensembling from a trained network",
    "plane": "loss surface in the plane of a curve",
    "landscape": "filter-normalised 1-D/2-D loss slices around a model",
    "sharpness": "Hessian, slice curvature and ε-sharpness of models side by side",
    "spawn": "children spawned from one parent at epoch k: their barrier vs k",
    "demo": "the main job on the embedded digits data",
}


def usage() -> str:
    """The console script's help: one line per command."""
    lines = ["usage: modeconn <command> [options]   (modeconn <command> --help for each; modeconn --version)",
             "", "commands:"]
    lines += [f"  {name:12s} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``modeconn <command> [args]``: run ``modeconn.<command>.main(args)``; returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from modeconn._version import __version__
        print(f"modeconn {__version__}")
        return 0
    name = argv[0].replace("-", "_")
    if name not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; one of {', '.join(COMMANDS)} (modeconn --help)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"modeconn.{name}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
