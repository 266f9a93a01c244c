"""K networks of one architecture as stacked weights: one forward for all of them.

The weights of K points are tensors ``[K, *shape]`` per parameter (and per
buffer); :func:`batched_forward` runs the template on a batch for all K, either
as one ``torch.func.vmap`` or as a loop over the points, the template run on
views of the stacked tensors (so in-place BatchNorm updates land in the stacked buffers).

Where an op has no vmap batching rule (PyTorch's CPU attention kernels,
``aten::_scaled_dot_product_flash_attention_for_cpu``, and the fused
``aten::_native_multi_head_attention``), vmap would loop inside the op with a
"There is a performance drop" warning; the first such call marks the
template, and from then on it is evaluated point by point, silently.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Callable, ContextManager, Dict, Iterator, Optional

import torch
from torch import nn
from torch.func import functional_call, vmap

__all__ = ["batched_forward", "each_point", "vectorize_by_default", "compiled_forward", "VMAP_MAX_WORK"]

Stacked = Dict[str, torch.Tensor]

# templates on which vmap met an op without a batching rule (evaluated point by point from then on)
_NO_BATCHING_RULE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_FALLBACK_WARNING = "we have not yet implemented the batching rule"


def batched_forward(net: nn.Module, vectorize: bool = True) -> Callable[[Stacked, Stacked, torch.Tensor], torch.Tensor]:
    """``f(params [K,...], buffers [K,...], x) -> [K, B, ...]``: K points on one batch.

    ``vectorize``: one ``vmap`` over the stacked weights; otherwise a loop
    over the K points. A vmap call that meets an op without a batching rule
    returns its (correct) result without the warning, and every later call
    for ``net`` loops over the points (:func:`vectorize_by_default` then says no).

    Example:
        >>> net = nn.Linear(3, 2)
        >>> params = {"weight": torch.randn(4, 2, 3), "bias": torch.zeros(4, 2)}
        >>> batched_forward(net)(params, {}, torch.randn(5, 3)).shape
        torch.Size([4, 5, 2])
    """
    loop = _point_loop(net)
    if not vectorize:
        return loop
    vmapped = vmap(lambda p, b, x: functional_call(net, {**p, **b}, (x,)), in_dims=(0, 0, None))

    def forward(p: Stacked, b: Stacked, x: torch.Tensor) -> torch.Tensor:
        """One vmap, unless ``net`` has shown an op vmap cannot batch."""
        if net in _NO_BATCHING_RULE:
            return loop(p, b, x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = vmapped(p, b, x)
        for w in caught:  # other warnings go on to the caller's filters
            if _FALLBACK_WARNING in str(w.message):
                _NO_BATCHING_RULE.add(net)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        return out
    return forward


def each_point(net: nn.Module, p: Stacked, b: Stacked, x: torch.Tensor,
               input_layers: Optional[Callable[[torch.Tensor], ContextManager[Callable[[int], None]]]] = None
               ) -> Iterator[torch.Tensor]:
    """The K points' outputs on ``x``, one after another: ``net`` run on views of the stacked tensors.

    Each point's views are put into ``net``'s parameter and buffer slots and
    ``net`` is called as it is (in-place BatchNorm updates land in the stacked
    buffers); the slots get their earlier tensors back when the generator
    ends or is closed (use ``contextlib.closing`` if it may be left early).
    The same as ``functional_call`` per point, without its per-call renaming
    and swapping of every tensor (≈0.07 ms per call, measured on the digits
    MLP, more than a small network's forward on a batch). A consumer that
    reduces each output before asking for the next never holds K outputs at
    once (see :func:`modeconn.evaluation.points.evaluate_points`).
    ``input_layers(x)``: a context (:meth:`~modeconn.evaluation.input_span.InputLayers.on`)
    within which the layers reading ``x`` answer for point k after ``at(k)``.
    """
    K = next(iter(p.values())).shape[0]
    if x.dim() == 4:  # channels-last convolutions are markedly faster on CPUs
        x = x.contiguous(memory_format=torch.channels_last)
    stacks = {**p, **b}
    slots = [_slot(net, name) for name in stacks]
    saved = [(table, attr, table.get(attr, _ABSENT)) for table, attr in slots]
    try:
        with (contextlib.nullcontext(None) if input_layers is None else input_layers(x)) as at:
            for k in range(K):
                for (table, attr), v in zip(slots, stacks.values()):
                    table[attr] = v[k].contiguous(memory_format=torch.channels_last) if v.dim() == 5 else v[k]
                if at is not None:
                    at(k)
                yield net(x)
    finally:
        for table, attr, old in saved:
            if old is _ABSENT:
                del table[attr]
            else:
                table[attr] = old


_ABSENT = object()


def _slot(net: nn.Module, name: str):
    """``(table, attr)``: the ``_buffers`` or ``_parameters`` dict of the submodule that holds ``name``."""
    owner, _, attr = name.rpartition(".")
    module = net.get_submodule(owner)
    return (module._buffers if attr in module._buffers else module._parameters), attr


def _point_loop(net: nn.Module) -> Callable[[Stacked, Stacked, torch.Tensor], torch.Tensor]:
    """The K points one after another (:func:`each_point`), outputs stacked."""
    def loop(p: Stacked, b: Stacked, x: torch.Tensor) -> torch.Tensor:
        """The K points one after another."""
        with contextlib.closing(each_point(net, p, b, x)) as outs:
            return torch.stack(list(outs))
    return loop


# On CPUs a vmapped dense layer becomes a batched matmul that runs slower than K plain matmuls
# once a point's work per batch is large; below it vmap saves the per-point Python and dispatch
# overhead. Measured on 2 threads (MLPs of width 8..512, batches 16..1024; benchmarks/_peer_grid.py):
# the loop wins from about 4e6 parameters x samples per batch (26k parameters x 1438 samples: 1.8x).
VMAP_MAX_WORK = 4_000_000


def vectorize_by_default(net: nn.Module, device: torch.device, work: Optional[int] = None) -> bool:
    """Whether to vmap over points: yes on GPUs and for small dense work on CPUs.

    On CPUs vmapped convolutions become grouped convolutions that run slower
    than one point after another (measured in benchmarks/eval_path.py),
    so CPU + convolutions -> loop over points. Dense nets on CPUs with a
    known ``work`` (a point's parameters x the samples of a batch): vmap
    while it is below :data:`VMAP_MAX_WORK`, else loop. A template on which
    vmap met an op without a batching rule (see :func:`batched_forward`) -> loop.
    """
    if net in _NO_BATCHING_RULE:
        return False
    if torch.device(device).type != "cpu":
        return True
    if any(isinstance(m, nn.modules.conv._ConvNd) for m in net.modules()):
        return False
    return work is None or work < VMAP_MAX_WORK


_COMPILED: "weakref.WeakKeyDictionary[nn.Module, Callable]" = weakref.WeakKeyDictionary()


def compiled_forward(net: nn.Module) -> Callable[[Stacked, Stacked, torch.Tensor], torch.Tensor]:
    """``torch.compile`` of the vmapped forward, built once per template (for eval-mode passes only)."""
    if net not in _COMPILED:
        _COMPILED[net] = torch.compile(batched_forward(net))
    return _COMPILED[net]
