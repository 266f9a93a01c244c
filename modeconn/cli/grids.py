"""Pieces shared by ``python -m modeconn.landscape`` and ``python -m modeconn.plane``:
ranges, data flags, atomic ``.npz`` files, partial grids and ``--resume``."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from modeconn.cli import common as _cli
from modeconn.runtime.checkpoints import atomic_write
from modeconn.data import DATASETS, TensorLoader, get_dataset
from modeconn.geometry.grid import GridResult

_RANGE = re.compile(r"^\s*[-+]?[\d.eE+-]*\s*:\s*[-+]?[\d.eE+-]*\s*$")


def parse_range(text: str, flag: str) -> Tuple[float, float]:
    """'-1:1' -> (-1.0, 1.0)."""
    lo, sep, hi = str(text).partition(":")
    try:
        if not sep:
            raise ValueError
        a, b = float(lo), float(hi)
    except ValueError:
        raise _cli.CommandError(f"{flag} {text!r}: expected LO:HI, e.g. {flag} -1:1") from None
    if not (np.isfinite(a) and np.isfinite(b)) or not a < b:
        raise _cli.CommandError(f"{flag} {text!r}: need finite LO < HI")
    return a, b


def join_negative_values(argv: Optional[Sequence[str]], flags: Sequence[str]) -> List[str]:
    """Let ``--range -1:1`` through argparse (it takes ``-1:1`` for an option): ``--range=-1:1``."""
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


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, choices=DATASETS,
                   help="dataset (default: the one recorded in the checkpoint)")
    g.add_argument("--data-dir", default="data",
                   help="where torchvision datasets are read from (default: %(default)s)")
    g.add_argument("--download", action="store_true",
                   help="download a torchvision dataset into --data-dir (needs internet)")
    g.add_argument("--split", default="both", choices=("train", "test", "both"),
                   help="which data the loss and accuracy are measured on; BN statistics always use the "
                        "training data (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=1024,
                   help="evaluation batch size, also the batch of the BN-statistics pass "
                        "(default: %(default)s)")


def add_grid_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--no-bn-recompute", action="store_true",
                   help="keep the checkpoint's BatchNorm statistics at every point instead of recomputing "
                        "them per point over the training data (the loss-landscape reference does this; it "
                        "distorts BN networks away from the checkpoint). No effect without BN.")
    g.add_argument("--points-per-pass", type=int, default=8,
                   help="grid points evaluated together in one pass over the data (vmap over stacked "
                        "weights; memory grows with it) (default: %(default)s)")
    g.add_argument("--hessian", action="store_true",
                   help="also compute the Hessian's extreme eigenvalues λmax, λmin and |λmin/λmax| "
                        "(Li et al.'s convexity map) at every grid point, over --hessian-samples training "
                        "samples. Expensive: tens of Hessian-vector products per point; use a coarse grid.")
    g.add_argument("--hessian-samples", type=int, default=512,
                   help="training samples (the first N) the Hessian is averaged over (default: %(default)s)")
    g.add_argument("--hessian-tol", type=float, default=1e-2,
                   help="relative accuracy of the Lanczos eigenvalues (default: %(default)s)")


def add_resume_args(p: argparse.ArgumentParser, partial: str) -> None:
    g = p.add_argument_group("resume")
    g.add_argument("--resume", action="store_true",
                   help=f"continue an interrupted run from OUT/{partial} (written after every finished grid "
                        "row; same arguments)")
    g.add_argument("--force", action="store_true", help="start over, replacing an earlier run in OUT")


def check_positive(value: int, flag: str, minimum: int = 1) -> int:
    if value < minimum:
        raise _cli.CommandError(f"{flag} must be >= {minimum}, got {value}")
    return value


def grid_config(args, keys: Sequence[str]) -> Dict[str, Any]:
    return {k: getattr(args, k) for k in keys}


# --------------------------------------------------------------------- files
def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """``np.savez_compressed`` through :func:`modeconn.checkpoint.atomic_write` (temp file + rename)."""
    return atomic_write(path, lambda f: np.savez_compressed(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def save_partial(path: Path, grid: GridResult, config: Mapping[str, Any]) -> Path:
    arrays = grid.to_arrays()
    arrays["config_json"] = np.array(json.dumps(dict(config), sort_keys=True, default=str))
    return save_npz(path, arrays)


def start_or_resume(out: Path, partial: str, final: str, config: Mapping[str, Any], resume: bool,
                    force: bool) -> Optional[GridResult]:
    """Check the output directory; return the partial grid to continue, or None.

    An earlier run is never overwritten silently: it needs ``--resume``
    (same arguments) or ``--force``.
    """
    ppath = out / partial
    if resume:
        if not ppath.exists():
            hint = f" ({out / final} is there: that run finished)" if (out / final).exists() else ""
            raise _cli.CommandError(f"--resume: {ppath} does not exist; nothing to resume{hint}")
        try:
            with np.load(ppath, allow_pickle=False) as z:
                old = json.loads(str(z["config_json"]))
                grid = GridResult.from_arrays(dict(z))
        except (OSError, ValueError, KeyError) as e:
            raise _cli.CommandError(f"--resume: {ppath} is not a readable partial grid: {e}") from None
        new = json.loads(json.dumps(dict(config), sort_keys=True, default=str))
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if diff:
            raise _cli.CommandError("--resume: arguments differ from the interrupted run: " + ", ".join(
                f"{k}={new.get(k)!r} (was {old.get(k)!r})" for k in diff))
        return grid
    if not force and (ppath.exists() or (out / final).exists()):
        raise _cli.CommandError(f"{out} already holds a run; pass --resume to continue it or --force to start over")
    return None


def finish(out: Path, partial: str) -> None:
    p = out / partial
    if p.exists():
        p.unlink()


# ---------------------------------------------------------------------- data
def loaders(meta: Mapping[str, Any], args, device, seed: Optional[int] = None):
    """(dataset, train_loader or None, test_loader or None, bn_loader) for a checkpoint's dataset."""
    name = args.dataset or meta.get("dataset")
    if name is None:
        raise _cli.CommandError("the checkpoint names no dataset; pass --dataset")
    check_positive(args.batch_size, "--batch-size")
    if seed is None:  # only synthetic sets (moons, spirals) depend on it; digits' split is fixed
        seed = meta.get("dataset_seed", meta.get("seed")) or 0
    ds = get_dataset(name, args.data_dir, args.download, seed=seed)
    if tuple(ds.input_shape) != tuple(meta.get("input_shape", ds.input_shape)):
        raise _cli.CommandError(f"dataset {name!r} has inputs of shape {tuple(ds.input_shape)}, the checkpoint's "
                                f"architecture expects {tuple(meta['input_shape'])}")
    train = ds.eval_loader("train", args.batch_size).to(device)
    test = ds.eval_loader("test", args.batch_size).to(device)
    return (ds, train if args.split in ("train", "both") else None,
            test if args.split in ("test", "both") else None, train)


def hessian_loader(ds, args, device) -> TensorLoader:
    n = check_positive(args.hessian_samples, "--hessian-samples")
    return TensorLoader(ds.x_train[:n], ds.y_train[:n], args.batch_size, transform=ds.eval_transform).to(device)


def bn_note(grid: GridResult, has_bn: bool) -> str:
    if not has_bn:
        return "no BatchNorm"
    return "BN statistics " + ("recomputed per point" if grid.bn_recomputed else "kept (--no-bn-recompute)")


def interrupted(out: Path, partial: str) -> int:
    msg = "\ninterrupted; rerun with --resume to continue from the last finished row"
    if (out / partial).exists():
        msg += f" (saved in {out / partial})"
    print(msg, file=sys.stderr)
    return 130
