"""Directions in the flat parameter space and the planes (or lines) they span.

A network's parameters are one flat vector θ of length P, laid out as a
:class:`~modeconn.curve_model.CurveModel` lays out its bends: the
``named_parameters`` of the architecture, in that order, each flattened.
Buffers (BatchNorm statistics) are not part of θ.

Directions (Li et al. 2018, "Visualizing the loss landscape of neural nets"):

* :func:`random_direction` draws a Gaussian vector from a seeded
  ``torch.Generator`` and rescales it with :func:`normalize_direction`;
* ``norm="filter"`` rescales, for every parameter tensor with ``dim >= 2``,
  each output filter/row ``i`` (the slice along axis 0) so that
  ``||d_i|| = ||θ_i||``; ``"layer"`` does the same per parameter tensor;
  ``"model"`` rescales the whole vector to ``||θ||``; ``"none"`` keeps the
  raw Gaussian;
* 1-D parameters (biases, norm-layer affine weights) are set to zero by
  default (``ignore_1d=True``, the reference's ``--xignore biasbn``); with
  ``ignore_1d=False`` they are kept and normalised per tensor (as
  ``"layer"``) under ``"filter"``;
* :func:`model_direction` is ``θ₂ − θ₁`` between two networks.

A :class:`Plane` is ``origin + a·d1 (+ b·d2)``; :func:`plane_through`
builds the orthonormal plane through three points (Gram–Schmidt) and their
2-D coordinates; :meth:`Plane.project` maps flat vectors to coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

NORMS = ("filter", "layer", "model", "none")

__all__ = ["NORMS", "Layout", "layout_of", "flatten_parameters", "random_direction", "normalize_direction",
           "orthogonalize", "model_direction", "Plane", "plane_through", "random_plane"]


# -------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """Names, shapes and sizes of the parameters, in flat-vector order."""

    names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]

    @property
    def numels(self) -> List[int]:
        return [int(np.prod(s)) if len(s) else 1 for s in self.shapes]

    @property
    def num_parameters(self) -> int:
        return sum(self.numels)

    def split(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """Views of a flat ``[P]`` vector, one per parameter, in their shapes."""
        if flat.dim() != 1 or flat.numel() != self.num_parameters:
            raise ValueError(f"expected a flat vector of length {self.num_parameters}, got shape {tuple(flat.shape)}")
        return [c.view(s) for c, s in zip(torch.split(flat, self.numels), self.shapes)]


def layout_of(obj: Union[nn.Module, Layout]) -> Layout:
    """The flat layout of a module's parameters, a CurveModel's points, or a Layout."""
    if isinstance(obj, Layout):
        return obj
    if hasattr(obj, "names") and hasattr(obj, "shapes") and hasattr(obj, "unflatten"):  # CurveModel
        return Layout(tuple(obj.names), tuple(tuple(s) for s in obj.shapes))
    if isinstance(obj, nn.Module):
        named = list(obj.named_parameters())
        if not named:
            raise ValueError("the module has no parameters: there is no parameter space to take directions in")
        return Layout(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))
    raise TypeError(f"expected an nn.Module, a CurveModel or a Layout, got {type(obj).__name__}")


def flatten_parameters(model: nn.Module) -> torch.Tensor:
    """θ of a module as one flat vector (``named_parameters`` order, detached copy)."""
    params = [p.detach().reshape(-1) for _, p in model.named_parameters()]
    if not params:
        raise ValueError("the module has no parameters")
    return torch.cat(params)


def _check_flat(name: str, v: torch.Tensor, layout: Layout) -> None:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() != 1 or v.numel() != layout.num_parameters:
        raise ValueError(f"{name} must be a flat vector of length P={layout.num_parameters} "
                         f"(the architecture's parameters), got shape {tuple(v.shape)}")


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown normalisation {norm!r}; choose one of {NORMS}")


# ---------------------------------------------------------------- directions
@torch.no_grad()
def normalize_direction(direction: torch.Tensor, origin: torch.Tensor, layout: Union[nn.Module, Layout],
                        norm: str = "filter", ignore_1d: bool = True) -> torch.Tensor:
    """Rescale ``direction`` to the scale of the weights ``origin`` (returns a new vector).

    ``filter``: each slice ``d[i]`` along axis 0 of every parameter with
    ``dim >= 2`` becomes ``d[i] / ||d[i]|| * ||θ[i]||``; ``layer``: each
    parameter tensor ``d / ||d|| * ||θ||``; ``model``: the whole vector
    (over the included entries); ``none``: unchanged. 1-D parameters are
    zeroed with ``ignore_1d`` (default), else normalised per tensor under
    ``filter``/``layer`` (and included in ``model``). A zero slice of θ gives
    a zero slice of the direction.
    """
    _check_norm(norm)
    layout = layout_of(layout)
    _check_flat("direction", direction, layout)
    _check_flat("origin", origin, layout)
    out = direction.detach().clone()
    theta = origin.detach().to(out)
    d_parts, w_parts = layout.split(out), layout.split(theta)

    def rescale(d: torch.Tensor, w: torch.Tensor, dim: Optional[int]) -> None:
        if dim is None:
            dn, wn = d.norm(), w.norm()
        else:
            dn = d.reshape(d.shape[0], -1).norm(dim=1)
            wn = w.reshape(w.shape[0], -1).norm(dim=1)
        scale = torch.where(dn > 0, wn / dn.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(dn))
        d.mul_(scale.view(-1, *([1] * (d.dim() - 1))) if dim is not None else scale)

    included_sq = theta.new_zeros(())
    for d, w in zip(d_parts, w_parts):
        if d.dim() <= 1 and ignore_1d:
            d.zero_()
            continue
        included_sq += w.pow(2).sum()
        if norm == "filter":
            rescale(d, w, 0 if d.dim() >= 2 else None)
        elif norm == "layer":
            rescale(d, w, None)
    if norm == "model":
        dn = out.norm()
        if dn > 0:
            out.mul_(included_sq.sqrt() / dn)
    return out


def random_direction(origin: torch.Tensor, layout: Union[nn.Module, Layout], norm: str = "filter",
                     ignore_1d: bool = True, seed: Optional[int] = 0,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A Gaussian direction around ``origin``, normalised by :func:`normalize_direction`.

    The vector is drawn on the CPU from ``generator`` (or a fresh one seeded
    with ``seed``), so it is the same on every device; it is returned with
    ``origin``'s dtype and device.
    """
    _check_norm(norm)
    layout = layout_of(layout)
    _check_flat("origin", origin, layout)
    if generator is None:
        if seed is None:
            raise ValueError("random_direction needs a seed or a generator")
        generator = torch.Generator().manual_seed(int(seed))
    raw = torch.randn(layout.num_parameters, generator=generator, dtype=torch.float64)
    raw = raw.to(device=origin.device, dtype=origin.dtype)
    return normalize_direction(raw, origin, layout, norm, ignore_1d)


def orthogonalize(d2: torch.Tensor, d1: torch.Tensor, keep_norm: bool = True) -> torch.Tensor:
    """``d2`` minus its component along ``d1`` (computed in float64).

    With ``keep_norm`` the result is rescaled to ``||d2||`` so the axis keeps
    its scale (a filter-normalised d2 then keeps its overall size, while its
    per-filter norms hold only approximately).
    """
    a, b = d1.detach().double(), d2.detach().double()
    nn_ = a.dot(a)
    if nn_ == 0:
        raise ValueError("cannot orthogonalise against a zero direction")
    r = b - (b.dot(a) / nn_) * a
    rn = r.norm()
    if rn == 0:
        raise ValueError("the two directions are parallel: nothing is left after orthogonalisation")
    if keep_norm:
        r = r * (b.norm() / rn)
    return r.to(d2.dtype)


def model_direction(origin: Union[torch.Tensor, nn.Module], target: Union[torch.Tensor, nn.Module]) -> torch.Tensor:
    """``θ₂ − θ₁``: the direction from one network to another (same architecture)."""
    a = flatten_parameters(origin) if isinstance(origin, nn.Module) else origin.detach()
    b = flatten_parameters(target) if isinstance(target, nn.Module) else target.detach()
    if a.shape != b.shape:
        raise ValueError(f"the two networks differ in size: {tuple(a.shape)} vs {tuple(b.shape)} parameters")
    return (b.to(a) - a)


# --------------------------------------------------------------------- plane
@dataclass
class Plane:
    """The affine set ``origin + a·d1 (+ b·d2)`` in parameter space.

    ``d2`` is None for a line (1-D slice). The directions need not be
    orthonormal (random filter-normalised ones are not); :meth:`project`
    solves the least-squares problem through the Gram matrix.
    ``info`` records how the directions were made (seed, norm, ...).
    """

    origin: torch.Tensor
    d1: torch.Tensor
    d2: Optional[torch.Tensor] = None
    info: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("d1", "d2"):
            v = getattr(self, name)
            if v is not None and v.shape != self.origin.shape:
                raise ValueError(f"{name} has shape {tuple(v.shape)}, origin has {tuple(self.origin.shape)}")
        if self.origin.dim() != 1:
            raise ValueError(f"origin must be a flat vector, got shape {tuple(self.origin.shape)}")

    @property
    def dims(self) -> int:
        return 1 if self.d2 is None else 2

    @property
    def directions(self) -> torch.Tensor:
        """``[dims, P]``."""
        return torch.stack([self.d1] if self.d2 is None else [self.d1, self.d2])

    def points(self, coords, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Flat points ``[N, P]`` at coordinates ``[N, dims]`` (or ``[N]`` for a line).

        Computed as ``origin + a·d1 + b·d2`` in the plane's dtype, returned
        in ``dtype`` (default: the origin's).
        """
        c = torch.as_tensor(np.asarray(coords, dtype=np.float64))
        if c.dim() == 1 and self.dims == 1:
            c = c[:, None]
        if c.dim() != 2 or c.shape[1] != self.dims:
            raise ValueError(f"coords must be [N, {self.dims}], got shape {tuple(c.shape)}")
        o = self.origin
        out = o.unsqueeze(0) + c[:, 0:1].to(o) * self.d1.unsqueeze(0)
        if self.dims == 2:
            out.add_(c[:, 1:2].to(o) * self.d2.unsqueeze(0))
        return out.to(dtype or o.dtype)

    def point(self, a: float, b: Optional[float] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """One flat point ``[P]``."""
        if (b is None) != (self.dims == 1):
            raise ValueError(f"a {self.dims}-D plane takes {self.dims} coordinate(s)")
        return self.points([[a] if b is None else [a, b]], dtype)[0]

    def project(self, flat: torch.Tensor) -> np.ndarray:
        """Coordinates (float64 numpy, ``[..., dims]``) of flat vector(s) ``[..., P]``.

        The least-squares coordinates ``G⁻¹ Dᵀ (x − origin)``, ``G = D Dᵀ``;
        exact for points in the plane, the orthogonal projection otherwise.
        """
        D = self.directions.double()
        x = flat.detach().double().to(D.device) - self.origin.double()
        gram = D @ D.T
        rhs = x @ D.T
        coords = torch.linalg.solve(gram, rhs.reshape(-1, self.dims).T).T.reshape(rhs.shape)
        return coords.cpu().numpy()

    def residual(self, flat: torch.Tensor) -> np.ndarray:
        """Distance of flat vector(s) ``[..., P]`` from the plane."""
        c = torch.as_tensor(self.project(flat))
        D = self.directions.double()
        x = flat.detach().double().to(D.device) - self.origin.double()
        return (x - c.to(D.device) @ D).norm(dim=-1).cpu().numpy()

    def to(self, device=None, dtype=None) -> "Plane":
        f = lambda v: None if v is None else v.to(device=device, dtype=dtype)
        return Plane(f(self.origin), f(self.d1), f(self.d2), dict(self.info))

    def arrays(self) -> Dict[str, np.ndarray]:
        """The plane as numpy arrays (for an ``.npz``): origin, d1 (, d2)."""
        out = {"origin": self.origin.detach().cpu().numpy(), "d1": self.d1.detach().cpu().numpy()}
        if self.d2 is not None:
            out["d2"] = self.d2.detach().cpu().numpy()
        return out


def plane_through(p1: torch.Tensor, p2: torch.Tensor, p3: torch.Tensor,
                  dtype: torch.dtype = torch.float64) -> Tuple[Plane, np.ndarray]:
    """The plane through three points, orthonormal axes by Gram–Schmidt.

    ``origin = p1``, ``u = (p2 − p1)/|p2 − p1|``, ``v`` = ``p3 − p1`` minus its
    ``u`` component, normalised. Returns ``(plane, coords [3, 2])``: p1 at
    (0, 0), p2 at (|p2 − p1|, 0), p3 at (⟨p3 − p1, u⟩, ⟨p3 − p1, v⟩) with a
    positive second coordinate. Computed in float64 (``dtype``).
    """
    a, b, c = (p.detach().to(dtype) for p in (p1, p2, p3))
    if not (a.shape == b.shape == c.shape) or a.dim() != 1:
        raise ValueError(f"the three points must be flat vectors of one length, got shapes "
                         f"{tuple(p1.shape)}, {tuple(p2.shape)}, {tuple(p3.shape)}")
    e = b - a
    dx = e.norm()
    if dx == 0:
        raise ValueError("the first two points coincide: the plane is undefined")
    u = e / dx
    w = c - a
    x3 = w.dot(u)
    r = w - x3 * u
    dy = r.norm()
    if dy <= 1e-9 * max(float(dx), float(w.norm())):
        raise ValueError("the three points are (nearly) collinear: the plane is undefined "
                         "(for a curve: its middle bend lies on the segment between the endpoints; "
                         "was the curve trained?)")
    v = r / dy
    coords = np.array([[0.0, 0.0], [float(dx), 0.0], [float(x3), float(dy)]])
    return Plane(a, u, v, {"kind": "three_points"}), coords


def random_plane(origin: torch.Tensor, layout: Union[nn.Module, Layout], dims: int = 2, norm: str = "filter",
                 ignore_1d: bool = True, seed: int = 0, orthogonal: bool = False,
                 first: Optional[torch.Tensor] = None) -> Plane:
    """A line (``dims=1``) or plane (``dims=2``) of random directions around ``origin``.

    Both directions come from one ``torch.Generator`` seeded with ``seed``
    (d1 first, then d2; when ``first`` is given d2 is the first draw). ``first`` replaces d1 (e.g. ``model_direction(θ₁,
    θ₂)``; it is used as given, not normalised). ``orthogonal`` makes d2
    orthogonal to d1 (:func:`orthogonalize`, norm kept).
    """
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims}")
    layout = layout_of(layout)
    _check_flat("origin", origin, layout)
    gen = torch.Generator().manual_seed(int(seed))
    if first is None:
        d1 = random_direction(origin, layout, norm, ignore_1d, generator=gen)
    else:
        _check_flat("first", first, layout)
        d1 = first.detach().to(origin)
    d2 = None
    if dims == 2:
        d2 = random_direction(origin, layout, norm, ignore_1d, generator=gen)
        if orthogonal:
            d2 = orthogonalize(d2, d1)
    info = {"kind": "random" if first is None else "model_difference+random", "seed": int(seed), "norm": norm,
            "ignore_1d": bool(ignore_1d), "orthogonal": bool(orthogonal), "dims": dims}
    return Plane(origin.detach().clone(), d1, d2, info)
