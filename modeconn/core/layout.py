"""The flat parameter layout: one vector θ ∈ R^P for every parameter of a network.

Curves, directions, planes, Hessians and alignment all treat a network as a
point in R^P. :class:`FlatLayout` is the one place that knows which slice of
that vector is which parameter (names in ``named_parameters`` order, shapes),
and turns a flat vector back into named tensors or into a standalone module.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from math import prod
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["FlatLayout"]

Source = Union[nn.Module, Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class FlatLayout:
    """Names and shapes of parameters, in the order they sit in a flat vector.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> layout = FlatLayout.of(net)
        >>> layout.names, layout.num_parameters
        (('weight', 'bias'), 8)
        >>> theta = layout.flatten(net)
        >>> torch.equal(layout.unflatten(theta)["weight"], net.weight.detach())
        True
    """

    names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]

    @classmethod
    def of(cls, module: nn.Module, names: Optional[Sequence[str]] = None) -> "FlatLayout":
        """The layout of ``module``'s parameters (all of them, or those in ``names``, in that order)."""
        named = dict(module.named_parameters())
        if names is None:
            names = list(named)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ValueError(f"unknown parameter name(s) {unknown}; the module has {list(named)}")
        if not names:
            raise ValueError("the module has no parameters: there is no parameter space to work in")
        return cls(tuple(names), tuple(tuple(named[n].shape) for n in names))

    @property
    def numels(self) -> List[int]:
        """Number of entries of each parameter."""
        return [prod(s) for s in self.shapes]

    @property
    def num_parameters(self) -> int:
        """P, the length of a flat vector."""
        return sum(self.numels)

    def check(self, flat: torch.Tensor, what: str = "flat vector") -> torch.Tensor:
        """``flat`` itself, after checking that its last dimension is P (the error names ``what``)."""
        if not isinstance(flat, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(flat).__name__}")
        if flat.dim() == 0 or flat.shape[-1] != self.num_parameters:
            raise ValueError(f"{what} must have P={self.num_parameters} entries in its last dimension "
                             f"(the architecture's parameters), got shape {tuple(flat.shape)}")
        return flat

    def flatten(self, source: Source, dtype: Optional[torch.dtype] = None,
                device: Optional[torch.device] = None) -> torch.Tensor:
        """θ of a module or state dict as one detached ``[P]`` vector in this layout's order."""
        state = dict(source.named_parameters()) if isinstance(source, nn.Module) else source
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"missing parameter(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        wrong = [f"{n}: {tuple(state[n].shape)} != {s}" for n, s in zip(self.names, self.shapes)
                 if tuple(state[n].shape) != s]
        if wrong:
            raise ValueError("parameter shapes differ: " + "; ".join(wrong[:5]))
        flat = torch.cat([state[n].detach().reshape(-1) for n in self.names])
        return flat.to(device=device, dtype=dtype)

    def unflatten(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Split ``[..., P]`` into name -> ``[..., *shape]`` views (leading dimensions kept)."""
        self.check(flat)
        lead = flat.shape[:-1]
        return {n: c.reshape(*lead, *s)
                for n, s, c in zip(self.names, self.shapes, torch.split(flat, self.numels, dim=-1))}

    def module_at(self, template: nn.Module, flat: torch.Tensor,
                  buffers: Optional[Mapping[str, torch.Tensor]] = None) -> nn.Module:
        """A standalone copy of ``template`` whose parameters are the point ``flat`` [P].

        ``template`` may hold parameters or have had them stripped (a
        CurveModel's network); ``buffers`` (name -> tensor) replace the copy's
        buffers, e.g. BatchNorm statistics recomputed for this point. The copy
        keeps ``template``'s train/eval mode.
        """
        if self.check(flat).dim() != 1:
            raise ValueError(f"module_at takes one point [P], got shape {tuple(flat.shape)}")
        model = copy.deepcopy(template)
        with torch.no_grad():
            for name, w in self.unflatten(flat.detach()).items():
                mod_name, _, attr = name.rpartition(".")
                model.get_submodule(mod_name).register_parameter(attr, nn.Parameter(w.clone()))
            for name, b in (buffers or {}).items():
                model.get_buffer(name).copy_(b)
        return model
