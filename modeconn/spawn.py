"""python -m modeconn.spawn: parent–child spawning, the barrier between children against the spawn epoch."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List

import torch

from modeconn.cli.args import (add_data_args, add_model_args, add_optim_args, add_resume_args, add_run_args,
                               add_scale_args, at_least, parse_kwargs, parser)
from modeconn.cli.data import canonical_specs, data_fields, load_dataset, model_kwargs_for, train_loader
from modeconn.cli.errors import CommandError, run_command
from modeconn.cli.outputs import run_info, write_csv, write_json
from modeconn.cli.rundir import StoreRun
from modeconn.cli.session import Job, session
from modeconn.evaluation.barriers import BARRIER_REFERENCES
from modeconn.evaluation.path import points_of_this_rank
from modeconn.models import create_model
from modeconn.plots.spawn import plot_spawn
from modeconn.runtime import Hooks, Runtime
from modeconn.runtime.checkpoints import save_model
from modeconn.training.spawn import (PARENT, SpawnResult, check_spawn_arguments, child_key, spawn_children,
                                     spawn_key, spawn_steps)

EXAMPLE = """  python -m modeconn.spawn --dataset digits --model mlp --epochs 20 --spawn-at 0 1 2 4 8 \\
      --children 2 --seed 0 --out runs/spawn_mlp

trains one parent for --epochs epochs (its state kept at every spawn epoch k), then from
each kept state --children children to epoch --epochs, each with its own data order
(--child-seeds; the same schedule, optimizer state and settings as the parent), and
measures the straight line between every two children of the same k (BN statistics
recomputed at every point). Writes:
  OUT/spawn.json   per k: every pair's barriers (test/train loss and error, three
                   definitions) and the metrics along t, each child's accuracy and
                   distance from the spawn point, the means; the parent; run info
  OUT/spawn.csv    one row per (k, pair of children)
  OUT/spawn.png    barrier vs k (test loss, test error) and the distances
  OUT/models/      parent.pt, spawn_kK.pt, kK_childI.pt (model checkpoints)
  OUT/states/      one training state per run: --resume continues a killed run, finished
                   children are not trained again
Under torchrun (DDP) --batch-size is the global batch and rank 0 writes:
  torchrun --nproc_per_node 2 -m modeconn.spawn -- --spawn-at 0 2 --epochs 10 --out runs/spawn_ddp"""


def build_parser():
    """The parser of ``python -m modeconn.spawn``."""
    p = parser("spawn", "Parent-child spawning (Frankle et al. 2020; Fort et al. 2020): when does SGD's data "
               "order stop deciding the basin? Children spawned from one parent at epoch k and trained with "
               "different data orders are linearly connected (barrier ~0) once k is past the early chaotic "
               "phase.", EXAMPLE)
    add_data_args(p)
    add_model_args(p)
    add_optim_args(p, epochs=20, lr=0.05)
    g = p.add_argument_group("spawning")
    g.add_argument("--spawn-at", type=int, nargs="+", required=True, metavar="K",
                   help="epochs at which children are spawned, each 0 <= K < --epochs")
    g.add_argument("--children", type=at_least(2), default=2,
                   help="children per spawn epoch; every pair is measured (default: %(default)s)")
    g.add_argument("--child-seeds", type=int, nargs="+", metavar="SEED",
                   help="data-order seeds of the children, one each, the same for every K "
                        "(default: 1000*(seed+1)+i)")
    g.add_argument("--num-points", type=at_least(2), default=21,
                   help="evenly spaced t on each line between two children (default: %(default)s)")
    g.add_argument("--points-per-pass", type=at_least(1), default=8,
                   help="points evaluated together in one pass over the data (default: %(default)s)")
    g.add_argument("--barrier", default="interp", choices=BARRIER_REFERENCES,
                   help="barrier definition of the table and the plot (README: Barriers); spawn.json holds "
                        "all three (default: %(default)s)")
    add_run_args(p)
    add_resume_args(p, "states/", "epoch of the parent or of a child")
    add_scale_args(p)
    return p


def _config(args, kwargs: dict, spawn_at: List[int], seeds: List[int]) -> dict:
    """The arguments a --resume must repeat (evaluation settings may change)."""
    return {"dataset": args.dataset, "model": args.model, "model_kwargs": kwargs, "seed": args.seed,
            "epochs": args.epochs, "lr": args.lr, "wd": args.wd, "momentum": args.momentum,
            "schedule": args.schedule, "batch_size": args.batch_size, "spawn_at": spawn_at,
            "children": args.children, "child_seeds": seeds}


def _checked(args) -> tuple:
    """(spawn epochs, child seeds) from the flags, or a one-line error naming the flag."""
    try:
        return check_spawn_arguments(args.spawn_at, args.epochs, args.children, args.seed, args.child_seeds)
    except ValueError as e:  # the message starts with the argument's name: spawn_at, children, child_seeds
        name, _, rest = str(e).partition(" ")
        raise CommandError(f"--{name.replace('_', '-')} {rest}") from None


def _spawn(args, job: Job, ds, kwargs: dict, spawn_at: List[int], seeds: List[int], store) -> SpawnResult:
    """The parent, the children and the lines between them (progress on one bar)."""
    torch.manual_seed(args.seed)  # the parent's initialisation, as `train --seed` draws it
    model = create_model(args.model, ds.input_shape, ds.num_classes, **kwargs).to(job.device)
    loaders = [ds.eval_loader(split).to(job.device) for split in ("train", "test")]
    steps = len(train_loader(ds, args, job.info))
    pairs = args.children * (args.children - 1) // 2
    bar = job.progress(spawn_steps(args.epochs, spawn_at, args.children, steps) +
                       len(spawn_at) * pairs * points_of_this_rank(args.num_points, args.points_per_pass),
                       f"spawn {args.model}")
    result = spawn_children(
        model, lambda seed: train_loader(ds, args, job.info, seed=seed), *loaders, epochs=args.epochs,
        spawn_at=spawn_at, children=args.children, seed=args.seed, child_seeds=seeds, lr=args.lr,
        weight_decay=args.wd, momentum=args.momentum, schedule=args.schedule, num_points=args.num_points,
        points_per_pass=args.points_per_pass, reference=args.barrier, store=store,
        runtime=Runtime(job.device, args.amp, args.compile), hooks=Hooks(progress=bar.update))
    bar.close()
    return result


def _save_models(args, ds, kwargs: dict, result: SpawnResult, out: Path) -> None:
    """The parent, every spawn point and every child as self-describing model checkpoints in ``out``."""
    model = create_model(args.model, ds.input_shape, ds.num_classes, **kwargs)
    names = {PARENT: "parent"}
    names.update({spawn_key(k): f"spawn_k{k}" for k in result.spawn_at})
    names.update({child_key(k, i): f"k{k}_child{i}" for k in result.spawn_at for i in range(args.children)})
    for key, name in names.items():
        state = result.store[key]
        model.load_state_dict(state["model"])
        save_model(out / f"{name}.pt", model, args.model, kwargs, ds.input_shape, ds.num_classes,
                   dataset=args.dataset, seed=args.seed, spawn={"run": key, "epochs_trained": int(state["epoch"]) + 1},
                   **data_fields(args, ds))


def _csv_columns(result: SpawnResult) -> dict:
    """One row per (spawn epoch, pair of children)."""
    rows = []
    for point in result.points:
        for pair in point.pairs:
            a, b = (point.children[i] for i in pair.children)
            rows.append({"spawn_epoch": point.epoch, "child_a": a.index, "child_b": b.index,
                         "barrier_test_loss": pair.barrier("test_loss", result.reference),
                         "barrier_test_error": pair.barrier("test_error", result.reference),
                         "distance": pair.distance, "test_acc_a": a.test_acc, "test_acc_b": b.test_acc,
                         "distance_a_from_spawn": a.distance_from_spawn,
                         "distance_b_from_spawn": b.distance_from_spawn})
    return {name: [r[name] for r in rows] for name in rows[0]}


def _cell(values) -> str:
    """The mean of ``values``, with [min, max] when there are several."""
    text = f"{sum(values) / len(values):.4f}"
    return text + (f" [{min(values):.4f}, {max(values):.4f}]" if len(values) > 1 else "")


def _print_table(result: SpawnResult) -> None:
    """One line per spawn epoch: barriers, accuracies and distances (means over pairs/children)."""
    print(f"barrier = {result.reference}; each cell: mean [min, max] over the pairs or the children of k")
    rows = [("k", "barrier test loss", "barrier test err", "children test acc", "dist child-child",
             "dist from spawn")]
    for pt in result.points:
        barriers = (_cell(list(pt.barriers(m, result.reference))) for m in ("test_loss", "test_error"))
        rows.append((str(pt.epoch), *barriers, _cell([c.test_acc for c in pt.children]),
                     _cell([p.distance for p in pt.pairs]), _cell([c.distance_from_spawn for c in pt.children])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))
    print(f"parent after {result.epochs} epochs: test acc {result.parent['test_acc']:.4f}, "
          f"test loss {result.parent['test_loss']:.4f}")


def _write_results(args, argv, run: StoreRun, ds, kwargs: dict, result: SpawnResult) -> None:
    """spawn.json, spawn.csv, spawn.png, the model checkpoints, and the table."""
    out = run.out
    _save_models(args, ds, kwargs, result, out / "models")
    write_json(out / "spawn.json", {"config": run.config, "num_points": args.num_points,
                                    "pairs": "every pair of children of a spawn epoch; 'mean' averages over "
                                             "pairs (barriers, distance) and children (accuracy, loss, distance "
                                             "from the spawn point)",
                                    **result.to_dict(), "run": run_info(argv)})
    write_csv(out / "spawn.csv", _csv_columns(result))
    plot_spawn(result, out / "spawn.png", f"{args.model} on {args.dataset}: children spawned at epoch k, "
                                          f"trained to {args.epochs} (seed {args.seed})")
    _print_table(result)
    print(f"wrote {out / 'spawn.json'}, {out / 'spawn.csv'}, {out / 'spawn.png'}, checkpoints in {out / 'models'}")


def main_(argv=None) -> int:
    """The command body (see :func:`main`)."""
    args = build_parser().parse_args(argv)
    kwargs = parse_kwargs(args.model_kwargs)
    canonical_specs(args)
    spawn_at, seeds = _checked(args)
    with session(args) as job:
        run = StoreRun(Path(args.out), _config(args, kwargs, spawn_at, seeds), "spawn.json", job.is_main)
        store = run.start(args.resume, args.force)
        if job.is_main and not args.resume:  # a fresh run (possibly --force): no checkpoints of an earlier one
            for old in (run.out / "models").glob("*.pt"):
                old.unlink()
        with run.resumable():
            ds = load_dataset(args, args.dataset, args.seed)
            kwargs = model_kwargs_for(args.model, ds, kwargs)  # e.g. a token dataset's vocab for gpt
            result = _spawn(args, job, ds, kwargs, spawn_at, seeds, store)
            if job.is_main:  # rank 0 writes the results
                _write_results(args, argv, run, ds, kwargs, result)
    return 0


def main(argv=None) -> int:
    """``python -m modeconn.spawn [args]``; returns the exit status (0 done, 1 failed, 2 bad input,
    130/143 interrupted: see :mod:`modeconn.cli.errors`)."""
    return run_command(main_, argv)


if __name__ == "__main__":
    sys.exit(main())
