"""Picture of a training history (loss, accuracy and learning rate per epoch)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Mapping, Union

from matplotlib.figure import Figure

from modeconn.plots._figure import save_png

__all__ = ["plot_history"]


def plot_history(history: List[Mapping], path: Union[str, os.PathLike], title: str = "training") -> Path:
    """Draw a training history: loss and accuracy per epoch, learning rate beside.

    The left panel shows the training loss per epoch on a log scale and, when
    every record has a finite ``acc``, the training accuracy on a second y axis;
    the right panel shows the learning rate per epoch. The picture is a
    990 x 374 pixel PNG written atomically to ``path``.

    Args:
        history: one record per epoch with keys ``epoch``, ``loss``, ``lr`` and
            optionally ``acc`` (what :func:`modeconn.train_model` and
            :func:`modeconn.fit_curve` return).
        path: the PNG file to write (its directory is created if needed).
        title: figure title.

    Returns:
        ``Path(path)``, the file written.

    Example:
        >>> import tempfile, pathlib
        >>> from modeconn.plots import plot_history
        >>> records = [{"epoch": e, "loss": 1.0 / e, "acc": 0.5 + e / 10, "lr": 0.1} for e in (1, 2, 3)]
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     png = plot_history(records, pathlib.Path(tmp) / "history.png")
        ...     png.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        True
    """
    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(9, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [r["loss"] for r in history], "o-", color="C0", ms=3, label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss")
    ax1.set_yscale("log")
    acc = [r.get("acc") for r in history]
    if all(a is not None and a == a for a in acc):  # a == a is False for NaN
        axb = ax1.twinx()
        axb.plot(epochs, acc, "s--", color="C1", ms=3)
        axb.set_ylabel("train accuracy", color="C1")
    ax2.plot(epochs, [r["lr"] for r in history], color="C2")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("learning rate")
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)
