"""python -m modeconn.train: train one endpoint network."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from modeconn.cli import common as _cli
from modeconn.runtime.checkpoints import save_model
from modeconn.data import get_dataset
from modeconn.evaluation.model import evaluate
from modeconn.models import create_model, list_models
from modeconn.plots.history import plot_history
from modeconn.runtime import Hooks, Runtime
from modeconn.training.loop import train_model

EXAMPLE = """  python -m modeconn.train --dataset digits --model mlp --seed 1 --epochs 30 --out runs/mlp_a
  python -m modeconn.train --dataset digits --model convnet --model-kwargs bn=true width=16 --seed 2 --out runs/cnn_b

writes OUT/model.pt (self-describing checkpoint), OUT/history.json, OUT/history.png,
and OUT/resume.pt (state after the last finished epoch, for --resume).
Under torchrun (DDP) --batch-size is the global batch:
  torchrun --nproc_per_node 2 -m modeconn.train --model mlp --batch-size 128 --out runs/mlp_ddp"""


def parse_kwargs(items: Optional[Sequence[str]]) -> dict:
    """['depth=3', 'bn=true', 'width_multiplier=0.5'] -> {'depth': 3, 'bn': True, ...}."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _cli.CommandError(f"--model-kwargs: {item!r} is not KEY=VALUE")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
            continue
        for conv in (int, float):
            try:
                out[key] = conv(value)
                break
            except ValueError:
                pass
        else:
            out[key] = value
    return out


def build_parser():
    p = _cli.parser("train", "Train an endpoint network (SGD with momentum) and save a self-describing "
                    "checkpoint.", EXAMPLE)
    _cli.add_data_args(p)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="mlp", help=f"architecture, one of: {', '.join(list_models())} "
                                                  "(default: %(default)s)")
    g.add_argument("--model-kwargs", nargs="*", metavar="KEY=VALUE",
                   help="architecture arguments, e.g. depth=3 width=256 bn=true")
    _cli.add_optim_args(p, epochs=30, lr=0.05)
    _cli.add_run_args(p)
    _cli.add_resume_args(p)
    _cli.add_scale_args(p)
    return p


def main_(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    info = _cli.setup(args)
    device = info.device
    kwargs = parse_kwargs(args.model_kwargs)
    config = {"dataset": args.dataset, "model": args.model, "model_kwargs": kwargs, "seed": args.seed,
              "epochs": args.epochs, "lr": args.lr, "wd": args.wd, "momentum": args.momentum,
              "schedule": args.schedule, "batch_size": args.batch_size}
    state = _cli.resume_or_start(out, config, args.resume, args.force, "model.pt")
    ds = get_dataset(args.dataset, args.data_dir, args.download, seed=args.seed)
    torch.manual_seed(args.seed)
    model = create_model(args.model, ds.input_shape, ds.num_classes, **kwargs).to(device)
    loader = _cli.train_loader(ds, args, info)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    bar = _cli.progress(args.epochs * len(loader), f"train {args.model}", args.no_progress)
    history = train_model(model, loader, args.epochs, args.lr, args.wd, args.momentum, args.schedule,
                          seed=args.seed, resume=state, runtime=Runtime(device, args.amp, args.compile),
                          hooks=Hooks(progress=bar.update, on_epoch_end=_cli.epoch_saver(out, config, bar)))
    bar.close()
    if not info.is_main:  # rank 0 evaluates and writes the results
        return 0
    train = evaluate(model, ds.eval_loader("train").to(device))
    test = evaluate(model, ds.eval_loader("test").to(device))
    metrics = {"train_loss": train["loss"], "train_acc": train["acc"],
               "test_loss": test["loss"], "test_acc": test["acc"]}
    ckpt = save_model(out / "model.pt", model, args.model, kwargs, ds.input_shape, ds.num_classes,
                      dataset=args.dataset, dataset_seed=args.seed, seed=args.seed, metrics=metrics, history=history,
                      config=config, run=_cli.run_info(argv))
    plot_history(history, out / "history.png", f"{args.model} on {args.dataset}, seed {args.seed}")
    print(f"train loss {train['loss']:.4f} acc {train['acc']:.4f} | "
          f"test loss {test['loss']:.4f} acc {test['acc']:.4f}")
    print(f"wrote {ckpt}, {out / 'history.json'}, {out / 'history.png'}")
    return 0


def main(argv=None) -> int:
    return _cli.run_command(main_, argv)


if __name__ == "__main__":
    sys.exit(main())
