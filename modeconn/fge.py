"""python -m modeconn.fge: Fast Geometric Ensembling from one trained network."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Mapping, Optional

from modeconn.plots.ensemble import plot_fge
from modeconn.runtime import Hooks, Runtime
from modeconn.cli import data as cli_data
from modeconn.cli.args import (add_bn_samples_arg, add_data_args, add_endpoint_model_args, add_resume_args,
                               add_run_args, add_scale_args, at_least, parser)
from modeconn.cli.errors import CommandError, run_command
from modeconn.cli.outputs import run_info, write_json
from modeconn.cli.rundir import TrainingRun
from modeconn.cli.session import Job, session
from modeconn.cli.endpoints import load_endpoint_model
from modeconn.runtime.checkpoints import load_checkpoint, load_model, save_model
from modeconn.evaluation.ensembles import EnsembleResult, evaluate_ensemble
from modeconn.training.fge import FGEResult, cycle_length, cyclic_lr, snapshot_iterations, train_fge

EXAMPLE = """  python -m modeconn.fge --ckpt checkpoints/digits_cnn_a.pt --cycles 8 --cycle-epochs 2 \\
      --lr-max 0.05 --lr-min 0.0005 --out runs/fge_cnn \\
      --independent checkpoints/digits_cnn_a.pt checkpoints/digits_cnn_b.pt

starts from the network in --ckpt (architecture and dataset are read from it), trains
cycles * cycle-epochs more epochs with a cyclical learning rate (lr-max at cycle
boundaries, lr-min at each cycle's middle, set per iteration) and snapshots the network
at every minimum of the rate. Writes:
  OUT/fge.json              metrics of every member and of the ensemble of 1..n members
                            (test accuracy, NLL, ECE), lr of every iteration, snapshot
                            iterations, each snapshot's distance from the start, budget
                            comparison, run info
  OUT/fge.png               lr schedule with snapshot markers; ensemble accuracy / NLL
                            against the number of members
  OUT/snapshots/snap_XX.pt  the snapshots (model checkpoints, BN statistics recomputed);
                            from a Hugging Face model directory also OUT/snapshots/snap_XX/ (model directories)
  OUT/resume.pt, OUT/history.json   state after the last finished epoch (for --resume)

under torchrun the training is data parallel (DDP; --batch-size is the global batch) and
rank 0 evaluates and writes everything:
  torchrun --nproc_per_node 2 -m modeconn.fge --ckpt checkpoints/digits_cnn_a.pt --out runs/fge_ddp"""


def build_parser():
    """The parser of ``python -m modeconn.fge``."""
    p = parser("fge", "Fast Geometric Ensembling (Garipov et al. 2018): continue training a trained "
                    "network with a cyclical learning rate, take a snapshot at each minimum of the rate, "
                    "and evaluate the ensemble of snapshots (mean of softmax probabilities) against the "
                    "start network and, optionally, an ensemble of independently trained networks.", EXAMPLE)
    g = p.add_argument_group("FGE")
    g.add_argument("--ckpt", required=True,
                   help="model checkpoint to start from (from modeconn.train); gives architecture and dataset")
    g.add_argument("--cycles", type=at_least(1), default=8,
                   help="number of cycles = number of snapshots (default: %(default)s)")
    c = g.add_mutually_exclusive_group()
    c.add_argument("--cycle-epochs", type=int, default=None,
                   help="cycle length in epochs, any integer >= 1, odd allowed (default: 2)")
    c.add_argument("--cycle-iters", type=int, default=None,
                   help="cycle length in iterations (>= 2) instead of --cycle-epochs")
    g.add_argument("--lr-max", type=float, default=0.05,
                   help="learning rate at cycle boundaries (default: %(default)s)")
    g.add_argument("--lr-min", type=float, default=0.0005,
                   help="learning rate at the middle of each cycle, where snapshots are taken "
                        "(default: %(default)s)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    g.add_argument("--wd", type=float, default=5e-4, help="weight decay (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the batch order and of random layers during FGE (default: %(default)s)")
    g.add_argument("--independent", nargs="+", metavar="CKPT", default=None,
                   help="checkpoints of independently trained networks of the same dataset; their ensemble "
                        "is evaluated and compared at equal training budget")
    g.add_argument("--keep-on-disk", action="store_true",
                   help="write each snapshot to OUT/snapshots as soon as it is taken instead of keeping it "
                        "in memory (for large models; the resume state then holds paths, not weights)")
    add_data_args(p, dataset_default=None)
    add_endpoint_model_args(p)
    add_bn_samples_arg(p)
    add_run_args(p)
    add_resume_args(p, "resume.pt", "epoch")
    add_scale_args(p)
    return p


def epochs_of(meta: Mapping) -> Optional[float]:
    """Training epochs recorded in a model checkpoint (its config, else its history), or None."""
    config = meta.get("config") or {}
    if isinstance(config, Mapping) and config.get("epochs") is not None:
        return float(config["epochs"])
    history = meta.get("history") or []
    if history:
        return float(len(history))
    return None


def _fmt(v, spec=".4f"):
    """A number for the table, '-' for None."""
    return "-" if v is None else format(v, spec)


def _independent_meta(args, dataset: str, meta: Mapping) -> List[dict]:
    """The --independent checkpoints, checked to be trained on the same data and classes."""
    indep_meta = []
    for path in args.independent or []:
        m = load_checkpoint(path, kind="model")
        if m.get("dataset") not in (None, dataset) or int(m["num_classes"]) != int(meta["num_classes"]):
            raise CommandError(f"--independent {path}: trained on {m.get('dataset')!r} with "
                               f"{m['num_classes']} classes, the start network on {dataset!r} with "
                               f"{meta['num_classes']}")
        indep_meta.append(m)
    return indep_meta


def _config(args, dataset: str) -> dict:
    """The arguments a --resume must repeat."""
    return {"ckpt": str(args.ckpt), "dataset": dataset, "cycles": args.cycles,
            "cycle_epochs": args.cycle_epochs, "cycle_iters": args.cycle_iters, "lr_max": args.lr_max,
            "lr_min": args.lr_min, "momentum": args.momentum, "wd": args.wd, "seed": args.seed,
            "batch_size": args.batch_size, "keep_on_disk": args.keep_on_disk,
            "bn_samples": args.bn_samples}


def _train(args, job: Job, start_model, meta: Mapping, ds, run: TrainingRun, state: Optional[dict]):
    """The FGE cycles from ``start_model`` (saving the state after every epoch) -> (FGEResult, arch record)."""
    device = job.device
    train_loader = cli_data.train_loader(ds, args, job.info)
    bn_loader = cli_data.bn_loader(ds, args, device, batch_size=1024)
    C = cycle_length(len(train_loader), args.cycle_epochs, args.cycle_iters)
    snap_dir = run.out / "snapshots"
    if job.is_main and state is None:  # a fresh run (possibly --force): no stale snapshots of an earlier run
        for old in snap_dir.glob("snap_*.pt"):
            old.unlink()
    arch = {"arch": meta["arch"], "arch_kwargs": meta.get("arch_kwargs", {}),
            "input_shape": meta["input_shape"], "num_classes": meta["num_classes"],
            "dataset": run.config["dataset"], "dataset_kwargs": meta.get("dataset_kwargs") or {}, "seed": args.seed,
            **cli_data.data_source(ds)}
    if "hf_dtype" in meta:  # a model directory: its dtype and tokenizer, for the snapshots written as directories
        arch.update(hf_dtype=meta["hf_dtype"], source_dir=meta.get("source_dir"),
                    dataset_kwargs=cli_data.text_record(ds) or arch["dataset_kwargs"])
    bar = job.progress(args.cycles * C, "fge")
    result = train_fge(start_model, train_loader, args.cycles, cycle_iters=C, lr_max=args.lr_max, lr_min=args.lr_min,
                 momentum=args.momentum, weight_decay=args.wd, seed=args.seed, bn_loader=bn_loader,
                 keep_on_disk=snap_dir if args.keep_on_disk else None, snapshot_meta=arch,
                 resume=state, runtime=Runtime(job.device, args.amp, args.compile),
                 hooks=Hooks(progress=bar.update, on_epoch_end=run.epoch_saver(bar)))
    bar.close()
    return result, arch


def _save_snapshots(args, result: FGEResult, snap_dir: Path, arch: dict) -> List[Path]:
    """Every snapshot as a model checkpoint in ``snap_dir`` (those kept on disk are there already)."""
    snap_paths: List[Path] = []
    for i, snap in enumerate(result.snapshots):
        if isinstance(snap, Path):
            snap_paths.append(snap)
        else:
            snap_paths.append(save_model(snap_dir / f"snap_{i:02d}.pt", snap, **arch,
                                         fge={"index": i, "iteration": result.snapshot_iterations[i],
                                              "distance": result.distances[i], "start": str(args.ckpt)}))
        if "hf_dtype" in arch:  # a model directory in: every snapshot also as one (loadable by transformers)
            from modeconn.hf.models import save_model_dir

            save_model_dir(load_model(snap_paths[-1])[0], arch, snap_dir / f"snap_{i:02d}",
                           info={"dataset": arch["dataset"], "dataset_kwargs": arch["dataset_kwargs"],
                                 "seed": args.seed, "fge_index": i})
    return snap_paths


def _evaluate(args, result: FGEResult, start_model, test_loader, device):
    """(start model, FGE ensemble, independent ensemble or None) evaluated on the test set."""
    start_eval = evaluate_ensemble([start_model], test_loader)
    fge_eval = evaluate_ensemble(result.snapshots, test_loader, map_location=device)
    indep_eval = None
    if args.independent:
        indep_eval = evaluate_ensemble(list(args.independent), test_loader, map_location=device)
    return start_eval, fge_eval, indep_eval


def _budget_rows(args, result: FGEResult, meta: Mapping, indep_meta: List[dict], start_eval, fge_eval,
                 indep_eval) -> List[dict]:
    """One row per method: members, test metrics and the training epochs each cost."""
    start_epochs = epochs_of(meta)
    fge_epochs = result.epochs
    indep_epochs = [epochs_of(m) for m in indep_meta]
    indep_total = sum(indep_epochs) if indep_epochs and None not in indep_epochs else None
    rows = [{"method": "start model", "members": 1, **_metrics(start_eval, 0),
             "epochs": start_epochs},
            {"method": "FGE ensemble", "members": len(result.snapshots), **_metrics(fge_eval, -1),
             "epochs": None if start_epochs is None else start_epochs + fge_epochs,
             "extra_epochs": fge_epochs}]
    if indep_eval is not None:
        rows.append({"method": "independent ensemble", "members": len(args.independent),
                     **_metrics(indep_eval, -1), "epochs": indep_total, "epochs_each": indep_epochs})
    return rows


def _report(args, argv, run: TrainingRun, meta: Mapping, result: FGEResult, snap_paths: List[Path], evals,
            rows: List[dict]) -> dict:
    """Everything fge.json holds."""
    start_eval, fge_eval, indep_eval = evals
    members = fge_eval.to_dict()["members"]
    for i, m in enumerate(members):
        m.update(iteration=result.snapshot_iterations[i], lr=result.lr_trace[result.snapshot_iterations[i]],
                 distance_from_start=result.distances[i], path=str(snap_paths[i]))
    return {
        "config": run.config, "start": str(args.ckpt), "dataset": run.config["dataset"], "arch": meta["arch"],
        "arch_kwargs": meta.get("arch_kwargs", {}),
        "cycle_iters": result.cycle_iters, "iters_per_epoch": result.iters_per_epoch, "fge_epochs": result.epochs,
        "test": {"n": fge_eval.n, "start": start_eval.to_dict()["members"][0],
                 "members": members, "ensemble": fge_eval.to_dict()["ensemble"],
                 "independent": None if indep_eval is None else {
                     "checkpoints": list(args.independent), "members": indep_eval.to_dict()["members"],
                     "ensemble": indep_eval.to_dict()["ensemble"]}},
        "budget": rows,
        "lr_trace": result.lr_trace, "snapshot_iterations": result.snapshot_iterations,
        "distances": result.distances, "history": result.history, "ece_bins": fge_eval.num_bins,
        "run": run_info(argv),
    }


def _print_table(rows: List[dict], fge_epochs: float) -> None:
    """The budget table: members, test accuracy, NLL, ECE and epochs of every method."""
    print(f"{'':22s} {'members':>7s} {'test acc':>9s} {'test NLL':>9s} {'ECE':>7s} {'epochs':>12s}")
    for r in rows:
        ep = _fmt(r["epochs"], ".4g")
        if r["method"] == "FGE ensemble":
            ep += f" (+{fge_epochs:.4g})"
        print(f"{r['method']:22s} {r['members']:7d} {r['acc']:9.4f} {r['nll']:9.4f} {r['ece']:7.4f} {ep:>12s}")


def _write_results(args, argv, run: TrainingRun, job: Job, start_model, meta: Mapping, indep_meta: List[dict],
                   ds, result: FGEResult, arch: dict) -> None:
    """Snapshots, fge.json, fge.png and the budget table (rank 0)."""
    out, dataset, device = run.out, run.config["dataset"], job.device
    snap_dir = out / "snapshots"
    snap_paths = _save_snapshots(args, result, snap_dir, arch)
    test_loader = ds.eval_loader("test").to(device)
    start_eval, fge_eval, indep_eval = _evaluate(args, result, start_model, test_loader, device)
    rows = _budget_rows(args, result, meta, indep_meta, start_eval, fge_eval, indep_eval)
    report = _report(args, argv, run, meta, result, snap_paths, (start_eval, fge_eval, indep_eval), rows)
    write_json(out / "fge.json", report)
    plot_fge(result, fge_eval, out / "fge.png", start_eval, indep_eval,
             f"FGE from {Path(args.ckpt).name} on {dataset}: {args.cycles} cycles of {result.cycle_iters} iterations")
    _print_table(rows, result.epochs)
    print(f"wrote {out / 'fge.json'}, {out / 'fge.png'}, {len(snap_paths)} snapshots in {snap_dir}")


def main_(argv=None) -> int:
    """The command body (see :func:`main`)."""
    args = build_parser().parse_args(argv)
    if args.cycle_epochs is None and args.cycle_iters is None:
        args.cycle_epochs = 2
    snapshot_iterations(args.cycles, 2)           # check --cycles, --lr-max and --lr-min before any work
    cyclic_lr(0, 2, args.lr_max, args.lr_min)
    with session(args) as job:
        start_model, meta = load_endpoint_model(args.ckpt, "--ckpt", args)
        dataset = cli_data.dataset_name(args, meta, args.ckpt)
        indep_meta = _independent_meta(args, dataset, meta)
        run = TrainingRun(Path(args.out), _config(args, dataset), "fge.json", job.is_main)
        state = run.start(args.resume, args.force)
        with run.resumable():
            ds = cli_data.checkpoint_dataset(args, meta, args.ckpt)
            start_model = start_model.to(job.device)
            result, arch = _train(args, job, start_model, meta, ds, run, state)
            if job.is_main:  # rank 0 evaluates the ensembles and writes the results
                _write_results(args, argv, run, job, start_model, meta, indep_meta, ds, result, arch)
    return 0


def _metrics(res: EnsembleResult, k: int) -> dict:
    """Accuracy, NLL and ECE of the ensemble of the first ``k + 1`` members (``k = -1``: all)."""
    return {"acc": float(res.acc[k]), "nll": float(res.nll[k]), "ece": float(res.ece[k])}


def main(argv=None) -> int:
    """``python -m modeconn.fge [args]``; returns the exit status (see :mod:`modeconn.cli.errors`)."""
    return run_command(main_, argv)


if __name__ == "__main__":
    sys.exit(main())
