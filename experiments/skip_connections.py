"""Do skip connections keep the loss landscape of deep networks convex-looking? PreResNet with and
without shortcuts at increasing depth.

Paper: Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of Neural Nets" (NeurIPS
2018), Section 6, Fig. 5 and 6. Claim: filter-normalised 2-D contour plots of ResNet-20/56/110 on
CIFAR-10 are convex-looking bowls at every depth; without skip connections ResNet-20-noshort still
looks convex, but ResNet-56-noshort and ResNet-110-noshort turn chaotic (non-convex, many local
minima), and their test error grows (ResNet-20 7.37 % vs 20-noshort 8.18 %; ResNet-56 5.89 % vs
56-noshort 13.31 %; ResNet-110 5.79 % vs 110-noshort 16.44 %); with shortcuts the 0.1-level contour is
almost the same at depth 20 and 110, and for ResNet-20 the shortcuts make little visible difference.
The maps of |λmin/λmax| of the Hessian over the plane (Fig. 6) show that convex-looking regions have
insignificant negative curvature (for DenseNet-121 |λmin| < 1 % of λmax over a large region), while
the chaotic surfaces have large negative eigenvalues.

Protocol (digits, 8x8, 1437 train / 360 test images; no download): ``preresnet`` at depths 8, 20,
32 (6n + 2 with n = 1, 3, 5 basic blocks per stage), with shortcuts and with ``shortcut=False``
(every block returns its residual branch only), both seeded alike per seed (SGD,
momentum 0.9, cosine, weight decay 5e-4; ``mc.train_model``). BN statistics are then recomputed over
the first ``bn_samples`` training images, which also serve as the loss's data everywhere (the model's
own loss and every grid point, BN recomputed per point). Per model:

* a filter-normalised random plane (``random_plane(..., norm="filter")``, biases/BN left out, seed
  per run) and the train loss on a ``grid`` x ``grid`` lattice over [-1, 1]^2 (``evaluate_grid``);
* a plane-convexity share: the fraction of interior lattice points where the finite-difference 2-D
  Hessian of the loss in the plane passes Li et al.'s ratio test, smaller eigenvalue >= -0.1 x |larger|
  (the surface is locally convex in the plotted plane; cheap, so on every lattice point), and the number
  of local minima of the lattice (interior points below their 8 neighbours; 1 for a single basin) --
  added after a first cpu run showed the convexity share near 0.5 for every network: far from the
  minimum the loss flattens towards chance level, a concave rim around any basin;
* λmax, λmin and |λmin/λmax| of the full Hessian (``modeconn.geometry.curvature_metrics``, Lanczos on
  ``hessian_samples`` training images, BN recomputed per point) at ``curvature_points`` of the plane --
  Li et al.'s Fig. 6 quantity. Curvature costs ~40 Hessian-vector products per point, so the cpu preset
  takes the centre and the four points at distance 0.5 on the axes only; convexity measures: the mean
  ratio and the share of points with ratio < ``ratio_threshold`` (0.1, fixed before the run).

Presets:
  --quick        depth 8 with/without shortcuts, one seed, 1 epoch, 5x5 lattice, curvature at the
                 centre only (what the test runs)
  --preset cpu   depths 8/20/32 x shortcut yes/no x 3 seeds, 6 epochs, 13x13 lattice, 5 curvature points
                 (10-13 minutes)
  --preset paper CIFAR-10 from --data-dir, PreResNet-20/56/110 with and without shortcuts, 300 epochs,
                 batch 128, lr 0.1 (0.01 for 56/110-noshort, as the paper), wd 5e-4, 51x51 lattice,
                 curvature on a 7x7 sub-grid (the paper: SGD with Nesterov momentum and a step
                 schedule; here momentum 0.9 and cosine) -- for a GPU, not run here

    python experiments/skip_connections.py                # the CPU reproduction
    python experiments/skip_connections.py --quick --out /tmp/skip
    python experiments/skip_connections.py --preset paper --data-dir DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typing import Dict, List

import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

import modeconn as mc
from experiments.common import Clock, parse, summarize, table, write_results
from modeconn.evaluation.model import evaluate
from modeconn.geometry import curvature_metrics, evaluate_grid, flatten_parameters, random_plane
from modeconn.plots import plot_contours

NAME = "skip_connections"
NUMBERS = ("train_error", "test_error", "test_loss", "centre_loss", "plane_convex_share", "local_minima",
           "lambda_max_centre",
           "ratio_centre", "ratio_mean", "ratio_max", "convex_share")


def _square(lo: float, hi: float, n: int) -> List[List[float]]:
    """The points of an n x n lattice over [lo, hi]^2, as [x, y] pairs."""
    v = np.linspace(lo, hi, n)
    return [[float(x), float(y)] for y in v for x in v]


PRESETS = {
    "quick": {"dataset": "digits", "depths": [8], "seeds": [0], "epochs": 1, "batch": 64, "lr": 0.05, "wd": 5e-4,
              "bn_samples": 256, "hessian_samples": 32, "grid": 5, "curvature_points": [[0.0, 0.0]],
              "hessian_tol": 1e-2, "ratio_threshold": 0.1},
    "cpu": {"dataset": "digits", "depths": [8, 20, 32], "seeds": [0, 1, 2], "epochs": 6, "batch": 64, "lr": 0.05,
            "wd": 5e-4, "bn_samples": 512, "hessian_samples": 64, "grid": 13,
            "curvature_points": [[0.0, 0.0], [0.5, 0.0], [-0.5, 0.0], [0.0, 0.5], [0.0, -0.5]], "hessian_tol": 1e-2,
            "ratio_threshold": 0.1},
    "paper": {"dataset": "cifar10", "depths": [20, 56, 110], "seeds": [0, 1, 2], "epochs": 300, "batch": 128,
              "lr": 0.1, "noshort_lr": {"56": 0.01, "110": 0.01}, "wd": 5e-4, "bn_samples": 10000, "hessian_samples": 1024, "grid": 51,
              "curvature_points": _square(-1.0, 1.0, 7), "hessian_tol": 1e-3, "ratio_threshold": 0.1},
}


def load_dataset(cfg: dict, data_dir):
    """The dataset; a missing torchvision set ends the run with one clear line."""
    try:
        return mc.get_dataset(cfg["dataset"], data_dir=data_dir or "data")
    except FileNotFoundError as e:
        raise SystemExit(f"experiments/{NAME}.py: {e}") from None


def build(ds, depth: int, shortcut: bool, seed: int) -> torch.nn.Module:
    """PreResNet-``depth`` with or without shortcuts, initialised from ``seed`` (the same weights either way:
    the state dicts have the same keys and are drawn in the same order)."""
    torch.manual_seed(seed)
    return mc.create_model("preresnet", ds.input_shape, ds.num_classes, depth=depth, shortcut=shortcut)


def loaders(ds, cfg: dict, device: str) -> dict:
    """``bn``: the first ``bn_samples`` training images (BN statistics and the landscape's loss);
    ``hessian``: the first ``hessian_samples``; ``test``: the test set."""
    return {"bn": ds.eval_loader("train", 512, samples=cfg["bn_samples"]).to(device),
            "hessian": ds.eval_loader("train", cfg["hessian_samples"], samples=cfg["hessian_samples"]).to(device),
            "test": ds.eval_loader("test", 512).to(device)}


def train(ds, cfg: dict, depth: int, shortcut: bool, seed: int, data: dict, device: str) -> torch.nn.Module:
    """Train one network (SGD, cosine); BN statistics then recomputed over ``data["bn"]``."""
    model = build(ds, depth, shortcut, seed)
    lr = cfg["lr"] if shortcut else cfg.get("noshort_lr", {}).get(str(depth), cfg["lr"])
    mc.train_model(model, ds.train_loader(cfg["batch"], seed=seed), cfg["epochs"], lr, cfg["wd"],
                   schedule="cosine", seed=seed, runtime=mc.Runtime(device=device))
    return mc.recompute_bn(model, data["bn"]).eval()


def plane_convex_share(grid, threshold: float) -> float:
    """Share of the interior lattice points where the loss is convex in the plane, Li et al.'s ratio test
    applied to the 2-D finite-difference Hessian ``[[Lxx, Lxy], [Lxy, Lyy]]`` (central differences):
    with eigenvalues ``μ1 >= μ2``, convex when ``μ2 >= -threshold·|μ1|`` (a linear or flat direction,
    ``μ2 ≈ 0``, counts as convex; a clearly concave one does not)."""
    z = np.asarray(grid.arrays["train_loss"], float)  # [i_y, i_x]
    hx, hy = grid.xs[1] - grid.xs[0], grid.ys[1] - grid.ys[0]
    lxx = (z[1:-1, 2:] - 2 * z[1:-1, 1:-1] + z[1:-1, :-2]) / hx ** 2
    lyy = (z[2:, 1:-1] - 2 * z[1:-1, 1:-1] + z[:-2, 1:-1]) / hy ** 2
    lxy = (z[2:, 2:] - z[2:, :-2] - z[:-2, 2:] + z[:-2, :-2]) / (4 * hx * hy)
    mid, rad = (lxx + lyy) / 2, np.sqrt(((lxx - lyy) / 2) ** 2 + lxy ** 2)
    return float(np.mean(mid - rad >= -threshold * np.abs(mid + rad)))


def local_minima(grid) -> int:
    """Interior lattice points whose loss is below all 8 neighbours': 1 for a single basin, more where the
    surface is chaotic (Li et al.'s "many local minima")."""
    z = np.asarray(grid.arrays["train_loss"], float)
    centre = z[1:-1, 1:-1]
    below = np.ones(centre.shape, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                below &= centre < z[1 + dy:z.shape[0] - 1 + dy, 1 + dx:z.shape[1] - 1 + dx]
    return int(below.sum())


def landscape(model, cfg: dict, seed: int, data: dict):
    """The filter-normalised plane, the loss lattice over it and the curvature at ``curvature_points``."""
    plane = random_plane(flatten_parameters(model), model, dims=2, norm="filter", seed=seed)
    axis = np.linspace(-1.0, 1.0, cfg["grid"])
    grid = evaluate_grid(model, plane, axis, axis, train_loader=data["bn"], bn_loader=data["bn"])
    f = curvature_metrics(model, data["hessian"], bn_loader=data["bn"], tol=cfg["hessian_tol"], seed=seed)
    pts = np.asarray(cfg["curvature_points"], float)
    curv = {k: np.asarray(v, float) for k, v in f(plane.points(pts)).items()}
    return plane, grid, curv


def run_one(ds, cfg: dict, depth: int, shortcut: bool, seed: int, data: dict, device: str):
    """One network's row of numbers (see the module docstring) and its lattice."""
    model = train(ds, cfg, depth, shortcut, seed, data, device)
    train_m, test_m = evaluate(model, data["bn"]), evaluate(model, data["test"])
    _, grid, curv = landscape(model, cfg, seed, data)
    pts = np.asarray(cfg["curvature_points"], float)
    centre = int(np.argmin(np.abs(pts).sum(1)))
    z = grid.arrays["train_loss"]
    ratio = curv["curvature_ratio"]
    row = {"depth": depth, "shortcut": shortcut, "seed": seed, "train_error": train_m["error"],
           "train_loss": train_m["loss"], "test_error": test_m["error"], "test_loss": test_m["loss"],
           "centre_loss": float(z[len(grid.ys) // 2, len(grid.xs) // 2]),
           "plane_convex_share": plane_convex_share(grid, cfg["ratio_threshold"]), "local_minima": local_minima(grid),
           "lambda_max_centre": float(curv["lambda_max"][centre]), "ratio_centre": float(ratio[centre]),
           "ratio_mean": float(np.mean(ratio)), "ratio_max": float(np.max(ratio)),
           "convex_share": float(np.mean(ratio < cfg["ratio_threshold"])),
           "curvature": {k: v.tolist() for k, v in curv.items()}}
    return row, grid


def label(depth: int, shortcut: bool) -> str:
    """``PreResNet-20`` or ``PreResNet-20-noshort`` (Li et al.'s names)."""
    return f"PreResNet-{depth}" + ("" if shortcut else "-noshort")


def markdown(cfg: dict, summary: List[dict], seconds: float) -> str:
    """results.md: one row per (depth, shortcut), mean ± std over seeds."""
    pts = ", ".join(f"({x:g}, {y:g})" for x, y in cfg["curvature_points"][:9])
    more = " ..." if len(cfg["curvature_points"]) > 9 else ""
    head = [f"# Skip connections and the shape of the loss landscape ({cfg['dataset']}, PreResNet)", "",
            f"Preset `{cfg['preset']}`: depths {cfg['depths']} with / without shortcuts, seeds {cfg['seeds']} (one "
            f"torch seed per seed and depth for both variants), {cfg['epochs']} epochs, batch "
            f"{cfg['batch']}, lr {cfg['lr']}, wd {cfg['wd']}, cosine. Loss (train, first {cfg['bn_samples']} images, "
            f"BN recomputed per point) on a {cfg['grid']}x{cfg['grid']} lattice of a filter-normalised random plane "
            f"over [-1, 1]^2; plane-convex share = interior lattice points whose 2-D finite-difference Hessian has "
            f"μ2 >= -{cfg['ratio_threshold']}·|μ1|; local minima = interior lattice points below their 8 neighbours. "
            f"Hessian λmin/λmax ({cfg['hessian_samples']} images, Lanczos tol "
            f"{cfg['hessian_tol']}) at {pts}{more}; convex share = points with |λmin/λmax| < "
            f"{cfg['ratio_threshold']}. Mean ± std over seeds; {seconds:.0f} s.", ""]
    body = table(["network", "test error %", "test loss", "plane-convex share", "local minima", "λmax at centre",
                  "|λmin/λmax| centre", "|λmin/λmax| mean", "|λmin/λmax| max", "convex share"],
                 [[label(r["depth"], r["shortcut"]), (100 * r["test_error"][0], 100 * r["test_error"][1])] +
                  [r[k] for k in ("test_loss", "plane_convex_share", "local_minima", "lambda_max_centre",
                                  "ratio_centre", "ratio_mean", "ratio_max", "convex_share")] for r in summary],
                 digits=3)
    return "\n".join(head + [body, ""])


def _contour(ax, grid, row: dict, cfg: dict, norm) -> None:
    """Log-level contour lines of one lattice's train loss, the curvature points labelled by |λmin/λmax|."""
    z = np.maximum(np.asarray(grid.arrays["train_loss"], float), norm.vmin)
    levels = np.geomspace(norm.vmin, norm.vmax, 16)
    cs = ax.contour(grid.xs, grid.ys, z, levels=levels, norm=norm, cmap="viridis", linewidths=0.9)
    for (x, y), r in zip(cfg["curvature_points"], row["curvature"]["curvature_ratio"]):
        ax.plot([x], [y], "o", color="k" if r < cfg["ratio_threshold"] else "r", ms=4)
        if len(cfg["curvature_points"]) <= 9:
            ax.annotate(f"{r:.2f}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_title(f"{label(row['depth'], row['shortcut'])}: test err {100 * row['test_error']:.1f}%", fontsize=9)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=7)
    return cs


def _bars(ax, summary: List[dict], key: str, title: str) -> None:
    """Mean ± std of ``key`` per depth, with (blue) and without (red) shortcuts."""
    depths = sorted({r["depth"] for r in summary})
    for k, (sc, colour) in enumerate(((True, "C0"), (False, "C3"))):
        vals = [next(r[key] for r in summary if r["depth"] == d and r["shortcut"] == sc) for d in depths]
        ax.bar(np.arange(len(depths)) + 0.4 * k - 0.2, [v[0] for v in vals], 0.4, yerr=[v[1] for v in vals],
               color=colour, label="shortcuts" if sc else "no shortcuts")
    ax.set_xticks(range(len(depths)), [str(d) for d in depths])
    ax.set_xlabel("depth")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def figure(cfg: dict, rows: List[dict], grids: dict, summary: List[dict]) -> Figure:
    """Contours of the first seed (rows: with / without shortcuts; columns: depth, one colour scale) and,
    in the last column, the plane-convex share and the mean |λmin/λmax| per depth."""
    depths, seed = cfg["depths"], cfg["seeds"][0]
    fig = Figure(figsize=(3.6 * (len(depths) + 1) + 1, 7), layout="constrained")
    axes = np.asarray(fig.subplots(2, len(depths) + 1)).reshape(2, -1)
    zs = np.concatenate([np.ravel(g.arrays["train_loss"]) for g in grids.values()])
    norm = LogNorm(max(float(zs.min()), 1e-4), float(zs.max()))
    cs = None
    for i, sc in enumerate((True, False)):
        for j, d in enumerate(depths):
            row = next(r for r in rows if (r["depth"], r["shortcut"], r["seed"]) == (d, sc, seed))
            cs = _contour(axes[i][j], grids[label(d, sc)], row, cfg, norm)
    cb = fig.colorbar(cs, ax=axes[:, :len(depths)].ravel().tolist(), shrink=0.8, format="%.3g",
                      ticks=np.geomspace(norm.vmin, norm.vmax, 6), label="train loss (log levels)")
    cb.minorticks_off()
    _bars(axes[0][-1], summary, "plane_convex_share", "plane-convex share of the lattice")
    _bars(axes[1][-1], summary, "ratio_mean", "mean |λmin/λmax| at the curvature points")
    fig.suptitle(f"filter-normalised planes, seed {seed} (dots: curvature points, red if |λmin/λmax| >= "
                 f"{cfg['ratio_threshold']})", fontsize=10)
    return fig


def main(argv=None) -> dict:
    """Run the experiment (see the module docstring); returns the result dict."""
    args, cfg = parse(NAME, __doc__, PRESETS, argv)
    device = "cuda" if cfg["preset"] == "paper" and torch.cuda.is_available() else "cpu"
    ds = load_dataset(cfg, args.data_dir)
    data = loaders(ds, cfg, device)
    clock = Clock()
    rows, grids = [], {}
    for seed in cfg["seeds"]:
        for depth in cfg["depths"]:
            for shortcut in (True, False):
                t = Clock()
                row, grid = run_one(ds, cfg, depth, shortcut, seed, data, device)
                rows.append({**row, "lattice": grid.arrays["train_loss"].tolist(), "seconds": t.seconds})
                if seed == cfg["seeds"][0]:
                    grids[label(depth, shortcut)] = grid
                print(f"seed {seed} {label(depth, shortcut):22s} test error {100 * row['test_error']:5.2f}%  "
                      f"plane-convex {row['plane_convex_share']:.2f}  λmax {row['lambda_max_centre']:8.3f}  "
                      f"|λmin/λmax| mean {row['ratio_mean']:.3f}  ({t})")
    summary = summarize(rows, ["depth", "shortcut"], NUMBERS)
    md = markdown(cfg, summary, clock.seconds)
    result = {"config": cfg, "seconds": clock.seconds, "runs": rows, "summary": summary,
              "axis": np.linspace(-1.0, 1.0, cfg["grid"]).tolist()}
    out = write_results(args, NAME, result, md, {NAME: figure(cfg, rows, grids, summary)})
    for name, grid in grids.items():  # every first-seed lattice as modeconn's own contour picture
        plot_contours(grid, out / f"contours_{name}.png", f"{name}, seed {cfg['seeds'][0]}")
    print(md)
    print(f"wrote {out}/results.json, results.md, {NAME}.png, contours_*.png ({clock})")
    return result


if __name__ == "__main__":
    main()
