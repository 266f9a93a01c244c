"""Pictures of a simplex or complex of networks: the grid face by face, and the mode-to-mode paths."""
from __future__ import annotations

import math
import os
from itertools import combinations
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.tri import Triangulation

from modeconn.plots._figure import save_png

__all__ = ["plot_simplex"]

_CORNERS = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])


def _faces(simplexes: List[Tuple[int, ...]]) -> List[Tuple[int, ...]]:
    """The distinct 2-faces (vertex triples) of the simplexes, in order of appearance."""
    out: List[Tuple[int, ...]] = []
    for s in simplexes:
        for f in combinations(s, 3):
            if tuple(sorted(f)) not in [tuple(sorted(g)) for g in out]:
                out.append(f)
    return out


def _name(result, k: int) -> str:
    """A vertex's label: the reference vertices (modes) and the free ones."""
    return f"mode {k}" if k in result.reference_vertices else f"free {k}"


def _draw_face(ax, result, face: Tuple[int, ...], values: np.ndarray, norm):
    """Heat map of the grid points on the triangle ``face`` (barycentric -> the plane); returns the mappable."""
    others = [k for k in range(result.coords.shape[1]) if k not in face]
    on = np.all(result.coords[:, others] == 0, axis=1) if others else np.ones(len(values), bool)
    xy = result.coords[on][:, list(face)] @ _CORNERS
    mappable = ax.tripcolor(Triangulation(xy[:, 0], xy[:, 1]), values[on], shading="gouraud", norm=norm,
                            cmap="viridis")
    for corner, k in zip(_CORNERS, face):
        ax.annotate(_name(result, k), corner, ha="center", va="top" if corner[1] == 0 else "bottom", fontsize=8)
    j = int(np.argmax(np.where(on, values, -np.inf)))
    if on[j] and values[j] == values.max():  # the worst point of the complex lies on this face
        ax.plot(*(result.coords[j, list(face)] @ _CORNERS), "rx", ms=8, label="worst")
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(" / ".join(_name(result, k) for k in face), fontsize=9)
    return mappable


def _draw_segments(ax, result, values: np.ndarray, label: str) -> None:
    """Each 1-simplex (a, b) as the metric against the weight of b."""
    for s, idx in zip(result.simplexes, result.members):
        ax.plot(result.coords[idx, s[1]], values[idx], "-o", ms=3,
                label=f"{_name(result, s[0])} → {_name(result, s[1])}")
    ax.set_xlabel("weight of the second vertex")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _draw_paths(ax, result, metric: str) -> None:
    """Mode-to-mode chains (solid) and the straight lines (dashed) against t."""
    for n, (key, res) in enumerate(result.paths.items()):
        ax.plot(res.ts, res.values(metric), "-", color=f"C{n}", label=f"{key} through the complex")
        if res.linear is not None:
            ax.plot(res.linear.ts, res.linear.values(metric), "--", color=f"C{n}", label=f"{key} straight")
    ax.set_xlabel("t")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title("mode to mode", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_simplex(result, path: Union[str, os.PathLike], title: str = "", metric: str = "test_loss") -> Path:
    """Draw ``metric`` over a complex (:class:`~modeconn.evaluation.simplex.SimplexResult`) and its paths.

    2-simplexes and higher: one triangle heat map per distinct 2-face (for a
    2-simplex, the simplex itself; for higher ones, face by face), one
    colour scale for all (logarithmic for a positive loss), the worst grid
    point marked with a red cross. 1-simplexes: the metric along each
    segment. A last panel shows the mode-to-mode chains beside the straight
    lines when they were evaluated. One PNG, written atomically.

    Returns:
        ``Path(path)``, the file written.
    """
    values = result.values(metric)
    dim = max(len(s) for s in result.simplexes) - 1
    faces = _faces(result.simplexes) if dim >= 2 else []
    panels = (len(faces) if faces else 1) + (1 if result.paths else 0)
    ncols = min(4, panels)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(3.8 * ncols, 3.4 * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    label = metric.replace("_", " ")
    if faces:
        positive = metric.endswith(("loss", "nll")) and values.min() > 0
        norm = LogNorm(values.min(), values.max()) if positive else Normalize(values.min(), values.max())
        mappable = [_draw_face(axes[n], result, f, values, norm) for n, f in enumerate(faces)][-1]
        fig.colorbar(mappable, ax=axes[:len(faces)], label=label, shrink=0.8)
    else:
        _draw_segments(axes[0], result, values, label)
    if result.paths:
        _draw_paths(axes[panels - 1], result, metric)
    for ax in axes[panels:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return save_png(fig, path, dpi=100)
