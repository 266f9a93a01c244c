"""python -m modeconn.eval_simplex: loss over a fitted complex, its worst point, mode-to-mode barriers, ensembles."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from modeconn.cli.args import add_data_args, add_run_args, add_scale_args, at_least, parser
from modeconn.cli.data import bn_loader as cli_bn_loader, checkpoint_dataset
from modeconn.cli.errors import run_command
from modeconn.cli.outputs import run_info, write_csv, write_json, write_npz
from modeconn.cli.session import Job, session
from modeconn.core.simplex import SimplexModel, load_simplex
from modeconn.evaluation.ensembles import evaluate_ensemble, simplex_ensemble
from modeconn.evaluation.path import points_of_this_rank
from modeconn.evaluation.simplex import SimplexResult, complex_grid, evaluate_simplex, mode_pairs
from modeconn.plots.simplex import plot_simplex
from modeconn.runtime import Hooks, Runtime
from modeconn.runtime.checkpoints import make_directory

EXAMPLE = """  python -m modeconn.eval_simplex --ckpt runs/simplex_mlp/simplex.pt --resolution 10 --with-linear \\
      --out runs/simplex_mlp/eval

evaluates train/test loss and error on the barycentric grid α = n/R of every simplex (BN
statistics recomputed per point), the worst point and the barrier over the complex, the
barrier along each mode-to-mode chain mode_a -> shared vertices -> mode_b (--with-linear:
beside the straight line), and --ensemble-samples networks sampled from the complex as an
ensemble (accuracy, NLL, ECE) against its members and the ensemble of the modes. Writes
OUT/simplex.json (everything, with the command line), OUT/simplex.csv (one row per grid
point of every simplex), OUT/simplex.npz (the arrays) and OUT/simplex.png (triangle heat
maps for 2-simplexes, face by face for higher ones, curves for 1-simplexes; paths)."""


def build_parser():
    """The parser of ``python -m modeconn.eval_simplex``."""
    p = parser("eval_simplex", "Evaluate a complex of simplexes from modeconn.train_simplex: loss and error on "
               "a barycentric grid of every simplex, the worst point, barriers, mode-to-mode paths through "
               "the shared vertices, and ensembles sampled from the complex.", EXAMPLE)
    g = p.add_argument_group("simplex")
    g.add_argument("--ckpt", required=True, help="simplex checkpoint from modeconn.train_simplex")
    g.add_argument("--resolution", type=at_least(1), default=10,
                   help="R of the grid α = n/R: R + 1 points per edge (default: %(default)s)")
    g.add_argument("--num-path-points", type=at_least(2), default=21,
                   help="evenly spaced t along each mode-to-mode path (default: %(default)s)")
    g.add_argument("--with-linear", action="store_true",
                   help="also evaluate the straight line between every two modes")
    g.add_argument("--ensemble-samples", type=at_least(0), default=16,
                   help="networks drawn from the complex (uniform simplex, α ~ Dirichlet(1)) for the ensemble; "
                        "0 = none (default: %(default)s)")
    g.add_argument("--ensemble-seed", type=int, default=0, help="seed of those draws (default: %(default)s)")
    g.add_argument("--points-per-pass", type=at_least(1), default=8,
                   help="points evaluated together in one pass over the data (default: %(default)s)")
    g.add_argument("--no-bn-recompute", action="store_true",
                   help="keep the stored BN statistics instead of recomputing them at every point")
    add_data_args(p, dataset_default=None, evaluation=True)
    add_run_args(p, out_required=False, out_help="output directory (default: next to the checkpoint)")
    add_scale_args(p, training=False)
    return p


def _points(args, model: SimplexModel, runtime: Runtime) -> int:
    """How many points this rank evaluates: the grid's, then every path's (and line's)."""
    grid = len(complex_grid(model.simplexes, model.num_bends, args.resolution)[0])
    per_path = points_of_this_rank(args.num_path_points, args.points_per_pass, runtime)
    return (points_of_this_rank(grid, args.points_per_pass, runtime)
            + len(mode_pairs(model)) * per_path * (2 if args.with_linear else 1))


def _ensembles(args, model: SimplexModel, ds, device) -> dict:
    """The ensemble sampled from the complex and the ensemble of the modes, on the test data."""
    if not args.ensemble_samples:
        return {}
    bn = None if args.no_bn_recompute else cli_bn_loader(ds, args, device)
    test = ds.eval_loader("test", args.batch_size).to(device)
    members = simplex_ensemble(model, args.ensemble_samples, args.ensemble_seed, bn_loader=bn)
    sampled = evaluate_ensemble(members, test)
    modes = evaluate_ensemble([model.vertex_model(k) for k in model.fixed_idx], test) if model.fixed_idx else None
    return {"samples": args.ensemble_samples, "seed": args.ensemble_seed, "sampled": sampled.to_dict(),
            "sampled_final": sampled.final,
            "member_mean": {k: float(np.mean(getattr(sampled, f"member_{k}"))) for k in ("acc", "nll", "ece")},
            "modes": None if modes is None else modes.to_dict(),
            "modes_final": None if modes is None else modes.final}


def _write(result: SimplexResult, out: Path, title: str, extra: dict) -> None:
    """simplex.json, simplex.csv (one row per simplex and grid point), simplex.npz and simplex.png."""
    data = result.to_dict()
    data.update(extra)
    write_json(out / "simplex.json", data)
    K = result.coords.shape[1]
    rows = np.concatenate(result.members)
    columns = {"simplex": np.repeat(np.arange(len(result.members)), [len(m) for m in result.members]).tolist(),
               "point": rows.tolist()}
    columns.update({f"c{k}": result.coords[rows, k].tolist() for k in range(K)})
    for m in ("train_loss", "train_error", "test_loss", "test_error"):
        columns[m] = result.values(m)[rows].tolist()
    write_csv(out / "simplex.csv", columns)
    arrays = {m: result.values(m) for m in ("train_loss", "train_acc", "test_loss", "test_acc")}
    write_npz(out / "simplex.npz", {"coords": result.coords, "simplex_points": rows,
                                    "simplex_index": columns["simplex"], **arrays})
    plot_simplex(result, out / "simplex.png", title)


def _print_summary(result: SimplexResult, ens: dict, out: Path) -> None:
    """Worst point, barriers over the complex and along the paths, the ensembles, the files written."""
    for m in ("test_loss", "test_error"):
        w = result.worst(m)
        alpha = ", ".join(f"{a:.2f}" for a in w["alpha"])
        print(f"{m}: worst over the complex {w['value']:.4f} (simplex {w['simplex']}, α = {alpha}); at the modes "
              f"{result.vertex_values(m).round(4).tolist()}; barrier over the modes' mean "
              f"{result.barrier(m, 'mean'):.4f}")
    for key, b in result.path_barriers("test_loss").items():
        line = f"   straight line {b['linear']:.4f}" if "linear" in b else ""
        print(f"modes {key}: test-loss barrier through the complex {b['path']:.4f}{line}")
    if ens:
        s, mm = ens["sampled_final"], ens["member_mean"]
        print(f"ensemble of {s['members']} samples: test acc {s['acc']:.4f} NLL {s['nll']:.4f} ECE {s['ece']:.4f}"
              f" | one sample (mean): acc {mm['acc']:.4f} NLL {mm['nll']:.4f} ECE {mm['ece']:.4f}")
        if ens["modes_final"] is not None:
            f = ens["modes_final"]
            print(f"ensemble of the {f['members']} modes: test acc {f['acc']:.4f} NLL {f['nll']:.4f} "
                  f"ECE {f['ece']:.4f}")
    print(f"wrote {out / 'simplex.json'}, {out / 'simplex.csv'}, {out / 'simplex.npz'}, {out / 'simplex.png'}")


def main_(argv=None) -> int:
    """The command body (see :func:`main`)."""
    args = build_parser().parse_args(argv)
    with session(args) as job:
        model, meta = load_simplex(args.ckpt)
        out = Path(args.out) if args.out else Path(args.ckpt).parent / "eval"
        ds = checkpoint_dataset(args, meta, args.ckpt)
        if job.is_main:
            make_directory(out)  # a path that cannot be written fails now, not after the evaluation
        model = model.to(job.device)
        train = ds.eval_loader("train", args.batch_size).to(job.device)
        test = ds.eval_loader("test", args.batch_size).to(job.device)
        runtime = Runtime(amp=args.amp, compile=args.compile)
        bar = job.progress(_points(args, model, runtime), "points")
        result = evaluate_simplex(model, train, test, args.resolution, bn_loader=cli_bn_loader(ds, args, job.device),
                                  points_per_pass=args.points_per_pass,
                                  recompute_bn=not args.no_bn_recompute, num_path_points=args.num_path_points,
                                  with_linear=args.with_linear, runtime=runtime, hooks=Hooks(progress=bar.update))
        bar.close()
        if not job.is_main:  # every rank holds the gathered result; rank 0 writes it
            return 0
        ens = _ensembles(args, model, ds, job.device)
        _write(result, out, f"{len(model.fixed_idx)} modes, free vertices {model.free_idx} on {ds.name}",
               {"ensemble": ens, "dataset": ds.name, "source": str(args.ckpt), "run": run_info(argv)})
        _print_summary(result, ens, out)
    return 0


def main(argv=None) -> int:
    """``python -m modeconn.eval_simplex [args]``; returns the exit status (see :mod:`modeconn.cli.errors`)."""
    return run_command(main_, argv)


if __name__ == "__main__":
    sys.exit(main())
