"""python -m modeconn.train: train one endpoint network."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import torch

from modeconn.cli.args import (add_attack_args, add_data_args, add_model_args, add_optim_args, add_resume_args,
                               add_run_args, add_sam_args, add_scale_args, at_least, attack_config, parse_kwargs,
                               parser, sam_config)
from modeconn.cli.data import canonical_specs, data_fields, load_dataset, model_kwargs_for, train_loader
from modeconn.cli.endpoints import untrained_reason
from modeconn.cli.errors import RunFailed, run_command
from modeconn.cli.outputs import run_info
from modeconn.cli.rundir import TrainingRun
from modeconn.cli.session import Job, session
from modeconn.runtime.checkpoints import save_model
from modeconn.evaluation.model import evaluate
from modeconn.geometry.ntk import NTK_KINDS, NTKTracker
from modeconn.models import create_model
from modeconn.plots.history import plot_history
from modeconn.plots.ntk import plot_ntk
from modeconn.runtime import Hooks, Runtime
from modeconn.training.loop import train_model

EXAMPLE = """  python -m modeconn.train --dataset digits --model mlp --seed 1 --epochs 30 --out runs/mlp_a
  python -m modeconn.train --dataset digits --model convnet --model-kwargs bn=true width=16 --seed 2 --out runs/cnn_b
  python -m modeconn.train --model mynet.py:build --model-kwargs width=48 --out runs/mine   (your own model)
  python -m modeconn.train --dataset digits --model mlp --sam 0.05 --out runs/mlp_sam       # SAM (ASAM: --sam-adaptive)
  python -m modeconn.train --dataset digits --model mlp --adv pgd --eps 0.3 --steps 7 --out runs/mlp_adv
  python -m modeconn.train --dataset majority --model gpt --seed 1 --out runs/gpt_a   # vocab from the data
  python -m modeconn.train --model mlp --track-ntk 100 --out runs/mlp_ntk   # NTK distance/velocity per epoch

writes OUT/model.pt (self-describing checkpoint), OUT/history.json, OUT/history.png,
and OUT/resume.pt (state after the last finished epoch, for --resume); with --track-ntk also OUT/ntk.png.
Under torchrun (DDP) --batch-size is the global batch:
  torchrun --nproc_per_node 2 -m modeconn.train --model mlp --batch-size 128 --out runs/mlp_ddp"""


def build_parser():
    """The parser of ``python -m modeconn.train``."""
    p = parser("train", "Train an endpoint network (SGD with momentum) and save a self-describing "
               "checkpoint.", EXAMPLE)
    add_data_args(p)
    add_model_args(p)
    g = add_optim_args(p, epochs=30, lr=0.05)
    g.add_argument("--warmup", type=float, default=1.0, metavar="EPOCHS",
                   help="raise the learning rate linearly over this many epochs' steps first (0: none). Without "
                        "it a BatchNorm CNN at lr 0.05 blew up in its first steps for 2 of 8 seeds (README) "
                        "(default: %(default)s)")
    add_sam_args(p)
    n = p.add_argument_group("NTK tracking (Fort et al. 2020)")
    n.add_argument("--track-ntk", type=at_least(2), default=None, metavar="N",
                   help="after every epoch, the empirical NTK on the first N training samples: kernel distance "
                        "from the initial kernel, velocity, label alignment (history.json, ntk.png)")
    n.add_argument("--ntk-kind", choices=list(NTK_KINDS), default="trace",
                   help="trace over outputs, logit sum (cheap for many classes) or the full [N,N,K,K] kernel "
                        "(default: %(default)s)")
    add_attack_args(p, "--adv", training=True)
    add_run_args(p)
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 (the checkpoint is still written) when the trained model looks "
                        "untrained: train accuracy within 5 points of chance, or train loss >= log(classes)")
    add_resume_args(p, "resume.pt", "epoch")
    add_scale_args(p)
    return p


def _fit(args, job: Job, model, ds, run: TrainingRun, state: Optional[dict], attack=None) -> List[dict]:
    """Train ``model`` for the remaining epochs, saving the state after each; returns the history."""
    loader = train_loader(ds, args, job.info)
    bar = job.progress(args.epochs * len(loader), f"train {args.model}")
    tracker = None
    if args.track_ntk:  # the kernel of the initial weights first: before any step (also when resuming)
        x, y = next(iter(ds.eval_loader("train", batch_size=args.track_ntk, samples=args.track_ntk)))
        tracker = NTKTracker(model, x.to(job.device), y, kind=args.ntk_kind)
    history = train_model(model, loader, args.epochs, args.lr, args.wd, args.momentum, args.schedule,
                          seed=args.seed, resume=state, runtime=Runtime(job.device, args.amp, args.compile),
                          hooks=Hooks(progress=bar.update, on_epoch_end=run.epoch_saver(bar)), sam=args.sam,
                          sam_adaptive=args.sam_adaptive, sam_sparsity=args.sam_sparsity, sam_mask=args.sam_mask,
                          warmup_epochs=args.warmup, epoch_fields=tracker, adversarial=attack)
    bar.close()
    return history


def _write_results(args, argv, model, ds, kwargs: dict, config: dict, history: List[dict], device
                   ) -> Optional[str]:
    """Evaluate the trained model; write model.pt and history.png; print the metrics; return why the
    model looks untrained (None when it learned)."""
    out = Path(args.out)
    train = evaluate(model, ds.eval_loader("train").to(device))
    test = evaluate(model, ds.eval_loader("test").to(device))
    metrics = {"train_loss": train["loss"], "train_acc": train["acc"],
               "test_loss": test["loss"], "test_acc": test["acc"]}
    ckpt = save_model(out / "model.pt", model, args.model, kwargs, ds.input_shape, ds.num_classes,
                      dataset=args.dataset, dataset_seed=args.seed, seed=args.seed, metrics=metrics, history=history,
                      **data_fields(args, ds),
                      config=config, run=run_info(argv))
    plot_history(history, out / "history.png", f"{args.model} on {args.dataset}, seed {args.seed}")
    if args.track_ntk:
        plot_ntk(history, out / "ntk.png", f"NTK of {args.model} on {args.dataset}, {args.track_ntk} samples")
        last = history[-1]
        print(f"NTK: distance from init {last['ntk_distance']:.4f}, last velocity {last['ntk_velocity']:.4f}")
    print(f"train loss {train['loss']:.4f} acc {train['acc']:.4f} | "
          f"test loss {test['loss']:.4f} acc {test['acc']:.4f}")
    print(f"wrote {ckpt}, {out / 'history.json'}, {out / 'history.png'}")
    why = untrained_reason(metrics, ds.num_classes)
    if why:
        print(f"warning: the model looks untrained: {why}; lower --lr or train longer before using it as "
              "an endpoint", file=sys.stderr)
    return why


def main_(argv=None) -> int:
    """The command body (see :func:`main`)."""
    args = build_parser().parse_args(argv)
    kwargs = parse_kwargs(args.model_kwargs)
    attack = attack_config(args)
    canonical_specs(args)  # file and folder paths absolute: checkpoints rebuild from anywhere
    config = {"dataset": args.dataset, "model": args.model, "model_kwargs": kwargs, "seed": args.seed,
              "epochs": args.epochs, "lr": args.lr, "wd": args.wd, "momentum": args.momentum,
              "schedule": args.schedule, "batch_size": args.batch_size, **sam_config(args),
              **({"warmup": args.warmup} if args.warmup else {}),
              **({"track_ntk": args.track_ntk, "ntk_kind": args.ntk_kind} if args.track_ntk else {}),
              **({"adv": attack.as_dict()} if attack is not None else {})}
    with session(args) as job:
        run = TrainingRun(Path(args.out), config, "model.pt", job.is_main)
        state = run.start(args.resume, args.force)
        with run.resumable():
            ds = load_dataset(args, args.dataset, args.seed)
            torch.manual_seed(args.seed)
            kwargs = model_kwargs_for(args.model, ds, kwargs)  # e.g. a token dataset's vocab for gpt
            model = create_model(args.model, ds.input_shape, ds.num_classes, **kwargs).to(job.device)
            history = _fit(args, job, model, ds, run, state, attack)
            if job.is_main:  # rank 0 evaluates and writes the results
                why = _write_results(args, argv, model, ds, kwargs, config, history, job.device)
                if why and args.strict:
                    raise RunFailed(f"--strict: the model in {args.out} looks untrained ({why})")
    return 0


def main(argv=None) -> int:
    """``python -m modeconn.train [args]``; returns the exit status (0 done, 1 failed, 2 bad input,
    130/143 interrupted: see :mod:`modeconn.cli.errors`)."""
    return run_command(main_, argv)


if __name__ == "__main__":
    sys.exit(main())
