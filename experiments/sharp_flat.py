"""Does sharpness order minima by generalisation only after filter normalisation? Small vs large batch,
weight decay 0 vs 5e-4, SGD vs SAM.

Paper: Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of Neural Nets" (NeurIPS
2018), Section 4 and 5, Fig. 1, 3, 4. Claims: (i) the 1-D linear interpolation between a small-batch
(SB, 128) and a large-batch (LB, 8192, 16.4 % of the data) solution of VGG-9 on CIFAR-10 (Goodfellow
et al. / Keskar et al. style) makes the SB minimum look wide and the LB one sharp without weight decay
(test error 7.37 % SB vs 11.07 % LB), but with weight decay 5e-4 the picture flips -- the LB minimum
now looks considerably flatter although SB still generalises better (6.00 % vs 10.19 %). The weights
explain it: without weight decay LB ends with smaller weights than SB, with it SB (more updates per
epoch, more shrinking) ends with much smaller ones; with batch normalisation the loss is invariant to
each filter's scale, so un-normalised plots show that scale, not the minimum. (ii) Along random
*filter-normalised* directions (each filter of the direction rescaled to the norm of the weight's
filter) LB minima look sharper than SB ones, "although not dramatically so", with and without weight
decay, and "sharpness correlates well with generalisation error".

Protocol (digits, 8x8, 1437 train / 360 test images; no download): a ``convnet`` with BatchNorm
(width 8) is trained from one initialisation per seed in 8 (12) settings: batch 32 (SB) or the full training
set (LB, full-batch gradient descent), weight decay 0 or 5e-4, SGD (momentum 0.9, cosine schedule) or
SAM (``mc.train_model(..., sam=0.05)``, Foret et al. 2021). SB: 20 epochs at lr 0.05; LB: 200 full-batch
steps at lr 0.02 (at lr >= 0.05 full-batch descent stayed at chance in a trial). The cpu preset adds
weight decay 5e-3: in our 900 SB steps 5e-4 shrinks the weights by about 1 % (sum of lr·wd over the
steps ~ 0.01, against ~ 2 in the paper's 117k steps), too little to change their scale, which is the
mechanism the claim is about; 5e-3 is a tenfold stronger pull, still far below the paper's total. After training the
BN statistics are recomputed over the training set (``mc.recompute_bn``), so every number -- the
endpoints' own and the points of every slice, where the statistics are recomputed per point -- uses
exact statistics. Per model:

* train/test loss and error, the generalisation gap (test - train loss; test error);
* λmax and λmin of the Hessian of the training loss (``modeconn.geometry.hessian``, Lanczos, on the
  first ``hessian_samples`` training images, the network in eval mode) -- a measure that is *not*
  invariant to filter rescaling;
* two 1-D slices ``L(θ + α d)``, α in [-1, 1], from the same Gaussian draw per seed (``directions``
  draws, averaged): *un-normalised*, ``d`` the draw rescaled to the norm of the seed's initial weights
  -- the same vector for every model of a seed (``norm="model"`` at the initialisation); and
  *filter-normalised* (``random_plane(..., norm="filter")`` at the model: each filter of ``d`` with
  the norm of the model's filter); biases and BN parameters left out (Li et al.'s ``biasbn``).
  Sharpness of a slice: its curvature at 0 (``slice_curvature``, parabola through |α| <= 0.2) and
  its rise ``(L(-0.5) + L(0.5))/2 - L(0)``.

Per seed and per (weight decay, optimiser) the line from the SB to the LB solution, α in [-0.5, 1.5]
(α = 0 SB, α = 1 LB), train/test loss and accuracy (``evaluate_grid`` on ``Plane(θ_SB, θ_LB - θ_SB)``),
with its curvature at each end. Rank correlations (Spearman ρ, Kendall τ; scipy) between every
sharpness measure and the test error / the loss gap, across the settings within a seed (mean ± std
over seeds) and pooled over all models.

Presets:
  --quick        one seed, width 4, 1 SB epoch / 3 LB steps, 7-point slices (what the test runs)
  --preset cpu   3 seeds x 12 settings (wd 0, 5e-4, 5e-3) on the CPU (about 8 minutes)
  --preset paper CIFAR-10 from --data-dir, vgg11_bn (the zoo's closest to the paper's VGG-9; no dropout),
                 batch 128 vs 8192, wd 0 vs 5e-4, 300 epochs, lr 0.1, SAM ρ 0.05, 51-point slices --
                 for a GPU, not run here

    python experiments/sharp_flat.py                      # the CPU reproduction
    python experiments/sharp_flat.py --quick --out /tmp/sharp_flat
    python experiments/sharp_flat.py --preset paper --data-dir DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typing import Dict, List

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy import stats

import modeconn as mc
from experiments.common import Clock, mean_std, parse, pm, summarize, table, write_results
from modeconn.evaluation.model import evaluate
from modeconn.geometry import Plane, evaluate_grid, flatten_parameters, random_direction, random_plane, \
    slice_curvature
from modeconn.geometry.hessian import hessian_extreme_eigenvalues

NAME = "sharp_flat"
MEASURES = ("lambda_max", "raw_curvature", "raw_rise", "filter_curvature", "filter_rise")
TARGETS = ("test_error", "loss_gap")
NUMBERS = ("train_loss", "test_loss", "train_error", "test_error", "loss_gap", "weight_norm", "lambda_max",
           "lambda_min", "ratio") + MEASURES[1:]


def preset(dataset: str, model: str, kwargs: dict, seeds: list, small: dict, large: dict, **rest) -> dict:
    """A preset: the data and network, the SB and LB recipes (``batch`` None = the whole training set)."""
    return {"dataset": dataset, "model": model, "model_kwargs": kwargs, "seeds": seeds, "small": small,
            "large": large, "weight_decays": [0.0, 5e-4], "rho": 0.05, "hessian_tol": 1e-2,
            "fit_radius": 0.2, "rise_at": 0.5, **rest}


PRESETS = {
    "quick": preset("digits", "convnet", {"width": 4, "bn": True}, [0], dict(batch=32, epochs=1, lr=0.05),
                    dict(batch=None, epochs=3, lr=0.02), hessian_samples=64, slice_steps=11, directions=1,
                    interp_steps=9),
    "cpu": preset("digits", "convnet", {"width": 8, "bn": True}, [0, 1, 2], dict(batch=32, epochs=20, lr=0.05),
                  dict(batch=None, epochs=200, lr=0.02), hessian_samples=256, slice_steps=21, directions=2,
                  interp_steps=21, weight_decays=[0.0, 5e-4, 5e-3]),
    "paper": preset("cifar10", "vgg11_bn", {"dropout": 0.0}, [0, 1, 2], dict(batch=128, epochs=300, lr=0.1),
                    dict(batch=8192, epochs=300, lr=0.1), hessian_samples=4096, slice_steps=51, directions=1,
                    interp_steps=41),
}


def settings(cfg: dict) -> List[dict]:
    """The training settings: batch SB/LB x weight decay x optimiser (SAM radius or None)."""
    return [{"batch": b, "wd": wd, "opt": opt, "rho": cfg["rho"] if opt == "SAM" else None,
             "label": f"{b} wd={wd:g} {opt}"}
            for b in ("SB", "LB") for wd in cfg["weight_decays"] for opt in ("SGD", "SAM")]


def load_dataset(cfg: dict, data_dir):
    """The dataset; a missing torchvision set ends the run with one clear line."""
    try:
        return mc.get_dataset(cfg["dataset"], data_dir=data_dir or "data")
    except FileNotFoundError as e:
        raise SystemExit(f"experiments/{NAME}.py: {e}") from None


def initial_model(ds, cfg: dict, seed: int) -> torch.nn.Module:
    """The seed's initialisation, shared by all settings (so SB and LB solutions start together)."""
    torch.manual_seed(seed)
    return mc.create_model(cfg["model"], ds.input_shape, ds.num_classes, **cfg["model_kwargs"])


def train(ds, cfg: dict, s: dict, seed: int, init: torch.nn.Module, device: str) -> torch.nn.Module:
    """Train a copy of ``init`` with setting ``s``; BN statistics then recomputed exactly over the train set."""
    recipe = cfg["small" if s["batch"] == "SB" else "large"]
    model = mc.create_model(cfg["model"], ds.input_shape, ds.num_classes, **cfg["model_kwargs"])
    model.load_state_dict(init.state_dict())
    loader = ds.train_loader(recipe["batch"] or len(ds.y_train), seed=seed)
    mc.train_model(model, loader, recipe["epochs"], recipe["lr"], s["wd"], momentum=0.9, schedule="cosine",
                   seed=seed, sam=s["rho"], runtime=mc.Runtime(device=device))
    return mc.recompute_bn(model, eval_loaders(ds, device)[0]).eval()


def eval_loaders(ds, device: str):
    """(train, test) evaluation loaders: fixed order, no augmentation."""
    return ds.eval_loader("train", 512).to(device), ds.eval_loader("test", 512).to(device)


def slice_numbers(grid, fit_radius: float, rise_at: float) -> Dict[str, float]:
    """Curvature at 0 of a 1-D slice's train loss, and its rise ``(L(-a) + L(a))/2 - L(0)`` at ``a = rise_at``."""
    xs, loss = grid.xs, grid.arrays["train_loss"]
    at = lambda a: float(np.interp(a, xs, loss))
    return {"curvature": slice_curvature(xs, loss, fit_radius),
            "rise": 0.5 * (at(-rise_at) + at(rise_at)) - at(0.0)}


def directions(model, init, seed: int) -> Dict[str, torch.Tensor]:
    """The two slice directions of ``model`` from one Gaussian draw (``seed``): ``raw`` is the draw scaled
    once to the norm of the initial weights (``norm="model"`` at ``init``: the same vector for every model
    of a seed), ``filter`` the draw with each filter rescaled to the norm of ``model``'s filter. Biases and
    BN parameters are 0 in both (Li et al.'s ``biasbn``)."""
    theta = flatten_parameters(model)
    return {"raw": random_direction(flatten_parameters(init).to(theta), init, norm="model", seed=seed),
            "filter": random_plane(theta, model, dims=1, norm="filter", seed=seed).d1}


def slices(model, init, cfg: dict, seed: int, loaders) -> Dict[str, list]:
    """The un-normalised and filter-normalised 1-D slices of ``model`` around θ, ``directions`` draws of each
    (:func:`directions` with seeds ``1000·seed + k``), α in [-1, 1]."""
    theta = flatten_parameters(model)
    xs = np.linspace(-1.0, 1.0, cfg["slice_steps"])
    out = {"raw": [], "filter": []}
    for k in range(cfg["directions"]):
        for kind, d in directions(model, init, 1000 * seed + k).items():
            line = Plane(theta.clone(), d, info={"norm": kind, "seed": 1000 * seed + k})
            out[kind].append(evaluate_grid(model, line, xs, train_loader=loaders[0], test_loader=loaders[1]))
    return out


def measure(model, init, ds, cfg: dict, seed: int, device: str) -> tuple:
    """One model's row of numbers (see the module docstring) and its slices."""
    loaders = eval_loaders(ds, device)
    train, test = evaluate(model, loaders[0]), evaluate(model, loaders[1])
    hdata = ds.eval_loader("train", cfg["hessian_samples"], samples=cfg["hessian_samples"]).to(device)
    eig = hessian_extreme_eigenvalues(model, None, hdata, tol=cfg["hessian_tol"], seed=seed)
    row = {"train_loss": train["loss"], "test_loss": test["loss"], "train_error": train["error"],
           "test_error": test["error"], "loss_gap": test["loss"] - train["loss"],
           "weight_norm": float(sum(p.detach().pow(2).sum() for p in model.parameters() if p.dim() >= 2) ** 0.5),
           "lambda_max": eig.lambda_max, "lambda_min": eig.lambda_min, "ratio": eig.ratio}
    grids = slices(model, init, cfg, seed, loaders)
    for kind, gs in grids.items():
        nums = [slice_numbers(g, cfg["fit_radius"], cfg["rise_at"]) for g in gs]
        row[f"{kind}_curvature"] = float(np.mean([n["curvature"] for n in nums]))
        row[f"{kind}_rise"] = float(np.mean([n["rise"] for n in nums]))
    return row, grids


def interpolation(sb, lb, cfg: dict, loaders) -> dict:
    """The line θ(α) = θ_SB + α(θ_LB - θ_SB), α in [-0.5, 1.5]: its arrays and its curvature at each end."""
    a, b = flatten_parameters(sb), flatten_parameters(lb)
    line = Plane(a.clone(), b - a, info={"kind": "SB->LB"})
    grid = evaluate_grid(sb, line, np.linspace(-0.5, 1.5, cfg["interp_steps"]), train_loader=loaders[0],
                         test_loader=loaders[1])
    xs, loss = grid.xs, grid.arrays["train_loss"]
    radius = max(0.2, 2.01 * (xs[1] - xs[0]))  # at least 5 points in each fit
    return {"xs": xs.tolist(), **{k: v.tolist() for k, v in grid.arrays.items()},
            "curvature_sb": slice_curvature(xs, loss, radius), "curvature_lb": slice_curvature(xs - 1, loss, radius)}


def run_seed(ds, cfg: dict, seed: int, device: str, log) -> tuple:
    """All settings of one seed: their rows, slices (train loss arrays) and the SB->LB lines."""
    init = initial_model(ds, cfg, seed).to(device)
    rows, models, curves = [], {}, {}
    for s in settings(cfg):
        clock = Clock()
        models[s["label"]] = model = train(ds, cfg, s, seed, init, device)
        row, grids = measure(model, init, ds, cfg, seed, device)
        rows.append({"seed": seed, **{k: s[k] for k in ("label", "batch", "wd", "opt")}, **row,
                     "seconds": clock.seconds})
        curves[s["label"]] = {kind: {"xs": gs[0].xs.tolist(), "train_loss": gs[0].arrays["train_loss"].tolist()}
                              for kind, gs in grids.items()}
        log(f"seed {seed} {s['label']:18s} test error {100 * row['test_error']:5.2f}%  λmax "
            f"{row['lambda_max']:8.3f}  raw κ {row['raw_curvature']:8.3f}  filter κ "
            f"{row['filter_curvature']:8.3f}  ({clock})")
    lines = {}
    for wd in cfg["weight_decays"]:
        for opt in ("SGD", "SAM"):
            key = f"wd={wd:g} {opt}"
            lines[key] = interpolation(models[f"SB {key}"], models[f"LB {key}"], cfg, eval_loaders(ds, device))
    return rows, curves, lines


def correlations(rows: List[dict], seeds: list) -> List[dict]:
    """Spearman ρ and Kendall τ of every measure with every target: within each seed (across settings;
    mean ± std over seeds) and pooled over all models."""
    out = []
    for m in MEASURES:
        for t in TARGETS:
            per = []
            for seed in seeds:
                mine = [r for r in rows if r["seed"] == seed]
                x, y = [r[m] for r in mine], [r[t] for r in mine]
                per.append((stats.spearmanr(x, y)[0], stats.kendalltau(x, y)[0]))
            pooled = stats.spearmanr([r[m] for r in rows], [r[t] for r in rows])[0]
            out.append({"measure": m, "target": t, "spearman_per_seed": [float(p[0]) for p in per],
                        "kendall_per_seed": [float(p[1]) for p in per],
                        "spearman": mean_std(p[0] for p in per), "kendall": mean_std(p[1] for p in per),
                        "spearman_pooled": float(pooled)})
    return out


def interpolation_summary(lines_per_seed: List[dict]) -> List[dict]:
    """Per (weight decay, optimiser): the line's losses at SB, LB and its barrier, its curvature at each end."""
    out = []
    for key in lines_per_seed[0]:
        per = []
        for lines in lines_per_seed:
            ln = lines[key]
            xs, loss = np.asarray(ln["xs"]), np.asarray(ln["train_loss"])
            inner = loss[(xs >= -1e-9) & (xs <= 1 + 1e-9)]
            ends = float(np.interp(0.0, xs, loss)), float(np.interp(1.0, xs, loss))
            per.append({"sb_loss": ends[0], "lb_loss": ends[1], "barrier": float(inner.max() - max(ends)),
                        "curvature_sb": ln["curvature_sb"], "curvature_lb": ln["curvature_lb"],
                        "lb_over_sb": ln["curvature_lb"] / ln["curvature_sb"]})
        out.append({"line": key, **{k: mean_std(p[k] for p in per) for k in per[0]}})
    return out


def markdown(cfg: dict, summary: List[dict], corr: List[dict], interp: List[dict], seconds: float) -> str:
    """results.md: the per-setting table, the rank correlations and the SB->LB lines."""
    sb, lb = cfg["small"], cfg["large"]
    head = [f"# Sharp vs flat minima: un-normalised vs filter-normalised sharpness ({cfg['dataset']})", "",
            f"Preset `{cfg['preset']}`: `{cfg['model']}` {cfg['model_kwargs']}, seeds {cfg['seeds']} (one "
            f"initialisation per seed shared by all settings); SB batch {sb['batch']}, {sb['epochs']} epochs, lr "
            f"{sb['lr']}; LB batch {lb['batch'] or 'full'}, {lb['epochs']} epochs, lr {lb['lr']}; SGD momentum 0.9, "
            f"cosine; SAM ρ = {cfg['rho']}. Hessian on {cfg['hessian_samples']} training images; slices α in "
            f"[-1, 1] ({cfg['slice_steps']} points, {cfg['directions']} direction(s) averaged), curvature = "
            f"d²L/dα² at 0 (parabola through |α| <= {cfg['fit_radius']}), rise = mean L(±{cfg['rise_at']}) - L(0), "
            f"train loss; BN recomputed at every point. Mean ± std over seeds; {seconds:.0f} s.", ""]
    settings_table = table(
        ["setting", "test error %", "train loss", "loss gap", "‖θ‖", "λmax", "|λmin/λmax|", "raw κ", "raw rise",
         "filter κ", "filter rise"],
        [[r["label"], (100 * r["test_error"][0], 100 * r["test_error"][1])] +
         [r[k] for k in ("train_loss", "loss_gap", "weight_norm", "lambda_max", "ratio", "raw_curvature",
                         "raw_rise", "filter_curvature", "filter_rise")] for r in summary], digits=3)
    corr_table = table(["sharpness measure", "vs", "Spearman ρ (per seed)", "Kendall τ (per seed)",
                        "Spearman ρ (pooled)"],
                       [[c["measure"], c["target"], c["spearman"], c["kendall"], c["spearman_pooled"]]
                        for c in corr], digits=2)
    interp_table = table(["SB -> LB line", "train loss at SB (α=0)", "at LB (α=1)", "barrier on [0, 1]",
                          "κ at SB", "κ at LB", "κ LB / κ SB"],
                         [[r["line"]] + [r[k] for k in ("sb_loss", "lb_loss", "barrier", "curvature_sb",
                                                         "curvature_lb", "lb_over_sb")] for r in interp], digits=3)
    return "\n".join(head + ["Per setting:", "", settings_table, "",
                             "Rank correlation of sharpness with generalisation (within a seed across the "
                             f"{len(summary)} settings, mean ± std over seeds; pooled: all models):", "", corr_table,
                             "", "The 1-D line from the SB to the LB solution (Li et al. Fig. 1), curvature of "
                             "the train loss along it at each end:", "", interp_table, ""])


def _interp_panel(ax, lines_per_seed: List[dict], key: str) -> None:
    """One SB->LB line (mean over seeds): train/test loss (log) and accuracy (right axis)."""
    xs = np.asarray(lines_per_seed[0][key]["xs"])
    mean = {m: np.mean([ln[key][m] for ln in lines_per_seed], axis=0)
            for m in ("train_loss", "test_loss", "train_acc", "test_acc")}
    ax.semilogy(xs, mean["train_loss"], "-", color="C0", label="train loss")
    ax.semilogy(xs, mean["test_loss"], "--", color="C0", label="test loss")
    acc = ax.twinx()
    acc.plot(xs, 100 * mean["train_acc"], "-", color="C1", label="train acc")
    acc.plot(xs, 100 * mean["test_acc"], "--", color="C1", label="test acc")
    acc.set_ylim(0, 102)
    acc.tick_params(labelsize=7)
    ax.set_title(f"SB (α=0) -> LB (α=1), {key}", fontsize=9)
    ax.set_xlabel("α")


def _ratio_panel(ax, interp: List[dict]) -> None:
    """κ at LB / κ at SB along the SB->LB line, one bar per (weight decay, optimiser), mean ± std."""
    names = [r["line"] for r in interp]
    ax.bar(range(len(names)), [r["lb_over_sb"][0] for r in interp], yerr=[r["lb_over_sb"][1] for r in interp],
           color=["C0" if "SGD" in n else "C1" for n in names])
    ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_title("line curvature κ(LB) / κ(SB) (> 1: LB end sharper)", fontsize=9)


def figure(cfg: dict, rows: List[dict], curves: dict, lines_per_seed: List[dict], interp: List[dict]) -> Figure:
    """Top: the SGD SB->LB lines per weight decay, the curvature ratio at their ends. Bottom: seed 0's raw and
    filter-normalised slices (SGD solid, SAM dotted); κ vs test error (SGD circles, SAM triangles)."""
    fig = Figure(figsize=(16, 7.5))
    axes = fig.subplots(2, 4)
    sgd = [k for k in lines_per_seed[0] if k.endswith("SGD")][:3]
    for ax, key in zip(axes[0], sgd):
        _interp_panel(ax, lines_per_seed, key)
    _ratio_panel(axes[0][3], interp)
    axes[0][0].set_ylabel("loss (log)")
    labels = [s["label"] for s in settings(cfg)]
    for k, (ax, kind) in enumerate(zip(axes[1][:2], ("raw", "filter"))):
        for i, label in enumerate(labels):
            c = curves[label][kind]
            ax.semilogy(c["xs"], c["train_loss"], "-" if "SGD" in label else ":", color=f"C{i // 2}",
                        label=label)
        ax.set_title(f"{'un-normalised' if kind == 'raw' else 'filter-normalised'} slice, seed {cfg['seeds'][0]}",
                     fontsize=9)
        ax.set_xlabel("α")
    axes[1][0].set_ylabel("train loss (log)")
    axes[1][0].legend(fontsize=6, ncol=2)
    for ax, kind in zip(axes[1][2:], ("raw", "filter")):
        for i, label in enumerate(labels):
            mine = [r for r in rows if r["label"] == label]
            ax.scatter([r[f"{kind}_curvature"] for r in mine], [100 * r["test_error"] for r in mine],
                       color=f"C{i // 2}", marker="o" if "SGD" in label else "^", s=18)
        ax.set_xscale("symlog", linthresh=1e-2)
        ax.set_xlabel(f"{'un-normalised' if kind == 'raw' else 'filter-normalised'} curvature κ")
        ax.set_ylabel("test error %")
        ax.set_title(f"κ vs test error ({'raw' if kind == 'raw' else 'filter'})", fontsize=9)
    fig.tight_layout()
    return fig


def main(argv=None) -> dict:
    """Run the experiment (see the module docstring); returns the result dict."""
    args, cfg = parse(NAME, __doc__, PRESETS, argv)
    device = "cuda" if cfg["preset"] == "paper" and torch.cuda.is_available() else "cpu"
    ds = load_dataset(cfg, args.data_dir)
    clock = Clock()
    rows, lines_per_seed, curves = [], [], {}
    for seed in cfg["seeds"]:
        r, c, lines = run_seed(ds, cfg, seed, device, print)
        rows += r
        lines_per_seed.append(lines)
        curves = curves or c  # the first seed's slices go into the figure
    summary = summarize(rows, ["label"], NUMBERS)
    corr = correlations(rows, cfg["seeds"])
    interp = interpolation_summary(lines_per_seed)
    md = markdown(cfg, summary, corr, interp, clock.seconds)
    result = {"config": cfg, "seconds": clock.seconds, "runs": rows, "summary": summary, "correlations": corr,
              "interpolation": interp, "lines": lines_per_seed, "slices_first_seed": curves}
    out = write_results(args, NAME, result, md, {NAME: figure(cfg, rows, curves, lines_per_seed, interp)})
    print(md)
    print(f"wrote {out}/results.json, results.md, {NAME}.png ({clock})")
    return result


if __name__ == "__main__":
    main()
