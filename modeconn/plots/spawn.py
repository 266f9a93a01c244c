"""Picture of a spawning run: the barrier between children against the epoch they were spawned at."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
from matplotlib.figure import Figure

from modeconn.plots._figure import save_png
from modeconn.training.spawn import SpawnResult

__all__ = ["plot_spawn"]


def _mean_and_range(ax, ks, values: np.ndarray, label: str, color: str, marker: str = "o") -> None:
    """Mean over pairs (line) with the min–max over pairs as error bars (none for a single pair)."""
    mean = values.mean(axis=1)
    spread = np.stack([mean - values.min(axis=1), values.max(axis=1) - mean])
    ax.errorbar(ks, mean, yerr=spread if values.shape[1] > 1 else None, fmt=f"{marker}-", color=color,
                ms=5, capsize=3, label=label)


def plot_spawn(result: SpawnResult, path: Union[str, os.PathLike], title: str = "spawning") -> Path:
    """Draw the children's barriers and distances against the spawn epoch k.

    Left: the test-loss barrier of the straight line between two children
    (``result.reference``), middle: the test-error barrier (Frankle et al.'s
    instability), right: the L2 distance child–child and child–spawn point.
    With more than two children each point is the mean over pairs (children)
    and the bars span their minimum to maximum. A 1200 x 400 pixel PNG written
    atomically to ``path``; returns ``Path(path)``.
    """
    ks = result.spawn_at
    fig = Figure(figsize=(12, 4))
    ax_loss, ax_err, ax_dist = fig.subplots(1, 3)
    for ax, metric, name in ((ax_loss, "test_loss", "test loss"), (ax_err, "test_error", "test error")):
        _mean_and_range(ax, ks, result.barriers(metric), f"{name} barrier", "C3")
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set_xlabel("spawn epoch k")
        ax.set_ylabel(f"{name} barrier ({result.reference})")
        ax.set_title(f"{name} barrier between children")
    pair_dist = np.array([[p.distance for p in pt.pairs] for pt in result.points])
    spawn_dist = np.array([[c.distance_from_spawn for c in pt.children] for pt in result.points])
    _mean_and_range(ax_dist, ks, pair_dist, "child – child", "C0")
    _mean_and_range(ax_dist, ks, spawn_dist, "child – spawn point", "C2", "s")
    ax_dist.set_xlabel("spawn epoch k")
    ax_dist.set_ylabel("L2 distance of the parameters")
    ax_dist.set_title("distances at the end of training")
    ax_dist.legend(fontsize=8)
    for ax in (ax_loss, ax_err, ax_dist):
        ax.set_xticks(ks)
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path, dpi=100)
