"""python -m modeconn.plane: loss and error over the plane of a fitted curve."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from modeconn.cli import common as _cli
from modeconn.core.curve_model import load_curve
from modeconn.cli import grids as _io
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
    p = _cli.parser("plane", "Evaluate train/test loss and accuracy over the plane through a curve's start, "
                    "middle bend and end (Garipov et al. 2018, Fig. 1), and draw the curve on it.", EXAMPLE)
    g = p.add_argument_group("plane")
    g.add_argument("--ckpt", required=True, help="curve checkpoint (from modeconn.train_curve); dataset and "
                                                 "architecture are read from it")
    g.add_argument("--grid", type=int, default=21, help="grid points along x (default: %(default)s)")
    g.add_argument("--grid-y", type=int, default=None, help="grid points along y (default: --grid)")
    g.add_argument("--margin", type=float, default=0.2,
                   help="widen the box around the bends and the curve by this fraction of its width and "
                        "height on every side (default: %(default)s)")
    g.add_argument("--num-points", type=int, default=61,
                   help="points of the curve projected onto the plane and drawn (default: %(default)s)")
    g.add_argument("--bend", type=int, default=None,
                   help="which middle bend spans the plane, 1..num_bends-2 (default: the middle one)")
    _io.add_data_args(p)
    _io.add_grid_args(p)
    _cli.add_run_args(p)
    _cli.add_scale_args(p, training=False)
    _io.add_resume_args(p, PARTIAL)
    return p


def main_(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    info = _cli.setup(args)  # one process, or this rank of a torchrun job
    device = info.device
    args.grid_y = args.grid if args.grid_y is None else args.grid_y
    _io.check_positive(args.grid, "--grid", 2)
    _io.check_positive(args.grid_y, "--grid-y", 2)
    _io.check_positive(args.num_points, "--num-points", 2)
    _io.check_positive(args.points_per_pass, "--points-per-pass")
    if not args.margin >= 0:
        raise _cli.CommandError(f"--margin must be >= 0, got {args.margin}")
    config = _io.grid_config(args, CONFIG_KEYS)
    resume = _io.start_or_resume(out, PARTIAL, FINAL, config, args.resume, args.force)

    curve, meta = load_curve(args.ckpt)
    curve = curve.to(device)
    has_bn = curve.has_batchnorm()
    try:
        cp = curve_plane_geometry(curve, (args.grid, args.grid_y), args.margin, args.num_points, args.bend)
    except ValueError as e:
        raise _cli.CommandError(f"{args.ckpt}: {e}") from None
    ds, train, test, bn = _io.loaders(meta, args, device)
    metrics_fn = None
    if args.hessian:
        from modeconn.geometry.curvature import curvature_metrics

        metrics_fn = curvature_metrics(curve, _io.hessian_loader(ds, args, device), bn_loader=bn,
                                       recompute_bn=not args.no_bn_recompute, tol=args.hessian_tol)

    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    total = len(cp.xs) * len(cp.ys)
    bar = _cli.progress(total, f"plane ({total} points)", args.no_progress)
    save_row = (lambda r, g: _io.save_partial(out / PARTIAL, g, config)) if info.is_main else None
    t0 = time.perf_counter()
    try:
        cp.grid = evaluate_grid(curve, cp.plane, cp.xs, cp.ys, train, test, bn,
                                recompute_bn=not args.no_bn_recompute, points_per_pass=args.points_per_pass,
                                on_row=save_row, resume=resume, point_metrics=metrics_fn,
                                runtime=Runtime(amp=args.amp, compile=args.compile),
                                hooks=Hooks(progress=bar.update))
    except KeyboardInterrupt:
        bar.close()
        return _io.interrupted(out, PARTIAL)
    bar.close()
    seconds = time.perf_counter() - t0
    if not info.is_main:  # every rank holds the gathered grid; rank 0 writes it
        return 0
    grid = cp.grid

    arrays = grid.to_arrays()
    arrays.update({"anchors": cp.anchors, "bend_coords": cp.bend_coords, "bend_residuals": cp.bend_residuals,
                   "ts": cp.ts, "curve_coords": cp.curve_coords, "curve_residuals": cp.curve_residuals})
    _io.save_npz(out / FINAL, arrays)
    summary = {
        "kind": "plane", "checkpoint": args.ckpt, "dataset": ds.name, "arch": meta["arch"],
        "arch_kwargs": meta.get("arch_kwargs", {}), "curve": curve.curve.name, "num_bends": curve.num_bends,
        "num_parameters": curve.num_parameters,
        "orientation": "2-D arrays are indexed [i_y, i_x]: value[j][i] is at (xs[i], ys[j])",
        "axes": "origin = start; x = (end - start)/|end - start|; y = (bend - start) orthonormalised "
                "against x (Gram-Schmidt)",
        "geometry": cp.geometry(), "has_batchnorm": has_bn, "bn_recomputed": grid.bn_recomputed,
        "xs": grid.xs, "ys": grid.ys,
        "metrics": dict(grid.arrays), "summary": grid.summary(), "config": config, "seconds": seconds,
        "run": _cli.run_info(argv),
    }
    _cli.write_json(out / "plane.json", summary)
    _io.finish(out, PARTIAL)

    from modeconn.plots.landscape import plot_curvature, plot_curve_plane

    title = f"{curve.curve.name}({curve.num_bends}) of {meta['arch']} on {ds.name}"
    plot_curve_plane(cp, out / "plane.png", title)
    files = [out / FINAL, out / "plane.json", out / "plane.png"]
    if args.hessian:
        plot_curvature(grid, out / "curvature.png", title, "x", "y")
        files.append(out / "curvature.png")

    geo = cp.geometry()
    print(f"plane: start (0, 0), end ({geo['end'][0]:.4g}, 0), bend {cp.anchor_bend} at "
          f"({geo['bend'][0]:.4g}, {geo['bend'][1]:.4g}); largest distance of the curve from the plane "
          f"{geo['max_curve_residual']:.3g}")
    for split in ("train", "test"):
        if f"{split}_loss" in grid.arrays:
            s = grid.summary()[f"{split}_loss"]
            print(f"{split} loss over the plane: min {s['min']:.4g}, max {s['max']:.4g}")
    print(f"{total} points in {seconds:.1f}s, " + _io.bn_note(grid, has_bn))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def main(argv=None) -> int:
    return _cli.run_command(main_, argv)


if __name__ == "__main__":
    sys.exit(main())
