"""python -m modeconn.eval_curve: loss, error and barriers along a curve or a straight line."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Tuple

from modeconn.cli.args import (add_attack_args, add_data_args, add_endpoint_model_args, add_run_args,
                               add_scale_args, at_least, attack_config, parser)
from modeconn.cli.data import bn_loader, checkpoint_dataset, hessian_loader
from modeconn.cli.errors import CommandError, run_command
from modeconn.cli.outputs import run_info, write_csv, write_json
from modeconn.cli.session import Job, session
from modeconn.core.curve_model import linear_path, load_curve
from modeconn.cli.endpoints import load_endpoint
from modeconn.runtime.checkpoints import load_checkpoint, make_directory, model_from_meta
from modeconn.evaluation.adversarial import ROBUST_METRICS
from modeconn.evaluation.path import evaluate_path, points_of_this_rank
from modeconn.runtime import Hooks, Runtime
from modeconn.plots.path import plot_path
from modeconn.core.param_groups import GROUPINGS

EXAMPLE = """  python -m modeconn.eval_curve --ckpt runs/curve_mlp/curve.pt --with-linear --out runs/eval_mlp
  python -m modeconn.eval_curve --a checkpoints/digits_mlp_a.pt --b checkpoints/digits_mlp_b.pt
  python -m modeconn.eval_curve --ckpt runs/curve_adv/curve.pt --with-linear --adversarial pgd --eps 0.3 \
      --steps 10 --num-points 11      (robust loss/error and barriers beside the clean ones)
  python -m modeconn.eval_curve --a A.pt --b B_aligned.pt --repair --per-layer module --out runs/why

--repair (a line only): every point corrected by REPAIR (Jordan et al. 2023) before it is
evaluated; path.json/csv/png then hold the repaired line and, as 'linear', the plain one.
--per-layer (a line only) also writes OUT/layers.json (the layer-wise and cumulative paths,
Adilova et al. 2024) and OUT/layers.png (their barriers, one bar per layer in network order).

writes OUT/path.json (every array, summaries, the barrier table, command line, versions),
OUT/path.csv (one row per t) and OUT/path.png (train loss and test error vs t).

between two Hugging Face model directories (pip install modeconn[hf]) on a text, with the
per-token perplexity, and the midpoint written back as a model directory:
  python -m modeconn.eval_curve --a runs/lm_a --b runs/lm_b --dataset text:corpus.txt --save-points 0.5

under torchrun the points are shared among the processes (each evaluates its own points
over all the data, rank 0 writes the files; the numbers equal a one-process run):
  torchrun --nproc_per_node 2 -m modeconn.eval_curve --ckpt runs/curve_mlp/curve.pt"""


def build_parser():
    """The parser of ``python -m modeconn.eval_curve``."""
    p = parser("eval_curve", "Evaluate train/test loss, error and NLL along a fitted curve (or the straight "
               "line between two checkpoints), with BatchNorm statistics recomputed at every point, and "
               "report the loss barriers.", EXAMPLE)
    g = p.add_argument_group("path")
    g.add_argument("--ckpt", help="curve checkpoint from modeconn.train_curve")
    g.add_argument("--a", help="first endpoint checkpoint (straight line, without --ckpt)")
    g.add_argument("--b", help="second endpoint checkpoint (straight line, without --ckpt)")
    g.add_argument("--num-points", type=at_least(2), default=61,
                   help="evenly spaced t in [0, 1] (default: %(default)s)")
    g.add_argument("--with-linear", action="store_true",
                   help="also evaluate the straight line between the curve's endpoints")
    g.add_argument("--points-per-pass", type=at_least(1), default=8,
                   help="points evaluated together in one pass over the data (default: %(default)s)")
    g.add_argument("--no-bn-recompute", action="store_true",
                   help="keep the stored BN statistics instead of recomputing them at every point")
    g.add_argument("--wd", type=float, default=0.0,
                   help="report loss = NLL + 0.5*wd*||θ(t)||² as Garipov et al. (default: %(default)s)")
    g.add_argument("--hessian", action="store_true",
                   help="also the sharpness at every point: top and bottom Hessian eigenvalues (Lanczos) "
                        "and |λmin/λmax| (Li et al. 2018), over --hessian-samples training samples")
    g.add_argument("--hessian-samples", type=at_least(1), default=512,
                   help="training samples for the Hessian (default: %(default)s)")
    g.add_argument("--hessian-points", type=at_least(2), default=11,
                   help="evenly spaced t for the Hessian, fewer than --num-points as it is costly "
                        "(default: %(default)s)")
    add_attack_args(p, "--adversarial", training=False)
    g = p.add_argument_group("why is there a barrier (a straight line --a/--b only)")
    g.add_argument("--repair", action="store_true",
                   help="REPAIR every point: rescale each hidden channel's pre-activation mean and std over the "
                        "training data to the endpoints' interpolated ones (needs B aligned to A, e.g. by "
                        "modeconn.align; BN networks: equal to the BN recompute)")
    g.add_argument("--per-layer", nargs="?", const="module", default=None, choices=GROUPINGS,
                   help="layer-wise barriers: interpolate one group of parameters at a time (parameter, "
                        "module [the default] or top-level block), the others at --layer-base, and the first k "
                        "groups together; writes layers.json and layers.png")
    g.add_argument("--layer-base", choices=("a", "b"), default="a",
                   help="where the parameters not interpolated stay (default: %(default)s)")
    g.add_argument("--layer-points", type=at_least(2), default=11,
                   help="evenly spaced t on every layer-wise path (default: %(default)s)")
    g.add_argument("--save-points", type=float, nargs="+", default=None, metavar="T",
                   help="Hugging Face endpoints: also write the weights at these t as model directories "
                        "OUT/point_<t> (save_pretrained, the endpoints' dtype), loadable by transformers")
    add_data_args(p, dataset_default=None, evaluation=True)
    add_endpoint_model_args(p)
    add_run_args(p, out_required=False, out_help="output directory (default: next to the checkpoint)")
    add_scale_args(p, training=False)
    return p


def barrier_lines(result) -> list:
    """The barrier table of a path result as aligned text lines (test loss and error, three references)."""
    robust = [m for m in ("robust_test_loss", "robust_test_error") if m in result.extra]
    rows = result.barrier_table(("test_loss", "test_error", *robust))
    lines = [f"{'path':8s} {'metric':17s} {'interp':>16s} {'mean':>16s} {'max':>16s}"]
    by = {}
    for r in rows:
        by.setdefault((r["path"], r["metric"]), {})[r["reference"]] = r
    for (name, metric), refs in by.items():
        cells = [f"{refs[k]['barrier']:9.4f} @t={refs[k]['t']:.2f}" for k in ("interp", "mean", "max")]
        lines.append(f"{name:8s} {metric:17s} " + " ".join(f"{c:>16s}" for c in cells))
    return lines


def write_path_outputs(result, out: Path, title: str, extra: dict) -> None:
    """path.json (all arrays, summaries, barrier table + ``extra``), path.csv and path.png in ``out``."""
    make_directory(out)
    data = result.to_dict()
    data["barrier_table"] = result.barrier_table()
    data.update(extra)
    write_json(out / "path.json", data)
    columns = {"t": result.ts}
    for m in ("train_loss", "train_nll", "train_error", "test_loss", "test_nll", "test_error"):
        columns[m] = result.values(m)
        if result.linear is not None:
            columns[f"linear_{m}"] = result.linear.values(m)
    for res, prefix in ((result, ""), (result.linear, "linear_")):
        for m in (m for m in ROBUST_METRICS if res is not None and m in res.extra):
            columns[prefix + m] = res.extra[m]
    columns["arc_length"] = result.arc_length
    write_csv(out / "path.csv", columns)
    plot_path(result, out / "path.png", title)


def path_sharpness(path, ds, device, args, job: Job) -> dict:
    """λmax, λmin and |λmin/λmax| at evenly spaced points (BN statistics recomputed first)."""
    import numpy as np

    from modeconn.evaluation.bn import recompute_bn
    from modeconn.geometry.hessian import sharpness_along

    data = hessian_loader(ds, args, device)
    bn_data = bn_loader(ds, args, device)
    ts = np.linspace(0, 1, args.hessian_points)
    models = (recompute_bn(path.point(float(t)), bn_data) for t in ts)
    bar = job.progress(len(ts), "Hessian")
    s = sharpness_along(models, "cross_entropy", data, ts=ts, hooks=Hooks(progress=bar.update))
    bar.close()
    return {"hessian_ts": ts, "lambda_max": s.lambda_max, "lambda_min": s.lambda_min, "curvature_ratio": s.ratio}


def path_robustness(result, path, ds, attack, args, job: Job) -> None:
    """Robust test loss/error/accuracy at the result's ts (and its linear companion's) into ``extra``: PGD
    on the first --adv-samples test samples, BN statistics recomputed on clean training data first."""
    from modeconn.evaluation.adversarial import robust_path
    from modeconn.evaluation.path import endpoint_line

    device = job.device
    test = ds.eval_loader("test", args.batch_size, samples=args.adv_samples).to(device)
    bn_data = None if args.no_bn_recompute else bn_loader(ds, args, device)
    for res, p in ((result, path), (result.linear, endpoint_line(path) if result.linear is not None else None)):
        if res is None:
            continue
        bar = job.progress(len(res.ts), f"PGD {res.name}")
        res.extra.update(robust_path(p, test, attack, res.ts, bn_loader=bn_data, seed=0,
                                     progress=bar.update))
        bar.close()


def _load_path(args) -> Tuple[object, dict, Path, str]:
    """(path, metadata, output directory, name): the curve of --ckpt or the line from --a to --b."""
    if args.ckpt and (args.repair or args.per_layer):
        raise CommandError("--repair and --per-layer need the two endpoints --a A.pt --b B.pt, not --ckpt: "
                           "REPAIR's targets and the layer-wise paths interpolate the endpoints; for the points "
                           "of a curve use mc.repair(a, b, t, loader, point=curve.point(t)) in Python")
    if args.ckpt:
        meta = load_checkpoint(args.ckpt)
        if meta.get("kind") != "curve":
            raise CommandError(f"{args.ckpt} is a {meta.get('kind')!r} checkpoint, not a curve; "
                               "for the straight line between two models use --a A.pt --b B.pt")
        path, meta = load_curve(args.ckpt)
        out = Path(args.out) if args.out else Path(args.ckpt).parent / "eval"
        name = meta["curve_state"]["curve"]
    elif args.a and args.b:
        meta = load_endpoint(args.a, "--a", args)
        end_meta = load_endpoint(args.b, "--b", args)
        if (meta["arch"], meta["arch_kwargs"]) != (end_meta["arch"], end_meta["arch_kwargs"]):
            raise CommandError(f"--a is {meta['arch']} {meta['arch_kwargs']} but --b is "
                               f"{end_meta['arch']} {end_meta['arch_kwargs']}")
        template = model_from_meta(meta, f"--a {args.a}")  # one line naming the file when weights do not fit
        path = linear_path(template, end_meta["state_dict"])
        out = Path(args.out) if args.out else Path(args.a).parent / "eval_linear"
        name = "repair" if args.repair else "linear"
    else:
        raise CommandError("give --ckpt CURVE.pt, or --a A.pt and --b B.pt for a straight line")
    return path, meta, out, name


def save_points(path, meta: dict, ts, out: Path) -> list:
    """Write the weights of ``path`` at every t of ``ts`` as a model directory ``out/point_<t>``."""
    if not str(meta.get("arch", "")).startswith("hf:"):
        raise CommandError("--save-points writes Hugging Face model directories: the endpoints must be ones")
    if any(not 0.0 <= t <= 1.0 for t in ts):
        raise CommandError(f"--save-points: every t must lie in [0, 1], got {ts}")
    from modeconn.hf.models import save_model_dir

    return [save_model_dir({k: v.cpu() for k, v in path.weights_at(t).items()}, meta, out / f"point_{t:.3f}",
                           info={"dataset": meta.get("dataset"), "dataset_kwargs": meta.get("dataset_kwargs") or {},
                                 "curve_t": t})
            for t in ts]


def _evaluate(args, job: Job, path, ds, name: str):
    """The path's metrics at --num-points points (shared among the ranks under torchrun)."""
    device = job.device
    train = ds.eval_loader("train", args.batch_size).to(device)
    test = ds.eval_loader("test", args.batch_size).to(device)
    total = points_of_this_rank(args.num_points, args.points_per_pass) * (2 if args.with_linear and args.ckpt else 1)
    bar = job.progress(total, "points")
    if args.repair:
        return _evaluate_repaired(args, job, path, ds, train, test, bar)
    result = evaluate_path(path, train, test, args.num_points, bn_loader=bn_loader(ds, args, device),
                           points_per_pass=args.points_per_pass,
                           recompute_bn=not args.no_bn_recompute, with_linear=args.with_linear and bool(args.ckpt),
                           weight_decay=args.wd, name=name, runtime=Runtime(amp=args.amp, compile=args.compile),
                           hooks=Hooks(progress=bar.update))
    bar.close()
    return result


def _evaluate_repaired(args, job: Job, path, ds, train, test, bar):
    """The line with REPAIR at every point; the plain line as its ``linear`` companion."""
    from modeconn.alignment.repair import evaluate_repaired_path

    a, b = path.point(0.0), path.point(1.0)
    runtime = Runtime(amp=args.amp, compile=args.compile)
    result = evaluate_repaired_path(a, b, train, test, args.num_points, points_per_pass=args.points_per_pass,
                                    runtime=runtime, hooks=Hooks(progress=bar.update))
    result.linear = evaluate_path(path, train, test, args.num_points, bn_loader=bn_loader(ds, args, job.device),
                                  points_per_pass=args.points_per_pass, recompute_bn=not args.no_bn_recompute,
                                  name="linear", runtime=runtime)
    bar.close()
    return result


def per_layer(args, job: Job, path, ds, out: Path) -> dict:
    """Layer-wise and cumulative barriers of the line: layers.json, layers.png; returns the test-loss barriers."""
    from modeconn.evaluation.layerwise import layerwise_barriers
    from modeconn.plots.layers import plot_group_bars

    train = ds.eval_loader("train", args.batch_size).to(job.device)
    test = ds.eval_loader("test", args.batch_size).to(job.device)
    a, b = path.point(0.0), path.point(1.0)
    bar = job.progress(None, "layer-wise paths")
    res = layerwise_barriers(a, b, train, test, args.per_layer, base=args.layer_base, num_points=args.layer_points,
                             points_per_pass=args.points_per_pass, hooks=Hooks(progress=bar.update))
    bar.close()
    write_json(out / "layers.json", {**res.to_dict(), "grouping": args.per_layer, "dataset": ds.name,
                                     "source": {"start": args.a, "end": args.b}})
    barriers = {"this group alone": res.barriers("test_loss"),
                "first k groups": res.barriers("test_loss", cumulative=True)}
    plot_group_bars(barriers, out / "layers.png", "test-loss barrier",
                    f"layer-wise barriers on {ds.name} (others at {args.layer_base.upper()})")
    return barriers


def perplexity_extra(result) -> dict:
    """Per-token perplexity exp(NLL) along a language model's path, and its straight-line barrier.

    The barrier of the perplexity is taken like the loss's (height above the chord between the
    ends); for text data the NLL is the mean over every predicted token.
    """
    import numpy as np

    from modeconn.evaluation.barriers import barrier

    out = {}
    for split in ("train", "test"):
        ppl = np.exp(np.asarray(result.values(f"{split}_nll"), dtype=float))
        out[f"{split}_perplexity"] = ppl
        out[f"{split}_perplexity_barrier"] = barrier(result.ts, ppl)[0]
    return out


def _print_summary(result, name: str, out: Path) -> None:
    """The barrier table, the test error along the path, the sharpness (--hessian), the files written."""
    print("\n".join(barrier_lines(result)))
    if "test_perplexity" in result.extra:
        ppl = result.extra["test_perplexity"]
        print(f"test perplexity along the {name}: ends {ppl[0]:.3f} / {ppl[-1]:.3f}, max {max(ppl):.3f}, "
              f"barrier {result.extra['test_perplexity_barrier']:.3f}")
    s = result.summary("test_error")
    print(f"test error along the {name}: min {100 * s['min']:.2f}%  max {100 * s['max']:.2f}%  "
          f"arc-weighted mean {100 * s['weighted_mean']:.2f}%")
    if "lambda_max" in result.extra:
        for t, lmax, ratio in zip(result.extra["hessian_ts"], result.extra["lambda_max"],
                                  result.extra["curvature_ratio"]):
            print(f"t={t:.2f}  λmax {lmax:9.4g}  |λmin/λmax| {ratio:.3g}")
    print(f"wrote {out / 'path.json'}, {out / 'path.csv'}, {out / 'path.png'}")


def main_(argv=None) -> int:
    """The command body (see :func:`main`)."""
    args = build_parser().parse_args(argv)
    with session(args) as job:
        attack = attack_config(args)
        if attack is not None and args.repair:
            raise CommandError("--adversarial and --repair together are not supported: the robust loss would be "
                               "that of the plain line, not of the repaired one")
        path, meta, out, name = _load_path(args)
        ds = checkpoint_dataset(args, meta)
        if job.is_main:
            make_directory(out)  # a path that cannot be written fails now, not after the evaluation
        path = path.to(job.device)
        result = _evaluate(args, job, path, ds, name)
        if not job.is_main:  # every rank holds the gathered result; rank 0 writes it
            return 0
        if attack is not None:
            path_robustness(result, path, ds, attack, args, job)
        if args.hessian:
            result.extra.update(path_sharpness(path, ds, job.device, args, job))
        if str(ds.name).startswith("text:"):
            result.extra.update(perplexity_extra(result))
        write_path_outputs(result, out, f"{name} on {ds.name}",
                           {"dataset": ds.name, "source": {"ckpt": args.ckpt, "start": args.a, "end": args.b},
                            "run": run_info(argv),
                            **({"attack": attack.as_dict(), "attack_samples": args.adv_samples}
                               if attack is not None else {})})
        _print_summary(result, name, out)
        if args.per_layer:
            barriers = per_layer(args, job, path, ds, out)
            print(f"layer-wise test-loss barriers ({args.per_layer}s, others at {args.layer_base.upper()}):  "
                  f"{'alone':>9s} {'first k':>9s}")
            for g, v in barriers["this group alone"].items():
                print(f"  {g:40s} {v:9.4f} {barriers['first k groups'][g]:9.4f}")
            print(f"wrote {out / 'layers.json'}, {out / 'layers.png'}")
        if args.save_points:
            print("wrote " + ", ".join(str(d) for d in save_points(path, meta, args.save_points, out)))
    return 0


def main(argv=None) -> int:
    """``python -m modeconn.eval_curve [args]``; returns the exit status (see :mod:`modeconn.cli.errors`)."""
    return run_command(main_, argv)


if __name__ == "__main__":
    sys.exit(main())
