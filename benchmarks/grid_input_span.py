"""Benchmark: grids and paths with the input layer's products shared across points, against without.

    .venv/bin/python benchmarks/grid_input_span.py [--grid 11] [--reps 5]

:mod:`modeconn.evaluation.input_span` computes the products of a layer that
reads the raw input once per plane vector (origin, d1, d2) and batch for the
whole grid, instead of once per point. Switched off here by raising
``MIN_FAN_IN`` above every layer's fan-in; the two variants run interleaved
(A B A B ..., medians) in one process, on

* an MNIST-sized MLP 784-256-256-10 on 2,000 seeded random 28x28 images
  (batches of 500 from a ``TensorLoader``): the input layer is the largest;
* the shipped digits MLP 64-128-128-10 on the digits training set as one batch.

and the same two architectures along a Bezier(3) curve between two fresh
initialisations (31 points; every point's combination then takes three
passes, so only the wide input layer qualifies: for the digits MLP both
variants then run the same code, a difference of exactly 0, and their ratio
shows the run-to-run noise). Both variants must give the same values up to
float32 rounding (the largest difference is printed).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root: benchmarks._peers
from benchmarks._peers import interleaved  # noqa: E402
from modeconn import get_dataset, load_model, shipped_checkpoint  # noqa: E402
from modeconn.core.curve_model import CurveModel  # noqa: E402
from modeconn.core.curves import Bezier  # noqa: E402
from modeconn.data import TensorLoader  # noqa: E402
from modeconn.evaluation.path import evaluate_path  # noqa: E402
from modeconn.evaluation import input_span  # noqa: E402
from modeconn.geometry import evaluate_grid, flatten_parameters, random_plane  # noqa: E402


def _mnist_sized():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, 10)).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, 1, 28, 28, generator=g), torch.randint(0, 10, (2000,), generator=g)
    return "MLP 784-256-256-10, 2,000 random 28x28 images", net, TensorLoader(x, y, batch_size=500)


def _digits_mlp():
    net, _ = load_model(shipped_checkpoint("digits_mlp_a"))
    ds = get_dataset("digits")
    return "digits MLP 64-128-128-10, digits train set", net.eval(), ds.eval_loader("train", len(ds.y_train))


def _side_by_side(name: str, work: Callable[[], object], values: Callable[[object], np.ndarray], reps: int) -> None:
    """``work()`` with the input products shared and per point, interleaved; prints times, ratio, max |Δ|."""
    results = {}

    def run(shared: bool):
        def go():
            saved = input_span.MIN_FAN_IN
            input_span.MIN_FAN_IN = saved if shared else 1 << 62
            try:
                results[shared] = work()
            finally:
                input_span.MIN_FAN_IN = saved
        return go

    t = interleaved({"shared": run(True), "per point": run(False)}, reps)
    diff = np.abs(values(results[True]) - values(results[False])).max()
    print(f"{name}: shared {t['shared']:.3f} s, per point {t['per point']:.3f} s, "
          f"ratio {t['shared'] / t['per point']:.2f}; max |Δ train loss| {diff:.1e}")


def _case(name, net, loader, steps: int, reps: int) -> None:
    """A ``steps`` x ``steps`` grid over [-1, 1]² of a filter-normalised random plane (seed 0)."""
    xs = np.linspace(-1.0, 1.0, steps)
    plane = random_plane(flatten_parameters(net), net, dims=2, norm="filter", seed=0)
    _side_by_side(f"{name}, {steps}x{steps} grid",
                  lambda: evaluate_grid(net, plane, xs, xs, train_loader=loader, recompute_bn=False),
                  lambda g: g.arrays["train_loss"], reps)


def _path_case(name, make, loader, points: int, reps: int) -> None:
    """A Bezier(3) curve between two networks of ``make``'s architecture, evaluated at ``points`` ts."""
    torch.manual_seed(1)
    a, b = make(), make()
    curve = CurveModel(a, a, b, Bezier(3))
    _side_by_side(f"{name}, Bezier(3) path, {points} points",
                  lambda: evaluate_path(curve, loader, loader, num_points=points), lambda r: r.train_nll, reps)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", type=int, default=11, help="points per axis (default 11)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for make in (_mnist_sized, _digits_mlp):
        _case(*make(), args.grid, args.reps)
    name, net, loader = _mnist_sized()
    _path_case(name.split(",")[0], lambda: copy.deepcopy(net).apply(_reset), loader, 31, args.reps)
    name, net, loader = _digits_mlp()
    _path_case(name.split(",")[0], lambda: copy.deepcopy(net).apply(_reset), loader, 31, args.reps)


def _reset(m: nn.Module) -> None:
    """A fresh initialisation of a layer (two different networks of one architecture)."""
    if hasattr(m, "reset_parameters"):
        m.reset_parameters()


if __name__ == "__main__":
    main()
