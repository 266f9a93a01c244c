"""The filter-normalised 1-D slices of several models overlaid (Li et al. 2018, Figure 3 style)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Union

import numpy as np
from matplotlib.figure import Figure

from modeconn.geometry.grid import GridResult
from modeconn.plots._figure import save_png

PathLike = Union[str, os.PathLike]

__all__ = ["plot_sharpness_slices"]


def plot_sharpness_slices(slices: Mapping[str, GridResult], path: PathLike, title: str = "") -> Path:
    """Draw every model's slice ``L(θ + a·d)`` on one pair of axes: loss (left) and accuracy (right).

    One colour per model (``slices`` maps a label to its 1-D
    :class:`~modeconn.geometry.grid.GridResult`); train solid, test dashed, as
    in Li et al.'s comparison of small- and large-batch minima. A 896 x 504
    pixel PNG written atomically to ``path``; returns ``Path(path)``.

    Example:
        >>> import tempfile, pathlib
        >>> xs = np.linspace(-1, 1, 5)
        >>> def line(c):
        ...     return GridResult(xs, None, {"train_loss": c * xs ** 2, "train_acc": 1 - 0.1 * xs ** 2}, 1, 1, False, 5)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     plot_sharpness_slices({"flat": line(1.0), "sharp": line(9.0)}, pathlib.Path(tmp) / "s.png").exists()
        True
    """
    if not slices:
        raise ValueError("slices is empty: nothing to draw")
    fig = Figure(figsize=(7.47, 4.2))
    axes = fig.subplots(1, 2)
    for k, (label, grid) in enumerate(slices.items()):
        if grid.dims != 1:
            raise ValueError(f"the slice of {label!r} is {grid.dims}-D; a 1-D slice is needed")
        for split, style in (("train", "-"), ("test", "--")):
            if f"{split}_loss" in grid.arrays:
                axes[0].plot(grid.xs, grid.arrays[f"{split}_loss"], style, color=f"C{k}", label=f"{label} {split}")
                axes[1].plot(grid.xs, 100 * np.asarray(grid.arrays[f"{split}_acc"]), style, color=f"C{k}")
    axes[0].set_ylabel("loss")
    axes[1].set_ylabel("accuracy (%)")
    for ax in axes:
        ax.set_xlabel("α (filter-normalised direction)")
        ax.axvline(0.0, color="0.6", lw=0.8, ls=":")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    handles, labels = axes[0].get_legend_handles_labels()
    ncol = min(4 if max(map(len, labels)) < 16 else 2, len(labels))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    return save_png(fig, path, dpi=120)
