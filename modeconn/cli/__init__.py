"""The console script: ``modeconn <command> [args]`` = ``python -m modeconn.<command> [args]``."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "train an endpoint network",
    "train_curve": "fit a curve between two endpoints",
    "eval_curve": "loss, error and barriers along a curve or a line",
    "align": "permute one network's neurons to match another",
    "fge": "Fast Geometric Ensembling from a trained network",
    "plane": "loss surface in the plane of a curve",
    "landscape": "filter-normalised 1-D/2-D loss slices around a model",
    "demo": "the main job on the embedded digits data",
}


def usage() -> str:
    lines = ["usage: modeconn <command> [options]   (modeconn <command> --help for each)", "", "commands:"]
    lines += [f"  {name:12s} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name = argv[0].replace("-", "_")
    if name not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"modeconn.{name}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
