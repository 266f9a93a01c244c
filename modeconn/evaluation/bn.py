"""BatchNorm statistics: recomputed, never interpolated — one routine for one model or K points.

Running statistics along a curve are meaningless: a point's weights are new,
so its BN statistics are recomputed over training data before it is
evaluated. This is also the simple form of REPAIR (Jordan et al. 2022):
resetting statistics at interpolated points removes most of the variance
collapse that inflates barriers between aligned networks.

The statistics are the exact cumulative average of
``torch.optim.swa_utils.update_bn``: after batches ``1..N`` every BN layer
holds ``running_mean = (1/N) Σ_k mean_k`` and ``running_var = (1/N) Σ_k var_k``
(the batch mean and unbiased batch variance of the layer's input, equal
weight per batch), obtained by setting the layer's momentum to ``1/k`` at
batch k. Unlike ``update_bn``, the whole network stays in eval mode and only
the BatchNorm layers are put in train mode, so dropout and other random layers
are *off* during the pass: the statistics are those of the inputs the layers
see when the network is evaluated. A single network (:func:`recompute_bn`) and
K stacked points of one architecture (:func:`bn_statistics`, one pass for all)
go through the same mode context and momentum schedule (:func:`bn_pass`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch
from torch import nn

from modeconn.evaluation.model import eval_mode
from modeconn.evaluation.stacked import batched_forward, vectorize_by_default
from modeconn.runtime import Runtime

__all__ = ["batchnorm_modules", "has_batchnorm", "bn_pass", "recompute_bn", "bn_statistics"]


def batchnorm_modules(model: nn.Module) -> List[nn.Module]:
    """The BatchNorm layers of ``model`` that track running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    """True when the model has BatchNorm layers that track running statistics.

    Example:
        >>> has_batchnorm(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))
        True
        >>> has_batchnorm(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, track_running_stats=False)))
        False
    """
    return bool(batchnorm_modules(model))


@contextlib.contextmanager
def _statistics_mode(model: nn.Module, bns: List[nn.Module]) -> Iterator[None]:
    """``model`` in eval mode except ``bns`` (train mode); modes and momenta restored on exit."""
    momenta = [m.momentum for m in bns]
    with eval_mode(model):
        for m in bns:
            m.train()
        try:
            yield
        finally:
            for m, momentum in zip(bns, momenta):
                m.momentum = momentum


def bn_pass(model: nn.Module, loader: Iterable, forward: Callable[[torch.Tensor], object]) -> int:
    """The one BN-statistics pass: ``forward(x)`` for every batch of ``loader`` in statistics mode.

    ``model`` is in eval mode except its BN layers, whose momentum is
    ``1/(k+1)`` at batch k (0-based), so whatever running buffers ``forward``
    updates end as the equal-weight average over the batches. ``forward``
    must run ``model``'s modules (directly or through ``functional_call``).
    Batches may be ``(x, y)`` pairs or bare inputs. Returns the number of
    batches; raises ``ValueError`` when there were none.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        >>> bn_pass(net, [torch.randn(4, 2), torch.randn(4, 2)], net)  # the model as its own forward
        2
        >>> int(net[1].num_batches_tracked), net[1].momentum, net.training
        (2, 0.1, True)
    """
    bns = batchnorm_modules(model)
    k = -1
    with _statistics_mode(model, bns):
        for k, batch in enumerate(loader):
            for m in bns:
                m.momentum = 1.0 / (k + 1)
            forward(batch[0] if isinstance(batch, (list, tuple)) else batch)
    if k < 0:
        raise ValueError("the BN loader yielded no batches: BatchNorm statistics need training data")
    return k + 1


@torch.no_grad()
def recompute_bn(model: nn.Module, loader: Iterable, runtime: Optional[Runtime] = None) -> nn.Module:
    """Reset and recompute every BN layer's statistics of ``model`` over ``loader``, in place.

    The exact cumulative average of the module docstring, with dropout off.
    Models without BatchNorm are returned untouched, with no pass over the
    data. Every submodule's train/eval mode and each BN momentum are restored.

    Args:
        model: the network (changed in place and returned).
        loader: training batches ``(x, y)`` or inputs, without augmentation.
        runtime: ``device`` moves each input batch there; ``amp`` runs the
            forwards under bf16 autocast (the statistics stay float32).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.5), nn.BatchNorm1d(3))
        >>> x = torch.randn(8, 2)
        >>> _ = recompute_bn(net, [x[:4], x[4:]])
        >>> h = net[0](x)   # dropout is off during the pass: BN saw exactly these inputs
        >>> expected = (h[:4].mean(0) + h[4:].mean(0)) / 2
        >>> torch.allclose(net[2].running_mean, expected), net.training
        (True, True)
    """
    bns = batchnorm_modules(model)
    if not bns:
        return model
    runtime = runtime or Runtime()
    for m in bns:
        m.reset_running_stats()

    def forward(x):
        """One batch through the model (on the runtime's device)."""
        x = x if runtime.device is None else x.to(runtime.device)
        with runtime.autocast(x.device):
            model(x)
    bn_pass(model, loader, forward)
    return model


@torch.no_grad()
def bn_statistics(curve, flats: torch.Tensor, loader: Iterable,
                  runtime: Optional[Runtime] = None) -> Dict[str, torch.Tensor]:
    """BN running statistics of K points ``flats [K, P]`` of ``curve``'s architecture, in one pass.

    Equal to :func:`recompute_bn` run on each point separately (the forwards
    of all K points share every batch, see
    :func:`modeconn.evaluation.stacked.batched_forward`). ``curve`` is a
    :class:`~modeconn.core.curve_model.CurveModel` (its ``net`` template and
    ``unflatten``). Returns buffer name -> ``[K, *shape]``; empty when the
    net has no BN. ``runtime.amp``: the forwards under bf16 autocast.
    """
    net = curve.net
    bns = batchnorm_modules(net)
    if not bns:
        return {}
    runtime = runtime or Runtime()
    K, device = flats.shape[0], flats.device
    names = {id(m): n for n, m in net.named_modules()}
    buffers = {}
    for m in bns:  # the state reset_running_stats() leaves, K times
        prefix = names[id(m)]
        buffers[f"{prefix}.running_mean"] = m.running_mean.new_zeros(K, *m.running_mean.shape, device=device)
        buffers[f"{prefix}.running_var"] = m.running_var.new_ones(K, *m.running_var.shape, device=device)
        buffers[f"{prefix}.num_batches_tracked"] = torch.zeros(K, dtype=torch.long, device=device)
    params = curve.unflatten(flats)
    vmapped, loop = batched_forward(net, True), batched_forward(net, False)

    def forward(x):
        """One batch through all K points (vmap or a loop, by the batch's work); BN updates the stacked buffers."""
        with runtime.autocast(device):
            (vmapped if vectorize_by_default(net, device, flats.shape[1] * len(x)) else loop)(params, buffers, x)
    bn_pass(net, loader, forward)
    return buffers
