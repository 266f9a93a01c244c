"""Curve families: the coefficients c_k(t) that weight the bends of a path.

A curve with ``num_bends`` bends θ_0 … θ_{K-1} is the point
``θ(t) = Σ_k c_k(t) θ_k`` for t in [0, 1]. The first and last bends are the
endpoints. A straight line is ``PolyChain(2)`` (equal to ``Bezier(2)``).
"""
from __future__ import annotations

import math
from typing import Union

import torch

TLike = Union[float, int, torch.Tensor]


def _as_t(t: TLike, check: bool = True) -> torch.Tensor:
    """Turn t into a float tensor (0-d or 1-d) and check it lies in [0, 1]."""
    if isinstance(t, torch.Tensor):
        tt = t if t.is_floating_point() else t.float()
    else:
        tt = torch.tensor(float(t))
    if tt.dim() > 1:
        raise ValueError(f"t must be a scalar or a 1-D tensor, got shape {tuple(tt.shape)}")
    if check and tt.device.type == "cpu":
        if torch.isnan(tt).any():
            raise ValueError("t is NaN; t must lie in [0, 1]")
        if (tt < 0).any() or (tt > 1).any():
            bad = tt[(tt < 0) | (tt > 1)].flatten()[0].item()
            raise ValueError(f"t = {bad:g} lies outside [0, 1]")
    return tt


class Curve:
    """Base class: a family of coefficient functions over ``num_bends`` bends."""

    name = "curve"

    def __init__(self, num_bends: int):
        if not isinstance(num_bends, int) or isinstance(num_bends, bool):
            raise ValueError(f"num_bends must be an integer, got {num_bends!r}")
        if num_bends < 2:
            raise ValueError(
                f"num_bends = {num_bends}: a curve needs at least 2 bends (its two endpoints)"
            )
        self.num_bends = num_bends

    def coefficients(self, t: TLike, check: bool = True) -> torch.Tensor:
        """c(t) as a tensor of shape ``[..., num_bends]``; rows sum to 1."""
        return self._coefficients(_as_t(t, check))

    def _coefficients(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """c(t) for a checked float tensor t (0-d or 1-d); each family defines it."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_bends})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.num_bends == other.num_bends

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.num_bends))


class Bezier(Curve):
    """Bezier curve: Bernstein polynomials ``C(n,k) t^k (1-t)^(n-k)``, n = K-1.

    Passes through the first and last bend; the middle bends are control points.

    Example:
        >>> Bezier(3).coefficients(0.5)   # weights of θ_0, θ_1, θ_2 at t = 1/2
        tensor([0.2500, 0.5000, 0.2500])
        >>> Bezier(3).coefficients(torch.tensor([0.0, 1.0]))   # the endpoints
        tensor([[1., 0., 0.],
                [0., 0., 1.]])
    """

    name = "bezier"

    def _coefficients(self, t: torch.Tensor) -> torch.Tensor:
        """Bernstein basis of degree K-1 at t."""
        n = self.num_bends - 1
        k = torch.arange(n + 1, dtype=t.dtype, device=t.device)
        binom = torch.tensor([math.comb(n, i) for i in range(n + 1)], dtype=t.dtype, device=t.device)
        tt = t.unsqueeze(-1)
        return binom * tt.pow(k) * (1 - tt).pow(n - k)


class PolyChain(Curve):
    """Polygonal chain through equally spaced bends: hat functions.

    Bend k sits at t = k/(K-1); between two bends the path is the straight
    segment joining them.

    Example:
        >>> PolyChain(3).coefficients(0.25)   # halfway between bends 0 and 1
        tensor([0.5000, 0.5000, 0.0000])
    """

    name = "polychain"

    def _coefficients(self, t: torch.Tensor) -> torch.Tensor:
        """Hat functions ``max(0, 1 - |t·(K-1) - k|)`` at t."""
        n = self.num_bends - 1
        knots = torch.arange(n + 1, dtype=t.dtype, device=t.device)
        return torch.clamp(1 - (t.unsqueeze(-1) * n - knots).abs(), min=0)


CURVES = {"bezier": Bezier, "polychain": PolyChain}


def make_curve(name: str, num_bends: int) -> Curve:
    """Build a curve family by name ('bezier' or 'polychain').

    Example:
        >>> make_curve("bezier", 3), make_curve("PolyChain", 4)
        (Bezier(3), PolyChain(4))
    """
    try:
        cls = CURVES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown curve {name!r}; choose one of {sorted(CURVES)}") from None
    return cls(num_bends)
