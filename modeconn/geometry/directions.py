"""Directions in the flat parameter space and the planes (or lines) they span.

A network's parameters are one flat vector θ of length P in the
:class:`~modeconn.core.layout.FlatLayout` of its architecture (the
``named_parameters``, in that order, each flattened; a CurveModel's points
use the same layout). Buffers (BatchNorm statistics) are not part of θ.
Wherever a ``layout`` is asked for, a module, a CurveModel or a FlatLayout
may be given.

Directions (Li et al. 2018, "Visualizing the loss landscape of neural nets"):

* :func:`random_direction` draws a Gaussian vector from a seeded
  ``torch.Generator`` and rescales it with :func:`normalize_direction`;
* ``norm="filter"`` rescales, for every parameter tensor with ``dim >= 2``,
  each output filter/row ``i`` (the slice along axis 0) so that
  ``||d_i|| = ||θ_i||``; ``"layer"`` does the same per parameter tensor;
  ``"model"`` rescales all those entries together to the norm of θ's;
  ``"none"`` keeps the raw Gaussian;
* 1-D parameters (biases, norm-layer affine weights; scalars too) are set
  to zero by default (``ignore_1d=True``, the reference's ``--xignore
  biasbn``). With ``ignore_1d=False`` their direction is the parameter
  itself, ``d = θ``, under every norm but ``"none"``: what the reference
  implementation (``net_plotter.normalize_directions_for_weights``) does
  when biases and BN parameters are not ignored;
* :func:`model_direction` is ``θ₂ − θ₁`` between two networks.

A :class:`Plane` is ``origin + a·d1 (+ b·d2)``; :func:`plane_through`
builds the orthonormal plane through three points (Gram–Schmidt) and their
2-D coordinates; :meth:`Plane.project` maps flat vectors to coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from modeconn.core.curve_model import CurveModel
from modeconn.core.layout import FlatLayout

NORMS = ("filter", "layer", "model", "none")
LayoutLike = Union[nn.Module, CurveModel, FlatLayout]

__all__ = ["NORMS", "flatten_parameters", "random_direction", "normalize_direction", "orthogonalize",
           "model_direction", "Plane", "plane_through", "random_plane"]


# -------------------------------------------------------------------- layout
def _layout_of(obj: LayoutLike) -> FlatLayout:
    """The flat layout of a FlatLayout, a CurveModel's points or a module's parameters."""
    if isinstance(obj, FlatLayout):
        return obj
    if isinstance(obj, CurveModel):  # its own parameters are the bends; a point has the template's layout
        return obj.layout
    if isinstance(obj, nn.Module):
        return FlatLayout.of(obj)
    raise TypeError(f"expected an nn.Module, a CurveModel or a FlatLayout, got {type(obj).__name__}")


def flatten_parameters(model: nn.Module) -> torch.Tensor:
    """θ of a module as one flat vector (``named_parameters`` order, detached copy).

    Example:
        >>> flatten_parameters(nn.Linear(3, 2)).shape
        torch.Size([8])
    """
    return FlatLayout.of(model).flatten(model)


def _check_flat(name: str, v: torch.Tensor, layout: FlatLayout) -> None:
    """Raise unless ``v`` is one flat vector ``[P]`` of ``layout``."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() != 1 or v.numel() != layout.num_parameters:
        raise ValueError(f"{name} must be a flat vector of length P={layout.num_parameters} "
                         f"(the architecture's parameters), got shape {tuple(v.shape)}")


def _check_norm(norm: str) -> None:
    """Raise unless ``norm`` is one of :data:`NORMS`."""
    if norm not in NORMS:
        raise ValueError(f"unknown normalisation {norm!r}; choose one of {NORMS}")


# ---------------------------------------------------------------- directions
def _rescaled(d: torch.Tensor, w: torch.Tensor, per_row: bool) -> torch.Tensor:
    """``d`` scaled to ``w``'s norm, per slice along axis 0 when ``per_row``; a zero ``d`` or ``w`` gives 0."""
    if per_row:
        dn, wn = d.reshape(d.shape[0], -1).norm(dim=1), w.reshape(w.shape[0], -1).norm(dim=1)
    else:
        dn, wn = d.norm(), w.norm()
    scale = torch.where(dn > 0, wn / dn.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(dn))
    return d * (scale.reshape(-1, *([1] * (d.dim() - 1))) if per_row else scale)


@torch.no_grad()
def normalize_direction(direction: torch.Tensor, origin: torch.Tensor, layout: LayoutLike,
                        norm: str = "filter", ignore_1d: bool = True) -> torch.Tensor:
    """Rescale ``direction`` to the scale of the weights ``origin`` (returns a new vector).

    Parameters with ``dim >= 2``: ``filter`` turns each slice ``d[i]`` along
    axis 0 into ``d[i] / ||d[i]|| · ||θ[i]||``; ``layer`` each tensor into
    ``d / ||d|| · ||θ||``; ``model`` scales all of them by one factor, to
    the norm of θ's entries with ``dim >= 2``; ``none`` leaves them. A zero
    slice of θ gives a zero slice of the direction.

    Parameters with ``dim <= 1`` (biases, BatchNorm/LayerNorm weights): zero
    with ``ignore_1d`` (default); otherwise the weights themselves, ``d = θ``
    (Li et al.'s ``net_plotter.normalize_directions_for_weights`` without
    ``ignore='biasbn'``), except under ``none``, which keeps them raw. So
    under ``model`` with ``ignore_1d=False`` the whole direction has norm
    ``||θ||``.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
        >>> theta = flatten_parameters(net)
        >>> raw = torch.tensor([1.0, 0.0, 0.0, -1.0, 5.0, 5.0])   # weight rows, then bias
        >>> normalize_direction(raw, theta, net, "filter")
        tensor([ 5.,  0.,  0., -2.,  0.,  0.])
        >>> torch.equal(normalize_direction(raw, theta, net, "filter", ignore_1d=False)[4:], net.bias.detach())
        True
    """
    _check_norm(norm)
    layout = _layout_of(layout)
    _check_flat("direction", direction, layout)
    _check_flat("origin", origin, layout)
    d_parts = list(layout.unflatten(direction.detach()).values())
    w_parts = list(layout.unflatten(origin.detach().to(direction)).values())
    out = []
    for d, w in zip(d_parts, w_parts):
        if d.dim() <= 1:
            out.append(torch.zeros_like(d) if ignore_1d else (d if norm == "none" else w))
        elif norm in ("filter", "layer"):
            out.append(_rescaled(d, w, per_row=norm == "filter"))
        else:
            out.append(d)
    multi = [k for k, d in enumerate(d_parts) if d.dim() >= 2]
    if norm == "model" and multi:  # one factor for all dim >= 2 entries: their norm becomes θ's over them
        dn = sum(d_parts[k].pow(2).sum() for k in multi).sqrt()
        wn = sum(w_parts[k].pow(2).sum() for k in multi).sqrt()
        scale = wn / dn if dn > 0 else torch.zeros_like(dn)
        for k in multi:
            out[k] = d_parts[k] * scale
    return torch.cat([p.reshape(-1) for p in out])


def random_direction(origin: torch.Tensor, layout: LayoutLike, norm: str = "filter",
                     ignore_1d: bool = True, seed: Optional[int] = 0,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A Gaussian direction around ``origin``, normalised by :func:`normalize_direction`.

    The vector is drawn on the CPU from ``generator`` (or a fresh one seeded
    with ``seed``), so it is the same on every device; it is returned with
    ``origin``'s dtype and device.
    """
    _check_norm(norm)
    layout = _layout_of(layout)
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
        """Check that origin is flat and the directions have its shape."""
        for name in ("d1", "d2"):
            v = getattr(self, name)
            if v is not None and v.shape != self.origin.shape:
                raise ValueError(f"{name} has shape {tuple(v.shape)}, origin has {tuple(self.origin.shape)}")
        if self.origin.dim() != 1:
            raise ValueError(f"origin must be a flat vector, got shape {tuple(self.origin.shape)}")

    @property
    def dims(self) -> int:
        """1 for a line, 2 for a plane."""
        return 1 if self.d2 is None else 2

    @property
    def directions(self) -> torch.Tensor:
        """``[dims, P]``."""
        return torch.stack([self.d1] if self.d2 is None else [self.d1, self.d2])

    def points(self, coords, dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        """Flat points ``[N, P]`` at coordinates ``[N, dims]`` (or ``[N]`` for a line).

        Computed as ``origin + a·d1 + b·d2`` in the plane's dtype, returned
        in ``dtype`` (default: the origin's). ``out`` (``[N, P]``, any dtype
        and device) receives the points and is returned; in the origin's
        dtype and device it is filled row by row by the very same roundings,
        with no ``[N, P]`` temporaries (a grid reuses one buffer per pass).
        """
        c = torch.as_tensor(np.asarray(coords, dtype=np.float64))
        if c.dim() == 1 and self.dims == 1:
            c = c[:, None]
        if c.dim() != 2 or c.shape[1] != self.dims:
            raise ValueError(f"coords must be [N, {self.dims}], got shape {tuple(c.shape)}")
        o = self.origin
        if out is not None:
            if tuple(out.shape) != (len(c), o.numel()):
                raise ValueError(f"out must have shape {(len(c), o.numel())}, got {tuple(out.shape)}")
            if out.dtype != o.dtype or out.device != o.device:
                return out.copy_(self.points(c.numpy()))
            scratch = torch.empty_like(o)
            for row, ab in zip(out, c.to(o.dtype).tolist()):  # the coordinates rounded as below
                torch.add(o, torch.mul(self.d1, ab[0], out=scratch), out=row)
                if self.dims == 2:
                    row.add_(torch.mul(self.d2, ab[1], out=scratch))
            return out
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
        """The same plane with its vectors moved / cast (``Tensor.to`` semantics)."""
        def move(v):
            return None if v is None else v.to(device=device, dtype=dtype)

        return Plane(move(self.origin), move(self.d1), move(self.d2), dict(self.info))

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


def random_plane(origin: torch.Tensor, layout: LayoutLike, dims: int = 2, norm: str = "filter",
                 ignore_1d: bool = True, seed: int = 0, orthogonal: bool = False,
                 first: Optional[torch.Tensor] = None) -> Plane:
    """A line (``dims=1``) or plane (``dims=2``) of random directions around ``origin``.

    Both directions come from one ``torch.Generator`` seeded with ``seed``
    (d1 first, then d2; when ``first`` is given d2 is the first draw).
    ``first`` replaces d1 (e.g. ``model_direction(θ₁, θ₂)``; it is used as
    given, not normalised). ``orthogonal`` makes d2
    orthogonal to d1 (:func:`orthogonalize`, norm kept). ``norm`` and
    ``ignore_1d`` as in :func:`normalize_direction`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> theta = flatten_parameters(net)
        >>> plane = random_plane(theta, net, dims=2, norm="filter", seed=0)
        >>> plane.dims, tuple(plane.d1.shape)
        (2, (23,))
        >>> rows, w = plane.d1[:12].view(3, 4), net[0].weight.detach()   # first layer: filter norms match
        >>> torch.allclose(rows.norm(dim=1), w.norm(dim=1))
        True
        >>> plane.project(plane.point(0.5, -1.0)).round(6)
        array([ 0.5, -1. ])
    """
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims}")
    layout = _layout_of(layout)
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
