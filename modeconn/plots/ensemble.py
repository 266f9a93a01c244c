"""Picture of a Fast Geometric Ensemble: its learning-rate schedule and the ensemble as it grows."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from modeconn.evaluation.ensembles import EnsembleResult
from modeconn.plots._figure import save_png
from modeconn.training.fge import FGEResult

__all__ = ["plot_fge"]


def plot_fge(result: FGEResult, fge_eval: EnsembleResult, path: Union[str, os.PathLike],
             start: Optional[EnsembleResult] = None, independent: Optional[EnsembleResult] = None,
             title: str = "FGE") -> Path:
    """Draw an FGE run: the cyclical learning rate with snapshots, and the ensemble against its size.

    Left panel: the learning rate of every SGD step in ``result.lr_trace`` with
    a marker at each snapshot (Garipov et al. 2018, FGE). Right panel: test
    accuracy (left axis) and NLL (right axis) of the ensemble of the first k
    snapshots for k = 1..n, from ``fge_eval``; dashed, the same for an
    ensemble of ``independent`` networks; dotted horizontal lines, the
    ``start`` network alone. One legend below the panel. The picture is a
    1100 x 484 pixel PNG written atomically to ``path``.

    Args:
        result: the FGE run (``lr_trace``, ``snapshot_iterations``).
        fge_eval: :func:`~modeconn.evaluate_ensemble` of the snapshots.
        path: the PNG file to write (its directory is created if needed).
        start: the evaluation of the start network alone, if any.
        independent: the evaluation of an independently trained ensemble, if any.
        title: figure title.

    Returns:
        ``Path(path)``, the file written.
    """
    fig = Figure(figsize=(10, 4.4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(range(len(result.lr_trace)), result.lr_trace, color="C0", lw=1)
    ax1.plot(result.snapshot_iterations, [result.lr_trace[i] for i in result.snapshot_iterations], "v",
             color="C3", ms=6, label="snapshot")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("learning rate")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_title("cyclical learning rate")

    k = range(1, len(fge_eval.acc) + 1)
    ax2.plot(k, fge_eval.acc, "o-", color="C0", ms=4, label="FGE accuracy")
    ax3 = ax2.twinx()
    ax3.plot(k, fge_eval.nll, "s-", color="C1", ms=4, label="FGE NLL")
    if independent is not None:
        ki = range(1, len(independent.acc) + 1)
        ax2.plot(ki, independent.acc, "o--", color="C0", ms=4, alpha=0.6, label="independent accuracy")
        ax3.plot(ki, independent.nll, "s--", color="C1", ms=4, alpha=0.6, label="independent NLL")
    if start is not None:
        ax2.axhline(start.acc[0], color="C0", ls=":", lw=1, label="start accuracy")
        ax3.axhline(start.nll[0], color="C1", ls=":", lw=1, label="start NLL")
    accs = [float(a) for r in (fge_eval, independent, start) if r is not None for a in r.acc]
    pad = max(0.005, 0.2 * (max(accs) - min(accs)))  # room around the accuracies, not the whole [0, 1]
    ax2.set_ylim(min(accs) - pad, min(max(accs) + pad, 1.0 + pad / 4))
    ax2.set_xlabel("ensemble members")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))  # members are counted, not measured
    ax2.set_ylabel("test accuracy", color="C0")
    ax3.set_ylabel("test NLL", color="C1")
    h2, l2 = ax2.get_legend_handles_labels()
    h3, l3 = ax3.get_legend_handles_labels()
    ax2.legend(h2 + h3, l2 + l3, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=3, fontsize=7,
               frameon=False)
    ax2.set_title("ensemble on the test set")
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)
