"""python -m modeconn.train_simplex: fit a low-loss complex of simplexes connecting several modes."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import List, Optional

from modeconn.cli.args import (add_data_args, add_endpoint_model_args, add_optim_args, add_resume_args,
                               add_run_args, add_scale_args, at_least, parser)
from modeconn.cli.data import checkpoint_dataset, data_source, dataset_name, dataset_seed, train_loader
from modeconn.cli.endpoints import load_endpoint
from modeconn.cli.errors import CommandError, run_command
from modeconn.cli.outputs import run_info
from modeconn.cli.rundir import TrainingRun
from modeconn.cli.session import Job, session
from modeconn.core.simplex import SimplexModel, save_simplex
from modeconn.plots.history import plot_history
from modeconn.runtime import Hooks, Runtime
from modeconn.runtime.checkpoints import build_model
from modeconn.training.simplex import fit_simplex

EXAMPLE = """  python -m modeconn.train_simplex --modes runs/mlp1/model.pt runs/mlp2/model.pt runs/mlp3/model.pt \\
      --free-vertices 1 --epochs 30 --out runs/simplex_mlp

builds the mode-connecting complex of Benton et al. 2021: the modes stay fixed, the
--free-vertices shared vertices v_1..v_m are trained, simplex i = {mode_i, v_1..v_m};
each mini-batch draws one simplex uniformly and α ~ Dirichlet(1) on it.
Writes OUT/simplex.pt (self-describing: architecture, vertices, which are fixed, the
simplexes, dataset, seed, history), OUT/history.json, OUT/history.png and OUT/resume.pt.
Then: python -m modeconn.eval_simplex --ckpt OUT/simplex.pt"""


def build_parser():
    """The parser of ``python -m modeconn.train_simplex``."""
    p = parser("train_simplex", "Fit a complex of simplexes of low loss connecting several trained networks "
               "(Benton et al. 2021): minimise the expected loss over a uniformly drawn simplex and "
               "α ~ Dirichlet(1) on it, optionally minus λ·log(volume).", EXAMPLE)
    g = p.add_argument_group("simplex")
    g.add_argument("--modes", nargs="+", required=True, metavar="CKPT",
                   help="checkpoints of the modes to connect (from modeconn.train; at least 2, one architecture)")
    g.add_argument("--free-vertices", type=at_least(1), default=1,
                   help="shared trainable vertices m; each simplex has the m + 1 vertices {mode_i, v_1..v_m} "
                        "(default: %(default)s)")
    g.add_argument("--init", default="mean", choices=("mean", "random"),
                   help="free vertices start at the modes' mean, or from a fresh initialisation "
                        "(default: %(default)s)")
    g.add_argument("--volume-reg", type=float, default=0.0,
                   help="λ of the volume regulariser −λ·log V of the sampled simplex (Benton et al.); "
                        "0 = off (default: %(default)s)")
    add_data_args(p, dataset_default=None)
    add_endpoint_model_args(p)
    add_optim_args(p, epochs=30, lr=0.03)
    add_run_args(p)
    add_resume_args(p, "resume.pt", "epoch")
    add_scale_args(p)
    return p


def _modes(args) -> List[dict]:
    """The mode checkpoints, checked to be at least two of one architecture."""
    if len(args.modes) < 2:
        raise CommandError(f"--modes needs at least 2 checkpoints to connect, got {len(args.modes)}")
    metas = [load_endpoint(m, "--modes", args) for m in args.modes]
    for path, meta in zip(args.modes[1:], metas[1:]):
        for key in ("arch", "arch_kwargs", "input_shape", "num_classes"):
            if meta.get(key) != metas[0].get(key):
                raise CommandError(f"--modes {path} differs from {args.modes[0]} in {key}: "
                                   f"{meta.get(key)!r} vs {metas[0].get(key)!r}")
    return metas


def _config(args, dataset: str) -> dict:
    """The arguments a --resume must repeat."""
    return {"modes": [str(m) for m in args.modes], "free_vertices": args.free_vertices, "init": args.init,
            "volume_reg": args.volume_reg, "dataset": dataset, "epochs": args.epochs, "lr": args.lr,
            "wd": args.wd, "momentum": args.momentum, "schedule": args.schedule, "seed": args.seed,
            "batch_size": args.batch_size}


def _fit(args, job: Job, model: SimplexModel, ds, run: TrainingRun, state: Optional[dict]) -> List[dict]:
    """Train the free vertices for the remaining epochs, saving the state after each."""
    loader = train_loader(ds, args, job.info)
    bar = job.progress(args.epochs * len(loader), f"simplex: {len(args.modes)} modes, {args.free_vertices} free")
    history = fit_simplex(model, loader, args.epochs, args.lr, args.wd, args.momentum, args.schedule,
                          volume_reg=args.volume_reg, seed=args.seed, resume=state,
                          runtime=Runtime(job.device, args.amp, args.compile),
                          hooks=Hooks(progress=bar.update, on_epoch_end=run.epoch_saver(bar)))
    bar.close()
    return history


def _write_results(args, argv, model: SimplexModel, metas: List[dict], run: TrainingRun,
                   history: List[dict]) -> None:
    """simplex.pt and history.png, and the closing lines."""
    out, config, dataset = run.out, run.config, run.config["dataset"]
    meta = {k: metas[0].get(k) for k in ("arch", "arch_kwargs", "input_shape", "num_classes", "data_dir",
                                         "dataset_kwargs")}
    path = save_simplex(out / "simplex.pt", model, meta, dataset=dataset, dataset_seed=dataset_seed(metas[0]),
                        seed=args.seed, history=history, config=config, run=run_info(argv),
                        modes=[str(m) for m in args.modes], mode_metrics=[m.get("metrics", {}) for m in metas])
    plot_history(history, out / "history.png",
                 f"complex of {len(args.modes)} modes and {args.free_vertices} free vertices on {dataset}")
    last = history[-1]
    print(f"final epoch: train loss over sampled points {last['loss']:.4f}, acc {last['acc']:.4f}, "
          f"mean log volume {last['log_volume']:.3f}")
    print(f"wrote {path}, {out / 'history.json'}, {out / 'history.png'}")
    print(f"next: python -m modeconn.eval_simplex --ckpt {path}")


def main_(argv=None) -> int:
    """The command body (see :func:`main`)."""
    args = build_parser().parse_args(argv)
    if not math.isfinite(args.volume_reg) or args.volume_reg < 0:
        raise CommandError(f"--volume-reg must be a number >= 0, got {args.volume_reg}")
    with session(args) as job:
        metas = _modes(args)
        dataset = dataset_name(args, metas[0], "the mode checkpoints")
        run = TrainingRun(Path(args.out), _config(args, dataset), "simplex.pt", job.is_main)
        state = run.start(args.resume, args.force)
        with run.resumable():
            ds = checkpoint_dataset(args, metas[0], "the mode checkpoints")
            metas[0] = {**metas[0], "data_dir": data_source(ds).get("data_dir")}  # the one read
            model = SimplexModel.connecting(build_model(metas[0]), [m["state_dict"] for m in metas],
                                            args.free_vertices, init=args.init, seed=args.seed).to(job.device)
            history = _fit(args, job, model, ds, run, state)
            if job.is_main:  # rank 0 writes the results
                _write_results(args, argv, model, metas, run, history)
    return 0


def main(argv=None) -> int:
    """``python -m modeconn.train_simplex [args]``; returns the exit status (see :mod:`modeconn.cli.errors`)."""
    return run_command(main_, argv)


if __name__ == "__main__":
    sys.exit(main())
