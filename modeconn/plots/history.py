"""Pictures of results (matplotlib, Agg backend: no screen needed)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_history(history: List[Mapping], path: Path, title: str = "training") -> Path:
    """Training loss and accuracy per epoch, learning rate on a second panel."""
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(epochs, [r["loss"] for r in history], "o-", color="C0", ms=3, label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss")
    ax1.set_yscale("log")
    acc = [r.get("acc") for r in history]
    if all(a is not None and a == a for a in acc):
        axb = ax1.twinx()
        axb.plot(epochs, acc, "s--", color="C1", ms=3)
        axb.set_ylabel("train accuracy", color="C1")
    ax2.plot(epochs, [r["lr"] for r in history], color="C2")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("learning rate")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_path(result, path: Path, title: str = "") -> Path:
    """Train loss and test error along t; the straight line dashed on the same axes."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    paths = [(result, "-", result.name)]
    if result.linear is not None:
        paths.append((result.linear, "--", "linear"))
    for res, style, label in paths:
        ax1.plot(res.ts, res.train_loss, style, color="C0" if style == "-" else "C7", label=label)
        ax2.plot(res.ts, 100 * res.test_error, style, color="C3" if style == "-" else "C7", label=label)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
