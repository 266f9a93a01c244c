"""The one way every plot is written: a PNG, atomically, with no pyplot state."""
from __future__ import annotations

from pathlib import Path
from typing import Union
import os

from matplotlib.figure import Figure

from modeconn.runtime.checkpoints import atomic_write


def save_png(fig: Figure, path: Union[str, os.PathLike], dpi: int) -> Path:
    """Render ``fig`` as a PNG at ``dpi`` into ``path`` and return ``Path(path)``.

    Rendering goes through :func:`~modeconn.runtime.checkpoints.atomic_write`
    (temporary file beside ``path``, then renamed), so a reader never sees half
    an image. ``Figure.savefig`` picks the Agg renderer for PNG by itself, which
    is why no backend has to be chosen anywhere.
    """
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
