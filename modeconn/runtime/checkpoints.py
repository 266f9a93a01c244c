"""Self-describing checkpoints, written atomically, read without running code.

Every file modeconn writes is a plain dictionary::

    {"format": "modeconn", "format_version": 1, "kind": "model" | "curve" |
     "ensemble" | "training_state", "modeconn_version": ..., "torch_version": ...,
     "arch": name, "arch_kwargs": {...}, "dataset": name, "seed": int,
     "metrics": {...}, ...kind-specific fields}

so that a command needs nothing but the file. Files are loaded with
``torch.load(..., weights_only=True)``: a checkpoint can hold tensors, numbers,
strings, lists and dicts, never code. Writing goes to a temporary file in the
same directory that is renamed over the target, so a crash never leaves half a
checkpoint behind.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from modeconn._version import __version__

FORMAT = "modeconn"
FORMAT_VERSION = 1
KINDS = ("model", "curve", "ensemble", "training_state")

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A file is not a readable modeconn checkpoint (or not the expected kind)."""


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``.

    A crash or interruption leaves either the old file or the new one, never
    half of one. The file gets the usual permissions (umask applied).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def _plain_data(obj: Any) -> Any:
    """Containers of tensors, numbers and strings only (what weights_only loading accepts)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, (int, str)) else k: _plain_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_data(v) for v in obj]
    for plain in (bool, int, float, str):  # also turns subclasses (TorchVersion) into the plain type
        if isinstance(obj, plain):
            return plain(obj)
    if obj is None:
        return None
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def save_checkpoint(path: PathLike, kind: str, **fields: Any) -> Path:
    """Write a self-describing checkpoint of the given kind (atomic)."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {KINDS}")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "modeconn_version": __version__,
        "torch_version": str(torch.__version__),
    }
    payload.update(fields)
    return atomic_save(_plain_data(payload), path)


def _read_checkpoint_file(path: Path, map_location) -> Any:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the file holds pickled Python objects, not plain "
            f"tensors and containers (a checkpoint must not run code). Detail: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated, corrupt or not a torch file): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def load_checkpoint(path: PathLike, kind: Optional[str] = None, map_location="cpu") -> dict:
    """Load a modeconn checkpoint; check its kind if ``kind`` is given."""
    path = Path(path)
    obj = _read_checkpoint_file(path, map_location)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a modeconn checkpoint (no 'format': 'modeconn' header); "
            "plain state dicts can be passed to CurveModel together with a template"
        )
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written by a newer modeconn (format {obj['format_version']} > {FORMAT_VERSION})"
        )
    if kind is not None and obj.get("kind") != kind:
        raise CheckpointError(f"{path}: is a {obj.get('kind')!r} checkpoint, expected {kind!r}")
    return obj


def load_state_dict(source: Union[PathLike, Mapping[str, torch.Tensor], nn.Module]) -> dict:
    """State dict from a module, a mapping, a modeconn model checkpoint or a plain state-dict file."""
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    obj = _read_checkpoint_file(path, "cpu")
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if obj.get("kind") != "model":
            raise CheckpointError(f"{path}: is a {obj.get('kind')!r} checkpoint, expected a model")
        return obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError(f"{path}: neither a modeconn model checkpoint nor a state dict of tensors")


def save_model(path: PathLike, model: nn.Module, arch: str, arch_kwargs: Mapping,
               input_shape, num_classes: int, dataset: Optional[str] = None,
               seed: Optional[int] = None, metrics: Optional[Mapping] = None, **extra) -> Path:
    """Write an endpoint-model checkpoint that rebuilds itself with ``load_model``."""
    return save_checkpoint(
        path, "model", arch=arch, arch_kwargs=dict(arch_kwargs),
        input_shape=list(input_shape), num_classes=int(num_classes),
        dataset=dataset, seed=seed, metrics=dict(metrics or {}),
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra,
    )


def build_model(meta: Mapping) -> nn.Module:
    """Instantiate the architecture a checkpoint describes (weights not loaded)."""
    from modeconn.models import create_model

    return create_model(meta["arch"], tuple(meta["input_shape"]), meta["num_classes"],
                        **meta.get("arch_kwargs", {}))


def load_model(path: PathLike, map_location="cpu") -> Tuple[nn.Module, dict]:
    """Rebuild the model stored in a 'model' checkpoint; returns (model, metadata)."""
    meta = load_checkpoint(path, kind="model", map_location=map_location)
    model = build_model(meta)
    try:
        model.load_state_dict(meta["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit architecture {meta['arch']!r}: {e}") from None
    return model, meta
