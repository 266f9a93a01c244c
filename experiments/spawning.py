"""When does SGD noise stop deciding the basin? The barrier between spawned children vs the spawn epoch k.

Question: a parent network is trained for k epochs; two children continue from
its state to the end of training with different data orders (SGD noise only:
same weights, momentum, schedule). From which k on are the two children
linearly connected, i.e. is the loss/error barrier on the straight line
between them about zero?

Papers and claims:

* Frankle, Dziugaite, Roy & Carbin 2020, "Linear Mode Connectivity and the
  Lottery Ticket Hypothesis" (ICML), Fig. 3 / Table 1: ResNet-20 on CIFAR-10
  (63k iterations, batch 128, lr 0.1) becomes *stable to SGD noise* — the test
  error barrier ("instability") between two children falls to about zero —
  when the children are spawned at k ≈ 2000 iterations, about 3% of training;
  children spawned at initialisation (k = 0) are separated by a large barrier.
  (LeNet on MNIST is stable already at k = 0.)
* Fort, Dziugaite, Paul, Kharaghani, Roy & Ganguli 2020, "Deep learning versus
  kernel learning: an empirical study of loss landscape geometry and the time
  evolution of the Neural Tangent Kernel" (NeurIPS), Fig. 2: the barrier
  between children falls quickly in the first few epochs, while the NTK moves
  fastest (the NTK side is ``experiments/ntk_spawn.py``).

Protocol: ``mc.spawn_children`` per (model, dataset, parent seed): the parent
is trained for ``epochs`` epochs (SGD, momentum 0.9, Garipov's "reference"
schedule, weight decay), two children per spawn epoch k with data seeds
``1000 * (seed + 1) + i``, and the straight line between them evaluated at
``num_points`` points with BatchNorm statistics recomputed at every point. The
barrier is ``interp`` (max over t of the metric minus the linear interpolation
of its end values) of the test loss and of the test error. Per model/dataset
and seed, k* is the first spawn epoch whose barrier is at most 10% of the
barrier at k = 0 (k* = 0 when the k = 0 barrier is already <= 0; "not reached"
when no k qualifies), in epochs and in % of training; mean ± std over parent
seeds. Models: ``convnet_bn`` and ``preresnet`` (depth 20) on ``digits`` (8x8
images); ``mlp`` and ``cnn1d`` on ``mnist1d`` — its inputs are 1-D signals
(shape (1, 40)), which the 2-D convolutional models of the zoo do not take.

Presets:

* ``--quick``: convnet_bn (width 4) on digits and mlp (width 16) on mnist1d,
  3 epochs, k in {0, 1, 2}, two seeds (well under 30 s; the test runs it).
* ``--preset cpu`` (default): the four models above (convnet_bn width 16,
  PreResNet-20, mlp width 128, cnn1d width 16), 6-20 epochs of batch 64
  (digits: 23 SGD steps per epoch, mnist1d: 63), 4-9 spawn epochs each, parent
  seeds 0, 1, 2 (about 7-8 minutes on 2 loaded cores). Spawning is per whole
  epoch, so k* is resolved to one epoch (6-17% of these short trainings).
* ``--preset paper``: Frankle et al.'s ResNet-20 setting on CIFAR-10 from
  ``--data-dir`` (PreResNet-20 of the zoo, 160 epochs = 63k iterations of
  batch 128, lr 0.1, weight decay 1e-4, k up to 80 epochs), meant for a GPU;
  NOT run here. Differences: ``spawn_children`` runs the Garipov "reference"
  schedule (constant, then linear decay) without warm-up, where Frankle et al.
  decay the rate 10x at 32k and 48k iterations (and warm up in some variants).

Commands::

    python experiments/spawning.py                    # cpu preset
    python experiments/spawning.py --quick            # tiny run
    python experiments/spawning.py --preset paper --data-dir DIR
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make the repository's `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from matplotlib.figure import Figure

import modeconn as mc
from experiments.common import Clock, mean_std, parse, summarize, table, write_results

NAME = "spawning"
THRESHOLD = 0.1  # k* = first k whose barrier is <= 10% of the k = 0 barrier
METRICS = ("test_loss", "test_error")


def _run(dataset: str, model: str, epochs: int, spawn_at: List[int], lr: float = 0.05, **kw) -> dict:
    """One model/dataset entry of a preset (batch 64, weight decay 5e-4 unless given)."""
    return {"dataset": dataset, "model": model, "model_kwargs": kw.pop("model_kwargs", {}), "epochs": epochs,
            "spawn_at": spawn_at, "lr": lr, "batch_size": kw.pop("batch_size", 64),
            "weight_decay": kw.pop("weight_decay", 5e-4), **kw}


PRESETS = {
    "quick": {"seeds": [0, 1], "num_points": 5, "runs": [
        _run("digits", "convnet_bn", 3, [0, 1, 2], model_kwargs={"width": 4}),
        _run("mnist1d", "mlp", 3, [0, 1, 2], model_kwargs={"width": 16}, batch_size=128)]},
    "cpu": {"seeds": [0, 1, 2], "num_points": 9, "runs": [
        _run("digits", "convnet_bn", 16, [0, 1, 2, 4, 8], model_kwargs={"width": 16}),
        _run("digits", "preresnet", 6, [0, 1, 2, 3], model_kwargs={"depth": 20}),
        _run("mnist1d", "mlp", 20, [0, 1, 2, 3, 4, 6, 8, 12, 16], model_kwargs={"width": 128}),
        _run("mnist1d", "cnn1d", 10, [0, 1, 2, 3, 4, 6], model_kwargs={"width": 16})]},
    "paper": {"seeds": [0, 1, 2], "num_points": 21, "runs": [
        _run("cifar10", "preresnet", 160, [0, 1, 2, 3, 5, 10, 20, 40, 80], lr=0.1, model_kwargs={"depth": 20},
             batch_size=128, weight_decay=1e-4)]},
}


def label(run: dict) -> str:
    """``model/dataset`` (the row name of the tables)."""
    return f"{run['model']}/{run['dataset']}"


def spawn_run(ds, run: dict, seed: int, num_points: int,
              child_seeds: Optional[Sequence[int]] = None) -> mc.SpawnResult:
    """Parent ``seed`` of ``run`` and its two children per spawn epoch (``mc.spawn_children``)."""
    torch.manual_seed(seed)  # the parent's initialisation
    model = mc.create_model(run["model"], ds.input_shape, ds.num_classes, **run["model_kwargs"])
    return mc.spawn_children(model, lambda s: ds.train_loader(run["batch_size"], seed=s), ds.eval_loader("train"),
                             ds.eval_loader("test"), epochs=run["epochs"], spawn_at=run["spawn_at"], children=2,
                             seed=seed, child_seeds=child_seeds, lr=run["lr"], weight_decay=run["weight_decay"],
                             num_points=num_points, reference="interp")


def first_below(ks: Sequence[int], barriers: Sequence[float], fraction: float = THRESHOLD) -> Optional[int]:
    """The first k whose barrier is <= ``fraction`` x the barrier at the first k (k = 0); None if none is.

    A k = 0 barrier that is already <= 0 gives k = 0 (the children are connected from the start).
    """
    limit = fraction * barriers[0]
    return next((int(k) for k, b in zip(ks, barriers) if b <= limit), None)


def seed_rows(result: mc.SpawnResult, run: dict) -> List[dict]:
    """One row per spawn epoch k of one parent: barriers (mean over the children's pairs), accuracies."""
    rows = []
    for point in result.points:
        mean = point.to_dict("interp")["mean"]
        rows.append({"run": label(run), "seed": result.seed, "k": point.epoch,
                     "percent": 100.0 * point.epoch / result.epochs,
                     "barrier_test_loss": mean["barrier_test_loss"], "barrier_test_error": mean["barrier_test_error"],
                     "children_test_acc": mean["test_acc"], "distance": mean["distance"]})
    return rows


def crossing(rows: List[dict], epochs: int) -> dict:
    """k* of one parent for each metric: epochs, % of training (None: not reached), and the k = 0 barrier."""
    ks = [r["k"] for r in rows]
    out = {}
    for m in METRICS:
        values = [r[f"barrier_{m}"] for r in rows]
        k = first_below(ks, values)
        out[m] = {"k0_barrier": values[0], "k_star": k, "percent": None if k is None else 100.0 * k / epochs}
    return out


def run_all(cfg: dict, data_dir) -> dict:
    """Every (model/dataset, parent seed): rows per k, k* per seed, the parents' accuracies."""
    rows, seeds = [], []
    for run in cfg["runs"]:
        ds = mc.get_dataset(run["dataset"], data_dir=data_dir)
        for seed in cfg["seeds"]:
            clock = Clock()
            result = spawn_run(ds, run, seed, cfg["num_points"])
            mine = seed_rows(result, run)
            rows += mine
            seeds.append({"run": label(run), "seed": seed, "parent_test_acc": result.parent["test_acc"],
                          "crossing": crossing(mine, run["epochs"]), "seconds": clock.seconds})
    return {"rows": rows, "seeds": seeds}


def crossing_summary(cfg: dict, seeds: List[dict]) -> List[dict]:
    """Per model/dataset: k = 0 barriers and k* (epochs, %) as mean ± std over the seeds that reached it."""
    out = []
    for run in cfg["runs"]:
        mine = [s for s in seeds if s["run"] == label(run)]
        row = {"run": label(run), "epochs": run["epochs"], "n": len(mine),
               "parent_test_acc": mean_std(s["parent_test_acc"] for s in mine)}
        for m in METRICS:
            cs = [s["crossing"][m] for s in mine]
            reached = [c for c in cs if c["k_star"] is not None]
            row[f"{m}_k0"] = mean_std(c["k0_barrier"] for c in cs)
            row[f"{m}_reached"] = len(reached)
            row[f"{m}_k_star"] = mean_std(c["k_star"] for c in reached) if reached else None
            row[f"{m}_percent"] = mean_std(c["percent"] for c in reached) if reached else None
        out.append(row)
    return out


def _cell(value):
    """A (mean, std) pair as is; 'not reached' for None."""
    return "not reached" if value is None else value


def markdown(cfg: dict, per_k: List[dict], summary: List[dict], seconds: float) -> str:
    """The tables of results.md: the crossing summary, then barrier vs k per model/dataset."""
    n = len(cfg["seeds"])
    lines = [f"# Spawning: barrier between children vs spawn epoch k ({cfg['preset']} preset)", "",
             f"Two children per parent and k, {n} parent seeds ({cfg['seeds']}), line at {cfg['num_points']} points "
             f"(BN recomputed), barrier `interp`. k* = first k with barrier <= {THRESHOLD:.0%} of the k = 0 "
             f"barrier; mean ± std over the seeds that reached it (reached: how many of {n}). {seconds:.0f} s.", "",
             "## Where the barrier falls below 10% of its k = 0 value", ""]
    heads = ["model/dataset", "epochs", "parent test acc"]
    for m in METRICS:
        heads += [f"{m} barrier at k=0", f"k* {m} (epochs)", f"k* {m} (% of training)", "reached"]
    body = []
    for r in summary:
        cells = [r["run"], r["epochs"], r["parent_test_acc"]]
        for m in METRICS:
            cells += [r[f"{m}_k0"], _cell(r[f"{m}_k_star"]), _cell(r[f"{m}_percent"]), f"{r[f'{m}_reached']}/{r['n']}"]
        body.append(cells)
    lines += [table(heads, body), "", "## Barrier vs spawn epoch (mean ± std over parent seeds)", ""]
    body = [[r["run"], r["k"], f"{r['percent']:.0f}", r["barrier_test_loss"], r["barrier_test_error"],
             r["children_test_acc"], r["distance"]] for r in per_k]
    lines += [table(["model/dataset", "k", "% of training", "barrier test loss", "barrier test error",
                     "children test acc", "L2 child-child"], body), ""]
    return "\n".join(lines)


def figure(per_k: List[dict], title: str) -> Figure:
    """Barrier vs % of training (mean ± std over seeds): test loss, test error, and loss relative to k = 0."""
    fig = Figure(figsize=(13, 4))
    axes = fig.subplots(1, 3)
    for i, name in enumerate(dict.fromkeys(r["run"] for r in per_k)):
        mine = [r for r in per_k if r["run"] == name]
        x = [r["percent"] for r in mine]
        for ax, key in zip(axes[:2], ("barrier_test_loss", "barrier_test_error")):
            ax.errorbar(x, [r[key][0] for r in mine], yerr=[r[key][1] for r in mine], fmt="o-", ms=4, capsize=3,
                        color=f"C{i}", label=name)
        k0 = mine[0]["barrier_test_loss"][0]
        axes[2].plot(x, [r["barrier_test_loss"][0] / k0 if k0 > 0 else np.nan for r in mine], "o-", ms=4,
                     color=f"C{i}", label=name)
    axes[2].axhline(THRESHOLD, color="0.4", ls="--", lw=1, label="10% of k = 0")
    for ax, what in zip(axes, ("test loss barrier", "test error barrier", "test loss barrier / barrier at k=0")):
        ax.axhline(0.0, color="0.7", lw=0.8)
        ax.set_xlabel("spawn epoch k (% of training)")
        ax.set_title(what, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def main(argv=None) -> dict:
    """Run the preset, write results.json / results.md / spawning.png, print the tables."""
    args, cfg = parse(NAME, __doc__, PRESETS, argv)
    clock = Clock()
    runs = run_all(cfg, args.data_dir)
    per_k = summarize(runs["rows"], ["run", "k", "percent"],
                      ["barrier_test_loss", "barrier_test_error", "children_test_acc", "distance"])
    summary = crossing_summary(cfg, runs["seeds"])
    seconds = clock.seconds
    text = markdown(cfg, per_k, summary, seconds)
    result = {"config": cfg, "seconds": seconds, "threshold": THRESHOLD, **runs, "per_k": per_k,
              "summary": summary}
    fig = figure(per_k, f"Children spawned at epoch k: barrier on the line between them ({len(cfg['seeds'])} "
                        "parent seeds, mean ± std)")
    out = write_results(args, NAME, result, text, {NAME: fig})
    print(text)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / (NAME + '.png')}")
    return result


if __name__ == "__main__":
    main()
