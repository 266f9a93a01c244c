"""Are two independently trained networks joined by a simple curve of low loss? Line vs PolyChain vs Bezier.

Paper: Garipov, Izmailov, Podoprikhin, Vetrov, Wilson, "Loss Surfaces, Mode
Connectivity, and Fast Ensembling of DNNs" (NeurIPS 2018), Section 3/4 and
Fig. 2. Claim: the optima found by SGD from different initialisations are
connected by simple curves -- a polygonal chain with one bend or a quadratic
Bezier curve, trained to minimise E_{t~U(0,1)} L(θ(t)) -- along which train
loss and test error stay near the endpoints', while the straight line between
them crosses a barrier (its midpoint's error is close to chance). The authors'
repository (github.com/timgaripov/dnn-mode-connectivity, README) reports, on
CIFAR-10, the min / max test error along the curves: VGG16 endpoints
6.79 / 6.94 %, Bezier 6.79 / 7.75 %, PolyChain 6.79 / 8.08 %; PreResNet164
endpoints 4.76 / 4.75 %, Bezier 4.45 / 4.97 %, PolyChain 4.39 / 5.13 %; the
regularised train loss along the curves (VGG16 Bezier 0.14-0.24) never rises
above the endpoints' (0.24) by much.

Protocol: per model/dataset cell and per pair p (``--seeds``; endpoints
trained with seeds 2p and 2p+1: their own initialisation and batch order), two
endpoints are trained with ``mc.train_model`` (SGD, momentum 0.9, Garipov's
"reference" schedule); then four paths between them: the straight line
(``mc.linear_path``), and PolyChain(3), Bezier(3), Bezier(5) fitted with
``mc.fit_curve`` (middle bends started on the line, endpoints fixed, curve
weight decay at θ(t), one t ~ U(0, 1) per batch, fit seed p). Each path is
evaluated by ``mc.evaluate_path`` at ``points`` evenly spaced t with
BatchNorm statistics recomputed at every point (endpoints included). Reported,
mean ± std over pairs: the barriers (``interp`` reference: max_t M(t) minus
the chord between the endpoints' values) of the train and test loss (mean
cross-entropy, without the l2 term) and error; min / mean / max over t of the
train loss and the test error; the arc length of the path in weight space
(the length of the polyline through the evaluated points, a lower bound that
converges with ``points``; exact for the line). results.json also keeps the
paper's l2-regularised train loss along every path.

Cells (``--preset cpu``): digits (8x8, 1438 train / 359 test images) with
``mlp``, ``convnet_bn``, ``vgg11_bn`` at width x1/8 without dropout and
``preresnet`` depth 20; MNIST-1D (1-D signals of length 40) with ``mlp`` and
``cnn1d``. The 2-D convolutional models of the zoo (convnet_bn, VGG, PreResNet)
do not take 1-D input, so MNIST-1D gets only mlp and cnn1d. Epochs are few
(8-20) and curves get as many epochs as the endpoints (the paper: 600 curve
epochs for 200 endpoint epochs), curve learning rate 0.3 x the endpoints' (the
paper's 0.015 / 0.05 for VGG16).

Presets:
  --quick        two pairs, two tiny cells (digits mlp, digits convnet_bn), 2 epochs, 5 points (tests)
  --preset cpu   6 cells x 3 pairs on 2 CPU cores (about 5-9 minutes)
  --preset paper CIFAR-10 from --data-dir: VGG16 (200 endpoint epochs, lr 0.05, wd 5e-4; curves 600
                 epochs, lr 0.015) and PreResNet-110 (150 epochs, lr 0.1, wd 3e-4; curves 200 epochs,
                 lr 0.03), batch 128, 61 points, 3 pairs -- the authors' README; for a GPU, not run here

    python experiments/curves.py                 # the CPU reproduction
    python experiments/curves.py --quick --out /tmp/curves
    python experiments/curves.py --preset paper --data-dir DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typing import List

import numpy as np
import torch
from matplotlib.figure import Figure

import modeconn as mc
from experiments.common import Clock, load_datasets, parse, pm, runtime, summarize, table, write_results

NAME = "curves"
# (name, curve family, bends): the line is PolyChain(2)
PATHS = (("line", "polychain", 2), ("polychain3", "polychain", 3), ("bezier3", "bezier", 3),
         ("bezier5", "bezier", 5))
SCALARS = ("train_loss_barrier", "test_loss_barrier", "train_error_barrier", "test_error_barrier",
           "train_loss_min", "train_loss_mean", "train_loss_max", "test_error_min", "test_error_mean",
           "test_error_max", "arc_length", "arc_ratio", "endpoint_test_error")


def cell(dataset: str, model: str, kwargs: dict, epochs: int, lr: float, wd: float = 5e-4,
         curve_epochs: int = None, batch: int = 64) -> dict:
    """One model/dataset cell: the endpoint recipe and the curve recipe (curve lr = 0.3 x lr, as the paper's)."""
    return {"dataset": dataset, "model": model, "kwargs": kwargs, "epochs": epochs, "lr": lr, "wd": wd,
            "curve_epochs": curve_epochs or epochs, "curve_lr": round(0.3 * lr, 6), "batch": batch}


PRESETS = {
    "quick": {"seeds": [0, 1], "points": 5, "cells": [
        cell("digits", "mlp", {"depth": 1, "width": 16}, 2, 0.05),
        cell("digits", "convnet_bn", {"width": 4}, 2, 0.05)]},
    "cpu": {"seeds": [0, 1, 2], "points": 11, "cells": [
        cell("digits", "mlp", {"depth": 2, "width": 64}, 20, 0.05),
        cell("digits", "convnet_bn", {"width": 8}, 20, 0.05),
        cell("digits", "vgg11_bn", {"width_multiplier": 0.125, "dropout": 0.0}, 15, 0.05),
        cell("digits", "preresnet", {"depth": 20}, 8, 0.1, wd=3e-4),
        cell("mnist1d", "mlp", {"depth": 2, "width": 64}, 20, 0.05),
        cell("mnist1d", "cnn1d", {"width": 16}, 15, 0.05)]},
    "paper": {"seeds": [0, 1, 2], "points": 61, "cells": [
        {**cell("cifar10", "vgg16", {}, 200, 0.05, 5e-4, 600, batch=128), "curve_lr": 0.015},
        {**cell("cifar10", "preresnet", {"depth": 110}, 150, 0.1, 3e-4, 200, batch=128), "curve_lr": 0.03}]},
}


def train_endpoint(ds, c: dict, seed: int, rt: mc.Runtime = None) -> torch.nn.Module:
    """One endpoint of cell ``c``: initialisation and batch order from ``seed`` (mc.train_model's SGD recipe)."""
    torch.manual_seed(seed)
    model = mc.create_model(c["model"], ds.input_shape, ds.num_classes, **c["kwargs"])
    mc.train_model(model, ds.train_loader(c["batch"], seed=seed), c["epochs"], c["lr"], c["wd"], seed=seed,
                   runtime=rt)
    return model.eval()


def make_path(kind: str, a, b, ds, c: dict, seed: int, rt: mc.Runtime = None) -> mc.CurveModel:
    """The path ``kind`` of :data:`PATHS` from ``a`` to ``b``: the line, or a curve fitted on the training data."""
    if kind == "line":
        return mc.linear_path(a, b)
    family, bends = next((f, k) for n, f, k in PATHS if n == kind)
    curve = mc.CurveModel(a, a, b, mc.make_curve(family, bends))
    mc.fit_curve(curve, ds.train_loader(c["batch"], seed=seed), c["curve_epochs"], c["curve_lr"], c["wd"],
                 seed=seed, runtime=rt)
    return curve


def path_metrics(path: mc.CurveModel, train, test, points: int, wd: float) -> dict:
    """Barriers, min/mean/max along t, arc length and the arrays of one path (``mc.evaluate_path``).

    ``*_loss`` is the mean cross-entropy; ``train_reg_loss`` adds the paper's
    ``0.5 * wd * ||θ(t)||²``. Barriers use the ``interp`` reference (``mc.barrier``).
    """
    res = mc.evaluate_path(path, train, test, points, weight_decay=wd)
    curves = {"ts": res.ts, "train_loss": res.train_nll, "test_loss": res.test_nll,
              "train_error": res.train_error, "test_error": res.test_error, "train_reg_loss": res.train_loss}
    out = {f"{m}_barrier": mc.barrier(res.ts, curves[m])[0]
           for m in ("train_loss", "test_loss", "train_error", "test_error")}
    for m in ("train_loss", "test_error", "train_reg_loss"):
        s = res.summary({"train_loss": "train_nll", "train_reg_loss": "train_loss"}.get(m, m))
        out.update({f"{m}_min": s["min"], f"{m}_mean": s["mean"], f"{m}_max": s["max"]})
    out["arc_length"] = float(res.arc_length[-1])
    out["endpoint_test_error"] = float(0.5 * (res.test_error[0] + res.test_error[-1]))
    out["curves"] = {k: np.asarray(v, dtype=float).tolist() for k, v in curves.items()}
    return out


def run_pair(ds, c: dict, pair: int, points: int, rt: mc.Runtime = None) -> List[dict]:
    """Endpoints 2·pair and 2·pair+1, the four paths between them, one row of metrics per path."""
    a, b = train_endpoint(ds, c, 2 * pair, rt), train_endpoint(ds, c, 2 * pair + 1, rt)
    device = rt.device if rt is not None else "cpu"
    train, test = ds.eval_loader("train", 512).to(device), ds.eval_loader("test", 512).to(device)
    rows = []
    for kind, _, _ in PATHS:
        clock = Clock()
        path = make_path(kind, a, b, ds, c, pair, rt)
        row = {"dataset": c["dataset"], "model": c["model"], "pair": pair, "path": kind,
               **path_metrics(path, train, test, points, c["wd"])}
        row["seconds"] = clock.seconds
        rows.append(row)
    line_length = rows[0]["arc_length"]
    for row in rows:
        row["arc_ratio"] = row["arc_length"] / line_length if line_length > 0 else float("nan")
    return rows


def pct(v, digits: int = 2) -> str:
    """An error (fraction, or (mean, std) of fractions) in percent."""
    return pm((100 * v[0], 100 * v[1]) if isinstance(v, (tuple, list)) else 100 * v, digits)


def markdown(summary: List[dict], cfg: dict, seconds: float) -> str:
    """results.md: the barrier table and the along-the-path table (mean ± std over pairs)."""
    key = ("dataset", "model", "path")
    head = ["# Line vs PolyChain vs Bezier curves between independently trained networks", "",
            f"Preset `{cfg['preset']}`, pairs {cfg['seeds']} (endpoint seeds 2p, 2p+1), {cfg['points']} points "
            f"per path, BN recomputed at every point; mean ± std over pairs; {seconds:.0f} s.", "",
            "Barriers (`interp`: max over t of M(t) minus the chord between the endpoints; loss = cross-entropy, "
            "error in %):", ""]
    barriers = table(["dataset", "model", "path", "pairs", "train loss", "test loss", "train error %",
                      "test error %"],
                     [[r[k] for k in key] + [r["n"], pm(r["train_loss_barrier"]), pm(r["test_loss_barrier"]),
                                             pct(r["train_error_barrier"]), pct(r["test_error_barrier"])]
                      for r in summary])
    along = table(["dataset", "model", "path", "endpoints' test error %", "train loss min / mean / max",
                   "test error % min / mean / max", "arc length", "arc / line"],
                  [[r[k] for k in key] + [pct(r["endpoint_test_error"]),
                                          " / ".join(pm(r[f"train_loss_{s}"], 3) for s in ("min", "mean", "max")),
                                          " / ".join(pct(r[f"test_error_{s}"], 1) for s in ("min", "mean", "max")),
                                          pm(r["arc_length"], 2), pm(r["arc_ratio"], 3)] for r in summary])
    cells = "\n".join(f"- {c['dataset']} `{c['model']}` {c['kwargs']}: {c['epochs']} epochs lr {c['lr']} wd "
                      f"{c['wd']} batch {c['batch']}; curves {c['curve_epochs']} epochs lr {c['curve_lr']}"
                      for c in cfg["cells"])
    return "\n".join(head + [barriers, "", "Along the path (min / mean over t / max; arc length in weight "
                                            "space, and relative to the line's):", "", along, "",
                             "Cells:", "", cells]) + "\n"


def figure(rows: List[dict], cells: List[dict]) -> Figure:
    """Train loss (top) and test error (bottom) against t, one column per cell, mean ± std over pairs."""
    fig = Figure(figsize=(3.0 * len(cells), 5.4))
    axes = fig.subplots(2, len(cells), squeeze=False)
    for j, c in enumerate(cells):
        for i, (metric, label) in enumerate((("train_loss", "train loss"), ("test_error", "test error %"))):
            ax = axes[i][j]
            for k, (kind, _, _) in enumerate(PATHS):
                mine = [r for r in rows if (r["dataset"], r["model"], r["path"]) == (c["dataset"], c["model"], kind)]
                ts = np.asarray(mine[0]["curves"]["ts"])
                v = np.asarray([r["curves"][metric] for r in mine]) * (100 if metric == "test_error" else 1)
                ax.plot(ts, v.mean(0), color=f"C{k}", label=kind)
                ax.fill_between(ts, v.mean(0) - v.std(0), v.mean(0) + v.std(0), color=f"C{k}", alpha=0.2)
            ax.set_xlabel("t")
            if j == 0:
                ax.set_ylabel(label)
            if i == 0:
                ax.set_title(f"{c['dataset']} {c['model']}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv=None) -> dict:
    """Train the endpoints, fit and evaluate the paths, write results.json / results.md / curves.png."""
    args, cfg = parse(NAME, __doc__, PRESETS, argv)
    clock, rt = Clock(), runtime()
    datasets = load_datasets(cfg["cells"], args.data_dir, NAME)
    rows = []
    for c in cfg["cells"]:
        for pair in cfg["seeds"]:
            rows += run_pair(datasets[c["dataset"]], c, pair, cfg["points"], rt)
            print(f"{c['dataset']} {c['model']} pair {pair}: test-error barrier " + ", ".join(
                f"{r['path']} {100 * r['test_error_barrier']:.1f}%" for r in rows[-len(PATHS):]) + f"  ({clock})",
                flush=True)
    summary = summarize(rows, ("dataset", "model", "path"), SCALARS)
    result = {"config": cfg, "seconds": clock.seconds, "runs": rows, "summary": summary}
    text = markdown(summary, cfg, clock.seconds)
    out = write_results(args, NAME, result, text, {NAME: figure(rows, cfg["cells"])})
    print(text)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / (NAME + '.png')}")
    return result


if __name__ == "__main__":
    main()
