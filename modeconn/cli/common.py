"""Pieces shared by the thin commands: argument groups, devices, output files, resume."""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from modeconn._version import __version__
from modeconn.runtime import distributed
from modeconn.runtime.checkpoints import CheckpointError, atomic_save, atomic_write, load_checkpoint
from modeconn.data import DATASETS

# Test hook (documented in README, "Multiple GPUs and machines"): "N" or "N:RANK" makes the process
# (every rank, or only RANK) exit abruptly after N training steps, as a killed run would.
FAULT_ENV = "MODECONN_FAULT_AFTER_STEPS"


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """Accepts a leading ``--``: ``torchrun ... -m modeconn.X -- --start A.pt`` keeps torchrun's own
    parser from reading ``--start`` as an abbreviation of its ``--start-method``."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if args[:1] == ["--"]:
            args = args[1:]
        return super().parse_known_args(args, namespace)


def parser(prog: str, description: str, example: str) -> argparse.ArgumentParser:
    return _Parser(
        prog=f"python -m modeconn.{prog}", description=description,
        epilog=f"example:\n{example}", formatter_class=argparse.RawDescriptionHelpFormatter)


def add_data_args(p: argparse.ArgumentParser, dataset_default: Optional[str] = "digits") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=dataset_default, choices=DATASETS,
                   help="dataset (default: %(default)s)" if dataset_default else
                   "dataset (default: the one recorded in the checkpoint)")
    g.add_argument("--data-dir", default="data",
                   help="where torchvision datasets are read from (default: %(default)s)")
    g.add_argument("--download", action="store_true",
                   help="download a torchvision dataset into --data-dir (needs internet)")
    g.add_argument("--batch-size", type=int, default=64,
                   help="training mini-batch size; under torchrun the GLOBAL batch, split evenly over the "
                        "processes (must be divisible by their number) (default: %(default)s)")


def add_optim_args(p: argparse.ArgumentParser, epochs: int, lr: float, wd: float = 5e-4) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=epochs, help="training epochs (default: %(default)s)")
    g.add_argument("--lr", type=float, default=lr, help="initial learning rate of SGD (default: %(default)s)")
    g.add_argument("--wd", type=float, default=wd, help="weight decay (default: %(default)s)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    g.add_argument("--schedule", default="reference", choices=("reference", "cosine", "constant"),
                   help="learning-rate schedule: 'reference' = constant for the first half, linear decay "
                        "to 1%% at 90%%, then flat (Garipov et al.); 'cosine'; 'constant' "
                        "(default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, batch order and t samples "
                                                       "(default: %(default)s)")


def add_run_args(p: argparse.ArgumentParser, out_default: Optional[str] = None) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", default=out_default, required=out_default is None,
                   help="output directory" + (" (default: %(default)s)" if out_default else ""))
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


def setup(args: argparse.Namespace) -> distributed.DistInfo:
    """Device and processes of a command: one process, or this rank of a torchrun job.

    Sets ``args.amp`` to False on the CPU (with a one-line note on rank 0).
    """
    device_of(args.device)  # the single-process checks and messages
    joined_before = distributed.is_initialized()
    try:
        info = distributed.init_from_env(getattr(args, "backend", "auto"), args.device)
    except ValueError as e:
        raise CommandError(str(e)) from None
    if distributed.is_initialized() and not joined_before:
        _GROUP_STARTED_BY_COMMAND[0] = True  # run_command leaves it at the end
    if getattr(args, "amp", False) and info.device.type != "cuda":
        if info.is_main:
            print("note: --amp (bf16 autocast) applies to CUDA devices; running in float32 on the CPU")
        args.amp = False
    return info


_GROUP_STARTED_BY_COMMAND = [False]


def train_loader(ds, args: argparse.Namespace, info: distributed.DistInfo):
    """This rank's share of every global batch of ``--batch-size`` (the whole batch in one process)."""
    try:
        per_rank = distributed.per_rank_batch(args.batch_size, info.world_size)
    except ValueError as e:
        raise CommandError(str(e)) from None
    return ds.train_loader(per_rank, seed=args.seed, rank=info.rank, world_size=info.world_size).to(info.device)


def add_resume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT/resume.pt (same arguments)")
    p.add_argument("--force", action="store_true", help="start over, replacing an earlier run in OUT")


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CommandError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: CUDA is not available on this machine")
    return dev


def progress(total: int, desc: str, disable: bool = False):
    """A tqdm bar, shown on rank 0 only."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=disable or not distributed.is_main(), dynamic_ncols=True,
               leave=False)
    fault = os.environ.get(FAULT_ENV)
    if fault:
        steps, _, rank = fault.partition(":")
        if not rank or int(rank) == distributed.get_rank():
            return _FaultyProgress(bar, int(steps))
    return bar


class _FaultyProgress:
    """A progress bar that ends the process abruptly after ``steps`` updates (the test hook FAULT_ENV)."""

    def __init__(self, bar, steps: int):
        self._bar, self._left = bar, steps

    def update(self, n: int = 1):
        self._bar.update(n)
        self._left -= n
        if self._left <= 0:
            print(f"{FAULT_ENV}: rank {distributed.get_rank()} exits now", file=sys.stderr, flush=True)
            os._exit(17)

    def __getattr__(self, name):
        return getattr(self._bar, name)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return _plain(obj.detach().cpu().tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, obj: Any) -> Path:
    """Atomic JSON write (non-finite floats become null)."""
    text = json.dumps(_plain(obj), indent=2) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


def write_csv(path: Path, columns: Mapping[str, Sequence]) -> Path:
    """Atomic CSV write, one column per key."""
    buf = io.StringIO()
    w = csv.writer(buf)
    names = list(columns)
    w.writerow(names)
    for row in zip(*[columns[n] for n in names]):
        w.writerow([f"{v:.6g}" if isinstance(v, (float, np.floating)) else v for v in row])
    return atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def run_info(argv: Optional[Sequence[str]]) -> Dict[str, Any]:
    """The command line and versions, recorded in every result file."""
    return {"argv": list(sys.argv[:1]) + list(argv if argv is not None else sys.argv[1:]),
            "modeconn": __version__, "torch": str(torch.__version__), "numpy": np.__version__,
            "python": platform.python_version(), "processes": distributed.get_world_size()}


def resume_or_start(out: Path, config: Mapping[str, Any], resume: bool, force: bool,
                    final_name: str) -> Optional[dict]:
    """Check the output directory; return the training state to resume from, or None.

    A run directory is never overwritten silently: an earlier run needs
    ``--resume`` (same configuration) or ``--force``.
    """
    state_path = out / "resume.pt"
    if resume:
        if not state_path.exists():
            raise CommandError(f"--resume: {state_path} does not exist; nothing to resume")
        try:
            state = load_checkpoint(state_path, kind="training_state")
        except CheckpointError as e:
            raise CommandError(str(e)) from None
        old = state.get("config", {})
        diff = [k for k in config if k in old and old[k] != config[k] and k not in ("device",)]
        if diff:
            raise CommandError("--resume: arguments differ from the interrupted run: " + ", ".join(
                f"{k}={config[k]!r} (was {old[k]!r})" for k in diff))
        return state
    if not force and (state_path.exists() or (out / final_name).exists()):
        raise CommandError(f"{out} already holds a run; pass --resume to continue it or --force to start over")
    return None


def epoch_saver(out: Path, config: Mapping[str, Any], bar=None) -> Callable[[dict, dict], None]:
    """``on_epoch_end`` callback: write the resumable state and the history (atomic; rank 0 only)."""

    def save(record: dict, state: dict) -> None:
        if not distributed.is_main():
            return
        atomic_save({"format": "modeconn", "format_version": 1, "kind": "training_state",
                     "config": dict(config), **state}, out / "resume.pt")
        write_json(out / "history.json", state["history"])
        if bar is not None:
            bar.set_postfix(epoch=record["epoch"], loss=f"{record['loss']:.4f}",
                            acc=f"{record['acc']:.3f}", lr=f"{record['lr']:.2g}")

    return save


def run_command(main_fn: Callable[[Optional[Sequence[str]]], int], argv=None) -> int:
    """Call a command body; turn expected errors into one line and exit status 2."""
    try:
        return main_fn(argv) or 0
    except (CommandError, CheckpointError, FileNotFoundError, ValueError) as e:
        rank = f"[rank {distributed.get_rank()}] " if distributed.active() else ""
        print(f"{rank}error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; rerun with --resume to continue from the last finished epoch", file=sys.stderr)
        return 130
    finally:
        if _GROUP_STARTED_BY_COMMAND[0]:  # a group the caller had joined stays
            _GROUP_STARTED_BY_COMMAND[0] = False
            distributed.cleanup()


def share_name_with(module_name: str, function: Callable) -> None:
    """Let a command module and the library function of the same name coexist.

    ``python -m modeconn.fge`` needs a module ``modeconn.fge``, while the API
    has ``modeconn.fge(...)``. Importing the command module rebinds the
    package attribute to the module; making that module callable (it calls
    the library function) keeps ``modeconn.fge(...)`` working either way.
    """
    import types

    class _CommandModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return function(*args, **kwargs)

    sys.modules[module_name].__class__ = _CommandModule
