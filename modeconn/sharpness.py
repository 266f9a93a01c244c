"""python -m modeconn.sharpness: every sharpness measure of one or more trained models, side by side."""
from __future__ import annotations

import math
import sys
from pathlib import Path

from modeconn.cli.args import (add_data_args, add_endpoint_model_args, add_run_args, at_least,
                               join_negative_values, parse_range, parser)
from modeconn.cli.data import bn_loader, checkpoint_dataset, hessian_loader
from modeconn.cli.endpoints import load_endpoint_model
from modeconn.cli.errors import CommandError, run_command
from modeconn.cli.outputs import run_info, write_csv, write_json
from modeconn.cli.session import Job, session
from modeconn.geometry.grid import axis
from modeconn.core.param_groups import GROUPINGS
from modeconn.geometry.sharpness import module_curvature, sharpness_report
from modeconn.runtime import Hooks
from modeconn.runtime.checkpoints import make_directory

EXAMPLE = """  python -m modeconn.sharpness --ckpt runs/mlp_b32/model.pt runs/mlp_full/model.pt --out runs/sharpness
  python -m modeconn.sharpness --ckpt runs/mlp_sgd/model.pt runs/mlp_sam/model.pt --labels SGD SAM \\
      --epsilon 5e-4 --trace-samples 200 --out runs/sharp_sam

For each model: λmax and λmin of the Hessian (Lanczos) and |λmin/λmax|, the trace
(Hutchinson, ± its standard error), the curvature at 0 of the filter-normalised 1-D slice
(Li et al. 2018), ε-sharpness (Keskar et al. 2017: the largest loss increase in the box
|δ_i| <= ε(|θ_i| + 1), by projected gradient ascent; also as 100·increase/(1 + L)), train/test
loss, accuracy and their gap. The Hessian and ε-sharpness use the first --hessian-samples
training samples, the network in eval mode; the slice recomputes BN statistics per point.

writes OUT/sharpness.json (every number, the slices, the settings), OUT/sharpness.csv (one row
per model) and OUT/sharpness.png (the slices of all models overlaid, Li et al. Figure 3 style).
--per-module [parameter|module|block] adds the Hessian restricted to each group of parameters
(λmax, λmin, trace of the diagonal block): OUT/modules.csv, OUT/modules.png and 'modules' in the JSON."""

COLUMNS = ("label", "lambda_max", "lambda_min", "ratio", "trace", "trace_stderr", "slice_curvature",
           "epsilon_increase", "epsilon_sharpness", "train_loss", "test_loss", "train_acc", "test_acc",
           "loss_gap", "acc_gap")


def build_parser():
    """The parser of ``python -m modeconn.sharpness``."""
    p = parser("sharpness", "Compare trained models on every sharpness measure: Hessian eigenvalues and trace, "
               "filter-normalised slice curvature, ε-sharpness, generalisation gap.", EXAMPLE)
    g = p.add_argument_group("models")
    g.add_argument("--ckpt", nargs="+", required=True, help="model checkpoints (from modeconn.train)")
    g.add_argument("--labels", nargs="+", default=None, help="one name per checkpoint (default: its directory)")
    add_data_args(p, dataset_default=None, evaluation=True)
    add_endpoint_model_args(p)
    h = p.add_argument_group("measures")
    h.add_argument("--hessian-samples", type=at_least(1), default=2048,
                   help="training samples (the first N) for the Hessian and ε-sharpness (default: %(default)s)")
    h.add_argument("--hessian-tol", type=float, default=1e-3,
                   help="relative accuracy of the Lanczos eigenvalues (default: %(default)s)")
    h.add_argument("--trace-samples", type=at_least(2), default=100,
                   help="Rademacher vectors of the Hutchinson trace (default: %(default)s)")
    h.add_argument("--epsilon", type=float, default=1e-3, help="ε of the ε-sharpness box (default: %(default)s)")
    h.add_argument("--ascent-steps", type=at_least(1), default=20,
                   help="projected gradient-ascent steps of ε-sharpness (default: %(default)s)")
    h.add_argument("--range", default="-1:1", metavar="LO:HI", help="α range of the slice (default: %(default)s)")
    h.add_argument("--steps", type=at_least(5), default=41, help="points of the slice (default: %(default)s)")
    h.add_argument("--fit-radius", type=float, default=0.1,
                   help="the slice's points with |α| <= R fit the parabola whose curvature is reported "
                        "(default: %(default)s)")
    h.add_argument("--seed", type=int, default=0,
                   help="seed of the slice direction, Lanczos start, Hutchinson vectors, ascent start "
                        "(default: %(default)s)")
    h.add_argument("--per-module", nargs="?", const="module", default=None, choices=GROUPINGS,
                   help="also the curvature of each module (or parameter, or top-level block): λmax, λmin and "
                        "trace of its block of the Hessian, the other parameters fixed")
    add_run_args(p)
    p.add_argument("--force", action="store_true", help="replace the results of an earlier run in OUT")
    return p


def _labels(args) -> list:
    """One label per checkpoint: --labels, else the first unique choice of directory names, file stems, paths."""
    if args.labels is not None:
        if len(args.labels) != len(args.ckpt):
            raise CommandError(f"--labels gives {len(args.labels)} names for {len(args.ckpt)} checkpoints")
        return list(args.labels)
    for names in ([Path(c).parent.name for c in args.ckpt], [Path(c).stem for c in args.ckpt]):
        if all(names) and len(set(names)) == len(names):
            return names
    return list(args.ckpt)


def _check(args) -> None:
    """Refuse bad numbers before any work."""
    if not (args.epsilon > 0 and math.isfinite(args.epsilon)):
        raise CommandError(f"--epsilon {args.epsilon}: need a finite number > 0")
    if not (args.hessian_tol >= 0 and math.isfinite(args.hessian_tol)):
        raise CommandError(f"--hessian-tol {args.hessian_tol}: need a finite number >= 0")
    if not args.fit_radius > 0:
        raise CommandError(f"--fit-radius {args.fit_radius}: need a number > 0")


def _measure(args, job: Job, ckpt: str, label: str, xs):
    """(report, dataset name, architecture) of one checkpoint."""
    model, meta = load_endpoint_model(ckpt, "--ckpt", args)
    model = model.to(job.device)
    ds = checkpoint_dataset(args, meta, ckpt)
    train = ds.eval_loader("train", args.batch_size).to(job.device)
    test = ds.eval_loader("test", args.batch_size).to(job.device)
    with job.progress(None, f"sharpness of {label}") as bar:
        report = sharpness_report(model, train, test, hessian_data=hessian_loader(ds, args, job.device),
                                  tol=args.hessian_tol, trace_samples=args.trace_samples, epsilon=args.epsilon,
                                  ascent_steps=args.ascent_steps, slice_xs=xs, fit_radius=args.fit_radius,
                                  seed=args.seed, bn_data=bn_loader(ds, args, job.device),
                                  hooks=Hooks(progress=bar.update))
        modules = module_curvature(model, hessian_loader(ds, args, job.device), args.per_module,
                                   tol=args.hessian_tol, trace_samples=args.trace_samples, seed=args.seed,
                                   hooks=Hooks(progress=bar.update)) if args.per_module else []
    return report, ds.name, meta["arch"], modules


def _write_modules(out: Path, per_model: dict) -> None:
    """modules.csv (one row per model and group), modules.png (λmax per group, one bar per model) and the table."""
    from dataclasses import asdict

    from modeconn.plots.layers import plot_group_bars

    rows = [{"label": label, **asdict(m)} for label, mods in per_model.items() for m in mods]
    write_csv(out / "modules.csv", {c: [r[c] if c != "params" else " ".join(r[c]) for r in rows]
                                    for c in ("label", "group", "params", "num_params", "lambda_max", "lambda_min",
                                              "trace", "trace_stderr")})
    plot_group_bars({label: {m.group: m.lambda_max for m in mods} for label, mods in per_model.items()},
                    out / "modules.png", "λmax of the module's Hessian block", "per-module curvature")
    print(f"{'model':12s} {'group':28s} {'params':>8s} {'λmax':>10s} {'λmin':>10s} {'trace':>10s}")
    for r in rows:
        print(f"{r['label'][:12]:12s} {r['group'][:28]:28s} {r['num_params']:8d} {r['lambda_max']:10.4g} "
              f"{r['lambda_min']:10.3g} {r['trace']:10.4g}")
    print(f"wrote {out / 'modules.csv'}, {out / 'modules.png'}")


def _table(rows: list) -> str:
    """The printed table: one line per model."""
    w = max(len("model"), *(len(r["label"]) for r in rows))
    head = (f"{'model':{w}s} {'λmax':>9s} {'λmin':>9s} {'|λmin/λmax|':>11s} {'trace ± se':>18s} {'slice κ':>9s} "
            f"{'ε-sharp %':>9s} {'train/test loss':>16s} {'train/test acc':>15s}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['label']:{w}s} {r['lambda_max']:9.4g} {r['lambda_min']:9.3g} {r['ratio']:11.3g} "
                     f"{r['trace']:9.4g} ± {r['trace_stderr']:<6.2g} {r['slice_curvature']:9.4g} "
                     f"{r['epsilon_sharpness']:9.4g} {r['train_loss']:7.4f}/{r['test_loss']:<8.4f} "
                     f"{100 * r['train_acc']:6.2f}/{100 * r['test_acc']:<6.2f}")
    return "\n".join(lines)


def main_(argv=None) -> int:
    """The command body (see :func:`main`)."""
    args = build_parser().parse_args(join_negative_values(argv, ("--range",)))
    _check(args)
    labels, xs = _labels(args), axis(*parse_range(args.range, "--range"), args.steps)
    out = Path(args.out)
    if (out / "sharpness.json").exists() and not args.force:
        raise CommandError(f"{out} already holds sharpness results; pass --force to replace them")
    with session(args, join=False) as job:
        make_directory(out)
        rows, slices, modules = [], {}, {}
        for ckpt, label in zip(args.ckpt, labels):
            report, dataset, arch, modules[label] = _measure(args, job, ckpt, label, xs)
            rows.append({"label": label, "checkpoint": ckpt, "dataset": dataset, "arch": arch, **report.row()})
            slices[label] = report.slice
        from modeconn.plots.sharpness import plot_sharpness_slices

        config = {k: v for k, v in vars(args).items() if k not in ("no_progress", "force")}
        write_json(out / "sharpness.json", {"kind": "sharpness", "models": rows, "config": config,
                                            "slices": {k: g.arrays | {"xs": g.xs} for k, g in slices.items()},
                                            "modules": {k: [m.__dict__ for m in v] for k, v in modules.items()},
                                            "run": run_info(argv)})
        write_csv(out / "sharpness.csv", {c: [r[c] for r in rows] for c in COLUMNS})
        plot_sharpness_slices(slices, out / "sharpness.png", f"filter-normalised slices, seed {args.seed}")
        print(_table(rows))
        if args.per_module:
            _write_modules(out, modules)
        print(f"ε = {args.epsilon}, {args.ascent_steps} ascent steps; Hessian over {args.hessian_samples} samples")
        print(f"wrote {out / 'sharpness.json'}, {out / 'sharpness.csv'}, {out / 'sharpness.png'}")
    return 0


def main(argv=None) -> int:
    """``python -m modeconn.sharpness [args]``; returns the exit status (see :mod:`modeconn.cli.errors`)."""
    return run_command(main_, argv)


if __name__ == "__main__":
    sys.exit(main())
