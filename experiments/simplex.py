"""Do low-loss simplicial complexes connect independent modes, and do their ensembles beat FGE?

Question: three independently trained networks (modes) are joined by a
simplicial complex with 1 or 2 shared trainable vertices (each mode and the
shared vertices span one simplex: a segment for one shared vertex, a triangle
for two). Is the loss low everywhere on the complex — compared with the
straight-line triangle between the three modes (their convex hull) and with
the straight lines between two modes? And is an ensemble of networks sampled
from the complex's volume better (accuracy, NLL) than Fast Geometric Ensembling
(FGE) started from the same modes with the same extra training budget?

Papers and claims:

* Benton, Maddox, Lotfi & Wilson 2021, "Loss Surface Simplexes for Mode
  Connecting Volumes and Fast Ensembling" (ICML): simplicial complexes of low
  training loss connect many independently trained modes (VGG16 / PreResNet
  on CIFAR-10/100, e.g. a complex joining several modes through shared
  vertices); the straight lines and the flat hull between modes cross high
  loss. Ensembles sampled from simplexes around modes (ESPRESSO) match or beat
  deep ensembles and FGE at a lower training budget (their ensemble-accuracy
  and NLL figures on CIFAR-10/100; quoted qualitatively here).
* Fort & Jastrzebski 2019, "Large Scale Structure of Neural Network Loss
  Landscapes" (NeurIPS): modes lie on one connected low-loss manifold of high
  dimension; low-loss paths and volumes join any set of solutions, while the
  straight lines between them cross barriers.

Protocol (per seed s): N = 3 modes with seeds ``100 s + j`` trained with SGD
(``train_model``, Garipov's "reference" schedule). The straight-line triangle
``mc.SimplexModel(template, modes)`` (all vertices fixed) and, for each
complex setting, ``mc.SimplexModel.connecting(template, modes, free_vertices=m)``
trained with ``mc.fit_simplex`` (one simplex and α ~ Dirichlet(1) per batch;
m = 1: the free vertex starts at the modes' mean, no volume term; m = 2: the
free vertices start from fresh initialisations and Benton et al.'s volume
regulariser −λ log V is on). Both are evaluated by ``mc.evaluate_simplex`` on
the barycentric grid α = n / R of every simplex (BN statistics recomputed at
every point): the worst test loss/error over the grid and the barrier (worst
minus the modes' mean); the triangle's edges are the straight lines between
modes (``interp`` barrier of the worst pair), the complex's mode-to-mode chains
run through the shared vertices. Ensembles at equal training budget: the
complex costs S extra epochs on top of the 3 modes; FGE gets S/3 epochs from
each mode (cycles of 2 epochs, one snapshot per cycle), and the simplex
ensemble (``mc.simplex_ensemble``) as many members as FGE has snapshots. The
deep ensemble of the 3 modes (no extra budget) and the single modes are
reported beside them. Mean ± std over the seeds.

Presets:

* ``--quick``: convnet_bn width 4 on digits, 2-epoch modes, 2-epoch complex,
  grid R = 2, two seeds (well under 30 s; the test runs it).
* ``--preset cpu`` (default): convnet_bn (width 16) on digits and cnn1d
  (width 16) on mnist1d (1-D signals, which the 2-D conv models do not take),
  20-epoch modes, an 18-epoch complex, grid R = 6, seeds 0-4 (about 5-6 minutes).
* ``--preset paper``: CIFAR-10 from ``--data-dir``, VGG16 (no BN) modes of 200
  epochs (lr 0.05, weight decay 5e-4, Garipov's recipe), complexes of 30
  epochs, grid R = 10; meant for a GPU, NOT run here. Benton et al.'s exact
  training lengths per vertex and λ may differ from these.

Commands::

    python experiments/simplex.py                    # cpu preset
    python experiments/simplex.py --quick            # tiny run
    python experiments/simplex.py --preset paper --data-dir DIR
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import List

if __package__ in (None, ""):  # run as a file: make the repository's `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from matplotlib.figure import Figure

import modeconn as mc
from modeconn.plots import plot_simplex
from experiments.common import Clock, parse, summarize, table, write_results

NAME = "simplex"
MODES = 3
COMPLEXES = [{"free_vertices": 1, "init": "mean", "volume_reg": 0.0},
             {"free_vertices": 2, "init": "random", "volume_reg": 0.01}]


def _setup(dataset: str, model: str, model_kwargs: dict, epochs: int, simplex_epochs: int, **kw) -> dict:
    """One model/dataset entry of a preset (batch 64, lr 0.05 for modes and FGE, 0.03 for complexes)."""
    return {"dataset": dataset, "model": model, "model_kwargs": model_kwargs, "epochs": epochs,
            "simplex_epochs": simplex_epochs, "batch_size": kw.get("batch_size", 64), "lr": kw.get("lr", 0.05),
            "simplex_lr": kw.get("simplex_lr", 0.03), "weight_decay": kw.get("weight_decay", 5e-4),
            "fge_cycle_epochs": kw.get("fge_cycle_epochs", 2), "fge_lr": kw.get("fge_lr", [0.05, 0.0005])}


PRESETS = {
    "quick": {"seeds": [0, 1], "resolution": 2, "path_points": 5, "complexes": COMPLEXES, "runs": [
        _setup("digits", "convnet_bn", {"width": 4}, 2, 3, fge_cycle_epochs=1)]},
    "cpu": {"seeds": [0, 1, 2, 3, 4], "resolution": 6, "path_points": 11, "complexes": COMPLEXES, "runs": [
        _setup("digits", "convnet_bn", {"width": 16}, 20, 18),
        _setup("mnist1d", "cnn1d", {"width": 16}, 20, 18)]},
    "paper": {"seeds": [0, 1, 2], "resolution": 10, "path_points": 21, "complexes": COMPLEXES, "runs": [
        _setup("cifar10", "vgg16", {}, 200, 30, batch_size=128, simplex_lr=0.015, fge_cycle_epochs=2)]},
}


def label(run: dict) -> str:
    """``model/dataset``."""
    return f"{run['model']}/{run['dataset']}"


def complex_label(spec: dict) -> str:
    """E.g. ``complex m=2 (random, λ=0.01)``."""
    return f"complex m={spec['free_vertices']} ({spec['init']}, λ={spec['volume_reg']:g})"


def train_modes(ds, run: dict, seed: int) -> List[torch.nn.Module]:
    """The N independently trained modes of ``seed`` (seeds 100 s + j: initialisation and data order)."""
    modes = []
    for j in range(MODES):
        torch.manual_seed(100 * seed + j)
        net = mc.create_model(run["model"], ds.input_shape, ds.num_classes, **run["model_kwargs"])
        mc.train_model(net, ds.train_loader(run["batch_size"], seed=100 * seed + j), epochs=run["epochs"],
                       lr=run["lr"], weight_decay=run["weight_decay"], seed=100 * seed + j)
        modes.append(net.eval())
    return modes


def fit_complex(ds, run: dict, modes, spec: dict, seed: int) -> mc.SimplexModel:
    """The mode-connecting complex of ``spec`` fitted for ``run["simplex_epochs"]`` epochs."""
    cplx = mc.SimplexModel.connecting(copy.deepcopy(modes[0]), modes, free_vertices=spec["free_vertices"],
                                      init=spec["init"], seed=1000 + seed)
    mc.fit_simplex(cplx, ds.train_loader(run["batch_size"], seed=500 + seed), epochs=run["simplex_epochs"],
                   lr=run["simplex_lr"], weight_decay=run["weight_decay"], volume_reg=spec["volume_reg"], seed=seed)
    return cplx.eval()


def surface_row(res, surface: str, kind: str) -> dict:
    """Worst values and barriers over a grid; the worst mode-to-mode path (``kind``: line or chain)."""
    paths = res.path_barriers("test_loss")
    errs = res.path_barriers("test_error")
    return {"surface": surface, "modes_test_loss": float(res.vertex_values("test_loss").mean()),
            "worst_test_loss": res.worst("test_loss")["value"], "barrier_test_loss": res.barrier("test_loss", "mean"),
            "worst_test_error": res.worst("test_error")["value"],
            "barrier_test_error": res.barrier("test_error", "mean"),
            "worst_path_barrier_test_loss": max(p["path"] for p in paths.values()),
            "worst_path_barrier_test_error": max(p["path"] for p in errs.values()),
            "worst_path_test_loss": max(p["max_on_path"] for p in paths.values()), "paths": kind,
            "grid_points": len(res.coords)}


def evaluate_surface(model: mc.SimplexModel, loaders, cfg: dict) -> mc.SimplexResult:
    """``mc.evaluate_simplex`` on the preset's grid, with the mode-to-mode paths."""
    return mc.evaluate_simplex(model, *loaders, resolution=cfg["resolution"], num_path_points=cfg["path_points"])


def fge_snapshots(ds, run: dict, modes, seed: int, train_eval) -> List[torch.nn.Module]:
    """FGE from every mode with S / N epochs each (cycles of ``fge_cycle_epochs``), snapshots pooled."""
    cycles = max(1, run["simplex_epochs"] // (MODES * run["fge_cycle_epochs"]))
    snaps = []
    for j, mode in enumerate(modes):
        fge = mc.train_fge(mode, ds.train_loader(run["batch_size"], seed=700 + 10 * seed + j), cycles=cycles,
                           cycle_epochs=run["fge_cycle_epochs"], lr_max=run["fge_lr"][0], lr_min=run["fge_lr"][1],
                           weight_decay=run["weight_decay"], seed=seed, bn_loader=train_eval)
        snaps += fge.models()
    return snaps


def ensemble_row(method: str, members, test_eval, budget: float) -> dict:
    """The whole ensemble's test accuracy, NLL and ECE, its members' mean accuracy and NLL, its budget in epochs."""
    res = mc.evaluate_ensemble(members, test_eval)
    return {"method": method, **{k: res.final[k] for k in ("acc", "nll", "ece", "members")},
            "member_acc": float(res.member_acc.mean()), "member_nll": float(res.member_nll.mean()),
            "member_ece": float(res.member_ece.mean()), "budget_epochs": budget}


def run_seed(ds, run: dict, cfg: dict, seed: int, keep: dict) -> tuple:
    """Everything of one seed: (surface rows, ensemble rows); ``keep`` gets seed 0's results for figures."""
    loaders = (ds.eval_loader("train"), ds.eval_loader("test"))
    modes = train_modes(ds, run, seed)
    tag = {"run": label(run), "seed": seed}
    triangle = evaluate_surface(mc.SimplexModel(copy.deepcopy(modes[0]), modes), loaders, cfg)
    surfaces = [{**tag, **surface_row(triangle, "straight triangle (hull of modes)", "line")}]
    base = MODES * run["epochs"]
    snaps = fge_snapshots(ds, run, modes, seed, loaders[0])
    # each mode with its BN statistics recomputed like every other point (copies: the modes stay as trained)
    fixed = [mc.recompute_bn(copy.deepcopy(m), loaders[0]) for m in modes]
    deep = ensemble_row("deep ensemble (3 modes)", fixed, loaders[1], base)
    single = {"method": "single mode (mean of 3)", "acc": deep["member_acc"], "nll": deep["member_nll"],
              "ece": deep["member_ece"], "members": 1, "budget_epochs": run["epochs"]}
    single.update(member_acc=single["acc"], member_nll=single["nll"], member_ece=single["ece"])
    ensembles = [{**tag, **single}, {**tag, **deep},
                 {**tag, **ensemble_row("FGE from the 3 modes", snaps, loaders[1], base + run["simplex_epochs"])}]
    for spec in cfg["complexes"]:
        cplx = fit_complex(ds, run, modes, spec, seed)
        res = evaluate_surface(cplx, loaders, cfg)
        surfaces.append({**tag, **surface_row(res, complex_label(spec), "chain")})
        members = mc.simplex_ensemble(cplx, len(snaps), seed=seed, bn_loader=loaders[0])
        ensembles.append({**tag, **ensemble_row(f"simplex ensemble, {complex_label(spec)}", members, loaders[1],
                                                base + run["simplex_epochs"])})
        keep.setdefault((label(run), seed), {})[complex_label(spec)] = res
    keep[(label(run), seed)]["triangle"] = triangle
    return surfaces, ensembles


SURFACE_KEYS = ["modes_test_loss", "worst_test_loss", "barrier_test_loss", "worst_test_error", "barrier_test_error",
                "worst_path_test_loss", "worst_path_barrier_test_loss", "worst_path_barrier_test_error"]
ENSEMBLE_KEYS = ["acc", "nll", "ece", "member_acc", "member_nll"]


def markdown(cfg: dict, surfaces: List[dict], ensembles: List[dict], seconds: float) -> str:
    """The tables of results.md."""
    n = len(cfg["seeds"])
    lines = [f"# Simplexes between {MODES} modes ({cfg['preset']} preset)", "",
             f"{n} seeds ({cfg['seeds']}), each {MODES} independent modes; grid α = n/{cfg['resolution']} on every "
             f"simplex, paths at {cfg['path_points']} points, BN recomputed at every point; mean ± std over seeds. "
             f"{seconds:.0f} s.", "",
             "## Loss over the complex vs the straight-line triangle and the lines between modes", "",
             "worst = largest value on the grid; barrier = worst minus the mean at the 3 modes; worst path = the "
             "mode pair with the highest `interp` barrier (triangle: the straight line; complex: the chain through "
             "the shared vertices).", ""]
    s = summarize(surfaces, ["run", "surface"], SURFACE_KEYS)
    lines += [table(["model/dataset", "surface", "modes' test loss", "worst test loss", "barrier test loss",
                     "worst test error", "barrier test error", "worst path: max test loss",
                     "worst path: barrier test loss", "worst path: barrier test error"],
                    [[r["run"], r["surface"], *(r[k] for k in SURFACE_KEYS)] for r in s]), ""]
    lines += ["## Ensembles at equal training budget (test set)", "",
              f"budget in epochs: modes {MODES} x E; complex and FGE S extra epochs each; the simplex ensemble has "
              "as many members as FGE has snapshots. The last two columns: the members alone (mean over members).",
              ""]
    e = summarize(ensembles, ["run", "method", "members", "budget_epochs"], ENSEMBLE_KEYS)
    lines += [table(["model/dataset", "method", "members", "budget (epochs)", "accuracy", "NLL", "ECE",
                     "members' mean accuracy", "members' mean NLL"],
                    [[r["run"], r["method"], r["members"], r["budget_epochs"], *(r[k] for k in ENSEMBLE_KEYS)]
                     for r in e]), ""]
    return "\n".join(lines)


def _bars(ax, rows: List[dict], by: str, key: str, width: float, title: str) -> None:
    """Grouped bars of ``key`` (mean ± std): one group per value of ``by``, one bar (colour) per run."""
    names = list(dict.fromkeys(r[by] for r in rows))
    runs = list(dict.fromkeys(r["run"] for r in rows))
    for i, run in enumerate(runs):
        vals = [next(r for r in rows if r["run"] == run and r[by] == n)[key] for n in names]
        x = np.arange(len(names)) + (i - (len(runs) - 1) / 2) * width
        ax.bar(x, [v[0] for v in vals], width, yerr=[v[1] for v in vals], capsize=3, color=f"C{i}", label=run)
    ax.set_xticks(np.arange(len(names)))
    short = [n.replace("simplex ensemble, complex", "simplex ens.\n").replace("FGE from the 3 modes", "FGE (3 modes)")
             .replace(" (", "\n(").replace("\n ", "\n") for n in names]
    ax.set_xticklabels(short, fontsize=7)
    ax.set_title(title, fontsize=10)


def figure(surfaces: List[dict], ensembles: List[dict], n: int) -> Figure:
    """Worst test loss per surface; ensemble accuracy and NLL per method (mean ± std over seeds)."""
    s = summarize(surfaces, ["run", "surface"], SURFACE_KEYS)
    e = summarize(ensembles, ["run", "method"], ENSEMBLE_KEYS)
    fig = Figure(figsize=(15, 4.6))
    ax_s, ax_a, ax_n = fig.subplots(1, 3)
    width = 0.8 / len({r["run"] for r in s})
    _bars(ax_s, s, "surface", "worst_test_loss", width, "worst test loss on the grid")
    _bars(ax_a, e, "method", "acc", width, "ensemble test accuracy")
    _bars(ax_n, e, "method", "nll", width, "ensemble test NLL")
    ax_s.set_yscale("log")
    lo = min(r["acc"][0] - r["acc"][1] for r in e)
    ax_a.set_ylim(max(0.0, lo - 0.02), 1.0)
    ax_s.legend(fontsize=8)
    fig.suptitle(f"{MODES} modes: simplicial complexes vs the straight triangle; ensembles at equal budget "
                 f"({n} seeds, mean ± std)", fontsize=10)
    fig.tight_layout()
    return fig


def main(argv=None) -> dict:
    """Run the preset, write results.json / results.md / simplex.png (and seed 0's complexes), print the tables."""
    args, cfg = parse(NAME, __doc__, PRESETS, argv)
    clock = Clock()
    surfaces, ensembles, keep = [], [], {}
    for run in cfg["runs"]:
        ds = mc.get_dataset(run["dataset"], data_dir=args.data_dir)
        for seed in cfg["seeds"]:
            s, e = run_seed(ds, run, cfg, seed, keep)
            surfaces += s
            ensembles += e
    seconds = clock.seconds
    text = markdown(cfg, surfaces, ensembles, seconds)
    result = {"config": cfg, "seconds": seconds, "surfaces": surfaces, "ensembles": ensembles,
              "surface_summary": summarize(surfaces, ["run", "surface"], SURFACE_KEYS),
              "ensemble_summary": summarize(ensembles, ["run", "method", "members", "budget_epochs"], ENSEMBLE_KEYS)}
    out = write_results(args, NAME, result, text, {NAME: figure(surfaces, ensembles, len(cfg["seeds"]))})
    first = cfg["seeds"][0]
    for run in cfg["runs"]:  # seed 0's surfaces, face by face (not published)
        for name, res in keep[(label(run), first)].items():
            stem = f"{run['model']}_{run['dataset']}_{name.split(' (')[0].replace(' ', '_').replace('=', '')}"
            plot_simplex(res, out / f"{stem}_seed{first}.png", f"{label(run)}, seed {first}: {name}")
    print(text)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / (NAME + '.png')} and seed {first}'s surfaces")
    return result


if __name__ == "__main__":
    main()
