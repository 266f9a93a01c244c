"""python -m modeconn.plane: loss and error over the plane of a fitted curve."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from modeconn.cli.args import (add_data_args, add_grid_args, add_resume_args, add_run_args, add_scale_args,
                               at_least, parser)
from modeconn.cli.data import checkpoint_dataset, hessian_loader, split_loaders
from modeconn.cli.errors import CommandError, run_command
from modeconn.cli.outputs import bn_note, run_info, write_json, write_npz
from modeconn.cli.rundir import GridRun
from modeconn.cli.session import Job, session
from modeconn.core.curve_model import load_curve
from modeconn.geometry.grid import curve_plane_geometry, evaluate_grid
from modeconn.runtime import Hooks, Runtime

PARTIAL, FINAL = "plane.partial.npz", "plane.npz"

EXAMPLE = """  python -m modeconn.plane --ckpt runs/curve_mlp/curve.pt --grid 21 --margin 0.2 --out runs/plane_mlp

The plane passes through the curve's start, its middle bend and its end (Gram-Schmidt:
start at (0, 0), end at (|end - start|, 0), the bend above the x axis). The grid covers
the bounding box of the bends and the curve, widened by --margin on every side. BN
statistics are recomputed at every grid point.

writes OUT/plane.npz (xs, ys, train/test loss and accuracy indexed [i_y, i_x], and the
coordinates of the bends and of the curve), OUT/plane.json (summary, coordinates, run
info) and OUT/plane.png (train loss with log-spaced levels, test error; endpoints, bends
and curve drawn). After every grid row OUT/plane.partial.npz is saved: after a crash
rerun with --resume."""

CONFIG_KEYS = ("ckpt", "grid", "grid_y", "margin", "num_points", "bend", "dataset", "split", "batch_size",
               "no_bn_recompute", "points_per_pass", "hessian", "hessian_samples", "hessian_tol")


def build_parser():
    """The parser of ``python -m modeconn.plane``."""
    p = parser("plane", "Evaluate train/test loss and accuracy over the plane through a curve's start, "
               "middle bend and end (Garipov et al. 2018, Fig. 1), and draw the curve on it.", EXAMPLE)
    g = p.add_argument_group("plane")
    g.add_argument("--ckpt", required=True, help="curve checkpoint (from modeconn.train_curve); dataset and "
                                                 "architecture are read from it")
    g.add_argument("--grid", type=at_least(2), default=21, help="grid points along x (default: %(default)s)")
    g.add_argument("--grid-y", type=at_least(2), default=None, help="grid points along y (default: --grid)")
    g.add_argument("--margin", type=float, default=0.2,
                   help="widen the box around the bends and the curve by this fraction of its width and "
                        "height on every side (default: %(default)s)")
    g.add_argument("--num-points", type=at_least(2), default=61,
                   help="points of the curve projected onto the plane and drawn (default: %(default)s)")
    g.add_argument("--bend", type=int, default=None,
                   help="which middle bend spans the plane, 1..num_bends-2 (default: the middle one)")
    add_data_args(p, dataset_default=None, evaluation=True, split=True)
    add_grid_args(p)
    add_run_args(p)
    add_scale_args(p, training=False)
    add_resume_args(p, PARTIAL, "grid row")
    return p


def _geometry(args, job: Job):
    """(curve on the device, its metadata, the plane through start, bend and end with the grid's box)."""
    curve, meta = load_curve(args.ckpt)
    curve = curve.to(job.device)
    try:
        cp = curve_plane_geometry(curve, (args.grid, args.grid_y), args.margin, args.num_points, args.bend)
    except ValueError as e:
        raise CommandError(f"{args.ckpt}: {e}") from None
    return curve, meta, cp


def _evaluate(args, job: Job, run: GridRun, resume, curve, meta, cp):
    """Fill ``cp.grid`` row by row (saving the partial grid after each); returns (dataset, seconds)."""
    device = job.device
    ds = checkpoint_dataset(args, meta)
    train, test, bn = split_loaders(ds, args, device)
    metrics_fn = None
    if args.hessian:
        from modeconn.geometry.curvature import curvature_metrics

        metrics_fn = curvature_metrics(curve, hessian_loader(ds, args, device), bn_loader=bn,
                                       recompute_bn=not args.no_bn_recompute, tol=args.hessian_tol)
    total = len(cp.xs) * len(cp.ys)
    save_row = run.row_saver()
    t0 = time.perf_counter()
    with job.progress(total, f"plane ({total} points)") as bar:
        cp.grid = evaluate_grid(curve, cp.plane, cp.xs, cp.ys, train, test, bn,
                                recompute_bn=not args.no_bn_recompute, points_per_pass=args.points_per_pass,
                                on_row=save_row, resume=resume, point_metrics=metrics_fn,
                                runtime=Runtime(amp=args.amp, compile=args.compile),
                                hooks=Hooks(progress=bar.update))
    return ds, time.perf_counter() - t0


def _write_results(args, argv, run: GridRun, curve, meta, cp, ds, seconds: float) -> list:
    """plane.npz, plane.json, the pictures; returns the files written."""
    out, grid = run.out, cp.grid
    arrays = grid.to_arrays()
    arrays.update({"anchors": cp.anchors, "bend_coords": cp.bend_coords, "bend_residuals": cp.bend_residuals,
                   "ts": cp.ts, "curve_coords": cp.curve_coords, "curve_residuals": cp.curve_residuals})
    write_npz(out / FINAL, arrays)
    summary = {
        "kind": "plane", "checkpoint": args.ckpt, "dataset": ds.name, "arch": meta["arch"],
        "arch_kwargs": meta.get("arch_kwargs", {}), "curve": curve.curve.name, "num_bends": curve.num_bends,
        "num_parameters": curve.num_parameters,
        "orientation": "2-D arrays are indexed [i_y, i_x]: value[j][i] is at (xs[i], ys[j])",
        "axes": "origin = start; x = (end - start)/|end - start|; y = (bend - start) orthonormalised "
                "against x (Gram-Schmidt)",
        "geometry": cp.geometry(), "has_batchnorm": curve.has_batchnorm(), "bn_recomputed": grid.bn_recomputed,
        "xs": grid.xs, "ys": grid.ys,
        "metrics": dict(grid.arrays), "summary": grid.summary(), "config": run.config, "seconds": seconds,
        "run": run_info(argv),
    }
    write_json(out / "plane.json", summary)
    run.finish()

    from modeconn.plots.landscape import plot_curvature, plot_curve_plane

    title = f"{curve.curve.name}({curve.num_bends}) of {meta['arch']} on {ds.name}"
    plot_curve_plane(cp, out / "plane.png", title)
    files = [out / FINAL, out / "plane.json", out / "plane.png"]
    if args.hessian:
        plot_curvature(grid, out / "curvature.png", title, "x", "y")
        files.append(out / "curvature.png")
    return files


def _print_summary(cp, curve, seconds: float, files: list) -> None:
    """Where start, end and bend lie, the loss range over the plane, the time taken, the files."""
    grid, geo = cp.grid, cp.geometry()
    print(f"plane: start (0, 0), end ({geo['end'][0]:.4g}, 0), bend {cp.anchor_bend} at "
          f"({geo['bend'][0]:.4g}, {geo['bend'][1]:.4g}); largest distance of the curve from the plane "
          f"{geo['max_curve_residual']:.3g}")
    for split in ("train", "test"):
        if f"{split}_loss" in grid.arrays:
            s = grid.summary()[f"{split}_loss"]
            print(f"{split} loss over the plane: min {s['min']:.4g}, max {s['max']:.4g}")
    total = len(cp.xs) * len(cp.ys)
    print(f"{total} points in {seconds:.1f}s, " + bn_note(grid.bn_recomputed, curve.has_batchnorm()))
    print("wrote " + ", ".join(str(f) for f in files))


def main_(argv=None) -> int:
    """The command body (see :func:`main`)."""
    args = build_parser().parse_args(argv)
    args.grid_y = args.grid if args.grid_y is None else args.grid_y
    if not args.margin >= 0:
        raise CommandError(f"--margin must be >= 0, got {args.margin}")
    with session(args) as job:  # one process, or this rank of a torchrun job
        run = GridRun(Path(args.out), {k: getattr(args, k) for k in CONFIG_KEYS}, FINAL, PARTIAL, job.is_main)
        resume = run.start(args.resume, args.force)
        with run.resumable():
            curve, meta, cp = _geometry(args, job)
            ds, seconds = _evaluate(args, job, run, resume, curve, meta, cp)
            if job.is_main:  # every rank holds the gathered grid; rank 0 writes it
                files = _write_results(args, argv, run, curve, meta, cp, ds, seconds)
                _print_summary(cp, curve, seconds, files)
    return 0


def main(argv=None) -> int:
    """``python -m modeconn.plane [args]``; returns the exit status (see :mod:`modeconn.cli.errors`)."""
    return run_command(main_, argv)


if __name__ == "__main__":
    sys.exit(main())
