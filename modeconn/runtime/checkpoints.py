"""Self-describing checkpoints, written atomically, read without running code.

Every file modeconn writes is a plain dictionary::

    {"format": "modeconn", "format_version": 1, "kind": "model" | "curve" | "simplex" |
     "ensemble" | "training_state", "modeconn_version": ..., "torch_version": ...,
     "arch": name, "arch_kwargs": {...}, "dataset": name, "seed": int,
     "metrics": {...}, ...kind-specific fields}

so that a command needs nothing but the file. A path ending in
``.safetensors`` is written and read as a safetensors file, the tensors in its
table and the rest in its metadata (:mod:`modeconn.runtime.safetensors_io`;
needs ``modeconn[hf]``). Other files are loaded with
``torch.load(..., weights_only=True)``: a checkpoint can hold tensors, numbers,
strings, lists and dicts, never code, and a file whose weights or state hold
NaN or Inf is refused with the tensor's name (a diverged run must not be picked
up as an endpoint or resumed). Writing goes to a temporary file in the same
directory that is renamed over the target, so a crash never leaves half a
checkpoint behind; a failed write raises :class:`WriteError` naming the file.

Example:
    >>> import tempfile
    >>> from modeconn.models import create_model
    >>> net = create_model("mlp", (1, 8, 8), 10, width=8)
    >>> path = save_model(Path(tempfile.mkdtemp()) / "m.pt", net, "mlp", {"width": 8}, (1, 8, 8), 10,
    ...                   dataset="digits", seed=0)
    >>> model, meta = load_model(path)
    >>> meta["kind"], meta["arch"], meta["dataset"]
    ('model', 'mlp', 'digits')
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
from modeconn.runtime.plain import to_plain
from modeconn.runtime.safetensors_io import decode_checkpoint, encode_checkpoint, is_safetensors

FORMAT = "modeconn"
FORMAT_VERSION = 1
KINDS = ("model", "curve", "simplex", "ensemble", "training_state")

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A file is not a readable modeconn checkpoint (or not the expected kind, or holds NaN/Inf)."""


class WriteError(OSError):
    """A file or directory could not be written: disk full, no permission, a file where a directory must be.

    An ``OSError`` whose ``filename`` is the path meant to be written (not a
    temporary file) and whose ``strerror`` is the cause; ``str()`` is one line
    such as ``cannot write runs/x/model.pt: No space left on device``.

    Example:
        >>> import errno
        >>> str(WriteError(errno.ENOSPC, "No space left on device", "runs/x/model.pt"))
        'cannot write runs/x/model.pt: No space left on device'
    """

    def __init__(self, code: Optional[int], cause: str, path: PathLike, *, action: str = "write"):
        """``code``: the errno; ``cause``: its text; ``path``: what was being written; ``action``: the verb."""
        super().__init__(code, cause, os.fspath(path))
        self.action = action

    def __str__(self) -> str:
        """One line: ``cannot <action> <path>: <cause>``."""
        return f"cannot {self.action} {self.filename}: {self.strerror}"


def _blocking_file(path: Path) -> Optional[Path]:
    """The first ancestor of ``path`` (or ``path`` itself) that exists but is not a directory."""
    for parent in reversed((path, *path.parents)):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def make_directory(path: PathLike) -> Path:
    """``mkdir -p path``; failures raise :class:`WriteError` naming the directory and the cause.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> make_directory(root / "a" / "b").is_dir()
        True
        >>> (root / "f").write_text("x")
        1
        >>> make_directory(root / "f" / "sub")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        modeconn.runtime.checkpoints.WriteError: cannot create directory .../f/sub: .../f is a file, not a directory
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocking = _blocking_file(path)
        cause = f"{blocking} is a file, not a directory" if blocking is not None else (e.strerror or str(e))
        raise WriteError(e.errno, cause, path, action="create directory") from None
    return path


def _remove_quietly(path: Optional[str]) -> None:
    """Delete a temporary file if it is there."""
    if path is not None and os.path.exists(path):
        os.unlink(path)


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``.

    A crash or interruption leaves either the old file or the new one, never
    half of one, and no temporary file. The file gets the usual permissions
    (umask applied). Missing parent directories are created.

    Raises:
        WriteError: the directory or the file cannot be written (e.g. no space
            left on the device, permission denied), also when ``write``
            turned the OSError into another exception; names ``path``, not the
            temporary file. Any other exception of ``write`` passes unchanged.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "out" / "note.txt"
        >>> atomic_write(target, lambda f: f.write(b"hello")).read_text()
        'hello'
    """
    path = Path(path)
    make_directory(path.parent)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        _remove_quietly(tmp)
        cause = _os_error_behind(e)
        if cause is None:
            raise
        raise WriteError(cause.errno, cause.strerror or str(cause), path) from e
    return path


def _os_error_behind(e: BaseException) -> Optional[OSError]:
    """The OSError that ``e`` is or arose from, if any.

    ``torch.save`` meeting a full disk raises a RuntimeError ("unexpected
    pos") while handling the OSError of the failed write; the OSError is the
    cause worth reporting. Interruptions (non-``Exception``) are never a write error.
    """
    seen = set()
    while isinstance(e, Exception) and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`; a ``.safetensors`` path gets a safetensors file
    (:mod:`modeconn.runtime.safetensors_io`, no pickle)."""
    if is_safetensors(path):
        data = encode_checkpoint(obj)
        return atomic_write(path, lambda f: f.write(data))
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path: PathLike, kind: str, **fields: Any) -> Path:
    """Write a self-describing checkpoint of the given kind (atomic).

    The header (format, version, kind, modeconn and torch versions) is added
    to ``fields``; everything is reduced to plain data (tensors kept) so that
    :func:`load_checkpoint` reads it with ``weights_only=True``.

    Raises:
        ValueError: unknown ``kind``.
        WriteError: the file cannot be written.

    Example:
        >>> import tempfile
        >>> path = save_checkpoint(Path(tempfile.mkdtemp()) / "s.pt", "ensemble", members=["a.pt"])
        >>> load_checkpoint(path, kind="ensemble")["members"]
        ['a.pt']
    """
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
    return atomic_save(to_plain(payload, keep_tensors=True), path)


def _read_checkpoint_file(path: Path, map_location) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a CheckpointError naming the file."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    try:
        if is_safetensors(path):
            return decode_checkpoint(path)
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


def _first_non_finite(obj: Any, name: str = "") -> Optional[Tuple[str, int, int]]:
    """(name, count, size) of the first floating tensor in ``obj`` holding NaN or Inf values, else None."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            bad = int(obj.numel() - torch.isfinite(obj).sum())
            if bad:
                return name, bad, obj.numel()
        return None
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        found = _first_non_finite(value, f"{name}.{key}" if name else str(key))
        if found is not None:
            return found
    return None


def check_finite_tensors(path: PathLike, obj: Any) -> None:
    """Refuse a loaded checkpoint whose weights or state hold NaN or Inf (a diverged or damaged run).

    Tensors are named by their key path, a model's weights by their
    state-dict key (``layers.0.weight``), other fields by the path from the
    top (``optimizer.state.0.momentum_buffer``).

    Raises:
        CheckpointError: names ``path``, the tensor and how many of its values are not finite.

    Example:
        >>> check_finite_tensors("ok.pt", {"state_dict": {"w": torch.ones(2)}})
        >>> bad = {"state_dict": {"layers.0.weight": torch.tensor([1.0, float("nan")])}}
        >>> check_finite_tensors("bad.pt", bad)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        modeconn.runtime.checkpoints.CheckpointError: bad.pt: tensor 'layers.0.weight' has 1 NaN/Inf value (of 2); ...
    """
    found = _first_non_finite(obj)
    if found is None:
        return
    name, bad, size = found
    if name.startswith("state_dict."):
        name = name[len("state_dict."):]
    raise CheckpointError(f"{path}: tensor {name!r} has {bad} NaN/Inf value{'s' if bad > 1 else ''} (of {size}); "
                          "refusing a diverged or damaged checkpoint")


def load_checkpoint(path: PathLike, kind: Optional[str] = None, map_location="cpu") -> dict:
    """Load a modeconn checkpoint; check its kind if ``kind`` is given (see the module example).

    Raises:
        CheckpointError: the file is missing, unreadable, pickles Python
            objects, is not a modeconn checkpoint or not of ``kind``, or holds
            a tensor with NaN/Inf values (named in the message).

    Example:
        >>> import tempfile
        >>> path = save_checkpoint(Path(tempfile.mkdtemp()) / "e.pt", "ensemble", members=["a.pt", "b.pt"])
        >>> ckpt = load_checkpoint(path)
        >>> ckpt["kind"], ckpt["members"]
        ('ensemble', ['a.pt', 'b.pt'])
        >>> load_checkpoint(path, kind="model")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        modeconn.runtime.checkpoints.CheckpointError: .../e.pt: is a 'ensemble' checkpoint, expected 'model'
    """
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
    check_finite_tensors(path, obj)
    return obj


def load_state_dict(source: Union[PathLike, Mapping[str, torch.Tensor], nn.Module]) -> dict:
    """State dict from a module, a mapping, a modeconn model checkpoint or a plain state-dict file.

    A file is checked like :func:`load_checkpoint` (NaN/Inf weights are refused); a module or a
    mapping is returned as it is.

    Example:
        >>> import tempfile
        >>> net = nn.Linear(2, 1)
        >>> path = Path(tempfile.mkdtemp()) / "plain.pt"
        >>> torch.save(net.state_dict(), path)   # a plain state-dict file, not a modeconn checkpoint
        >>> state = load_state_dict(path)
        >>> sorted(state), torch.equal(state["weight"], net.weight)
        (['bias', 'weight'], True)
    """
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    obj = _read_checkpoint_file(path, "cpu")
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if obj.get("kind") != "model":
            raise CheckpointError(f"{path}: is a {obj.get('kind')!r} checkpoint, expected a model")
        check_finite_tensors(path, obj)
        return obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        check_finite_tensors(path, obj)
        return obj
    raise CheckpointError(f"{path}: neither a modeconn model checkpoint nor a state dict of tensors")


def save_model(path: PathLike, model: nn.Module, arch: str, arch_kwargs: Mapping,
               input_shape, num_classes: int, dataset: Optional[str] = None,
               seed: Optional[int] = None, metrics: Optional[Mapping] = None, **extra) -> Path:
    """Write an endpoint-model checkpoint that rebuilds itself with :func:`load_model` (module example).

    ``arch``, ``arch_kwargs``, ``input_shape`` and ``num_classes`` are what
    :func:`modeconn.models.create_model` needs; ``extra`` fields are stored as
    they are (history, config, run info...).

    Example:
        >>> import tempfile
        >>> from modeconn.models import create_model
        >>> net = create_model("mlp", (2,), 3, width=4)
        >>> path = save_model(Path(tempfile.mkdtemp()) / "m.pt", net, "mlp", {"width": 4}, (2,), 3,
        ...                   metrics={"acc": 0.5}, notes="first run")
        >>> ckpt = load_checkpoint(path, kind="model")
        >>> ckpt["input_shape"], ckpt["metrics"], ckpt["notes"]
        ([2], {'acc': 0.5}, 'first run')
    """
    return save_checkpoint(
        path, "model", arch=arch, arch_kwargs=dict(arch_kwargs),
        input_shape=list(input_shape), num_classes=int(num_classes),
        dataset=dataset, seed=seed, metrics=dict(metrics or {}),
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra,
    )


def build_model(meta: Mapping) -> nn.Module:
    """Instantiate the architecture a checkpoint describes (weights not loaded).

    Example:
        >>> build_model({"arch": "mlp", "arch_kwargs": {"width": 4}, "input_shape": [1, 8, 8],
        ...              "num_classes": 10}).layers[0].out_features
        4
    """
    from modeconn.models import create_model

    return create_model(meta["arch"], tuple(meta["input_shape"]), meta["num_classes"],
                        **meta.get("arch_kwargs", {}))


def load_model(path: PathLike, map_location="cpu") -> Tuple[nn.Module, dict]:
    """Rebuild the model stored in a 'model' checkpoint; returns (model, metadata) (module example).

    Raises:
        CheckpointError: as :func:`load_checkpoint`, or the weights do not fit the architecture.

    Example:
        >>> import tempfile
        >>> from modeconn.models import create_model
        >>> net = create_model("mlp", (2,), 3, width=4)
        >>> path = save_model(Path(tempfile.mkdtemp()) / "m.pt", net, "mlp", {"width": 4}, (2,), 3)
        >>> model, meta = load_model(path)
        >>> x = torch.randn(5, 2)
        >>> torch.equal(model(x), net(x)), meta["num_classes"]
        (True, 3)
    """
    meta = load_checkpoint(path, kind="model", map_location=map_location)
    return model_from_meta(meta, str(path)), meta


def model_from_meta(meta: Mapping, source: str) -> nn.Module:
    """The architecture ``meta`` describes with its ``state_dict`` loaded; CheckpointError naming
    ``source`` when the weights do not fit."""
    model = build_model(meta)
    try:
        model.load_state_dict(meta["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{source}: weights do not fit architecture {meta['arch']!r} "
                              f"{dict(meta.get('arch_kwargs') or {})}: {str(e).splitlines()[0]}") from None
    return model


def save_described(path: PathLike, kind: str, model: Any, meta: Mapping, **extra: Any) -> Path:
    """Write ``model.describe()`` as ``<kind>_state`` of a checkpoint of ``kind`` (a curve, a simplex).

    ``meta`` must hold ``arch``, ``arch_kwargs``, ``input_shape`` and
    ``num_classes`` (how to rebuild the template); it and ``extra`` are
    stored beside. Behind ``save_curve`` and ``save_simplex``.
    """
    fields = {k: meta[k] for k in ("arch", "arch_kwargs", "input_shape", "num_classes")}
    fields.update({k: v for k, v in meta.items() if k not in fields})
    fields.update(extra)
    return save_checkpoint(path, kind, **{f"{kind}_state": model.describe()}, **fields)


def load_described(path: PathLike, kind: str, cls: Any, map_location="cpu") -> Tuple[Any, dict]:
    """(``cls.from_description(template, meta["<kind>_state"])``, metadata) of a checkpoint of ``kind``.

    Raises:
        CheckpointError: as :func:`load_checkpoint`, or the description does not fit the architecture.
    """
    meta = load_checkpoint(path, kind=kind, map_location=map_location)
    try:
        model = cls.from_description(build_model(meta), meta[f"{kind}_state"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {kind} does not fit architecture {meta.get('arch')!r}: {e}") from None
    return model, meta
