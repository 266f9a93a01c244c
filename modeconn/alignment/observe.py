"""Reading a group's units in forward passes: loader batches in, activations at observation points out.

Activation matching compares, unit by unit, what two models compute at the
same places.  :class:`ActivationRecorder` returns the tensors at a spec's
observation points (torch.fx node names, or module names read with forward
hooks); :func:`unit_matrix` cuts a group's units out of such a tensor as a
``[samples, units]`` matrix, counting spatial positions and flattened blocks
as extra samples.  An ``nn.MultiheadAttention`` module observed by name gives
its per-head attention probabilities (how its heads are told apart).
:class:`PointStats` accumulates, batch after batch, the float64 sums from which
the A-vs-B unit correlations follow.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import fx, nn

from modeconn.alignment.spec import ObservePoint

__all__ = ["ActivationRecorder", "PointStats", "unit_matrix", "batch_input", "batch_inputs"]


class ActivationRecorder:
    """Runs a model and returns the tensors at the requested observation points.

    Names are looked up first as torch.fx node names of the traced model (the
    traced graph is cut to return just those nodes), then as module names
    (captured with forward hooks; a module called more than once per forward is
    ambiguous and rejected).
    """

    def __init__(self, model: nn.Module, names: List[str], where: Dict[str, str]):
        """Prepare to record ``names``; ``where`` maps a name to its group, for error messages."""
        self.names = list(OrderedDict.fromkeys(names))
        try:
            gm = fx.symbolic_trace(model)
        except Exception:  # an untraceable model can still be observed through module hooks
            gm = None
        node_by_name = {n.name: n for n in gm.graph.nodes} if gm is not None else {}
        modules = dict(model.named_modules())
        self.fx_names = [n for n in self.names if n in node_by_name]
        self.hook_names = []
        for n in self.names:
            if n in node_by_name:
                continue
            if n in modules and n != "":
                self.hook_names.append(n)
            else:
                raise ValueError(
                    f"observe point '{n}' of group '{where.get(n, '?')}' is neither a torch.fx node "
                    f"of the traced model nor a submodule name")
        self.runner: Callable = model
        if self.fx_names:
            out = [n for n in gm.graph.nodes if n.op == "output"][0]
            out.args = (tuple(node_by_name[n] for n in self.fx_names),)
            gm.graph.eliminate_dead_code()
            gm.recompile()
            self.runner = gm
        self.hooked = [(n, modules[n]) for n in self.hook_names]

    def __call__(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Run the model on ``x``; the output of every observation point by name."""
        captured: Dict[str, List[torch.Tensor]] = {n: [] for n in self.hook_names}
        handles = [_capture(m, captured[n]) for n, m in self.hooked]
        try:
            res = self.runner(x)
        finally:
            for h in handles:
                h.remove()
        acts: Dict[str, torch.Tensor] = {}
        if self.fx_names:
            for n, t in zip(self.fx_names, res):
                acts[n] = t
        for n, lst in captured.items():
            if len(lst) != 1:
                raise ValueError(
                    f"observe point '{n}': the module ran {len(lst)} times in one forward pass; "
                    f"use a torch.fx node name instead")
            acts[n] = lst[0]
        return acts


def _capture(module: nn.Module, into: List[torch.Tensor]):
    """Register a forward hook appending ``module``'s output to ``into``; return its handle.

    An ``nn.MultiheadAttention`` gives its per-head attention probabilities
    ``[..., H, T, S]`` instead (its output holds no group's units): the call is
    repeated with ``need_weights=True, average_attn_weights=False``.  A hook also
    makes PyTorch skip its fused eval path, which would bypass the submodules.
    """
    if not isinstance(module, nn.MultiheadAttention):
        return module.register_forward_hook(lambda mod, inp, out: into.append(out))
    busy: List[bool] = []

    def per_head_weights(mod, args, kwargs, out):
        """Recompute the call with per-head weights (the hook ignores its own recomputation)."""
        if busy:
            return
        call = inspect.signature(mod.forward).bind(*args, **kwargs).arguments
        call.update(need_weights=True, average_attn_weights=False)
        busy.append(True)
        try:
            into.append(mod(**call)[1])
        finally:
            busy.clear()
    return module.register_forward_hook(per_head_weights, with_kwargs=True)


def unit_matrix(t: torch.Tensor, p: ObservePoint, size: int, group: str) -> torch.Tensor:
    """``[samples, size]`` float64 view of a group's units at one observation point."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"observe point '{p.node}' of group '{group}' is not a tensor")
    dim = p.dim % t.dim() if -t.dim() <= p.dim < t.dim() else None
    if dim is None or p.offset + p.outer * size * p.inner > t.shape[dim]:
        raise ValueError(
            f"observe point '{p.node}' of group '{group}' has shape {tuple(t.shape)}, which does not "
            f"hold {p.outer}x{size} units (x{p.inner}) at dim {p.dim} from offset {p.offset}")
    x = t.detach().movedim(dim, -1).narrow(-1, p.offset, p.outer * size * p.inner)
    x = x.reshape(*x.shape[:-1], p.outer, size, p.inner).transpose(-1, -2)
    return x.reshape(-1, size).to(torch.float64)


def batch_input(batch) -> torch.Tensor:
    """The input tensor of a loader batch: the batch itself, or ``x`` of an ``(x, y, ...)`` tuple."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise ValueError(
        f"loader batches must be tensors or (x, y) tuples with a tensor x, got {type(batch).__name__}")


def batch_inputs(loader, max_batches: Optional[int]) -> Iterator[torch.Tensor]:
    """The input tensors of the first ``max_batches`` batches of ``loader`` (all when None)."""
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        yield batch_input(batch)


@dataclass
class PointStats:
    """Running float64 sums of one observation point: enough for the A-vs-B unit correlations."""

    n: int
    sum_a: torch.Tensor
    sum_b: torch.Tensor
    sq_a: torch.Tensor
    sq_b: torch.Tensor
    cross: torch.Tensor

    @classmethod
    def zeros(cls, size: int, device: torch.device) -> "PointStats":
        """Empty sums for ``size`` units."""
        def z():
            """A zero vector, one entry per unit."""
            return torch.zeros(size, dtype=torch.float64, device=device)
        return cls(0, z(), z(), z(), z(), torch.zeros(size, size, dtype=torch.float64, device=device))

    def add(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        """Accumulate ``[samples, units]`` activations of A and B."""
        self.n += xa.shape[0]
        self.sum_a += xa.sum(0)
        self.sum_b += xb.sum(0)
        self.sq_a += (xa * xa).sum(0)
        self.sq_b += (xb * xb).sum(0)
        self.cross += xa.T @ xb

    def correlation(self) -> torch.Tensor:
        """``C[i, j]``: Pearson correlation of A's unit i with B's unit j (0 where a unit is constant)."""
        n = self.n
        ma_, mb_ = self.sum_a / n, self.sum_b / n
        cov = self.cross / n - torch.outer(ma_, mb_)
        sd_a = (self.sq_a / n - ma_ * ma_).clamp_min(0).sqrt()
        sd_b = (self.sq_b / n - mb_ * mb_).clamp_min(0).sqrt()
        denom = torch.outer(sd_a, sd_b)
        return torch.where(denom > 1e-12, cov / denom.clamp_min(1e-12), torch.zeros_like(cov))
