"""Pictures of lines, grids and curve planes (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from modeconn.plots import history as _plots
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from modeconn.geometry.grid import CurvePlane, GridResult  # noqa: E402

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
    return "train" if "train_loss" in grid.arrays else "test"


def _error_split(grid: GridResult) -> str:
    return "test" if "test_acc" in grid.arrays else "train"


def plot_line(grid: GridResult, path: Path, title: str = "", xlabel: str = "α",
              marks: Sequence[Tuple[float, str]] = ()) -> Path:
    """1-D slice: loss (left axis) and accuracy (right axis) against the coordinate."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _contour_panels(grid: GridResult, axes, points=(), curve: Optional[np.ndarray] = None,
                    xlabel: str = "α", ylabel: str = "β", equal: bool = False) -> None:
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
        cb.set_label(name + " (log levels)")
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


def plot_contours(grid: GridResult, path: Path, title: str = "", points=(), xlabel: str = "α",
                  ylabel: str = "β") -> Path:
    """2-D slice: filled contours of the loss and of the error (both with log-spaced levels).

    ``points``: ``[((x, y), label, marker), ...]`` drawn on both panels.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    _contour_panels(grid, axes, points, None, xlabel, ylabel)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_surface(grid: GridResult, path: Path, title: str = "", xlabel: str = "α", ylabel: str = "β") -> Path:
    """2-D slice as a 3-D surface of log10 of the loss."""
    split = _loss_split(grid)
    z = np.log10(np.maximum(grid.arrays[f"{split}_loss"], 1e-12))
    X, Y = np.meshgrid(grid.xs, grid.ys)
    fig = plt.figure(figsize=(7, 5.6))
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(X, Y, z, cmap="viridis", linewidth=0, antialiased=True, rstride=1, cstride=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_zlabel(f"log10 {split} loss")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_curvature(grid: GridResult, path: Path, title: str = "", xlabel: str = "α", ylabel: str = "β") -> Path:
    """``|λmin/λmax|`` over the slice (line or heat map) next to λmax."""
    ratio, lmax = grid.arrays["curvature_ratio"], grid.arrays["lambda_max"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_curve_plane(cp: CurvePlane, path: Path, title: str = "") -> Path:
    """Garipov et al.'s picture: train loss (log levels) and test error over the curve's plane,
    with the endpoints, the bends and the curve drawn."""
    grid = cp.grid
    if grid is None:
        raise ValueError("the curve plane has no grid to draw (use curve_plane, not curve_plane_geometry)")
    pts = [(tuple(cp.anchors[0]), "start", "o"), (tuple(cp.anchors[2]), "end", "o")]
    K = len(cp.bend_coords)
    for k in range(1, K - 1):
        pts.append((tuple(cp.bend_coords[k]), f"bend {k}", "D" if k == cp.anchor_bend else "d"))
    ext = np.ptp(cp.xs), np.ptp(cp.ys)
    equal = 1 / 3 <= ext[1] / ext[0] <= 3 if ext[0] > 0 else False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    _contour_panels(grid, axes, pts, cp.curve_coords, "x (along end − start)", "y", equal)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
