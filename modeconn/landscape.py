"""python -m modeconn.landscape: 1-D and 2-D slices of the loss around a trained network."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from modeconn.cli.args import (add_data_args, add_endpoint_model_args, add_grid_args, add_resume_args,
                               add_run_args, add_scale_args, at_least, join_negative_values, parse_range, parser)
from modeconn.cli.data import checkpoint_dataset, hessian_loader, split_loaders
from modeconn.cli.errors import CommandError, run_command
from modeconn.cli.outputs import bn_note, run_info, write_json, write_npz
from modeconn.cli.rundir import GridRun
from modeconn.cli.session import Job, session
from modeconn.evaluation.bn import has_batchnorm
from modeconn.geometry.directions import NORMS, flatten_parameters, model_direction, random_plane
from modeconn.geometry.grid import axis, evaluate_grid
from modeconn.runtime import Hooks, Runtime
from modeconn.cli.endpoints import load_endpoint_model

PARTIAL, FINAL = "landscape.partial.npz", "landscape.npz"

EXAMPLE = """  python -m modeconn.landscape --ckpt runs/mlp_a/model.pt --dims 2 --range -1:1 --steps 21 \\
      --out runs/land_a
  python -m modeconn.landscape --ckpt runs/mlp_a/model.pt --dims 1 --steps 51 --norm layer --out runs/line_a
  python -m modeconn.landscape --ckpt runs/mlp_a/model.pt --ckpt2 runs/mlp_b/model.pt --dims 1 \\
      --range -0.5:1.5 --steps 41 --out runs/interp_ab

A point of the slice is θ = θ₁ + α·d1 (+ β·d2). d1, d2 are Gaussian directions drawn
from --seed and rescaled by --norm (Li et al. 2018); with --ckpt2, d1 = θ₂ − θ₁, so
α = 0 is --ckpt and α = 1 is --ckpt2. BN statistics are recomputed at every point.

writes OUT/landscape.npz (xs[, ys], train/test loss and accuracy; 2-D arrays indexed
[i_y, i_x]), OUT/landscape.json (summary, directions, run info), OUT/directions.npz
(d1[, d2]), OUT/landscape.png (1-D: loss and accuracy; 2-D: filled contours) and, in 2-D,
OUT/landscape_surface.png; with --hessian also OUT/curvature.png. After every grid row
OUT/landscape.partial.npz is saved: after a crash rerun with --resume."""

RANGE_FLAGS = ("--range", "--range-y")
CONFIG_KEYS = ("ckpt", "ckpt2", "dims", "range", "range_y", "steps", "steps_y", "norm", "include_1d",
               "orthogonal", "seed", "dataset", "split", "batch_size", "no_bn_recompute", "points_per_pass",
               "hessian", "hessian_samples", "hessian_tol")


def _short(path: str) -> str:
    """``dir/file`` of a path, for titles."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def build_parser():
    """The parser of ``python -m modeconn.landscape``."""
    p = parser("landscape", "Evaluate train/test loss and accuracy over a line or plane through a trained "
               "network, along random filter-normalised directions or towards a second network.", EXAMPLE)
    g = p.add_argument_group("slice")
    g.add_argument("--ckpt", required=True, help="model checkpoint at the centre (from modeconn.train); "
                                                 "dataset and architecture are read from it")
    g.add_argument("--ckpt2", default=None,
                   help="second model checkpoint (same architecture): the first direction becomes θ₂ − θ₁, "
                        "so α from 0 to 1 walks the straight line from --ckpt to --ckpt2")
    g.add_argument("--dims", type=int, default=2, choices=(1, 2), help="1-D line or 2-D plane (default: %(default)s)")
    g.add_argument("--range", default=None, metavar="LO:HI",
                   help="α range of the first direction, e.g. --range -1:1 (default: -1:1, or -0.5:1.5 "
                        "with --ckpt2)")
    g.add_argument("--range-y", default=None, metavar="LO:HI",
                   help="β range of the second direction (2-D; default: -1:1)")
    g.add_argument("--steps", type=at_least(2), default=51,
                   help="points along α, ends included (default: %(default)s)")
    g.add_argument("--steps-y", type=at_least(2), default=None, help="points along β (2-D; default: --steps)")
    g.add_argument("--norm", default="filter", choices=NORMS,
                   help="rescaling of random directions: 'filter' (each output filter/row to the norm of "
                        "the weight's, Li et al.), 'layer' (per parameter tensor), 'model' (whole vector), "
                        "'none' (default: %(default)s)")
    g.add_argument("--include-1d", action="store_true",
                   help="let random directions move 1-D parameters (biases, norm-layer affine weights), "
                        "normalised per tensor; by default they are zero in every random direction")
    g.add_argument("--orthogonal", action="store_true",
                   help="make the second direction orthogonal to the first (norm kept)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random directions (default: %(default)s)")
    add_data_args(p, dataset_default=None, evaluation=True, split=True)
    add_endpoint_model_args(p)
    add_grid_args(p)
    add_run_args(p)
    add_scale_args(p, training=False)
    add_resume_args(p, PARTIAL, "grid row")
    return p


def _axes(args):
    """(xs, ys or None) of the slice; fills in the defaults of --range, --range-y and --steps-y."""
    if args.range is None:
        args.range = "-0.5:1.5" if args.ckpt2 else "-1:1"
    if args.dims == 1:
        if args.range_y is not None or args.steps_y is not None:
            raise CommandError("--range-y and --steps-y need --dims 2")
    else:
        args.range_y = args.range_y or "-1:1"
        args.steps_y = args.steps if args.steps_y is None else args.steps_y
    xs = axis(*parse_range(args.range, "--range"), args.steps)
    ys = axis(*parse_range(args.range_y, "--range-y"), args.steps_y) if args.dims == 2 else None
    return xs, ys


def _slice(args, job: Job):
    """(model at the centre, its metadata, its flat weights, the plane of the slice)."""
    model, meta = load_endpoint_model(args.ckpt, "--ckpt", args)
    model = model.to(job.device)
    origin = flatten_parameters(model)
    first = None
    if args.ckpt2:
        model2, meta2 = load_endpoint_model(args.ckpt2, "--ckpt2", args)
        for key in ("arch", "arch_kwargs", "input_shape", "num_classes"):
            if meta.get(key) != meta2.get(key):
                raise CommandError(f"--ckpt and --ckpt2 differ in {key}: {meta.get(key)!r} vs {meta2.get(key)!r}")
        first = model_direction(origin, flatten_parameters(model2).to(origin))
        del model2
    plane = random_plane(origin, model, args.dims, args.norm, not args.include_1d, args.seed, args.orthogonal, first)
    return model, meta, origin, plane


def _evaluate(args, job: Job, run: GridRun, resume, model, meta, plane, xs, ys):
    """The grid over the slice, row by row (saving the partial grid after each) -> (grid, dataset, seconds)."""
    device = job.device
    ds = checkpoint_dataset(args, meta)
    train, test, bn = split_loaders(ds, args, device)
    metrics_fn = None
    if args.hessian:
        from modeconn.geometry.curvature import curvature_metrics

        metrics_fn = curvature_metrics(model, hessian_loader(ds, args, device), bn_loader=bn,
                                       recompute_bn=not args.no_bn_recompute, tol=args.hessian_tol, seed=args.seed)

    if resume is None and job.is_main:
        write_npz(run.out / "directions.npz", {k: v for k, v in plane.arrays().items() if k != "origin"})
    total = len(xs) * (1 if ys is None else len(ys))
    save_row = run.row_saver()
    t0 = time.perf_counter()
    with job.progress(total, f"{args.dims}-D slice ({total} points)") as bar:
        grid = evaluate_grid(model, plane, xs, ys, train, test, bn, recompute_bn=not args.no_bn_recompute,
                             points_per_pass=args.points_per_pass,
                             on_row=save_row, runtime=Runtime(amp=args.amp, compile=args.compile),
                             resume=resume, hooks=Hooks(progress=bar.update), point_metrics=metrics_fn)
    return grid, ds, time.perf_counter() - t0


def _summary(args, argv, run: GridRun, grid, ds, meta, origin, plane, has_bn: bool, seconds: float) -> dict:
    """Everything landscape.json holds."""
    d1n, d2n = float(plane.d1.double().norm()), (None if plane.d2 is None else float(plane.d2.double().norm()))
    cos = None
    if plane.d2 is not None and d1n > 0 and d2n > 0:
        cos = float(plane.d1.double().dot(plane.d2.double()) / (d1n * d2n))
    return {
        "kind": "landscape", "dims": args.dims, "checkpoint": args.ckpt, "checkpoint2": args.ckpt2,
        "dataset": ds.name, "arch": meta["arch"], "arch_kwargs": meta.get("arch_kwargs", {}),
        "num_parameters": int(origin.numel()),
        "orientation": "2-D arrays are indexed [i_y, i_x]: value[j][i] is at (xs[i], ys[j])",
        "point": "theta = theta_ckpt + x * d1 + y * d2",
        "directions": {**plane.info, "d1": "theta2 - theta1" if args.ckpt2 else "random",
                       "norm_d1": d1n, "norm_d2": d2n, "cos_d1_d2": cos,
                       "norm_theta": float(origin.double().norm())},
        "has_batchnorm": has_bn, "bn_recomputed": grid.bn_recomputed, "xs": grid.xs, "ys": grid.ys,
        "metrics": {k: v for k, v in grid.arrays.items()}, "summary": grid.summary(),
        "config": run.config, "seconds": seconds, "run": run_info(argv),
    }


def _plot(args, grid, out: Path, meta, ds) -> list:
    """landscape.png (a line, or contours and a surface), curvature.png with --hessian; returns them."""
    from modeconn.plots.landscape import plot_contours, plot_curvature, plot_line, plot_surface

    title = f"{meta['arch']} on {ds.name}: " + (f"from {_short(args.ckpt)} towards {_short(args.ckpt2)}" if args.ckpt2
                                                 else f"{args.norm}-normalised directions, seed {args.seed}")
    files = [out / "landscape.png"]
    if args.dims == 1:
        marks = [(0.0, "ckpt")] + ([(1.0, "ckpt2")] if args.ckpt2 else [])
        plot_line(grid, out / "landscape.png", title, "α (θ₂ − θ₁)" if args.ckpt2 else "α", marks)
    else:
        pts = [((0.0, 0.0), "ckpt", "o")] + ([((1.0, 0.0), "ckpt2", "o")] if args.ckpt2 else [])
        plot_contours(grid, out / "landscape.png", title, pts)
        plot_surface(grid, out / "landscape_surface.png", title)
        files.append(out / "landscape_surface.png")
    if args.hessian:
        plot_curvature(grid, out / "curvature.png", title)
        files.append(out / "curvature.png")
    return files


def _print_summary(grid, seconds: float, has_bn: bool, files: list) -> None:
    """The loss range of each split, the speed, the files written."""
    for split in ("train", "test"):
        if f"{split}_loss" in grid.arrays:
            s = grid.summary()[f"{split}_loss"]
            at = ", ".join(f"{c:.4g}" for c in s["argmin"])
            print(f"{split} loss: min {s['min']:.4g} at ({at}), max {s['max']:.4g}")
    total = len(grid.xs) * (1 if grid.ys is None else len(grid.ys))
    print(f"{total} points in {seconds:.1f}s ({total / max(seconds, 1e-9):.1f} points/s), "
          + bn_note(grid.bn_recomputed, has_bn))
    print("wrote " + ", ".join(str(f) for f in files))


def main_(argv=None) -> int:
    """The command body (see :func:`main`)."""
    argv = join_negative_values(argv, RANGE_FLAGS)
    args = build_parser().parse_args(argv)
    xs, ys = _axes(args)
    with session(args) as job:  # one process, or this rank of a torchrun job
        run = GridRun(Path(args.out), {k: getattr(args, k) for k in CONFIG_KEYS}, FINAL, PARTIAL, job.is_main)
        resume = run.start(args.resume, args.force)
        with run.resumable():
            model, meta, origin, plane = _slice(args, job)
            has_bn = has_batchnorm(model)
            grid, ds, seconds = _evaluate(args, job, run, resume, model, meta, plane, xs, ys)
            if not job.is_main:  # every rank holds the gathered grid; rank 0 writes it
                return 0
            write_npz(run.out / FINAL, grid.to_arrays())
            write_json(run.out / "landscape.json",
                       _summary(args, argv, run, grid, ds, meta, origin, plane, has_bn, seconds))
            run.finish()
            files = [run.out / FINAL, run.out / "landscape.json", run.out / "directions.npz"]
            files += _plot(args, grid, run.out, meta, ds)
            _print_summary(grid, seconds, has_bn, files)
    return 0


def main(argv=None) -> int:
    """``python -m modeconn.landscape [args]``; returns the exit status (see :mod:`modeconn.cli.errors`)."""
    return run_command(main_, argv)


if __name__ == "__main__":
    sys.exit(main())
