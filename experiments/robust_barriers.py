"""Clean vs robust loss barriers between adversarially trained networks, and the sharpness of robust minima.

Reproduces, on the digits MLP (scikit-learn's 8x8 digits, ``mlp`` depth 2
width 128), two findings:

* Tatro et al. 2020 (§4.3): between two adversarially trained networks the
  *robust* loss (PGD examples) has a high barrier along the straight line;
  aligning the neurons (weight matching) removes much of it, and a curve
  fitted between the aligned endpoints finds models on the path that are
  as accurate and as robust as the endpoints, or more. Curves are fitted on
  clean data ("aligned curve") and, between the adversarial pair, on PGD
  examples at θ(t) ("aligned robust curve", the robust objective). The
  line, aligned line and clean curve between two standard networks are the
  control. Robust losses are evaluated
  at every point with BN statistics recomputed on clean data (no BN here).
* Prabhu et al. ("Understanding Adversarial Robustness Through Loss
  Landscape Geometries"): filter-normalised 1-D slices (Li et al. 2018) of
  standard vs adversarially trained models; they find adversarial training
  does *not* give flatter minima. We report the slice curvature at 0 and
  λmax of the Hessian (``sharpness_report``) for each model.

Endpoints: three pairs (seeds 1/2, 3/4, 5/6) of each kind, SGD (lr 0.05, momentum 0.9, wd 5e-4, cosine, 1
warm-up epoch); adversarial ones with PGD L∞ (ε = 0.3 in normalised pixel
units, i.e. ≈ 1.8 of the 0..16 grey levels; 7 steps, α = 2.5ε/7, random
start). The robust metrics attack with PGD L∞ ε = 0.3 and 10 steps.

    .venv/bin/python experiments/robust_barriers.py            # CPU preset (a few minutes)
    .venv/bin/python experiments/robust_barriers.py --quick    # seconds; what the test runs

Writes ``experiments/results/robust_barriers{,_quick}.json`` (every number),
``.md`` (the tables) and ``.png`` (clean and robust loss along the paths) and
``_slices.png`` (the slices).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from modeconn.alignment import align_models, infer_permutation_spec
from modeconn.core.curve_model import CurveModel, linear_path
from modeconn.core.curves import Bezier
from modeconn.data import get_dataset
from modeconn.evaluation.adversarial import PGD, robust_path
from modeconn.evaluation.path import evaluate_path
from modeconn.geometry.sharpness import sharpness_report
from modeconn.models import create_model
from modeconn.plots.robustness import plot_robust_paths
from modeconn.plots.sharpness import plot_sharpness_slices
from modeconn.training.loop import fit_curve, train_model

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = {
    "cpu": dict(epochs=40, curve_epochs=30, points=11, eval_steps=10, train_steps=7, slice_points=21,
                trace_samples=20, test_samples=None, pairs=[(1, 2), (3, 4), (5, 6)]),
    "quick": dict(epochs=3, curve_epochs=2, points=3, eval_steps=2, train_steps=1, slice_points=5,
                  trace_samples=2, test_samples=100, pairs=[(1, 2)]),
}
EPS = 0.3


def endpoint(ds, seed: int, adversarial: bool, cfg: dict) -> torch.nn.Module:
    """One trained MLP (seed ``seed``), adversarially trained with PGD when ``adversarial``."""
    torch.manual_seed(seed)
    net = create_model("mlp", ds.input_shape, ds.num_classes)
    attack = PGD(EPS, cfg["train_steps"]) if adversarial else None
    train_model(net, ds.train_loader(128, seed=seed), cfg["epochs"], lr=0.05, schedule="cosine", seed=seed,
                warmup_epochs=1.0, adversarial=attack)
    return net.eval()


def barrier_row(res, robust: Dict[str, np.ndarray]) -> dict:
    """Clean and robust barriers (interp reference) and the extremes of accuracy along the path."""
    res.extra.update(robust)
    acc, racc = res.test_acc, robust["robust_test_acc"]
    return {"clean_loss_barrier": res.barrier("test_loss"), "clean_error_barrier": res.barrier("test_error"),
            "robust_loss_barrier": res.barrier("robust_test_loss"),
            "robust_error_barrier": res.barrier("robust_test_error"),
            "endpoint_acc": [float(acc[0]), float(acc[-1])], "min_acc": float(acc.min()),
            "endpoint_robust_acc": [float(racc[0]), float(racc[-1])], "max_robust_acc": float(racc.max()),
            "min_robust_acc": float(racc.min()), "ts": res.ts.tolist(), "test_loss": res.test_nll.tolist(),
            "robust_test_loss": robust["robust_test_loss"].tolist()}


def fitted_curve(a, b, ds, cfg: dict, seed: int, attack=None) -> CurveModel:
    """A Bezier(3) curve from ``a`` to ``b`` fitted on clean data, or on PGD examples at θ(t) with ``attack``."""
    curve = CurveModel(create_model("mlp", ds.input_shape, ds.num_classes), a, b, Bezier(3))
    fit_curve(curve, ds.train_loader(128, seed=seed), cfg["curve_epochs"], lr=0.03, seed=seed, adversarial=attack)
    return curve


def paths_between(a, b, ds, cfg: dict, seed: int, robust_curve: bool) -> dict:
    """Line, aligned line, aligned Bezier curve (and, with ``robust_curve``, the aligned curve fitted on PGD
    examples) between ``a`` and ``b``: clean and robust metrics of each."""
    train, test = ds.eval_loader("train"), ds.eval_loader("test")
    attacked = ds.eval_loader("test", samples=cfg["test_samples"])
    attack = PGD(EPS, cfg["eval_steps"])
    spec = infer_permutation_spec(a, ds.x_test[:1])
    b_aligned, _, report = align_models(a, b, "weight", spec=spec, seed=seed)
    paths = {"line": linear_path(a, b), "aligned line": linear_path(a, b_aligned),
             "aligned curve": fitted_curve(a, b_aligned, ds, cfg, seed)}
    if robust_curve:
        paths["aligned robust curve"] = fitted_curve(a, b_aligned, ds, cfg, seed, PGD(EPS, cfg["train_steps"]))
    out = {"alignment_cosine": [report.mean_before, report.mean_after]}
    for name, path in paths.items():
        res = evaluate_path(path, train, test, cfg["points"], name=name)
        out[name] = barrier_row(res, robust_path(path, attacked, attack, res.ts, bn_loader=train, seed=seed))
    return out


def slices(models: dict, ds, cfg: dict) -> dict:
    """Filter-normalised 1-D slice, its curvature and λmax of each model (``sharpness_report``, seed 0)."""
    train, test = ds.eval_loader("train"), ds.eval_loader("test")
    xs = np.linspace(-1, 1, cfg["slice_points"])
    return {name: sharpness_report(net, train, test, slice_xs=xs, trace_samples=cfg["trace_samples"],
                                   fit_radius=0.5, seed=0) for name, net in models.items()}


def markdown(result: dict) -> str:
    """The tables of the results file."""
    cfg = result["config"]
    lines = [f"# Clean vs robust barriers, digits MLP (preset {result['preset']}, {result['seconds']:.0f} s)", "",
             f"PGD L∞ ε = {EPS} (normalised units), {cfg['eval_steps']} steps for evaluation, "
             f"{cfg['train_steps']} for adversarial training; interp-reference barriers of the test loss/error "
             f"at {cfg['points']} points; robust metrics on {cfg['test_samples'] or 'all'} test samples.", "",
             "| pair (seeds) | path | clean loss barrier | robust loss barrier | clean err barrier | robust err barrier "
             "| robust acc ends | max robust acc on path |", "|---|---|---|---|---|---|---|---|"]
    for pair in result["pairs"]:
        seeds = "/".join(map(str, pair["seeds"]))
        for kind in ("adversarial", "standard"):
            for name, r in pair[kind].items():
                if name == "alignment_cosine":
                    continue
                ends = "/".join(f"{100 * v:.1f}" for v in r["endpoint_robust_acc"])
                lines.append(f"| {kind} ({seeds}) | {name} | {r['clean_loss_barrier']:.3f} | "
                             f"{r['robust_loss_barrier']:.3f} | {100 * r['clean_error_barrier']:.1f}% | "
                             f"{100 * r['robust_error_barrier']:.1f}% | {ends}% | {100 * r['max_robust_acc']:.1f}% |")
    lines += ["", "| model (seed) | train loss | test acc | slice curvature at 0 | λmax | Hessian trace |",
              "|---|---|---|---|---|---|"]
    for name, s in result["sharpness"].items():
        lines.append(f"| {name} | {s['train_loss']:.4f} | {100 * s['test_acc']:.1f}% | "
                     f"{s['slice_curvature']:.3f} | {s['lambda_max']:.3f} | {s['trace']:.2f} |")
    return "\n".join(lines) + "\n"


def run(preset: str = "cpu", out_dir: Path = RESULTS) -> dict:
    """Train the endpoints of every pair, evaluate the paths and slices, write JSON/markdown/PNGs."""
    t0 = time.perf_counter()
    cfg = PRESETS[preset]
    torch.set_num_threads(1)
    ds = get_dataset("digits")
    pairs, models = [], {}
    for s1, s2 in cfg["pairs"]:
        nets = {(kind, s): endpoint(ds, s, kind == "adversarial", cfg) for kind in ("adversarial", "standard")
                for s in (s1, s2)}
        models.update({f"{kind} ({s})": net for (kind, s), net in nets.items()})
        pairs.append({"seeds": [s1, s2], **{kind: paths_between(nets[(kind, s1)], nets[(kind, s2)], ds, cfg, seed=0,
                                                                 robust_curve=kind == "adversarial")
                                            for kind in ("adversarial", "standard")}})
    reports = slices(models, ds, cfg)
    suffix = "" if preset == "cpu" else f"_{preset}"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"preset": preset, "config": cfg, "eps": EPS, "pairs": pairs,
              "sharpness": {k: r.row() for k, r in reports.items()},
              "slices": {k: {"xs": r.slice.xs.tolist(), "train_loss": r.slice.arrays["train_loss"].tolist()}
                         for k, r in reports.items()}}
    result["seconds"] = time.perf_counter() - t0
    (out_dir / f"robust_barriers{suffix}.json").write_text(json.dumps(result, indent=1, default=float))
    (out_dir / f"robust_barriers{suffix}.md").write_text(markdown(result))
    first = pairs[0]
    curves = {name: {"clean": (r["ts"], r["test_loss"]), "robust": (r["ts"], r["robust_test_loss"])}
              for name, r in first["adversarial"].items() if name != "alignment_cosine"}
    plot_robust_paths(curves, out_dir / f"robust_barriers{suffix}.png",
                      f"adversarially trained digits MLPs (seeds {first['seeds'][0]}, {first['seeds'][1]})")
    s1 = first["seeds"][0]
    plot_sharpness_slices({k: reports[f"{k} ({s1})"].slice for k in ("standard", "adversarial")},
                          out_dir / f"robust_barriers{suffix}_slices.png",
                          f"filter-normalised 1-D slices (seed {s1}): standard vs adversarial training")
    return result


def main() -> None:
    """Command line: ``--quick`` for the seconds-long preset."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny preset (what the test runs)")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory of the result files")
    args = p.parse_args()
    result = run("quick" if args.quick else "cpu", args.out)
    print(markdown(result))


if __name__ == "__main__":
    main()
