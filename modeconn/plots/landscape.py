"""Pictures of lines, grids and curve planes (the results of :mod:`modeconn.geometry.grid`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from modeconn.geometry.grid import CurvePlane, GridResult
from modeconn.plots._figure import save_png

PathLike = Union[str, os.PathLike]

__all__ = ["plot_line", "plot_contours", "plot_surface", "plot_curve_plane", "plot_curvature"]


def _log_levels(z: np.ndarray, n: int = 24):
    """Log-spaced levels and norm for a positive field (linear if it is nearly flat)."""
    finite = z[np.isfinite(z)]
    lo = max(float(finite.min()), 1e-8)
    hi = max(float(finite.max()), lo * 1.0001)
    if hi / lo < 1.05:
        return np.linspace(lo, hi, n), None
    return np.geomspace(lo, hi, n), LogNorm(lo, hi)


def _loss_split(grid: GridResult) -> str:
    """The split whose loss is drawn: train when the grid has it, else test."""
    return "train" if "train_loss" in grid.arrays else "test"


def _error_split(grid: GridResult) -> str:
    """The split whose error is drawn: test when the grid has it, else train."""
    return "test" if "test_acc" in grid.arrays else "train"


def plot_line(grid: GridResult, path: PathLike, title: str = "", xlabel: str = "α",
              marks: Sequence[Tuple[float, str]] = ()) -> Path:
    """Draw a 1-D slice: loss and accuracy against the coordinate along the line.

    The loss of each split in ``grid.arrays`` (train solid, test dashed) goes
    on the left axis, the accuracy in percent on the right axis; ``marks``
    ``[(x, label), ...]`` draw dotted vertical lines labelled above the plot
    (e.g. where the checkpoints sit). One legend below the axes names every
    line. The picture is a 768 x 504 pixel PNG written atomically to ``path``.

    Args:
        grid: a 1-D :class:`~modeconn.geometry.grid.GridResult` with
            ``{split}_loss`` and ``{split}_acc`` arrays for train and/or test.
        path: the PNG file to write (its directory is created if needed).
        title: figure title; none when empty.
        xlabel: label of the coordinate axis.
        marks: positions to mark, with their labels.

    Returns:
        ``Path(path)``, the file written.

    Example:
        >>> import tempfile, pathlib
        >>> import numpy as np
        >>> from modeconn.geometry.grid import GridResult
        >>> from modeconn.plots import plot_line
        >>> xs = np.linspace(-1, 2, 7)
        >>> grid = GridResult(xs, None, {"test_loss": 1 + xs ** 2, "test_acc": 0.9 - 0.1 * xs ** 2},
        ...                   rows_done=1, num_rows=1, bn_recomputed=False, points_per_pass=7)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     plot_line(grid, pathlib.Path(tmp) / "line.png", marks=[(0.0, "ckpt")]).stat().st_size > 0
        True
    """
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    axb = ax.twinx()
    for split, style in (("train", "-"), ("test", "--")):
        if f"{split}_loss" in grid.arrays:
            ax.plot(grid.xs, grid.arrays[f"{split}_loss"], style, color="C0", label=f"{split} loss")
            axb.plot(grid.xs, 100 * grid.arrays[f"{split}_acc"], style, color="C1", label=f"{split} accuracy")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss", color="C0")
    axb.set_ylabel("accuracy (%)", color="C1")
    lo_acc = min(float(np.nanmin(100 * grid.arrays[f"{sp}_acc"])) for sp in ("train", "test")
                 if f"{sp}_acc" in grid.arrays)
    axb.set_ylim(max(0.0, lo_acc - 0.1 * (100 - lo_acc) - 1), 100.5)
    for x, label in marks:
        ax.axvline(x, color="0.6", lw=0.8, ls=":")
        ax.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=8)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = axb.get_legend_handles_labels()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.legend(h1 + h2, l1 + l2, loc="lower center", ncol=4, fontsize=8, frameon=False)
    return save_png(fig, path, dpi=120)


def _contour_panels(grid: GridResult, axes, points=(), curve: Optional[np.ndarray] = None,
                    xlabel: str = "α", ylabel: str = "β", equal: bool = False) -> None:
    """Fill two axes with contours of the grid's loss and error, plus points and a curve on both."""
    ls, es = _loss_split(grid), _error_split(grid)
    panels = [(f"{ls} loss", grid.arrays[f"{ls}_loss"], True),
              (f"{es} error (%)", 100 * grid.error(es), False)]
    for ax, (name, z, log) in zip(axes, panels):
        if log:
            levels, norm = _log_levels(z)
            cs = ax.contourf(grid.xs, grid.ys, z, levels=levels, norm=norm, cmap="viridis", extend="neither")
            ax.contour(grid.xs, grid.ys, z, levels=levels[::3], colors="k", linewidths=0.4, alpha=0.5)
        else:  # error in %: log-spaced levels from the smallest non-zero error (0 drawn as that)
            positive = z[np.isfinite(z) & (z > 0)]
            floor = max(float(positive.min()) if positive.size else 0.1, 0.1)
            z = np.maximum(z, floor)
            levels, norm = _log_levels(z)
            cs = ax.contourf(grid.xs, grid.ys, z, levels=levels, norm=norm, cmap="magma_r")
        ticks = levels[::max(1, len(levels) // 6)]
        cb = ax.figure.colorbar(cs, ax=ax, shrink=0.85, ticks=ticks, format="%.3g")
        cb.minorticks_off()
        cb.set_label(name + (" (log levels)" if norm is not None else ""))
        if curve is not None:
            ax.plot(curve[:, 0], curve[:, 1], color="w", lw=2.2)
            ax.plot(curve[:, 0], curve[:, 1], color="k", lw=1.0)
        for (x, y), label, marker in points:
            ax.plot([x], [y], marker, color="w", mec="k", ms=8)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8,
                        color="k", bbox=dict(boxstyle="round,pad=0.15", fc="w", alpha=0.7, lw=0))
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if equal:
            ax.set_aspect("equal")


def plot_contours(grid: GridResult, path: PathLike, title: str = "", points=(), xlabel: str = "α",
                  ylabel: str = "β") -> Path:
    """Draw a 2-D slice as filled contours of the loss and of the error, with colorbars.

    Left panel: the train loss (test loss if the grid has no train split);
    right panel: the test error in percent (train error if no test split).
    Both use log-spaced levels (linear when the field is nearly flat), since
    the interesting part of a landscape is its low basin. ``points``
    ``[((x, y), label, marker), ...]`` are drawn and labelled on both panels.
    The picture is a 1320 x 528 pixel PNG written atomically to ``path``.

    Args:
        grid: a 2-D :class:`~modeconn.geometry.grid.GridResult` (arrays indexed
            ``[i_y, i_x]``).
        path: the PNG file to write (its directory is created if needed).
        title: figure title; none when empty.
        points: points to mark, e.g. ``[((0.0, 0.0), "ckpt", "o")]``.
        xlabel, ylabel: axis labels.

    Returns:
        ``Path(path)``, the file written.
    """
    fig = Figure(figsize=(11, 4.4))
    axes = fig.subplots(1, 2)
    _contour_panels(grid, axes, points, None, xlabel, ylabel)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=120)


def plot_surface(grid: GridResult, path: PathLike, title: str = "", xlabel: str = "α",
                 ylabel: str = "β") -> Path:
    """Draw a 2-D slice as a 3-D surface of ``log10`` of the loss.

    The height is ``log10`` of the train loss (test loss if the grid has no
    train split), floored at ``1e-12``. The picture is a 840 x 672 pixel PNG
    written atomically to ``path``.

    Args:
        grid: a 2-D :class:`~modeconn.geometry.grid.GridResult`.
        path: the PNG file to write (its directory is created if needed).
        title: axes title; none when empty.
        xlabel, ylabel: labels of the two grid axes.

    Returns:
        ``Path(path)``, the file written.
    """
    split = _loss_split(grid)
    z = np.log10(np.maximum(grid.arrays[f"{split}_loss"], 1e-12))
    X, Y = np.meshgrid(grid.xs, grid.ys)
    fig = Figure(figsize=(7, 5.6))
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(X, Y, z, cmap="viridis", linewidth=0, antialiased=True, rstride=1, cstride=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_zlabel(f"log10 {split} loss")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=120)


def plot_curvature(grid: GridResult, path: PathLike, title: str = "", xlabel: str = "α",
                   ylabel: str = "β") -> Path:
    """Draw the Hessian's curvature over a slice: ``|λmin/λmax|`` next to ``λmax``.

    A 1-D grid gives two line plots, a 2-D grid two heat maps with colorbars,
    of the arrays ``curvature_ratio`` (``|λmin/λmax|``, near 0 where the
    surface is locally convex, Li et al. 2018) and ``lambda_max``. The picture
    is a 1320 x 504 pixel PNG written atomically to ``path``.

    Args:
        grid: a :class:`~modeconn.geometry.grid.GridResult` holding the
            ``curvature_ratio`` and ``lambda_max`` arrays.
        path: the PNG file to write (its directory is created if needed).
        title: figure title; none when empty.
        xlabel, ylabel: axis labels (``ylabel`` only in 2-D).

    Returns:
        ``Path(path)``, the file written.
    """
    ratio, lmax = grid.arrays["curvature_ratio"], grid.arrays["lambda_max"]
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, (name, z) in zip(axes, (("|λmin / λmax|", ratio), ("λmax", lmax))):
        if grid.dims == 1:
            ax.plot(grid.xs, z, "o-", ms=3)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(name)
        else:
            im = ax.pcolormesh(grid.xs, grid.ys, z, shading="nearest", cmap="viridis")
            fig.colorbar(im, ax=ax, shrink=0.85).set_label(name)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
        ax.set_title(name)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=120)


def plot_curve_plane(cp: CurvePlane, path: PathLike, title: str = "") -> Path:
    """Draw Garipov et al.'s (2018) picture of a curve's plane: loss and error contours with the curve.

    The two contour panels of :func:`plot_contours` over the plane through the
    start, the anchor bend and the end, with the endpoints, every inner bend
    (the anchor bend as a large diamond) and the curve's projection drawn on
    both. Axes keep equal scale when the plane's extents are within a factor
    of 3. The picture is a 1320 x 528 pixel PNG written atomically to ``path``.

    Args:
        cp: a :class:`~modeconn.geometry.grid.CurvePlane` with its ``grid``
            evaluated (from ``curve_plane``).
        path: the PNG file to write (its directory is created if needed).
        title: figure title; none when empty.

    Returns:
        ``Path(path)``, the file written.

    Raises:
        ValueError: ``cp.grid`` is None (only the geometry was computed).
    """
    grid = cp.grid
    if grid is None:
        raise ValueError("the curve plane has no grid to draw (use curve_plane, not curve_plane_geometry)")
    pts = [(tuple(cp.anchors[0]), "start", "o"), (tuple(cp.anchors[2]), "end", "o")]
    K = len(cp.bend_coords)
    for k in range(1, K - 1):
        pts.append((tuple(cp.bend_coords[k]), f"bend {k}", "D" if k == cp.anchor_bend else "d"))
    ext = np.ptp(cp.xs), np.ptp(cp.ys)
    equal = 1 / 3 <= ext[1] / ext[0] <= 3 if ext[0] > 0 else False
    fig = Figure(figsize=(11, 4.4))
    axes = fig.subplots(1, 2)
    _contour_panels(grid, axes, pts, cp.curve_coords, "x (along end − start)", "y", equal)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=120)
