"""Bar charts of one number per group of parameters, ordered as the network is (layer-wise results)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Union

import numpy as np
from matplotlib.figure import Figure

from modeconn.plots._figure import save_png

PathLike = Union[str, os.PathLike]

__all__ = ["plot_group_bars"]


def plot_group_bars(series: Mapping[str, Mapping[str, float]], path: PathLike, ylabel: str,
                    title: str = "") -> Path:
    """Grouped bars: one cluster per parameter group (x axis, in the given order), one bar per series.

    ``series`` maps a series label (e.g. ``"layer alone"``, ``"first k
    layers"``, or a model's name) to ``group -> value``; groups are taken from
    the first series in its order, which should be the network's
    (:func:`~modeconn.core.param_groups.parameter_groups`). Layer-wise barriers
    (``eval_curve --per-layer``) and per-module curvature (``sharpness
    --per-module``) are drawn by it. A PNG at least 640 pixels wide, written
    atomically to ``path``; returns ``Path(path)``.

    Example:
        >>> import tempfile, pathlib
        >>> d = tempfile.mkdtemp()
        >>> p = plot_group_bars({"alone": {"fc1": 0.1, "fc2": 0.3}}, pathlib.Path(d) / "b.png", "barrier")
        >>> p.stat().st_size > 0
        True
    """
    if not series or not next(iter(series.values())):
        raise ValueError("plot_group_bars needs at least one series with one group")
    groups = list(next(iter(series.values())))
    x = np.arange(len(groups))
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(6.4, 0.55 * len(groups) * len(series) + 1.5), 4.2))
    ax = fig.subplots()
    for i, (label, values) in enumerate(series.items()):
        heights = [float(values.get(g, np.nan)) for g in groups]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=label, color=f"C{i}")
    ax.set_xticks(x, groups, rotation=35 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center",
                  fontsize=8)
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    if len(series) > 1:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=100)
