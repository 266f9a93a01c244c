"""The trained networks shipped with modeconn: two endpoint pairs on the digits data.

The files live in the repository's top-level ``checkpoints/`` folder, which
pyproject.toml installs as the package ``modeconn.checkpoints`` (wheel, sdist
and editable install alike); :func:`shipped_checkpoint` finds them with
:mod:`importlib.resources`, so a script works wherever modeconn is installed.
``checkpoints/README.md`` (shipped next to them) tells how each was trained.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

PACKAGE = "modeconn.checkpoints"
NAMES = ("digits_mlp_a", "digits_mlp_b", "digits_cnn_a", "digits_cnn_b")


def _folder() -> Path:
    """The folder that holds the shipped files.

    Installed (regular or editable), that is the package ``modeconn.checkpoints``.
    A source checkout used without installing (``PYTHONPATH`` on the repository)
    has no such package; its files are then the checkout's own ``checkpoints/``.
    """
    try:
        folder = resources.files(PACKAGE)
    except ModuleNotFoundError as err:
        if err.name != PACKAGE:
            raise
        return Path(__file__).resolve().parents[2] / "checkpoints"
    if not isinstance(folder, Path):  # e.g. a zipped installation: no file to hand to torch.load
        raise FileNotFoundError(f"the shipped checkpoints are not files on disk here ({folder}); "
                                "install modeconn as a regular (unzipped) package")
    return folder


def shipped_checkpoint(name: str) -> Path:
    """The path of a trained endpoint shipped with modeconn, for your own scripts.

    Args:
        name: one of ``digits_mlp_a``, ``digits_mlp_b`` (an MLP pair) or
            ``digits_cnn_a``, ``digits_cnn_b`` (a CNN-with-BatchNorm pair), with or
            without the ``.pt`` suffix.

    Returns:
        The path of the checkpoint file, ready for :func:`modeconn.load_model`.

    Raises:
        ValueError: ``name`` is not a shipped endpoint (the message lists them).
        FileNotFoundError: the installation lacks the file (a broken install).

    Example:
        >>> import modeconn as mc
        >>> path = mc.shipped_checkpoint("digits_mlp_a")
        >>> path.name, path == mc.shipped_checkpoint("digits_mlp_a.pt")
        ('digits_mlp_a.pt', True)
        >>> model, meta = mc.load_model(path)
        >>> meta["arch"], meta["dataset"]
        ('mlp', 'digits')
        >>> mc.shipped_checkpoint("resnet")
        Traceback (most recent call last):
        ...
        ValueError: no shipped checkpoint 'resnet'; available: digits_mlp_a, digits_mlp_b, digits_cnn_a, digits_cnn_b
    """
    stem = name[:-len(".pt")] if name.endswith(".pt") else name
    if stem not in NAMES:
        raise ValueError(f"no shipped checkpoint {name!r}; available: {', '.join(NAMES)}")
    path = _folder() / f"{stem}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the shipped checkpoint {stem!r} is missing from this installation "
                                "of modeconn; reinstall it")
    return path
