"""Checkpoints a command reads as endpoints, and the warning when one never learned.

A network left at chance (a diverged or too-short run) is a valid file, so
every later step would run on it and print barriers that mean nothing. A
model counts as untrained when its recorded training accuracy is within
``CHANCE_MARGIN`` of chance (1 / classes), or its training loss is no lower
than log(classes), the loss of predicting every class alike.

An endpoint is a modeconn model checkpoint (``.pt`` or ``.safetensors``), a
Hugging Face model directory (``config.json`` + ``model.safetensors``, read
with :func:`modeconn.hf.models.load_model_dir`, which needs ``modeconn[hf]``),
or a plain state dict (``.pt`` or ``.safetensors``, e.g. from another tool)
when the command is told the model (``--model``, ``--model-kwargs``) and the
data (``--dataset``), which such a file does not record.
"""
from __future__ import annotations

import math
import sys
from typing import Mapping, Optional, Tuple

from torch import nn

from modeconn.cli.errors import CommandError
from modeconn.runtime.checkpoints import FORMAT, CheckpointError, load_checkpoint, load_state_dict, model_from_meta

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


def _plain_state_dict_meta(path, flag: str, args, error: CheckpointError) -> dict:
    """The metadata of a plain state-dict file, from ``--model``/``--model-kwargs``/``--dataset``; the
    checkpoint's own error when the file is not a state dict either, a CommandError when a flag is missing."""
    try:
        state = load_state_dict(path)
    except CheckpointError:
        raise error from None
    model, dataset = getattr(args, "model", None), getattr(args, "dataset", None)
    if not model or not dataset:
        raise CommandError(f"{flag} {path} is a plain state dict (no modeconn metadata): give --model SPEC "
                           "[--model-kwargs ...] and --dataset NAME to say what it is")
    from modeconn.cli.args import parse_kwargs
    from modeconn.cli.data import canonical_specs, load_dataset

    canonical_specs(args)
    ds = load_dataset(args, args.dataset, 0)
    return {"format": FORMAT, "kind": "model", "arch": args.model, "arch_kwargs": parse_kwargs(args.model_kwargs),
            "input_shape": list(ds.input_shape), "num_classes": int(ds.num_classes), "dataset": args.dataset,
            "seed": 0, "metrics": {}, "state_dict": dict(state), "source": {"plain_state_dict": str(path)}}


def load_endpoint(path, flag: str, args=None) -> dict:
    """The model checkpoint (or model directory, or plain state dict described by ``args``) at ``path``
    (given as ``flag``), with a warning if it looks untrained."""
    if _is_model_dir(path):
        return load_endpoint_model(path, flag)[1]
    try:
        meta = load_checkpoint(path, kind="model")
    except CheckpointError as e:
        meta = _plain_state_dict_meta(path, flag, args, e)
    warn_if_untrained(meta, f"{flag} {path}")
    return meta


def load_endpoint_model(path, flag: str, args=None) -> Tuple[nn.Module, dict]:
    """``(model, metadata)`` of the endpoint at ``path`` (given as ``flag``), read and warned about like
    :func:`load_endpoint`."""
    if _is_model_dir(path):
        from modeconn.hf.models import load_model_dir

        model, meta = load_model_dir(path)
        warn_if_untrained(meta, f"{flag} {path}")
        return model, meta
    meta = load_endpoint(path, flag, args)
    return model_from_meta(meta, f"{flag} {path}"), meta
