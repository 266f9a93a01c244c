"""The files a command writes besides checkpoints: JSON, CSV and ``.npz``, every one atomic.

Each goes through :func:`modeconn.runtime.checkpoints.atomic_write` (a
temporary file renamed over the target): an interrupted or failed write leaves
the old file or none, never half of one, and a failure is a ``WriteError``
naming the file. Results become plain data through
:func:`modeconn.runtime.plain.to_plain` (non-finite floats are JSON ``null``).
"""
from __future__ import annotations

import csv
import io
import json
import platform
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from modeconn._version import __version__
from modeconn.runtime import distributed
from modeconn.runtime.checkpoints import atomic_write
from modeconn.runtime.plain import to_plain


def write_json(path: Path, obj: Any) -> Path:
    """``obj`` as indented JSON (non-finite floats become null).

    Example:
        >>> import tempfile
        >>> path = write_json(Path(tempfile.mkdtemp()) / "r.json", {"loss": float("nan"), "ts": (0.0, 1.0)})
        >>> json.loads(path.read_text())
        {'loss': None, 'ts': [0.0, 1.0]}
    """
    text = json.dumps(to_plain(obj), indent=2) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


def write_csv(path: Path, columns: Mapping[str, Sequence]) -> Path:
    """One column per key, a header row of the keys; floats with 6 significant digits."""
    buf = io.StringIO()
    w = csv.writer(buf)
    names = list(columns)
    w.writerow(names)
    for row in zip(*[columns[n] for n in names]):
        w.writerow([f"{v:.6g}" if isinstance(v, (float, np.floating)) else v for v in row])
    return atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def write_npz(path: Path, arrays: Mapping[str, Any]) -> Path:
    """``np.savez_compressed`` of ``arrays``."""
    return atomic_write(path, lambda f: np.savez_compressed(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def run_info(argv: Optional[Sequence[str]]) -> Dict[str, Any]:
    """The command line and versions, recorded in every result file."""
    return {"argv": list(sys.argv[:1]) + list(argv if argv is not None else sys.argv[1:]),
            "modeconn": __version__, "torch": str(torch.__version__), "numpy": np.__version__,
            "python": platform.python_version(), "processes": distributed.get_world_size()}


def bn_note(bn_recomputed: bool, has_bn: bool) -> str:
    """How BatchNorm was treated at the evaluated points, for the closing line of a grid command."""
    if not has_bn:
        return "no BatchNorm"
    return "BN statistics " + ("recomputed per point" if bn_recomputed else "kept (--no-bn-recompute)")
