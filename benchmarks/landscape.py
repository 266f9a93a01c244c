"""Benchmark: a 21x21 loss-landscape grid, modeconn.landscape vs Li et al.'s point-at-a-time loop.

    .venv/bin/python benchmarks/landscape.py [--grid 21] [--epochs 10] [--json out.json]

Two networks on the digits dataset: the default MLP (no BN) and a BN CNN
(``create_model("convnet", (1, 8, 8), 10, bn=True, width=16)``), both briefly
trained. For each, the same filter-normalised random plane (seed 0) over
[-1, 1]² is evaluated

* by ``modeconn.geometry.evaluate_grid`` (several points per pass through
  ``modeconn.evaluation.path.evaluate_points``: vmap over stacked weights, data held as
  tensors, BN statistics of all points of a pass in one pass), and
* by the loop of Li et al.'s ``loss-landscape`` code re-created below: for
  each grid point, write ``w + x·d1 + y·d2`` into the parameters of one model
  copy, [for BN models: ``torch.optim.swa_utils.update_bn`` — the reference
  itself never does this], then evaluate over a ``torch.utils.data.DataLoader``
  (batch 128) accumulating ``loss.item() * batch_size`` per batch.

Both compute train and test loss and accuracy at all points; the BN pass of
both uses batches of 128 over the training set in the same order, so the
numbers agree to float rounding (max abs difference printed). The methods
run interleaved, row by row (see ``bench``), so both see the same load. With
``--single`` also modeconn with ``points_per_pass=1`` (no vmap), to separate
the two sources of speed. Timings on a shared CPU are noisy; the BN CNN part
is compute-bound and takes several minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch
import torch.nn as nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

import modeconn as mc
from modeconn.evaluation.model import evaluate
from modeconn.geometry import evaluate_grid, evaluator_for, flatten_parameters, random_plane


# ------------------------------------------------------- Li et al., re-created
def _set_weights(net, weights, directions, step):
    """loss-landscape's net_plotter.set_weights: p = w + d0·x + d1·y, tensor by tensor."""
    dx, dy = directions
    for p, w, d0, d1 in zip(net.parameters(), weights, dx, dy):
        p.data = w + d0 * step[0] + d1 * step[1]


def _eval_loss(net, criterion, loader):
    """loss-landscape's evaluation.eval_loss (classification branch)."""
    correct = total_loss = total = 0
    net.eval()
    with torch.no_grad():
        for inputs, targets in loader:
            batch_size = inputs.size(0)
            total += batch_size
            outputs = net(inputs)
            loss = criterion(outputs, targets)
            total_loss += loss.item() * batch_size
            _, predicted = torch.max(outputs.data, 1)
            correct += predicted.eq(targets).sum().item()
    return total_loss / total, correct / total


class Reference:
    """Li et al.'s loop over the points of one grid row at a time (so rows can be interleaved)."""

    def __init__(self, model, plane, xs, ys, ds, recompute_bn):
        self.net = copy.deepcopy(model)
        self.weights = [p.data.clone() for p in self.net.parameters()]
        sizes = [w.numel() for w in self.weights]
        split = lambda v: [c.view_as(w) for c, w in zip(torch.split(v, sizes), self.weights)]
        self.directions = (split(plane.d1), split(plane.d2))
        self.train = DataLoader(TensorDataset(ds.x_train, ds.y_train), batch_size=128, shuffle=False)
        self.test = DataLoader(TensorDataset(ds.x_test, ds.y_test), batch_size=128, shuffle=False)
        self.criterion = nn.CrossEntropyLoss()
        self.xs, self.ys, self.bn = xs, ys, recompute_bn
        self.out = {k: np.full((len(ys), len(xs)), np.nan)
                    for k in ("train_loss", "train_acc", "test_loss", "test_acc")}

    def row(self, j):
        out = self.out
        for i, x in enumerate(self.xs):
            _set_weights(self.net, self.weights, self.directions, (float(x), float(self.ys[j])))
            if self.bn:
                update_bn(self.train, self.net)
            out["train_loss"][j, i], out["train_acc"][j, i] = _eval_loss(self.net, self.criterion, self.train)
            out["test_loss"][j, i], out["test_acc"][j, i] = _eval_loss(self.net, self.criterion, self.test)


# ------------------------------------------------------------------- bench
def bench(name, model, ds, grid, points_per_pass, bn, single=False):
    """One grid, the methods interleaved row by row: after each row modeconn finishes
    (``on_row``), the reference (and, with ``single``, modeconn with one point per
    pass) computes the same row. Each method's time is the sum over its rows, so a
    burst of load from other processes hits all of them alike."""
    theta = flatten_parameters(model)
    plane = random_plane(theta, model, dims=2, norm="filter", seed=0)
    xs = ys = np.linspace(-1.0, 1.0, grid)
    train, test = ds.eval_loader("train", 1024), ds.eval_loader("test", 1024)
    bn_loader = ds.eval_loader("train", 128)  # the reference's update_bn batches
    n = grid * grid
    ref = Reference(model, plane, xs, ys, ds, bn)
    evaluator = evaluator_for(model)
    k1 = {k: np.full((grid, grid), np.nan) for k in ref.out}
    times = {"ours": [], "ref": [], "k1": []}
    evaluate_grid(evaluator, plane, xs[:2], ys[:1], train, test, bn_loader=bn_loader, recompute_bn=bn,
                  points_per_pass=2)  # warm-up (first vmap trace)
    clock = [time.perf_counter()]

    def on_row(j, partial):
        times["ours"].append(time.perf_counter() - clock[0])
        t0 = time.perf_counter()
        ref.row(j)
        times["ref"].append(time.perf_counter() - t0)
        if single:
            t0 = time.perf_counter()
            g1 = evaluate_grid(evaluator, plane, xs, ys[j:j + 1], train, test, bn_loader=bn_loader,
                               recompute_bn=bn, points_per_pass=1)
            times["k1"].append(time.perf_counter() - t0)
            for k in k1:
                k1[k][j] = g1.arrays[k][0]
        clock[0] = time.perf_counter()

    mine = evaluate_grid(model, plane, xs, ys, train, test, bn_loader=bn_loader, recompute_bn=bn,
                         points_per_pass=points_per_pass, on_row=on_row).arrays
    t_ours, t_ref = sum(times["ours"]), sum(times["ref"])
    t_single = sum(times["k1"]) if single else None
    row_ratio = float(np.median(np.array(times["ref"]) / np.array(times["ours"])))
    diff = {k: float(np.max(np.abs(mine[k] - ref.out[k]))) for k in ref.out}
    print(f"\n{name}: {grid}x{grid} = {n} points, {theta.numel()} parameters, BN recomputed per point: {bn}")
    print(f"  Li et al. loop (DataLoader 128, .item()/batch) {t_ref:8.2f} s  {n / t_ref:7.1f} points/s")
    if single:
        print(f"  modeconn, points_per_pass=1                    {t_single:8.2f} s  {n / t_single:7.1f} points/s"
              f"  ({t_ref / t_single:.1f}x; max abs diff "
              f"{max(float(np.max(np.abs(k1[k] - ref.out[k]))) for k in ref.out):.2e})")
    print(f"  modeconn, points_per_pass={points_per_pass:<2d}                   {t_ours:8.2f} s  "
          f"{n / t_ours:7.1f} points/s  ({t_ref / t_ours:.1f}x)")
    print("  max |modeconn - reference|: " + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))
    print(f"  speed ratio (reference time / modeconn time): {t_ref / t_ours:.2f}x total, "
          f"{row_ratio:.2f}x median over rows")
    return {"model": name, "points": n, "parameters": int(theta.numel()), "bn_recomputed": bn,
            "seconds_reference": t_ref, "seconds_modeconn": t_ours, "seconds_modeconn_k1": t_single,
            "points_per_pass": points_per_pass, "speedup": t_ref / t_ours, "speedup_median_row": row_ratio,
            "speedup_k1": None if t_single is None else t_ref / t_single,
            "max_abs_diff": diff}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", type=int, default=21, help="grid points per axis (default: %(default)s)")
    p.add_argument("--points-per-pass", type=int, default=8, help="modeconn points per pass (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs of the MLP (CNN: half) "
                                                          "(default: %(default)s)")
    p.add_argument("--single", action="store_true",
                   help="also time modeconn with points_per_pass=1 (no vmap) to separate the gains")
    p.add_argument("--only", choices=("mlp", "cnn"), default=None, help="run one of the two models")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for both methods (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    ds = mc.get_dataset("digits")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, digits: {len(ds.x_train)} train / "
          f"{len(ds.x_test)} test samples")
    results = []
    for name, kwargs, bn, epochs in (("mlp", {}, False, args.epochs),
                                     ("convnet bn width 16", {"bn": True, "width": 16}, True,
                                      max(1, args.epochs // 2))):
        if args.only and not name.startswith(args.only if args.only == "mlp" else "convnet"):
            continue
        torch.manual_seed(0)
        model = mc.create_model("convnet" if bn else "mlp", ds.input_shape, ds.num_classes, **kwargs)
        t0 = time.perf_counter()
        mc.train_model(model, ds.train_loader(64, seed=0), epochs=epochs, lr=0.05, seed=0)
        print(f"\ntrained {name} for {epochs} epochs in {time.perf_counter() - t0:.1f}s: test acc "
              f"{evaluate(model, ds.eval_loader('test'))['acc']:.4f}")
        results.append(bench(name, model, ds, args.grid, args.points_per_pass, bn, args.single))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": str(torch.__version__), "threads": torch.get_num_threads(), "results": results},
                      f, indent=2)


if __name__ == "__main__":
    main()
