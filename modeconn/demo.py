"""python -m modeconn.demo: the main job on the embedded digits data, in a few minutes on a CPU.

For each shipped endpoint pair (a digits MLP pair, a digits CNN-with-BatchNorm
pair): fit a Bezier curve between the two networks, evaluate the straight line
and the curve (BN statistics recomputed at every point), print the loss and
accuracy at t = 0, 0.25, 0.5, 0.75, 1 and the barrier table, and write every
result under OUT.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from modeconn.cli.args import add_run_args, at_least, parser
from modeconn.cli.errors import run_command
from modeconn.cli.outputs import run_info, write_json
from modeconn.cli.session import Job, session
from modeconn.runtime.checkpoints import build_model, load_checkpoint, load_model, make_directory
from modeconn.models.shipped import shipped_checkpoint
from modeconn.core.curve_model import CurveModel, save_curve
from modeconn.core.curves import Bezier
from modeconn.data import get_dataset
from modeconn.evaluation.ensembles import evaluate_ensemble
from modeconn.training.fge import train_fge
from modeconn.geometry.grid import curve_plane
from modeconn.runtime import Hooks
from modeconn.plots.landscape import plot_curve_plane
from modeconn.eval_curve import write_path_outputs
from modeconn.evaluation.path import evaluate_path
from modeconn.training.loop import fit_curve

EXAMPLE = """  python -m modeconn.demo --out runs/demo
  python -m modeconn.demo --pairs mlp --epochs 10     # quicker"""

PAIRS = {"mlp": ("digits_mlp_a.pt", "digits_mlp_b.pt"), "cnn": ("digits_cnn_a.pt", "digits_cnn_b.pt")}
SHOW_T = (0.0, 0.25, 0.5, 0.75, 1.0)


def build_parser():
    """The parser of ``python -m modeconn.demo``."""
    p = parser("demo", "Fit Bezier curves between the shipped digits endpoint pairs and compare them with "
               "the straight line.", EXAMPLE)
    p.add_argument("--checkpoints", default=None,
                   help="folder holding the endpoint files " + ", ".join(f for pair in PAIRS.values() for f in pair)
                        + " (default: the ones shipped with modeconn, see modeconn.shipped_checkpoint)")
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS),
                   help="which endpoint pairs to connect (default: both)")
    p.add_argument("--epochs", type=at_least(1), default=30, help="curve training epochs (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.05, help="curve learning rate (default: %(default)s)")
    p.add_argument("--fge-cycles", type=at_least(0), default=4,
                   help="FGE cycles (2 epochs each) from the shipped CNN; 0 skips FGE (default: %(default)s)")
    p.add_argument("--plane-grid", type=int, nargs=2, default=(21, 21), metavar=("MLP", "CNN"),
                   help="plane grid size per pair (MLP, CNN); 0 skips the plane picture (default: 21 21)")
    p.add_argument("--num-points", type=at_least(2), default=21,
                   help="points along each path; 4k+1 includes t=0.25, 0.5, 0.75 (default: %(default)s)")
    add_run_args(p, out_default="runs/demo")
    return p


def endpoint(args, filename: str) -> Path:
    """The endpoint file ``filename``: in ``--checkpoints`` if given, else the shipped one."""
    return Path(args.checkpoints) / filename if args.checkpoints else shipped_checkpoint(filename)


def point_table(result) -> list:
    """Loss and accuracy of the line and the curve at t = 0, 0.25, 0.5, 0.75, 1, as text lines."""
    lines = [f"{'t':>5s} | {'line: train loss':>16s} {'acc':>6s} {'test loss':>9s} {'acc':>6s} | "
             f"{'curve: train loss':>17s} {'acc':>6s} {'test loss':>9s} {'acc':>6s}"]
    for t in SHOW_T:
        i = int(abs(result.ts - t).argmin())
        row = f"{result.ts[i]:5.2f} |"
        for res, w in ((result.linear, 16), (result, 17)):
            row += (f" {res.train_loss[i]:{w}.4f} {res.train_acc[i]:6.4f} {res.test_loss[i]:9.4f}"
                    f" {res.test_acc[i]:6.4f} |")
        lines.append(row.rstrip("|"))
    return lines


def run_fge(args, ds, job: Job, out: Path) -> dict:
    """A short FGE run from the shipped digits CNN: single model vs FGE ensemble on the test set."""
    device = job.device
    start, _ = load_model(endpoint(args, PAIRS["cnn"][0]))
    start = start.to(device)
    loader = ds.train_loader(64, seed=0).to(device)
    bar = job.progress(args.fge_cycles * 2 * len(loader), "cnn: FGE")
    result = train_fge(start, loader, args.fge_cycles, cycle_epochs=2, lr_max=0.05, lr_min=0.0005,
                 bn_loader=ds.eval_loader("train").to(device), hooks=Hooks(progress=bar.update))
    bar.close()
    test = ds.eval_loader("test").to(device)
    single = evaluate_ensemble([start], test)
    ens = evaluate_ensemble(result.snapshots, test)
    rows = {"start model": {"test_acc": single.acc[0], "test_nll": single.nll[0], "members": 1},
            f"FGE ({len(result.snapshots)} snapshots)": {"test_acc": ens.acc[-1], "test_nll": ens.nll[-1],
                                                         "members": len(result.snapshots)}}
    print(f"\n== FGE from {PAIRS['cnn'][0]}: {args.fge_cycles} cycles of 2 epochs, lr 0.05 -> 0.0005")
    print(f"{'':22s} {'test acc':>8s} {'test NLL':>8s}")
    for name, r in rows.items():
        print(f"{name:22s} {r['test_acc']:8.4f} {r['test_nll']:8.4f}")
    write_json(out / "fge" / "fge.json", {"rows": rows, "ensemble": ens.to_dict(),
                                          "lr_trace": result.lr_trace,
                                          "distances": result.distances})
    return rows


def _fit_pair(args, job: Job, pair: str, ds, train_eval, test):
    """Fit a Bezier(3) curve between the pair and evaluate it and the line -> (curve, history, result, paths)."""
    device = job.device
    a_path, b_path = (endpoint(args, f) for f in PAIRS[pair])
    a_meta, b_meta = load_checkpoint(a_path, kind="model"), load_checkpoint(b_path, kind="model")
    curve = CurveModel(build_model(a_meta), a_meta["state_dict"], b_meta["state_dict"], Bezier(3)).to(device)
    loader = ds.train_loader(64, seed=0).to(device)
    bar = job.progress(args.epochs * len(loader), f"{pair}: fit Bezier(3)")
    history = fit_curve(curve, loader, args.epochs, args.lr, weight_decay=5e-4,
                        hooks=Hooks(progress=bar.update))
    bar.close()
    bar = job.progress(2 * args.num_points, f"{pair}: evaluate")
    result = evaluate_path(curve, train_eval, test, args.num_points, with_linear=True,
                           hooks=Hooks(progress=bar.update), name="bezier")
    bar.close()
    return curve, history, result, (a_path, b_path, a_meta)


def _run_pair(args, job: Job, pair: str, ds, train_eval, test, out: Path) -> dict:
    """One endpoint pair: curve, paths, plane picture, printed table -> the pair's barrier summary."""
    curve, history, result, (a_path, b_path, a_meta) = _fit_pair(args, job, pair, ds, train_eval, test)
    pdir = out / pair
    meta = {k: a_meta[k] for k in ("arch", "arch_kwargs", "input_shape", "num_classes")}
    save_curve(pdir / "curve.pt", curve, meta, dataset="digits", seed=0, history=history,
               config={"start": str(a_path), "end": str(b_path), "epochs": args.epochs, "lr": args.lr})
    write_path_outputs(result, pdir, f"digits {pair}: Bezier curve vs straight line",
                       {"dataset": "digits", "source": {"start": str(a_path), "end": str(b_path)}})
    grid = args.plane_grid[list(PAIRS).index(pair)]
    if grid:
        bar = job.progress(grid * grid, f"{pair}: plane")
        cp = curve_plane(curve, train_eval, test, grid=grid, margin=0.2, num_points=args.num_points,
                         hooks=Hooks(progress=bar.update))
        bar.close()
        plot_curve_plane(cp, pdir / "plane.png", f"digits {pair}: plane through start, bend and end")
    print(f"\n== {pair}: {a_meta['arch']} {a_meta['arch_kwargs']}  ({a_path.name} -> {b_path.name}), "
          f"BN recomputed: {result.bn_recomputed}")
    print("\n".join(point_table(result)))
    return {name: {"test_loss_barrier": res.barrier("test_loss"), "test_error_barrier": res.barrier("test_error"),
                   "min_test_acc": float(res.test_acc.min()), "max_test_acc": float(res.test_acc.max())}
            for name, res in (("line", result.linear), ("curve", result))}


def _print_barriers(pairs: dict) -> None:
    """The closing table: barriers and accuracy range of the line and the curve of every pair."""
    print(f"\n{'pair':5s} {'path':6s} {'test-loss barrier':>18s} {'test-error barrier':>19s} "
          f"{'min acc':>8s} {'max acc':>8s}")
    for pair, rows in pairs.items():
        for name, r in rows.items():
            print(f"{pair:5s} {name:6s} {r['test_loss_barrier']:18.4f} {100 * r['test_error_barrier']:18.2f}% "
                  f"{r['min_test_acc']:8.4f} {r['max_test_acc']:8.4f}")


def main_(argv=None) -> int:
    """The command body (see :func:`main`)."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    with session(args, join=False) as job:
        make_directory(out)  # a path that cannot be written fails now, not after the work
        ds = get_dataset("digits")
        train_eval = ds.eval_loader("train").to(job.device)
        test = ds.eval_loader("test").to(job.device)
        summary = {"run": run_info(argv), "pairs": {}}
        start_time = time.perf_counter()
        for pair in args.pairs:
            summary["pairs"][pair] = _run_pair(args, job, pair, ds, train_eval, test, out)
        _print_barriers(summary["pairs"])
        if args.fge_cycles > 0:
            summary["fge"] = run_fge(args, ds, job, out)
        summary["seconds"] = time.perf_counter() - start_time
        write_json(out / "summary.json", summary)
    print(f"\nresults in {out.resolve()}: summary.json, per pair curve.pt, path.json, path.csv, path.png, "
          f"plane.png, and fge/fge.json ({summary['seconds']:.0f} s)")
    return 0


def main(argv=None) -> int:
    """``python -m modeconn.demo [args]``; returns the exit status (see :mod:`modeconn.cli.errors`)."""
    return run_command(main_, argv)


if __name__ == "__main__":
    sys.exit(main())
