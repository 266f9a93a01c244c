"""Clean vs robust (adversarial) loss along paths between two networks (Tatro et al. 2020)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence, Tuple, Union

import numpy as np
from matplotlib.figure import Figure

from modeconn.plots._figure import save_png

__all__ = ["plot_robust_paths"]

Curve = Tuple[Sequence[float], Sequence[float]]


def plot_robust_paths(paths: Mapping[str, Mapping[str, Curve]], path: Union[str, os.PathLike],
                      title: str = "") -> Path:
    """Two panels against t: the clean test loss and the robust (PGD) test loss along several paths.

    Tatro et al. 2020's picture of the clean and the robust loss barrier between two adversarially
    trained networks: ``paths`` maps a path's name (e.g. "line", "aligned line", "aligned curve") to
    ``{"clean": (ts, loss), "robust": (ts, loss)}``; one colour per path, the same in both panels.
    (The 1-D slices of standard vs robust models are :func:`~modeconn.plots.sharpness.plot_sharpness_slices`.)
    A 1100 x 418 pixel PNG written atomically to ``path``; returns ``Path(path)``.

    Example:
        >>> import tempfile, pathlib
        >>> ts = [0.0, 0.5, 1.0]
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     plot_robust_paths({"line": {"clean": (ts, [0.1, 1.0, 0.1]), "robust": (ts, [1.0, 2.0, 1.0])}},
        ...                       pathlib.Path(tmp) / "r.png").exists()
        True
    """
    if not paths:
        raise ValueError("paths is empty: nothing to draw")
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    for i, (name, curves) in enumerate(paths.items()):
        for ax, key in zip(axes, ("clean", "robust")):
            ts, v = curves[key]
            ax.plot(ts, np.asarray(v), "-o", ms=3, color=f"C{i}", label=name)
    for ax, label in zip(axes, ("clean test loss", "robust (PGD) test loss")):
        ax.set_xlabel("t")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)
