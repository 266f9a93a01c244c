"""The commands' arguments: the parser factory and the flag groups several commands share."""
from __future__ import annotations

import argparse
import math
import re
import sys
from typing import Callable, List, Optional, Sequence, Tuple

from modeconn.cli.errors import EXIT_STATUS, CommandError
from modeconn.data import DATASETS
from modeconn.models import list_models
from modeconn.runtime import distributed

_RANGE = re.compile(r"^\s*[-+]?[\d.eE+-]*\s*:\s*[-+]?[\d.eE+-]*\s*$")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one-line :class:`CommandError` (exit status 2),
    and which accepts a leading ``--``.

    No modeconn flag is a prefix of a torchrun flag (``tests/test_house.py`` checks it), so
    ``torchrun ... -m modeconn.<command> FLAGS`` needs no ``--``; one given anyway is dropped here.
    """

    def parse_known_args(self, args=None, namespace=None):
        """argparse's parsing, after dropping one leading ``--``."""
        args = list(sys.argv[1:] if args is None else args)
        if args[:1] == ["--"]:
            args = args[1:]
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        """A usage error: raise it as one line instead of printing the usage and exiting."""
        raise CommandError(f"{message} (see {self.prog} --help)")


def parser(prog: str, description: str, example: str) -> argparse.ArgumentParser:
    """The parser of ``python -m modeconn.<prog>``: the description, then the example and exit statuses."""
    return _Parser(prog=f"python -m modeconn.{prog}", description=description,
                   epilog=f"example:\n{example}\n\n{EXIT_STATUS}",
                   formatter_class=argparse.RawDescriptionHelpFormatter)


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= minimum`` (a smaller one is a one-line usage error).

    Example:
        >>> p = parser("demo", "d", "e")
        >>> _ = p.add_argument("--num-points", type=at_least(2), default=21)
        >>> p.parse_args(["--num-points", "5"]).num_points
        5
        >>> p.parse_args(["--num-points", "1"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        modeconn.cli.errors.CommandError: argument --num-points: need at least 2, got 1 (see ... --help)
    """

    def parse(text: str) -> int:
        """``text`` as an integer of at least ``minimum``."""
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"need at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def zero_or_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: 0 (the step is skipped) or an integer ``>= minimum``.

    Example:
        >>> p = parser("demo", "d", "e")
        >>> _ = p.add_argument("--num-points", type=zero_or_at_least(2), default=21)
        >>> p.parse_args(["--num-points", "0"]).num_points
        0
        >>> p.parse_args(["--num-points", "1"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        modeconn.cli.errors.CommandError: argument --num-points: need 0 or at least 2, got 1 (see ... --help)
    """
    positive = at_least(minimum)

    def parse(text: str) -> int:
        """``text`` as 0 or an integer of at least ``minimum``."""
        if text.strip() == "0":
            return 0
        try:
            return positive(text)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(str(e).replace("need at least", "need 0 or at least")) from None

    parse.__name__ = f"0 or integer >= {minimum}"
    return parse


def add_bn_samples_arg(g) -> None:
    """--bn-samples: BatchNorm statistics from a seeded random subset of the training data."""
    g.add_argument("--bn-samples", type=at_least(1), default=None, metavar="N",
                   help="estimate BatchNorm statistics at every point from N random training samples "
                        "(seeded; default: all of them, exact); ignored by models without BatchNorm")


def add_data_args(p: argparse.ArgumentParser, dataset_default: Optional[str] = "digits",
                  evaluation: bool = False, split: bool = False, title: str = "data") -> None:
    """--dataset, --data-dir, --download, --batch-size (training or evaluation batches), optionally --split."""
    g = p.add_argument_group(title)
    g.add_argument("--dataset", default=dataset_default, metavar="NAME|SPEC",
                   help=f"dataset: one of {', '.join(DATASETS)}, or imagefolder:PATH (PATH/train, PATH/val), "
                        "pkg.module:factory, file.py:factory (factory(seed) -> (x_train, y_train, x_test, y_test) "
                        "or (train_set, test_set)), text:PATH (a text file or a directory of them, next-token "
                        "blocks; needs modeconn[hf] for a model directory's tokenizer) "
                        + ("(default: %(default)s)" if dataset_default else
                                                        "(default: the one recorded in the checkpoint)"))
    g.add_argument("--data-dir", default=None,
                   help="where torchvision datasets are read from (default: the directory recorded in the "
                        "checkpoint when it exists, else ./data)")
    g.add_argument("--download", action="store_true",
                   help="download a torchvision dataset into --data-dir (needs internet)")
    g.add_argument("--image-size", type=at_least(8), default=32,
                   help="imagefolder: images are cropped/resized to this size (default: %(default)s; later "
                        "commands use the size recorded in the checkpoint)")
    g.add_argument("--block-size", type=at_least(1), default=None,
                   help="text:PATH: tokens per sample (default: the size recorded in the checkpoint, else 64)")
    g.add_argument("--workers", type=at_least(0), default=0,
                   help="DataLoader worker processes for streamed datasets (imagefolder, (train_set, test_set) "
                        "factories) (default: %(default)s)")
    if split:
        g.add_argument("--split", default="both", choices=("train", "test", "both"),
                       help="which data the loss and accuracy are measured on; BN statistics always use the "
                            "training data (default: %(default)s)")
    if evaluation:
        g.add_argument("--batch-size", type=at_least(1), default=1024,
                       help="evaluation batch size, also the batch of the BN-statistics pass "
                            "(default: %(default)s)")
        add_bn_samples_arg(g)
    else:
        g.add_argument("--batch-size", type=at_least(1), default=64,
                       help="training mini-batch size; under torchrun the GLOBAL batch, split evenly over the "
                            "processes (must be divisible by their number) (default: %(default)s)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model and --model-kwargs (parsed by :func:`parse_kwargs`) of the commands that build a network."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="mlp", help=f"architecture: one of {', '.join(list_models())}, or your "
                   "own: pkg.module:factory, path/file.py:factory (factory(input_shape, num_classes, **kwargs) "
                   "-> nn.Module), torchvision:NAME, timm:NAME (default: %(default)s)")
    g.add_argument("--model-kwargs", nargs="*", metavar="KEY=VALUE",
                   help="architecture arguments, e.g. depth=3 width=256 bn=true")


def add_endpoint_model_args(p: argparse.ArgumentParser) -> None:
    """--model and --model-kwargs of the commands that read endpoints: only for plain state dicts."""
    g = p.add_argument_group("endpoints given as plain state dicts (.pt / .safetensors without modeconn metadata)")
    g.add_argument("--model", default=None, metavar="NAME|SPEC",
                   help="the architecture of plain state-dict endpoints: a zoo name or a spec as in train "
                        "(file.py:factory, pkg.module:factory, torchvision:NAME, timm:NAME); needs --dataset too. "
                        "modeconn checkpoints and model directories describe themselves")
    g.add_argument("--model-kwargs", nargs="*", metavar="KEY=VALUE", help="its arguments, e.g. width=64")


def parse_kwargs(items: Optional[Sequence[str]]) -> dict:
    """--model-kwargs: ['depth=3', 'bn=true', 'width_multiplier=0.5'] -> {'depth': 3, 'bn': True, ...}.

    Example:
        >>> parse_kwargs(["depth=3", "bn=true", "width_multiplier=0.5", "act=relu"])
        {'depth': 3, 'bn': True, 'width_multiplier': 0.5, 'act': 'relu'}
    """
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandError(f"--model-kwargs: {item!r} is not KEY=VALUE")
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


def add_optim_args(p: argparse.ArgumentParser, epochs: int, lr: float, wd: float = 5e-4):
    """--epochs, --lr, --wd, --momentum, --schedule, --seed of the SGD training commands; returns the group."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=at_least(1), default=epochs, help="training epochs (default: %(default)s)")
    g.add_argument("--lr", type=float, default=lr, help="initial learning rate of SGD (default: %(default)s)")
    g.add_argument("--wd", type=float, default=wd, help="weight decay (default: %(default)s)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    g.add_argument("--schedule", default="reference", choices=("reference", "cosine", "constant"),
                   help="learning-rate schedule: 'reference' = constant for the first half, linear decay "
                        "to 1%% at 90%%, then flat (Garipov et al.); 'cosine'; 'constant' "
                        "(default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, batch order and t samples "
                                                       "(default: %(default)s)")
    return g


def add_run_args(p: argparse.ArgumentParser, out_default: Optional[str] = None, out_required: bool = True,
                 out_help: str = "output directory", out_metavar: Optional[str] = None) -> None:
    """--out (required unless it has a default or ``out_required`` is False), --device, --no-progress."""
    g = p.add_argument_group("run")
    g.add_argument("--out", default=out_default, required=out_required and out_default is None,
                   metavar=out_metavar, help=out_help + (" (default: %(default)s)" if out_default else ""))
    g.add_argument("--device", default="auto", help="'cpu', 'cuda', 'cuda:1' or 'auto' (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_scale_args(p: argparse.ArgumentParser, training: bool = True) -> None:
    """--backend, --amp, --compile: several processes under torchrun and the opt-in speed flags."""
    g = p.add_argument_group("scale-out (README: Multiple GPUs and machines)")
    g.add_argument("--backend", default="auto", choices=distributed.BACKENDS,
                   help="torch.distributed backend when started by torchrun: auto = nccl on CUDA, gloo on "
                        "the CPU (default: %(default)s); ignored in a single process")
    g.add_argument("--amp", action="store_true",
                   help="bf16 autocast for the forward passes on CUDA (on the CPU a note is printed and the "
                        "flag is ignored)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the " + ("model / curve step" if training else "metric passes") +
                        " (off by default; the first steps are slow while it compiles)")


def add_resume_args(p: argparse.ArgumentParser, state_file: str, unit: str) -> None:
    """--resume and --force: continue from ``OUT/state_file`` (saved after every ``unit``) or start over."""
    g = p.add_argument_group("resume")
    g.add_argument("--resume", action="store_true",
                   help=f"continue an interrupted run from OUT/{state_file} (written after every finished "
                        f"{unit}; same arguments)")
    g.add_argument("--force", action="store_true", help="start over, replacing an earlier run in OUT")


def add_grid_args(p: argparse.ArgumentParser) -> None:
    """How the grid commands (plane, landscape) evaluate a point: BN, batching, Hessian."""
    g = p.add_argument_group("evaluation")
    g.add_argument("--no-bn-recompute", action="store_true",
                   help="keep the checkpoint's BatchNorm statistics at every point instead of recomputing "
                        "them per point over the training data (the loss-landscape reference does this; it "
                        "distorts BN networks away from the checkpoint). No effect without BN.")
    g.add_argument("--points-per-pass", type=at_least(1), default=8,
                   help="grid points evaluated together in one pass over the data (vmap over stacked "
                        "weights; memory grows with it); where the points run one after another (CPU "
                        "convolutions, larger dense nets) a whole 2-D row shares a pass (default: %(default)s)")
    g.add_argument("--hessian", action="store_true",
                   help="also compute the Hessian's extreme eigenvalues λmax, λmin and |λmin/λmax| "
                        "(Li et al.'s convexity map) at every grid point, over --hessian-samples training "
                        "samples. Expensive: tens of Hessian-vector products per point; use a coarse grid.")
    g.add_argument("--hessian-samples", type=at_least(1), default=512,
                   help="training samples (the first N) the Hessian is averaged over (default: %(default)s)")
    g.add_argument("--hessian-tol", type=float, default=1e-2,
                   help="relative accuracy of the Lanczos eigenvalues (default: %(default)s)")


def parse_range(text: str, flag: str) -> Tuple[float, float]:
    """``'-1:1'`` -> ``(-1.0, 1.0)``; anything but finite ``LO < HI`` is a :class:`CommandError`.

    Example:
        >>> parse_range("-0.5:1.5", "--range")
        (-0.5, 1.5)
    """
    lo, sep, hi = str(text).partition(":")
    try:
        if not sep:
            raise ValueError
        a, b = float(lo), float(hi)
    except ValueError:
        raise CommandError(f"{flag} {text!r}: expected LO:HI, e.g. {flag} -1:1") from None
    if not (math.isfinite(a) and math.isfinite(b)) or not a < b:
        raise CommandError(f"{flag} {text!r}: need finite LO < HI")
    return a, b


def join_negative_values(argv: Optional[Sequence[str]], flags: Sequence[str]) -> List[str]:
    """Let ``--range -1:1`` through argparse (which takes ``-1:1`` for an option): ``--range=-1:1``.

    Example:
        >>> join_negative_values(["--range", "-1:1", "--steps", "5"], ["--range"])
        ['--range=-1:1', '--steps', '5']
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in flags and i + 1 < len(argv) and argv[i + 1].startswith("-") and _RANGE.match(argv[i + 1]):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def add_sam_args(p: argparse.ArgumentParser) -> None:
    """--sam RHO and --sam-adaptive: train with SAM / ASAM (:mod:`modeconn.training.sam`)."""
    g = p.add_argument_group("sharpness-aware minimisation")
    g.add_argument("--sam", type=float, default=None, metavar="RHO",
                   help="SAM (Foret et al. 2021): each step ascends to w + RHO·g/‖g‖ and descends from w with "
                        "the gradient found there; two passes per step (typical RHO 0.05; off by default)")
    g.add_argument("--sam-adaptive", action="store_true",
                   help="ASAM (Kwon et al. 2021): the ascent scaled by |w| + 0.01 per weight, invariant to "
                        "rescaling a layer (typical RHO 0.5 to 2; needs --sam)")
    g.add_argument("--sam-sparsity", type=float, default=0.0, metavar="S",
                   help="SSAM (Mi et al. 2022): perturb only 1-S of the parameters, chosen by --sam-mask and "
                        "renewed every epoch (Mi et al.: S=0.5 keeps SAM's accuracy; needs --sam; default: 0)")
    g.add_argument("--sam-mask", choices=["fisher", "random"], default=None,
                   help="SSAM's mask: the parameters of largest Fisher information (mean squared gradient over "
                        "the last epoch's steps) or a random one (default: fisher when --sam-sparsity > 0)")


def sam_config(args: argparse.Namespace) -> dict:
    """``{"sam": RHO, "sam_adaptive": bool}`` for a run's config when --sam is given, else ``{}`` (runs without
    SAM keep the config of earlier versions, so they still resume); a bad combination is a CommandError."""
    sparse = args.sam_sparsity != 0 or args.sam_mask is not None
    if args.sam is None:
        if args.sam_adaptive or sparse:
            raise CommandError(f"{'--sam-adaptive' if args.sam_adaptive else '--sam-sparsity/--sam-mask'} "
                               "needs --sam RHO")
        return {}
    if not (args.sam > 0 and math.isfinite(args.sam)):
        raise CommandError(f"--sam {args.sam}: the radius must be a finite number > 0")
    if not 0 <= args.sam_sparsity < 1:
        raise CommandError(f"--sam-sparsity {args.sam_sparsity}: the share left unperturbed must be in [0, 1)")
    if sparse and args.sam_mask is None:
        args.sam_mask = "fisher"
    out = {"sam": args.sam, "sam_adaptive": args.sam_adaptive}
    return {**out, "sam_sparsity": args.sam_sparsity, "sam_mask": args.sam_mask} if sparse else out


def add_attack_args(p: argparse.ArgumentParser, flag: str, training: bool) -> None:
    """``flag`` (``--adv`` for training, ``--adversarial`` for evaluation) ``pgd`` with --eps, --steps,
    --adv-norm, --adv-step-size (and --adv-samples when evaluating): a
    :class:`~modeconn.evaluation.adversarial.PGD` attack, read back by :func:`attack_config`."""
    g = p.add_argument_group("adversarial (PGD, Madry et al. 2018)")
    what = ("train on PGD examples of every batch (adversarial training)" if training else
            "also the robust test loss/error along the path: PGD examples of each point's network, BN "
            "statistics recomputed on clean data first (Tatro et al. 2020)")
    g.add_argument(flag, choices=("pgd",), default=None, dest="attack", help=what)
    g.add_argument("--eps", type=float, default=None,
                   help="radius of the attack's ball, in the units of the normalised inputs (needs " + flag + ")")
    g.add_argument("--steps", type=at_least(1), default=10, help="PGD steps (default: %(default)s)")
    g.add_argument("--adv-norm", choices=("linf", "l2"), default="linf", help="ball (default: %(default)s)")
    g.add_argument("--adv-step-size", type=float, default=None,
                   help="step size α (default: 2.5·eps/steps)")
    if not training:
        g.add_argument("--adv-samples", type=at_least(1), default=None, metavar="N",
                       help="attack only the first N test samples (PGD costs steps+1 passes per point; "
                            "default: all)")


def attack_config(args: argparse.Namespace):
    """The ``PGD`` of :func:`add_attack_args`'s flags, or None without the attack flag; a bad or missing
    value is a CommandError naming the flag."""
    from modeconn.evaluation.adversarial import PGD

    if args.attack is None:
        if args.eps is not None:
            raise CommandError("--eps is the radius of a PGD attack; give --adv pgd / --adversarial pgd too")
        return None
    if args.eps is None:
        raise CommandError(f"--{args.attack} attack needs --eps (its radius)")
    try:
        return PGD(eps=args.eps, steps=args.steps, norm=args.adv_norm, step_size=args.adv_step_size)
    except ValueError as e:
        raise CommandError(f"--eps/--steps/--adv-step-size: {e}") from None
