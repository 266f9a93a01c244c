"""The batched point engine: metrics of K arbitrary points of one architecture, in one pass per loader.

The shared engine of path, grid and plane evaluation. How it is fast:

* the data are held as tensors (``TensorLoader``), sums stay on the device
  (one :class:`~modeconn.evaluation.model.MetricSums`, no ``.item()`` per batch);
* the K points' weights are stacked ``[K, P]`` and share every batch: the
  template runs once for all of them (``torch.func.vmap``,
  :func:`~modeconn.evaluation.stacked.batched_forward`), or, on CPUs for
  convolutions and for dense work above
  :data:`~modeconn.evaluation.stacked.VMAP_MAX_WORK`, once per point on views
  of the stacked weights, each output reduced as soon as it is made;
* BatchNorm statistics of all K points are recomputed in the same single pass
  over the training data (:func:`~modeconn.evaluation.bn.bn_statistics`, the
  routine :func:`~modeconn.evaluation.bn.recompute_bn` also runs on one model).
"""
from __future__ import annotations

import itertools
from typing import Dict, Iterable, Optional

import numpy as np
import torch

from modeconn.evaluation.bn import batchnorm_modules, bn_statistics
from modeconn.evaluation.model import MetricSums, eval_mode
from modeconn.evaluation.stacked import batched_forward, compiled_forward, each_point, vectorize_by_default
from modeconn.runtime import Runtime

__all__ = ["evaluate_points"]


@torch.no_grad()
def _point_means(curve, flats: torch.Tensor, buffers: Dict[str, torch.Tensor], loader: Iterable,
                 runtime: Optional[Runtime] = None) -> Dict[str, np.ndarray]:
    """Mean cross-entropy and accuracy (``[K]`` each) of K points ``flats [K, P]`` (buffers ``[K, ...]``) over ``loader``.

    The template runs in eval mode. All K points share each batch: one vmap,
    or, where :func:`vectorize_by_default` says so for the first batch's
    size, one point after another, each output reduced into its point's
    sums at once (no ``[K, B, C]`` block is held: on CPUs the allocator
    would return such blocks to the OS and fault them in again, pass after
    pass). ``runtime.amp``: forwards under bf16 autocast (logits back to
    float32 before the sums); ``runtime.compile``: the vmapped forward
    through ``torch.compile``.
    """
    runtime = runtime or Runtime()
    net, device = curve.net, flats.device
    params = curve.unflatten(flats)
    batches = iter(loader)
    first = next(batches, None)
    if first is None:
        raise ValueError("the loader yielded no samples")
    batches = itertools.chain([first], batches)
    one_by_one = not runtime.compile and not vectorize_by_default(net, device, flats.shape[1] * len(first[0]))
    fwd = compiled_forward(net) if runtime.compile else batched_forward(net, True)
    sums = [MetricSums() for _ in range(len(flats))] if one_by_one else [MetricSums()]
    for s in sums:  # before the forwards (see MetricSums.reserve)
        s.reserve(len(flats) if not one_by_one else 1, device)
    with eval_mode(net):
        for x, y in batches:
            with runtime.autocast(device):
                outs = (each_point(net, params, buffers, x) if one_by_one
                        else [fwd(params, buffers, x)])          # [B, C] per point, or [K, B, C]
                for s, out in zip(sums, outs):
                    out = out.unsqueeze(0) if one_by_one else out
                    s.add_logits(out.float() if runtime.amp else out, y)
    means = [s.means() for s in sums]
    return {k: np.concatenate([m[k] for m in means]) for k in ("loss", "acc")}


@torch.no_grad()
def evaluate_points(curve, flats: torch.Tensor, train_loader: Optional[Iterable],
                    test_loader: Optional[Iterable], bn_loader: Optional[Iterable] = None,
                    recompute_bn: bool = True, runtime: Optional[Runtime] = None) -> Dict[str, np.ndarray]:
    """Metrics of K arbitrary points ``flats [K, P]`` of ``curve``'s architecture, in one pass per loader.

    Args:
        curve: a :class:`~modeconn.core.curve_model.CurveModel` (only its
            template ``net`` and parameter layout are used).
        flats: the points, ``[K, P]``, on the template's device.
        train_loader, test_loader: data of the two splits; a split whose
            loader is None is left out.
        bn_loader: data for BN statistics (default: ``train_loader``).
        recompute_bn: recompute BN statistics per point
            (:func:`~modeconn.evaluation.bn.bn_statistics`) when the net has
            BatchNorm; with False the template's current buffers are used.
        runtime: ``amp`` (bf16 autocast) and ``compile`` (``torch.compile``
            of the metric passes); points stay on ``flats``' device.

    Returns:
        ``{"train_loss", "train_acc", "test_loss", "test_acc"}``, arrays of
        length K; the loss is the mean cross-entropy (NLL).

    Example:
        >>> from modeconn.core.curve_model import linear_path
        >>> from modeconn.data import TensorLoader
        >>> line = linear_path(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3))
        >>> data = TensorLoader(torch.randn(16, 4), torch.randint(0, 3, (16,)), batch_size=8)
        >>> out = evaluate_points(line, line.flat_weights_at(torch.tensor([0.0, 0.5, 1.0])), data, None)
        >>> sorted(out), out["train_loss"].shape
        (['train_acc', 'train_loss'], (3,))
    """
    flats = flats.detach()
    bn_loader = train_loader if bn_loader is None else bn_loader
    if recompute_bn and batchnorm_modules(curve.net):
        if bn_loader is None:
            raise ValueError("BN statistics need a bn_loader or train_loader")
        buffers = bn_statistics(curve, flats, bn_loader, runtime=runtime)
    else:
        buffers = {n: b.unsqueeze(0).expand(len(flats), *b.shape) for n, b in curve.net.named_buffers()}
    out = {}
    for split, loader in (("train", train_loader), ("test", test_loader)):
        if loader is not None:
            m = _point_means(curve, flats, buffers, loader, runtime)
            out[f"{split}_loss"], out[f"{split}_acc"] = m["loss"], m["acc"]
    return out
