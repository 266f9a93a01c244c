"""Picture of the metrics along a path (a curve, or a straight line) between two networks."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from matplotlib.figure import Figure

from modeconn.plots._figure import save_png

__all__ = ["plot_path"]


def plot_path(result, path: Union[str, os.PathLike], title: str = "") -> Path:
    """Draw train loss and test error along a path, the straight line dashed beside it.

    Two panels against ``t``: the train loss (log scale) and the test error in
    percent of ``result``, a :class:`~modeconn.evaluation.path.PathResult`
    (``ts``, ``train_loss``, ``test_error``, ``name``). When ``result.linear``
    holds the straight line between the same endpoints it is drawn dashed in
    grey; the endpoints are marked with black dots. A robust test error in
    ``result.extra["robust_test_error"]`` (PGD, :mod:`modeconn.evaluation.adversarial`)
    is drawn in orange beside the clean one. The picture is a
    1100 x 418 pixel PNG written atomically to ``path``.

    Args:
        result: the path's metrics (``name`` labels its line in the legends).
        path: the PNG file to write (its directory is created if needed).
        title: figure title; none when empty.

    Returns:
        ``Path(path)``, the file written.
    """
    fig = Figure(figsize=(10, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    paths = [(result, "-", result.name)]
    if result.linear is not None:
        paths.append((result.linear, "--", "linear"))
    for res, style, label in paths:
        ax1.plot(res.ts, res.train_loss, style, color="C0" if style == "-" else "C7", label=label)
        ax2.plot(res.ts, 100 * res.test_error, style, color="C3" if style == "-" else "C7", label=label)
        if "robust_test_error" in res.extra:  # the PGD error beside the clean one (Tatro et al. 2020)
            ax2.plot(res.ts, 100 * res.extra["robust_test_error"], style, color="C1" if style == "-" else "C8",
                     label=f"{label}, robust")
    for ax, key, scale in ((ax1, "train_loss", 1), (ax2, "test_error", 100)):
        v = getattr(result, key)
        ax.plot([result.ts[0], result.ts[-1]], [scale * v[0], scale * v[-1]], "ko", ms=6, label="endpoints")
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("train loss")
    ax1.set_yscale("log")
    ax2.set_ylabel("test error (%)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)
