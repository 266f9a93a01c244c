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
