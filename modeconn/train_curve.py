"""python -m modeconn.train_curve: fit a low-loss curve between two endpoints."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from modeconn.cli.args import (add_attack_args, add_data_args, add_endpoint_model_args, add_optim_args,
                               add_resume_args, add_run_args, add_sam_args, add_scale_args, at_least,
                               attack_config, parser, sam_config)
from modeconn.cli.data import (bn_loader, checkpoint_dataset, data_source, dataset_name, dataset_seed, text_record,
                               train_loader)
from modeconn.cli.errors import CommandError, run_command
from modeconn.cli.outputs import run_info, write_json
from modeconn.cli.rundir import TrainingRun
from modeconn.cli.session import Job, session
from modeconn.cli.endpoints import load_endpoint
from modeconn.runtime.checkpoints import build_model
from modeconn.core.curve_model import CurveModel, save_curve
from modeconn.core.curves import make_curve
from modeconn.plots.history import plot_history
from modeconn.runtime import Hooks, Runtime
from modeconn.training.loop import fit_curve

EXAMPLE = """  python -m modeconn.train_curve --a checkpoints/digits_mlp_a.pt --b checkpoints/digits_mlp_b.pt \\
      --curve bezier --num-bends 3 --epochs 30 --out runs/curve_mlp
  (add --sam 0.05 to fit the free bends with SAM, --sam-adaptive for ASAM)
  python -m modeconn.train_curve --a A.pt --b B.pt --align pam --pam-rounds 3 --epochs 10 --out runs/pam
  (PAM: OUT/pam.json holds, per round, the barrier and the fraction of units the permutation moved)
  python -m modeconn.train_curve --a A_adv.pt --b B_adv.pt --adv pgd --eps 0.3 --steps 7 --out runs/robust_curve
  (the robust curve objective: every batch attacked by PGD at the sampled point θ(t))

writes OUT/curve.pt (self-describing: architecture, curve type, bends, which are fixed,
dataset, seed, history), OUT/history.json, OUT/history.png and OUT/resume.pt.
Then: python -m modeconn.eval_curve --ckpt OUT/curve.pt

on 4 GPUs (or CPU processes with gloo), --batch-size being the global batch:
  torchrun --nproc_per_node 4 -m modeconn.train_curve --a A.pt --b B.pt --batch-size 256 --out OUT

between two Hugging Face model directories (pip install modeconn[hf]), on a text:
  python -m modeconn.train_curve --a runs/lm_a --b runs/lm_b_aligned --dataset text:corpus.txt \
      --lr 0.1 --wd 0 --schedule cosine --out runs/lm_curve"""


def build_parser():
    """The parser of ``python -m modeconn.train_curve``."""
    p = parser("train_curve", "Fit a curve (Bezier or polygonal chain) of low loss between two trained "
               "networks: minimise the expected loss over t ~ U(0,1), one t per mini-batch.", EXAMPLE)
    g = p.add_argument_group("curve")
    g.add_argument("--a", required=True, help="checkpoint of the first endpoint (from modeconn.train)")
    g.add_argument("--b", required=True, help="checkpoint of the second endpoint")
    g.add_argument("--curve", default="bezier", choices=("bezier", "polychain"),
                   help="curve family (default: %(default)s)")
    g.add_argument("--num-bends", type=int, default=3,
                   help="bends including both endpoints; 3 = one trainable middle bend (default: %(default)s)")
    g.add_argument("--fix-start", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the start endpoint fixed (default: fixed)")
    g.add_argument("--fix-end", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the end endpoint fixed (default: fixed)")
    g.add_argument("--init", default="linear", choices=("linear", "random"),
                   help="middle bends start on the straight segment or from a fresh initialisation "
                        "(default: %(default)s)")
    g.add_argument("--align", default=None, choices=("weight", "activation", "pam"),
                   help="permute the end's neurons to match the start before fitting; pam: start from weight "
                        "matching, then --pam-rounds rounds of --epochs curve epochs and one permutation update "
                        "of the end (weight matching to the bend next to it, proximal term --pam-proximal; "
                        "Tatro et al. 2020), reporting per round how many units moved and the barrier")
    g.add_argument("--pam-rounds", type=at_least(1), default=3, help="PAM rounds (default: %(default)s)")
    g.add_argument("--pam-proximal", type=float, default=0.0, metavar="LAMBDA",
                   help="PAM's proximal weight: reward per unit left where the previous round put it, in the "
                        "units of the weights' inner products (default: %(default)s)")
    g.add_argument("--pam-points", type=at_least(2), default=11,
                   help="evenly spaced t of each round's barrier (default: %(default)s)")
    add_data_args(p, dataset_default=None)
    add_endpoint_model_args(p)
    add_optim_args(p, epochs=30, lr=0.03)
    add_sam_args(p)
    add_attack_args(p, "--adv", training=True)
    add_run_args(p)
    add_resume_args(p, "resume.pt", "epoch")
    add_scale_args(p)
    return p


def _endpoints(args) -> Tuple[dict, dict]:
    """The two endpoint checkpoints, checked to share one architecture."""
    start_meta = load_endpoint(args.a, "--a", args)
    end_meta = load_endpoint(args.b, "--b", args)
    for key in ("arch", "arch_kwargs", "input_shape", "num_classes"):
        if start_meta.get(key) != end_meta.get(key):
            raise CommandError(f"--a and --b differ in {key}: {start_meta.get(key)!r} vs "
                               f"{end_meta.get(key)!r}")
    return start_meta, end_meta


def _config(args, dataset: str) -> dict:
    """The arguments a --resume must repeat."""
    return {"start": str(args.a), "end": str(args.b), "curve": args.curve, "num_bends": args.num_bends,
            "fix_start": args.fix_start, "fix_end": args.fix_end, "init": args.init, "align": args.align,
            "dataset": dataset, "epochs": args.epochs, "lr": args.lr, "wd": args.wd,
            "momentum": args.momentum, "schedule": args.schedule, "seed": args.seed,
            "batch_size": args.batch_size, **sam_config(args), **_pam_config(args), **_attack(args)}


def _attack(args) -> dict:
    """``{"adv": PGD settings}`` with --adv pgd (the robust curve objective, ``args.attack_settings``), else ``{}``."""
    attack = args.attack_settings
    return {"adv": attack.as_dict()} if attack is not None else {}


def _pam_config(args) -> dict:
    """PAM's settings for the run config (none without --align pam, so older runs still resume)."""
    if args.align != "pam":
        return {}
    if args.resume:
        raise CommandError("--align pam cannot --resume (its rounds are not checkpointed); use --force to rerun")
    if not (math.isfinite(args.pam_proximal) and args.pam_proximal >= 0):
        raise CommandError(f"--pam-proximal {args.pam_proximal}: must be a finite number >= 0")
    return {"pam_rounds": args.pam_rounds, "pam_proximal": args.pam_proximal, "pam_points": args.pam_points}


def _end_state(args, ds, start_meta: dict, end_meta: dict, device) -> Tuple[dict, Optional[dict]]:
    """The end bend's weights: the --b checkpoint's, or (--align) permuted to match --a."""
    end_state = end_meta["state_dict"]
    alignment = None
    if args.align in ("weight", "activation"):  # pam sets the end itself (_fit_pam)
        from modeconn.alignment import align_models

        start_model, end_model = build_model(start_meta), build_model(end_meta)
        start_model.load_state_dict(start_meta["state_dict"])
        end_model.load_state_dict(end_state)
        # B (end) is permuted to line up with A (start); the training data without augmentation
        # feed activation matching (the weight method only traces the first batch's shape)
        aligned, _, report = align_models(start_model, end_model, method=args.align,
                                   loader=ds.eval_loader("train"), seed=args.seed, device=device)
        end_state = {k: v.detach().cpu() for k, v in aligned.state_dict().items()}
        alignment = {"method": args.align, "aligned": "end", "reference": str(args.a),
                     "report": report.as_dict()}
        print(f"aligned --b to --a by {args.align} matching: mean {report.metric} "
              f"{report.mean_before:.3f} -> {report.mean_after:.3f} over {len(report.groups)} groups")
    return end_state, alignment


def _build_curve(args, ds, start_meta: dict, end_meta: dict, device) -> Tuple[CurveModel, Optional[dict]]:
    """(the curve to fit between --a and the (aligned) --b, the alignment record or None)."""
    end_state, alignment = _end_state(args, ds, start_meta, end_meta, device)
    return _new_curve(args, start_meta, end_state, device), alignment


def _new_curve(args, start_meta: dict, end_state: dict, device) -> CurveModel:
    """The curve of the command's flags from --a to ``end_state``, on ``device``."""
    return CurveModel(build_model(start_meta), start_meta["state_dict"], end_state,
                      make_curve(args.curve, args.num_bends), fix_start=args.fix_start, fix_end=args.fix_end,
                      init=args.init, seed=args.seed).to(device)


def _fit(args, job: Job, curve, ds, run: TrainingRun, state: Optional[dict]) -> List[dict]:
    """Train the curve's free bends for the remaining epochs, saving the state after each."""
    loader = train_loader(ds, args, job.info)
    bar = job.progress(args.epochs * len(loader), f"fit {args.curve}({args.num_bends})")
    history = fit_curve(curve, loader, args.epochs, args.lr, args.wd, args.momentum, args.schedule,
                        seed=args.seed, resume=state, runtime=Runtime(job.device, args.amp, args.compile),
                        hooks=Hooks(progress=bar.update, on_epoch_end=run.epoch_saver(bar)), sam=args.sam,
                        sam_adaptive=args.sam_adaptive, sam_sparsity=args.sam_sparsity, sam_mask=args.sam_mask,
                        adversarial=args.attack_settings)
    bar.close()
    return history


def _fit_pam(args, job: Job, ds, start_meta: dict, end_meta: dict) -> Tuple[CurveModel, List[dict], dict]:
    """--align pam: weight matching of --b to --a, the curve to the aligned --b, then alternating curve and
    permutation steps; returns (curve, history, alignment record)."""
    from modeconn.alignment import align_models, apply_permutation, infer_permutation_spec
    from modeconn.alignment.pam import pam_fit

    start_model, end_model = build_model(start_meta), build_model(end_meta)
    start_model.load_state_dict(start_meta["state_dict"])
    end_model.load_state_dict(end_meta["state_dict"])
    spec = infer_permutation_spec(start_model, next(iter(ds.eval_loader("train")))[0][:1])
    _, perm, report = align_models(start_model, end_model, "weight", spec=spec, seed=args.seed)
    device = job.device
    curve = _new_curve(args, start_meta, apply_permutation(end_meta["state_dict"], spec, perm), device)
    loader = train_loader(ds, args, job.info)
    evals = (ds.eval_loader("train", args.batch_size).to(device), ds.eval_loader("test", args.batch_size).to(device),
             bn_loader(ds, args, device))
    bar = job.progress(args.pam_rounds * args.epochs * len(loader), "PAM")
    fit = dict(lr=args.lr, weight_decay=args.wd, momentum=args.momentum, schedule=args.schedule,
               runtime=Runtime(device, args.amp, args.compile), sam=args.sam, sam_adaptive=args.sam_adaptive,
               adversarial=args.attack_settings)
    result = pam_fit(curve, end_meta["state_dict"], spec, loader, evals, args.pam_rounds, args.epochs,
                     args.pam_proximal, initial=perm, num_points=args.pam_points, seed=args.seed, fit_kwargs=fit,
                     hooks=Hooks(progress=bar.update))
    bar.close()
    for r in result.rounds:
        print(f"PAM round {r.round}: curve test-loss barrier {r.barrier:.4f}; permutation moved "
              f"{100 * r.moved['total']:.1f}% of units; barrier with the new permutation {r.barrier_after:.4f}")
    alignment = {"method": "pam", "aligned": "end", "reference": str(args.a), "report": report.as_dict(),
                 "pam": result.as_dict()}
    if job.is_main:
        write_json(Path(args.out) / "pam.json", alignment["pam"])
        write_json(Path(args.out) / "history.json", result.history)
    return curve, result.history, alignment


def _write_results(args, argv, curve, start_meta: dict, end_meta: dict, run: TrainingRun, history: List[dict],
                   alignment: Optional[dict]) -> None:
    """curve.pt and history.png, and the closing lines."""
    out, config, dataset = run.out, run.config, run.config["dataset"]
    meta = {k: start_meta.get(k) for k in ("arch", "arch_kwargs", "input_shape", "num_classes", "data_dir",
                                           "dataset_kwargs")}
    if "hf_dtype" in start_meta:  # model-directory endpoints: their dtype and tokenizer, for points written back
        meta.update(hf_dtype=start_meta["hf_dtype"], source_dir=start_meta.get("source_dir"))
    path = save_curve(out / "curve.pt", curve, meta, dataset=dataset, dataset_seed=dataset_seed(start_meta),
                      seed=args.seed, history=history,
                      config=config, alignment=alignment, run=run_info(argv),
                      start_metrics=start_meta.get("metrics", {}), end_metrics=end_meta.get("metrics", {}))
    plot_history(history, out / "history.png", f"{args.curve}({args.num_bends}) between {args.a} and {args.b}")
    last = history[-1]
    print(f"final epoch: train loss over random t {last['loss']:.4f}, acc {last['acc']:.4f}")
    print(f"wrote {path}, {out / 'history.json'}, {out / 'history.png'}")
    print(f"next: python -m modeconn.eval_curve --ckpt {path}")


def main_(argv=None) -> int:
    """The command body (see :func:`main`)."""
    args = build_parser().parse_args(argv)
    with session(args) as job:
        start_meta, end_meta = _endpoints(args)
        dataset = dataset_name(args, start_meta, "the endpoint checkpoints")
        args.attack_settings = attack_config(args)  # None without --adv
        run = TrainingRun(Path(args.out), _config(args, dataset), "curve.pt", job.is_main)
        state = run.start(args.resume, args.force)
        with run.resumable():
            ds = checkpoint_dataset(args, start_meta, "the endpoint checkpoints")
            start_meta = {**start_meta, "data_dir": data_source(ds).get("data_dir"),  # the one read
                          "dataset_kwargs": text_record(ds) or start_meta.get("dataset_kwargs")}
            if args.align == "pam":
                curve, history, alignment = _fit_pam(args, job, ds, start_meta, end_meta)
            else:
                curve, alignment = _build_curve(args, ds, start_meta, end_meta, job.device)
                history = _fit(args, job, curve, ds, run, state)
            if job.is_main:  # rank 0 writes the results
                _write_results(args, argv, curve, start_meta, end_meta, run, history, alignment)
    return 0


def main(argv=None) -> int:
    """``python -m modeconn.train_curve [args]``; returns the exit status (see :mod:`modeconn.cli.errors`)."""
    return run_command(main_, argv)


if __name__ == "__main__":
    sys.exit(main())
