"""Checkpoints a command reads as endpoints, and the warning when one never learned.

A network left at chance (a diverged or too-short run) is a valid file, so
every later step would run on it and print barriers that mean nothing. A
model counts as untrained when its recorded training accuracy is within
``CHANCE_MARGIN`` of chance (1 / classes), or its training loss is no lower
than log(classes), the loss of predicting every class alike.

An endpoint is a modeconn model checkpoint (``.pt`` or ``.safetensors``) or a
Hugging Face model directory (``config.json`` + ``model.safetensors``, read
with :func:`modeconn.hf.models.load_model_dir`, which needs ``modeconn[hf]``).
"""
from __future__ import annotations

import math
import sys
from typing import Mapping, Optional, Tuple

from torch import nn

from modeconn.runtime.checkpoints import load_checkpoint, load_model

CHANCE_MARGIN = 0.05


def untrained_reason(metrics: Mapping, num_classes: int) -> Optional[str]:
    """Why ``metrics`` (``train_acc``/``train_loss``, as ``train`` records them) look untrained, or None.

    Example:
        >>> untrained_reason({"train_acc": 0.12, "train_loss": 2.30}, 10)
        'train accuracy 0.1200 is within 5 points of chance (0.1000 for 10 classes)'
        >>> untrained_reason({"train_acc": 0.97, "train_loss": 0.1}, 10) is None
        True
    """
    if not metrics or num_classes < 2:
        return None
    chance = 1.0 / num_classes
    acc, loss = metrics.get("train_acc"), metrics.get("train_loss")
    if acc is not None and acc <= chance + CHANCE_MARGIN:
        return (f"train accuracy {acc:.4f} is within {round(100 * CHANCE_MARGIN)} points of chance "
                f"({chance:.4f} for {num_classes} classes)")
    if loss is not None and not loss < math.log(num_classes):
        return f"train loss {loss:.4f} is no lower than log({num_classes}) = {math.log(num_classes):.4f} (uniform guess)"
    return None


def warn_if_untrained(meta: Mapping, source: str) -> None:
    """Print one warning line on stderr when the checkpoint ``meta`` (read from ``source``) looks untrained."""
    why = untrained_reason(meta.get("metrics") or {}, int(meta.get("num_classes") or 0))
    if why:
        print(f"warning: {source} looks untrained: {why}; results computed from it mean little",
              file=sys.stderr)


def _is_model_dir(path) -> bool:
    """Whether ``path`` names a Hugging Face model directory (checked without importing transformers)."""
    from modeconn.hf.models import is_model_dir

    return is_model_dir(path)


def load_endpoint(path, flag: str) -> dict:
    """The model checkpoint (or model directory) at ``path`` (given as ``flag``), with a warning if it
    looks untrained."""
    if _is_model_dir(path):
        return load_endpoint_model(path, flag)[1]
    meta = load_checkpoint(path, kind="model")
    warn_if_untrained(meta, f"{flag} {path}")
    return meta


def load_endpoint_model(path, flag: str) -> Tuple[nn.Module, dict]:
    """``(model, metadata)`` of the model checkpoint at ``path`` (given as ``flag``), warned about like
    :func:`load_endpoint`."""
    if _is_model_dir(path):
        from modeconn.hf.models import load_model_dir

        model, meta = load_model_dir(path)
    else:
        model, meta = load_model(path)
    warn_if_untrained(meta, f"{flag} {path}")
    return model, meta
