"""At an equal training budget, which ensemble is best: FGE, independent networks, a curve's points, a simplex's?

Paper: Garipov, Izmailov, Podoprikhin, Vetrov, Wilson, "Loss Surfaces, Mode
Connectivity, and Fast Ensembling of DNNs" (NeurIPS 2018), Section 5 and
Table 3. Claim: Fast Geometric Ensembling -- continue training one network
with a cyclical learning rate and average the predictions of the snapshots
taken at the rate's minima -- beats a single network trained with the same
budget and competes with ensembles of independently trained networks that
cost more. The authors' repository (github.com/timgaripov/dnn-mode-connectivity,
README) gives the CIFAR-100 test accuracy for 1 / 2 / 3 budgets (a budget B =
the epochs of one conventional training, 200): VGG16 Ind 72.5 ± 0.1 / 74.8 /
75.6 %, FGE 74.6 ± 0.1 / 76.1 / 76.6 %; PreResNet164 Ind 78.4 ± 0.1 / 80.5 /
81.6 %, FGE 80.3 ± 0.2 / 81.3 / 81.7 % -- FGE with one budget about ties two
independent networks. Ensembles of points along a fitted curve and of
samples from a simplex (Benton et al. 2021, "Loss Surface Simplexes for Mode
Connecting Volumes and Fast Ensembling") are the other two ways to turn a
low-loss region into an ensemble.

Protocol, per cell and seed s (budgets counted in epochs; B = ``epochs``):

* independent: K networks (model seeds 10s+j: initialisation and batch
  order), each ``epochs`` epochs with ``mc.train_model``; the ensemble of the
  first k costs kB;
* FGE (``mc.train_fge``): from each independent network's checkpoint at epoch
  ``epochs - fge_epochs`` (the paper starts from epoch 160 of 200),
  ``fge_epochs`` epochs of the cyclical rate (cycles of ``fge_cycle`` epochs,
  ``lr_max`` -> ``lr_min``), one snapshot per cycle; a run costs B; the
  ensemble of the snapshots of the first k runs costs kB;
* curve: a Bezier(3) fitted (``mc.fit_curve``, ``curve_epochs``) between
  independent networks 0 and 1; members (``mc.curve_ensemble``) at t = 0, 1,
  1/2, 1/4, 3/4, 1/8, ...: the two endpoints first, so its 2-member ensemble is
  the independent one's; cost 2B + curve_epochs;
* simplex: the mode-connecting complex of the same two networks with two
  free vertices (``SimplexModel.connecting``, ``mc.fit_simplex``,
  ``simplex_epochs``); members: the two modes, then ``mc.simplex_ensemble``
  samples (α ~ Dirichlet(1) on a random simplex); cost 2B + simplex_epochs.

Every member's BatchNorm statistics are recomputed over the training data
(``mc.recompute_bn``; snapshots and curve/simplex points by the library); the
ensemble averages softmax probabilities (``mc.evaluate_ensemble``). Reported
on the test set, mean ± std over seeds: accuracy, NLL and ECE (15
equal-width confidence bins, Σ_b n_b/n |acc_b - conf_b|, as
``EnsembleResult`` computes it), against the number of members and against
the budget. An epoch of curve or simplex fitting is counted as one epoch
(one forward/backward per batch at one sampled point).

Cells (``--preset cpu``, 5 seeds): digits ``mlp`` (2 x 64, 20 epochs; FGE
over the last 6 in cycles of 1 epoch) and MNIST-1D ``cnn1d`` (width 16, 30
epochs; FGE over the last 6), FGE's share of the budget about the paper's
(40 of 200 epochs). Not digits' convnets: in a one-seed trial every ensemble of
``convnet_bn`` scored 99.72 % (one error among 359 test images), too few
errors to tell the methods apart. MNIST-1D is 1-D (length 40): the 2-D
convolutional models of the zoo do not take it, hence cnn1d.

Presets:
  --quick        two seeds, digits mlp, 4 epochs, 2 independent networks (tests)
  --preset cpu   2 cells x 5 seeds x K = 3 (a few minutes on 2 cores)
  --preset paper CIFAR-100 from --data-dir, VGG16 (200 epochs, lr 0.05, wd 5e-4; FGE over the last 40
                 epochs in cycles of 2, lr 1e-2 -> 5e-4; curve / simplex 200 epochs, lr 0.015), K = 3,
                 batch 128 -- for a GPU, not run here

    python experiments/ensembles.py
    python experiments/ensembles.py --quick --out /tmp/ensembles
    python experiments/ensembles.py --preset paper --data-dir DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typing import List, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure

import modeconn as mc
from experiments.common import Clock, load_datasets, parse, pm, runtime, summarize, table, write_results

NAME = "ensembles"
METHODS = ("independent", "fge", "curve", "simplex")
CURVE_TS = (0.0, 1.0, 0.5, 0.25, 0.75, 0.125, 0.375, 0.625, 0.875)  # endpoints first, then halving


def cell(dataset: str, model: str, kwargs: dict, epochs: int, fge_epochs: int, lr: float = 0.05,
         wd: float = 5e-4, batch: int = 64, fge_cycle: int = 1, lr_max: float = 0.02, lr_min: float = 0.0005,
         members: int = 9) -> dict:
    """One cell: the recipe of a network, of FGE, and of the curve / simplex fits (epochs = one budget)."""
    return {"dataset": dataset, "model": model, "kwargs": kwargs, "epochs": epochs, "lr": lr, "wd": wd,
            "batch": batch, "fge_epochs": fge_epochs, "fge_cycle": fge_cycle, "lr_max": lr_max, "lr_min": lr_min,
            "curve_epochs": epochs, "curve_lr": round(0.3 * lr, 6), "simplex_epochs": epochs,
            "simplex_lr": round(0.3 * lr, 6), "members": members}


PRESETS = {
    "quick": {"seeds": [0, 1], "independent": 2,
              "cells": [cell("digits", "mlp", {"depth": 1, "width": 32}, 4, 2, members=4)]},
    "cpu": {"seeds": [0, 1, 2, 3, 4], "independent": 3,
            "cells": [cell("digits", "mlp", {"depth": 2, "width": 64}, 20, 6),
                      cell("mnist1d", "cnn1d", {"width": 16}, 30, 6)]},
    "paper": {"seeds": [0, 1, 2], "independent": 3,
              "cells": [cell("cifar100", "vgg16", {}, 200, 40, lr=0.05, wd=5e-4, batch=128, fge_cycle=2,
                             lr_max=1e-2, lr_min=5e-4)]},
}


def train_member(ds, c: dict, seed: int, rt: mc.Runtime = None) -> Tuple[torch.nn.Module, dict]:
    """One independent network (init and batch order from ``seed``) and its weights at epoch
    ``epochs - fge_epochs`` (where FGE starts, as the paper's epoch 160 of 200)."""
    torch.manual_seed(seed)
    model = mc.create_model(c["model"], ds.input_shape, ds.num_classes, **c["kwargs"])
    kept = {}

    def keep(record, state):
        """Remember the network's state at the epoch FGE starts from."""
        if record["epoch"] == c["epochs"] - c["fge_epochs"]:
            kept.update(state["model"])

    mc.train_model(model, ds.train_loader(c["batch"], seed=seed), c["epochs"], c["lr"], c["wd"], seed=seed,
                   runtime=rt, hooks=mc.Hooks(on_epoch_end=keep))
    return model.eval(), kept


def fge_snapshots(ds, c: dict, start: dict, seed: int, bn, rt: mc.Runtime) -> mc.FGEResult:
    """One FGE run from the weights ``start``: ``fge_epochs / fge_cycle`` snapshots (``.models()``)."""
    model = mc.create_model(c["model"], ds.input_shape, ds.num_classes, **c["kwargs"])
    model.load_state_dict(start)
    return mc.train_fge(model, ds.train_loader(c["batch"], seed=seed), cycles=c["fge_epochs"] // c["fge_cycle"],
                        cycle_epochs=c["fge_cycle"], lr_max=c["lr_max"], lr_min=c["lr_min"], weight_decay=c["wd"],
                        seed=seed, bn_loader=bn, runtime=rt)


def curve_members(ds, c: dict, a, b, seed: int, n: int, bn, rt: mc.Runtime) -> list:
    """``n`` points of a Bezier(3) fitted between ``a`` and ``b``: t = 0, 1, then halving (:data:`CURVE_TS`)."""
    curve = mc.CurveModel(a, a, b, mc.Bezier(3)).to(rt.device)
    mc.fit_curve(curve, ds.train_loader(c["batch"], seed=seed), c["curve_epochs"], c["curve_lr"], c["wd"],
                 seed=seed, runtime=rt)
    return mc.curve_ensemble(curve, CURVE_TS[:n], bn_loader=bn)


def simplex_members(ds, c: dict, a, b, seed: int, n: int, bn, rt: mc.Runtime) -> list:
    """The two modes, then ``n - 2`` samples of the complex {a, v1, v2}, {b, v1, v2} fitted between them."""
    complex_ = mc.SimplexModel.connecting(a, [a, b], free_vertices=2).to(rt.device)
    mc.fit_simplex(complex_, ds.train_loader(c["batch"], seed=seed), c["simplex_epochs"], c["simplex_lr"],
                   c["wd"], seed=seed, runtime=rt)
    return [a, b] + mc.simplex_ensemble(complex_, n - 2, seed=seed, bn_loader=bn)


def ensemble_rows(name: str, members: list, test, budgets: List[float], base: dict) -> List[dict]:
    """One row per prefix of ``members`` (1..n): test accuracy, NLL, ECE and the budget in epochs."""
    res = mc.evaluate_ensemble(members, test)
    return [{**base, "method": name, "members": k + 1, "budget_epochs": float(budgets[k]),
             "budget": float(budgets[k]) / base["epochs"], "acc": float(res.acc[k]), "nll": float(res.nll[k]),
             "ece": float(res.ece[k])} for k in range(len(members))]


def distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """||θ_a - θ_b||, all parameters flat, in float64."""
    with torch.no_grad():
        return float(sum(((p.double() - q.double()) ** 2).sum() for p, q in zip(a.parameters(), b.parameters()))
                     ** 0.5)


def diversity(nets: list, runs: List[mc.FGEResult]) -> dict:
    """How far apart the members lie: FGE snapshots from their start and from the previous snapshot, and two
    independent networks."""
    models = [r.models() for r in runs]
    return {"fge_from_start": float(np.mean([d for r in runs for d in r.distances])),
            "fge_consecutive": float(np.mean([distance(m[i], m[i + 1]) for m in models for i in range(len(m) - 1)])),
            "independent": distance(nets[0], nets[1])}


def run_seed(ds, c: dict, seed: int, K: int, rt: mc.Runtime) -> Tuple[List[dict], dict]:
    """Every method of one seed: rows of (method, members, budget, acc, NLL, ECE), and :func:`diversity`."""
    E, F, cyc = c["epochs"], c["fge_epochs"], c["fge_cycle"]
    if not 0 < F < E or F % cyc:
        raise ValueError(f"fge_epochs={F} must lie in (0, epochs={E}) and be a multiple of fge_cycle={cyc}")
    base = {"dataset": c["dataset"], "model": c["model"], "seed": seed, "epochs": E}
    bn, test = ds.eval_loader("train", 512).to(rt.device), ds.eval_loader("test", 512).to(rt.device)
    nets, starts = zip(*(train_member(ds, c, 10 * seed + j, rt) for j in range(K)))
    nets = [mc.recompute_bn(n, bn).eval() for n in nets]  # exact statistics, like every other member
    rows = ensemble_rows("independent", nets, test, [E * (k + 1) for k in range(K)], base)
    per_run = F // cyc
    runs = [fge_snapshots(ds, c, starts[j], 10 * seed + j, bn, rt) for j in range(K)]
    snaps = [s for r in runs for s in r.models()]
    # snapshot i of run r is paid for by r full runs, the run's pre-training and i cycles
    fge_budget = [E * (i // per_run) + (E - F) + cyc * (i % per_run + 1) for i in range(len(snaps))]
    rows += ensemble_rows("fge", snaps, test, fge_budget, base)
    n = c["members"]
    # the first two members are the endpoints (B each); the fit is paid for from the third member on
    rows += ensemble_rows("curve", curve_members(ds, c, nets[0], nets[1], seed, n, bn, rt), test,
                          [E, 2 * E] + [2 * E + c["curve_epochs"]] * (n - 2), base)
    rows += ensemble_rows("simplex", simplex_members(ds, c, nets[0], nets[1], seed, n, bn, rt), test,
                          [E, 2 * E] + [2 * E + c["simplex_epochs"]] * (n - 2), base)
    return rows, {**base, **diversity(nets, runs)}


def headline(rows: List[dict], c: dict, K: int) -> List[dict]:
    """The equal-budget rows: independent k and FGE k runs (k = 1..K), the curve / simplex with all members."""
    per_run = c["fge_epochs"] // c["fge_cycle"]
    keep = {("independent", k) for k in range(1, K + 1)} | {("fge", k * per_run) for k in range(1, K + 1)}
    keep |= {(m, c["members"]) for m in ("curve", "simplex")}
    return [r for r in rows if (r["dataset"], r["model"]) == (c["dataset"], c["model"])
            and (r["method"], r["members"]) in keep]


def markdown(rows: List[dict], spread: List[dict], cfg: dict, seconds: float) -> str:
    """results.md: per cell, the equal-budget table, then how far apart members lie (mean ± std over seeds)."""
    out = ["# Ensembles at an equal training budget: independent vs FGE vs curve vs simplex", "",
           f"Preset `{cfg['preset']}`, seeds {cfg['seeds']}, K = {cfg['independent']} independent networks per "
           f"seed; test set; mean ± std over seeds; ECE with 15 bins; {seconds:.0f} s. Budget B = the epochs of "
           "one network; FGE's k-budget ensemble holds the snapshots of k runs, each from its own network's "
           "checkpoint; curve and simplex members start with the two endpoints (= the 2 independent networks).", ""]
    for c in cfg["cells"]:
        summary = summarize(headline(rows, c, cfg["independent"]), ("method", "members"),
                            ("budget", "acc", "nll", "ece"))
        summary.sort(key=lambda r: (r["budget"][0], METHODS.index(r["method"]), r["members"]))
        out += [f"## {c['dataset']} `{c['model']}` {c['kwargs']}", "",
                f"{c['epochs']} epochs (= B), lr {c['lr']}, wd {c['wd']}, batch {c['batch']}; FGE over the last "
                f"{c['fge_epochs']} epochs, cycles of {c['fge_cycle']}, lr {c['lr_max']} -> {c['lr_min']}; curve "
                f"{c['curve_epochs']} epochs lr {c['curve_lr']}, simplex {c['simplex_epochs']} epochs lr "
                f"{c['simplex_lr']}.", "",
                table(["method", "members", "budget (B)", "test accuracy %", "test NLL", "ECE %"],
                      [[r["method"], r["members"], pm(r["budget"][0], 2),
                        pm((100 * r["acc"][0], 100 * r["acc"][1]), 2), pm(r["nll"], 4),
                        pm((100 * r["ece"][0], 100 * r["ece"][1]), 2)] for r in summary]), ""]
    keys = ("fge_from_start", "fge_consecutive", "independent")
    out += ["## How far apart the members lie (L2 distance in weight space)", "",
            table(["dataset", "model", "FGE snapshot - its start", "FGE snapshot - previous snapshot",
                   "independent network 0 - 1"],
                  [[r["dataset"], r["model"]] + [pm(r[k], 3) for k in keys]
                   for r in summarize(spread, ("dataset", "model"), keys)]), ""]
    return "\n".join(out)


def _mean_by(rows: List[dict], x: str, y: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x values, mean of y, std of y over seeds) of rows sharing x."""
    xs = sorted({r[x] for r in rows})
    vals = [[r[y] for r in rows if r[x] == v] for v in xs]
    return np.asarray(xs), np.asarray([np.mean(v) for v in vals]), np.asarray([np.std(v) for v in vals])


def figure(rows: List[dict], cfg: dict) -> Figure:
    """Per cell: accuracy, NLL and ECE against the number of members, and accuracy against the budget."""
    cells = cfg["cells"]
    fig = Figure(figsize=(13, 3.0 * len(cells)))
    axes = fig.subplots(len(cells), 4, squeeze=False)
    for i, c in enumerate(cells):
        mine = [r for r in rows if (r["dataset"], r["model"]) == (c["dataset"], c["model"])]
        for k, m in enumerate(METHODS):
            rm = [r for r in mine if r["method"] == m]
            for ax, y, scale in zip(axes[i][:3], ("acc", "nll", "ece"), (100, 1, 100)):
                xs, mu, sd = _mean_by(rm, "members", y)
                ax.errorbar(xs, scale * mu, yerr=scale * sd, color=f"C{k}", marker=".", capsize=2, label=m)
            heads = [r for r in headline(mine, c, cfg["independent"]) if r["method"] == m]
            xs, mu, sd = _mean_by(heads, "budget", "acc")
            axes[i][3].errorbar(xs, 100 * mu, yerr=100 * sd, color=f"C{k}", marker="o", capsize=2, label=m)
        for ax, label in zip(axes[i], ("test accuracy %", "test NLL", "ECE %", "test accuracy %")):
            ax.set_ylabel(label)
            ax.set_xlabel("members" if ax is not axes[i][3] else "budget (B = one network's epochs)")
        axes[i][0].set_title(f"{c['dataset']} {c['model']}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv=None) -> dict:
    """Train the networks, build the four kinds of ensembles, write results.json / results.md / ensembles.png."""
    args, cfg = parse(NAME, __doc__, PRESETS, argv)
    clock, rt = Clock(), runtime()
    datasets = load_datasets(cfg["cells"], args.data_dir, NAME)
    rows, spread = [], []
    for c in cfg["cells"]:
        for seed in cfg["seeds"]:
            new, far = run_seed(datasets[c["dataset"]], c, seed, cfg["independent"], rt)
            rows += new
            spread.append(far)
            last = {r["method"]: r for r in rows if r["seed"] == seed and r["model"] == c["model"]}
            print(f"{c['dataset']} {c['model']} seed {seed}: test accuracy " + ", ".join(
                f"{m} ({r['members']}) {100 * r['acc']:.2f}%" for m, r in last.items()) + f"  ({clock})", flush=True)
    result = {"config": cfg, "seconds": clock.seconds, "runs": rows, "distances": spread}
    text = markdown(rows, spread, cfg, clock.seconds)
    out = write_results(args, NAME, result, text, {NAME: figure(rows, cfg)})
    print(text)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / (NAME + '.png')}")
    return result


if __name__ == "__main__":
    main()
