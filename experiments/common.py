"""What every experiment script shares: its command line, its presets, its result files.

An experiment is ``python experiments/<name>.py [--quick] [--preset cpu|paper] [--out DIR]``:

* ``--preset cpu`` (default) is the CPU reproduction (≤ 15 minutes on 2 cores);
* ``--quick`` is a tiny run (well under a minute) that the test suite makes of every experiment;
* ``--preset paper`` carries the paper's datasets and hyper-parameters (CIFAR from ``--data-dir``),
  meant for a GPU.

Results go to ``runs/experiments/<name>/`` (or ``--out``): ``results.json`` (the config, every run and
the summary), ``results.md`` (the tables) and PNG figures. ``--publish`` also copies ``results.md`` to
``experiments/results/<name>.md`` and the main figure to ``experiments/figures/<name>.png``, which is how
``make experiments`` refreshes what the repository shows.

Scripts use only modeconn's public API (no ``_private`` module) and this file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure

import modeconn as mc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PNG_LIMIT = 200_000  # bytes: figures committed under experiments/figures/ stay small


def parse(name: str, doc: str, presets: Mapping[str, dict], argv: Optional[Sequence[str]] = None,
          extra=None) -> Tuple[argparse.Namespace, dict]:
    """The experiment's arguments and its config: ``presets["quick"|"cpu"|"paper"]``, copied.

    ``extra(parser)`` may add the experiment's own flags. ``--seeds`` overrides the preset's seeds.
    """
    p = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny run (< 1 minute; what the tests run)")
    p.add_argument("--preset", choices=["cpu", "paper"], default="cpu",
                   help="cpu: the CPU reproduction (default, <= 15 min on 2 cores); paper: the paper's "
                        "datasets and hyper-parameters (CIFAR from --data-dir; meant for a GPU)")
    p.add_argument("--out", default=None, help=f"output directory (default: runs/experiments/{name})")
    p.add_argument("--data-dir", default=None, help="where torchvision datasets are (paper preset)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the preset's seeds")
    p.add_argument("--publish", action="store_true",
                   help="also copy results.md and the main figure into experiments/results and experiments/figures")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    preset = "quick" if args.quick else args.preset
    if preset not in presets:
        p.error(f"experiment {name!r} has no {preset!r} preset")
    cfg = json.loads(json.dumps(presets[preset]))  # a deep copy that is also JSON-clean
    cfg["preset"] = preset
    if args.seeds is not None:
        cfg["seeds"] = list(args.seeds)
    if args.publish and preset == "quick":
        p.error("--publish is for full runs; a --quick run is not what the repository should show")
    args.out = Path(args.out) if args.out else ROOT / "runs" / "experiments" / name
    return args, cfg


def mean_std(values: Iterable[float]) -> Tuple[float, float]:
    """Mean and (population) standard deviation, as plain floats."""
    v = np.asarray(list(values), dtype=float)
    return float(v.mean()), float(v.std())


def summarize(rows: List[dict], by: Sequence[str], keys: Sequence[str]) -> List[dict]:
    """One row per distinct value of ``by``: ``by``'s values, then ``key: (mean, std)`` for every key."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[b] for b in by), []).append(r)
    return [dict(zip(by, g), n=len(rs), **{k: mean_std(r[k] for r in rs) for k in keys})
            for g, rs in groups.items()]


def pm(value, digits: int = 4) -> str:
    """``mean ± std`` for a (mean, std) pair, the number itself otherwise."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence], digits: int = 4) -> str:
    """A markdown table; (mean, std) cells print as ``mean ± std``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(pm(c, digits) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(fig: Figure, path: Path, dpi: int = 90) -> Path:
    """Write ``fig`` as a PNG (atomically), lowering the resolution until it is under 200 KB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    while True:
        fig.savefig(tmp, format="png", dpi=dpi)
        if tmp.stat().st_size <= PNG_LIMIT or dpi <= 40:
            break
        dpi = int(dpi * 0.8)
    os.replace(tmp, path)
    return path


def write_results(args: argparse.Namespace, name: str, result: dict, markdown: str,
                  figures: Mapping[str, Figure], main_figure: Optional[str] = None) -> Path:
    """Write ``results.json``, ``results.md`` and the figures into ``args.out``; publish if asked.

    ``result`` must be JSON-serialisable (numbers, lists, dicts). ``figures`` maps a file stem to a
    figure; ``main_figure`` (default: the first) is the one ``--publish`` copies.
    """
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "results.md").write_text(markdown)
    paths = {stem: save_figure(fig, out / f"{stem}.png") for stem, fig in figures.items()}
    if args.publish:
        (HERE / "results").mkdir(exist_ok=True)
        shutil.copyfile(out / "results.md", HERE / "results" / f"{name}.md")
        if paths:
            main = paths[main_figure or next(iter(paths))]
            (HERE / "figures").mkdir(exist_ok=True)
            shutil.copyfile(main, HERE / "figures" / f"{name}.png")
    return out


def load_datasets(cells: Sequence[Mapping], data_dir, script: str) -> Dict[str, object]:
    """Every cell's ``"dataset"`` by name, all loaded before any training: a missing torchvision set ends
    the run at once with one line naming ``experiments/<script>.py``."""
    datasets = {}
    for name in dict.fromkeys(c["dataset"] for c in cells):
        try:
            datasets[name] = mc.get_dataset(name, data_dir=data_dir or "data")
        except FileNotFoundError as e:
            raise SystemExit(f"experiments/{script}.py: {e}") from None
    return datasets


def runtime() -> mc.Runtime:
    """The paper presets run on a GPU when there is one; everything else on the CPU."""
    return mc.Runtime(device="cuda" if torch.cuda.is_available() else "cpu")


class Clock:
    """Seconds since construction; ``str`` gives ``'123 s'``."""

    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def __str__(self) -> str:
        return f"{self.seconds:.0f} s"
