"""Evaluate one network (or any ``x -> logits`` function) over a loader."""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, Union

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Every given module, and each of its submodules, in eval mode inside the block.

    On exit each submodule gets back its own earlier mode (not one flag for
    the whole tree), also when the block raises.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
        >>> net[1].eval()  # doctest: +ELLIPSIS
        Dropout(...)
        >>> with eval_mode(net):
        ...     net.training, net[1].training
        (False, False)
        >>> net.training, net[1].training
        (True, False)
    """
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


@torch.no_grad()
def evaluate(model: Union[nn.Module, Callable], loader: Iterable, loss: str = "cross_entropy") -> Dict[str, float]:
    """Mean loss, accuracy, error and NLL of ``model`` over ``loader``.

    Modules are put in eval mode for the pass and restored afterwards. Sums
    are kept as tensors on the device (no per-batch ``.item()``). For
    ``loss="mse"`` only ``loss`` is reported.
    """
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    total_loss = total_correct = None
    n = 0
    try:
        for x, y in loader:
            out = model(x)
            if loss == "cross_entropy":
                batch_loss = F.cross_entropy(out, y, reduction="sum")
                correct = (out.argmax(1) == y).sum()
            elif loss == "mse":
                batch_loss = F.mse_loss(out, y.reshape(out.shape).to(out.dtype), reduction="sum") / out[0].numel()
                correct = torch.zeros((), device=out.device)
            else:
                raise ValueError(f"unknown loss {loss!r}")
            total_loss = batch_loss.double() if total_loss is None else total_loss + batch_loss.double()
            total_correct = correct if total_correct is None else total_correct + correct
            n += len(y)
    finally:
        if was_training:
            model.train()
    if n == 0:
        raise ValueError("the loader yielded no samples")
    mean_loss = float(total_loss) / n
    if loss == "mse":
        return {"loss": mean_loss, "n": n}
    acc = float(total_correct) / n
    return {"loss": mean_loss, "nll": mean_loss, "acc": acc, "error": 1.0 - acc, "n": n}
