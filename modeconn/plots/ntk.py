"""Picture of how the NTK moves during training (Fort et al. 2020), optionally beside the spawning barrier."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple, Union

from matplotlib.figure import Figure

from modeconn.plots._figure import save_png

__all__ = ["plot_ntk"]


def plot_ntk(history: List[Mapping], path: Union[str, os.PathLike], title: str = "NTK during training",
             barrier: Optional[Tuple[Sequence[float], Sequence[float]]] = None) -> Path:
    """Kernel distance from the initial NTK and kernel velocity per epoch (left), label alignment (right).

    Args:
        history: records with ``epoch``, ``ntk_distance``, ``ntk_velocity`` and
            optionally ``ntk_alignment`` (``train_model(..., epoch_fields=NTKTracker(...))``).
        path: the PNG to write.
        title: figure title.
        barrier: ``(spawn epochs, barrier)`` of spawned children, drawn on a second axis of the left panel.

    Returns:
        ``Path(path)``.
    """
    rows = [r for r in history if "ntk_distance" in r]
    if not rows:
        raise ValueError("the history holds no NTK records (train with track_ntk / --track-ntk)")
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(9, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [r["ntk_distance"] for r in rows], "o-", ms=3, color="C0", label="distance from init")
    ax1.plot(epochs, [r["ntk_velocity"] for r in rows], "s--", ms=3, color="C1", label="velocity (per epoch)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("kernel distance")
    ax1.legend(loc="upper left", fontsize=8)
    if barrier is not None:
        axb = ax1.twinx()
        axb.plot(list(barrier[0]), list(barrier[1]), "^-", color="C3", ms=4)
        axb.set_ylabel("children's barrier (spawned at k)", color="C3")
    if all("ntk_alignment" in r for r in rows):
        ax2.plot(epochs, [r["ntk_alignment"] for r in rows], "o-", ms=3, color="C2")
        ax2.set_ylabel("kernel-label alignment")
    ax2.set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)
