"""python -m modeconn.align: permute B's neurons to line up with A, and measure what it buys."""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Dict, Tuple

from modeconn.alignment import align_models
from modeconn.alignment.matching import DEFAULT_INIT, INITS
from modeconn.alignment.repair import evaluate_repaired_path
from modeconn.cli.args import (add_data_args, add_endpoint_model_args, add_run_args, at_least, parser,
                               zero_or_at_least)
from modeconn.cli.data import bn_loader, checkpoint_dataset, sample_loader
from modeconn.cli.errors import CommandError, run_command
from modeconn.cli.outputs import run_info, write_json
from modeconn.cli.session import Job, session
from modeconn.core.curve_model import linear_path
from modeconn.cli.endpoints import load_endpoint_model
from modeconn.runtime.checkpoints import make_directory, save_model
from modeconn.evaluation.path import evaluate_path
from modeconn.runtime import Hooks
from modeconn.plots.path import plot_path

EXAMPLE = """  python -m modeconn.align --a checkpoints/digits_mlp_a.pt --b checkpoints/digits_mlp_b.pt \\
      --method weight --out runs/align/digits_mlp_b_aligned.pt --report

writes OUT (B with its hidden units permuted to match A: the same function as B, a model
checkpoint with B's metadata plus an 'alignment' field) and OUT with suffix .json (the report,
the straight-line barriers A->B before alignment, after, and after alignment + REPAIR (Jordan et
al. 2023: every point's hidden channels renormalised to the endpoints' interpolated statistics),
the paths in full, command line) and OUT with suffix .png (train loss and test error along the
straight lines before and after alignment).
Then, e.g.: python -m modeconn.train_curve --a A.pt --b OUT --out runs/curve_aligned

Hugging Face model directories (pip install modeconn[hf]) in, a model directory out:
  python -m modeconn.align --a runs/lm_a --b runs/lm_b --dataset text:corpus.txt --out runs/lm_b_aligned"""

ARCH_KEYS = ("arch", "arch_kwargs", "input_shape", "num_classes")
BARRIER_METRICS = ("test_loss", "test_error", "train_loss", "train_error")


def build_parser():
    """The parser of ``python -m modeconn.align``."""
    p = parser("align", "Align model B to model A: find the permutation of B's hidden units that best "
               "matches A (Git Re-Basin weight matching, or correlation of activations on A's training "
               "data), write the permuted B, and report the straight-line loss barrier between A and B "
               "before alignment, after it and after alignment + REPAIR (BatchNorm statistics recomputed at "
               "every point).", EXAMPLE)
    g = p.add_argument_group("alignment")
    g.add_argument("--a", required=True, metavar="A.pt", help="reference model checkpoint (kept as it is)")
    g.add_argument("--b", required=True, metavar="B.pt", help="model checkpoint to permute (same architecture)")
    g.add_argument("--method", default="weight", choices=("weight", "activation"),
                   help="'weight': match weights, no data needed (Ainsworth et al. 2023); 'activation': "
                        "match activation correlations over the training data of A's dataset, without "
                        "augmentation (Tatro et al. 2020) (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the weight-matching visiting order (default: %(default)s)")
    g.add_argument("--max-iter", type=at_least(1), default=100,
                   help="weight matching: at most this many sweeps over the groups (default: %(default)s)")
    g.add_argument("--restarts", type=at_least(1), default=1,
                   help="weight matching: also start from R-1 random permutations and keep the best objective "
                        "(coordinate descent can stop in a local optimum) (default: %(default)s)")
    g.add_argument("--init", default=DEFAULT_INIT, choices=INITS,
                   help="weight matching: start from B aligned layer by layer from the input (greedy; kept "
                        "only if not worse than B as given), from B as given (identity), or from units matched "
                        "by their sorted weights (blind to the other layers' order; recovers a permuted copy "
                        "where rows tie, e.g. timm models at their initialisation) (default: %(default)s)")
    g.add_argument("--rescale", action="store_true",
                   help="weight matching: first give every ReLU-like unit unit incoming norm in both models, "
                        "compensated in its outgoing weights (the function is unchanged; only where no "
                        "normalisation follows), so a rescaled copy of A still matches A")
    g.add_argument("--report", action="store_true",
                   help="print the per-group table (units, similarity before -> after, what stays fixed)")
    g = p.add_argument_group("barrier report (three straight lines, a BN pass per point: the slow part)")
    g.add_argument("--num-points", type=zero_or_at_least(2), default=21,
                   help="evenly spaced t in [0, 1] on each straight line; 0 skips the report "
                        "(default: %(default)s)")
    g.add_argument("--eval-samples", type=at_least(1), default=None, metavar="N",
                   help="evaluate the lines (and their BN statistics) on N random training and N random "
                        "test samples instead of all (default: all)")
    add_data_args(p, dataset_default=None, evaluation=True)
    add_endpoint_model_args(p)
    add_run_args(p, out_metavar="B_aligned.pt",
                 out_help="aligned checkpoint to write (a model directory when --b is one); the JSON and PNG "
                          "go next to it (suffixes .json, .png)")
    return p


def _check_out(args) -> Tuple[Path, Path]:
    """(checkpoint, JSON) paths of --out; neither a directory nor one of the inputs."""
    out = Path(args.out)
    if out.suffix in (".json", ".png"):
        raise CommandError(f"--out {out}: give the checkpoint's name (e.g. B_aligned.pt); "
                           "the JSON and PNG are written next to it")
    if out.exists() and out.is_dir() and not _is_hf(args.b):
        raise CommandError(f"--out {out} is a directory; give a file name such as {out / 'B_aligned.pt'}")
    for flag, src in (("--a", args.a), ("--b", args.b)):
        if Path(src).exists() and out.exists() and out.resolve() == Path(src).resolve():
            raise CommandError(f"--out {out} is the same file as {flag}; write the aligned model elsewhere")
    return out, out.with_suffix(".json")


def _is_hf(path) -> bool:
    """Whether ``path`` is a Hugging Face model directory (its aligned copy is one too, written at --out)."""
    from modeconn.hf.models import is_model_dir

    return is_model_dir(path)


def _barriers(result) -> dict:
    """The straight line's barrier of every metric of BARRIER_METRICS."""
    return {m: result.barrier(m) for m in BARRIER_METRICS}


def _load_pair(args):
    """(model A, its metadata, model B, its metadata), checked to share one architecture."""
    model_a, meta_a = load_endpoint_model(args.a, "--a", args)
    model_b, meta_b = load_endpoint_model(args.b, "--b", args)
    for key in ARCH_KEYS:
        if meta_a.get(key) != meta_b.get(key):
            raise CommandError(
                f"--a and --b have different architectures: {key} is {meta_a.get(key)!r} in {args.a} but "
                f"{meta_b.get(key)!r} in {args.b}")
    return model_a, meta_a, model_b, meta_b


def _align(args, ds, model_a, model_b, device):
    """(B permuted to match A, the alignment report, seconds taken)."""
    # alignment: on the CPU copies of the checkpoints; activations are computed on --device
    t0 = time.perf_counter()
    aligned_b, _, report = align_models(model_a, model_b, method=args.method,
                                  loader=ds.eval_loader("train", args.batch_size), seed=args.seed,
                                  max_iter=args.max_iter, device=device, rescale=args.rescale,
                                  restarts=args.restarts, init=args.init)
    align_seconds = time.perf_counter() - t0
    return aligned_b, report, align_seconds


def _straight_lines(args, job: Job, ds, model_a, model_b, aligned_b) -> Dict[str, object]:
    """The straight lines A -> B and A -> aligned B, BN statistics recomputed at every point."""
    device = job.device
    train = sample_loader(ds, "train", args.eval_samples, args.batch_size, device)
    test = sample_loader(ds, "test", args.eval_samples, args.batch_size, device)
    bar = job.progress(3 * args.num_points, "straight lines")
    results = {}
    for which, end in (("before", model_b), ("after", aligned_b)):
        path = linear_path(model_a, end).to(device)
        bn = train if args.eval_samples else bn_loader(ds, args, device)  # --eval-samples: BN from the same subset
        results[which] = evaluate_path(path, train, test, args.num_points, bn_loader=bn, hooks=Hooks(progress=bar.update),
                                       name=f"linear_{which}")
    results["repair"] = evaluate_repaired_path(model_a.to(device), aligned_b.to(device), train, test,
                                               args.num_points, hooks=Hooks(progress=bar.update))
    bar.close()
    return results


def _write_outputs(args, argv, out: Path, out_json: Path, aligned_b, meta_b: dict, report, results: dict,
                   align_seconds: float, dataset: str) -> Tuple[Path, dict]:
    """The aligned checkpoint, its JSON report and the picture; returns (checkpoint path, barriers)."""
    barriers = {"reference": "interp", **{k: _barriers(r) for k, r in results.items()}} if results else None
    report_data = report.as_dict()
    alignment = {"method": args.method, "reference": str(args.a), "source": str(args.b), "seed": args.seed,
                 "dataset": dataset, "seconds": align_seconds, "report": report_data, "barriers": barriers,
                 "run": run_info(argv)}
    extra = {k: v for k, v in meta_b.items()
             if k not in ARCH_KEYS + ("format", "format_version", "kind", "modeconn_version", "torch_version",
                                      "state_dict", "dataset", "seed", "metrics", "alignment")}
    if str(meta_b["arch"]).startswith("hf:"):  # a model directory in, a model directory out
        from modeconn.hf.models import save_model_dir

        ckpt = save_model_dir(aligned_b.cpu(), meta_b, out, info={
            "dataset": meta_b.get("dataset") or dataset, "seed": meta_b.get("seed"),
            "metrics": meta_b.get("metrics") or {}, "alignment": alignment})
    else:
        ckpt = save_model(out, aligned_b.cpu(), meta_b["arch"], meta_b["arch_kwargs"], meta_b["input_shape"],
                          meta_b["num_classes"], dataset=meta_b.get("dataset"), seed=meta_b.get("seed"),
                          metrics=meta_b.get("metrics"), alignment=alignment, **extra)
    write_json(out_json, {
        "a": str(args.a), "b": str(args.b), "out": str(ckpt), "method": args.method, "seed": args.seed,
        "dataset": dataset, "num_points": args.num_points,
        "eval_samples": args.eval_samples, "align_seconds": align_seconds,
        "report": report_data, "barriers": barriers,
        "paths": {k: r.to_dict() for k, r in results.items()}, "run": run_info(argv)})

    if not results:  # --num-points 0: no lines, no picture
        return ckpt, barriers
    out_png = out.with_suffix(".png")
    plot_path(dataclasses.replace(results["after"], name=f"aligned ({args.method})", linear=results["before"]),
              out_png, f"straight line A -> B on {dataset}: solid = B aligned, dashed 'linear' = B as trained")
    return ckpt, barriers


def _print_summary(args, report, align_seconds: float, dataset: str, barriers: dict, files) -> None:
    """The alignment summary (the per-group table with --report) and the barriers before and after."""
    lines = report.summary().splitlines()
    lines[0] += f" ({align_seconds:.2f} s)"
    print("\n".join(lines if args.report else lines[:1]))
    if barriers is None:
        print("barrier report skipped (--num-points 0)")
        print("wrote " + ", ".join(str(f) for f in files[:2]))
        return
    samples = f", {args.eval_samples} samples per split" if args.eval_samples else ""
    print(f"straight line A -> B on {dataset} ({args.num_points} points{samples}, barrier = max_t L(t) - "
          f"[(1-t) L(0) + t L(1)]):")
    print(f"  {'':18s} {'before':>9s} {'after':>9s} {'+REPAIR':>9s}")
    b, a, r = barriers["before"], barriers["after"], barriers["repair"]
    print(f"  {'test loss barrier':18s} {b['test_loss']:9.4f} {a['test_loss']:9.4f} {r['test_loss']:9.4f}")
    print(f"  {'test error barrier':18s} {100 * b['test_error']:8.2f}% {100 * a['test_error']:8.2f}% "
          f"{100 * r['test_error']:8.2f}%")
    print("wrote " + ", ".join(str(f) for f in files))


def main_(argv=None) -> int:
    """The command body (see :func:`main`)."""
    args = build_parser().parse_args(argv)
    out, out_json = _check_out(args)
    with session(args, join=False) as job:
        model_a, meta_a, model_b, meta_b = _load_pair(args)
        ds = checkpoint_dataset(args, meta_a, args.a)
        dataset = ds.name
        if meta_b.get("dataset") not in (None, dataset):
            print(f"note: {args.b} was trained on {meta_b['dataset']!r}; using {dataset!r}", file=sys.stderr)
        make_directory(out.parent)  # a path that cannot be written fails now, not after the work
        aligned_b, report, align_seconds = _align(args, ds, model_a, model_b, job.device)
        results = _straight_lines(args, job, ds, model_a, model_b, aligned_b) if args.num_points else {}
        ckpt, barriers = _write_outputs(args, argv, out, out_json, aligned_b, meta_b, report, results,
                                        align_seconds, dataset)
        _print_summary(args, report, align_seconds, dataset, barriers, (ckpt, out_json, out.with_suffix(".png")))
    return 0


def main(argv=None) -> int:
    """``python -m modeconn.align [args]``; returns the exit status (see :mod:`modeconn.cli.errors`)."""
    return run_command(main_, argv)


if __name__ == "__main__":
    sys.exit(main())
