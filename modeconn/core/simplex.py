"""Simplexes and simplicial complexes of networks: θ = Σ_j α_j θ_{s_j}, α on the probability simplex.

A simplex of weights generalises the curve (Benton et al. 2021, "Loss Surface
Simplexes for Mode Connecting Volumes and Fast Ensembling"): vertices
θ_0 … θ_m, and the point ``θ(α) = Σ_j α_j θ_j`` for α ≥ 0 with Σ α = 1. A
*complex* is several simplexes over one set of K vertices; the
mode-connecting complex of :meth:`SimplexModel.connecting` has N fixed modes
and m shared free vertices, simplex i = {mode_i, v_1 … v_m}.

It is the curve machinery (:class:`~modeconn.core.curve_model.BendsModel`)
with other coefficients: the vertices are the K rows of one ``[K, P]``
matrix, fixed rows (modes) in a buffer, free rows trainable, and a point of
the complex is given by its barycentric coordinates over all K vertices,
``c ∈ R^K`` (α on one simplex's vertices, zero elsewhere): θ = c @ vertices,
one matmul through ``functional_call``. :meth:`SimplexModel.coefficients`
turns (α, simplex) into c.
"""
from __future__ import annotations

import math
from itertools import combinations_with_replacement
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from modeconn.core.curve_model import BendsModel, Source, _BufferStore, _check_compatible, _fresh_init
from modeconn.core.layout import FlatLayout
from modeconn.runtime.checkpoints import load_described, load_state_dict, save_described

__all__ = ["SimplexModel", "uniform_simplex", "barycentric_grid", "simplex_log_volume", "save_simplex",
           "load_simplex"]

_SUM_TOL = 1e-5


def uniform_simplex(num_vertices: int, generator: Optional[torch.Generator] = None,
                    num_samples: Optional[int] = None) -> torch.Tensor:
    """α ~ Dirichlet(1, …, 1): uniform on the probability simplex, ``[num_vertices]`` or ``[n, num_vertices]``.

    Drawn as normalised independent Exp(1) variables (E_j / Σ E, the standard
    construction of the Dirichlet), because ``torch.distributions.Dirichlet``
    cannot take a generator and a run must depend only on its seed.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> a = uniform_simplex(3, g, num_samples=4)
        >>> a.shape, bool(torch.allclose(a.sum(1), torch.ones(4, dtype=a.dtype))), bool((a >= 0).all())
        (torch.Size([4, 3]), True, True)
    """
    if num_vertices < 1:
        raise ValueError(f"num_vertices must be >= 1, got {num_vertices}")
    shape = (num_vertices,) if num_samples is None else (int(num_samples), num_vertices)
    e = torch.empty(shape, dtype=torch.float64).exponential_(1.0, generator=generator)
    return e / e.sum(-1, keepdim=True)


def barycentric_grid(num_vertices: int, resolution: int) -> np.ndarray:
    """Integer barycentric grid: every ``n ∈ N^num_vertices`` with Σ n = ``resolution``; α = n / resolution.

    ``C(resolution + num_vertices - 1, num_vertices - 1)`` rows, vertices included.

    Example:
        >>> barycentric_grid(3, 2).tolist()
        [[2, 0, 0], [1, 1, 0], [1, 0, 1], [0, 2, 0], [0, 1, 1], [0, 0, 2]]
    """
    if num_vertices < 1 or resolution < 1:
        raise ValueError(f"need num_vertices >= 1 and resolution >= 1, got {num_vertices}, {resolution}")
    rows = [np.bincount(np.array(c, dtype=int), minlength=num_vertices)
            for c in combinations_with_replacement(range(num_vertices), resolution)]
    return np.stack(rows)


def simplex_log_volume(vertices: torch.Tensor) -> torch.Tensor:
    """log of the m-dimensional volume of the simplex with vertices ``[m + 1, P]`` (differentiable).

    ``V = sqrt(det G) / m!`` with the Gram matrix ``G = E Eᵀ`` of the edge
    vectors ``E_j = θ_j − θ_0`` (equivalent to the Cayley–Menger determinant),
    computed in float64. A degenerate simplex gives ``-inf``.

    Example:
        >>> tri = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 2.0]])   # right triangle, area 3
        >>> round(float(simplex_log_volume(tri).exp()), 6)
        3.0
    """
    if vertices.dim() != 2 or len(vertices) < 2:
        raise ValueError(f"vertices must be [m + 1, P] with m >= 1, got shape {tuple(vertices.shape)}")
    m = len(vertices) - 1
    edges = (vertices[1:] - vertices[:1]).double()
    return 0.5 * torch.logdet(edges @ edges.T) - math.lgamma(m + 1)


class SimplexModel(BendsModel):
    """A simplicial complex of networks over K vertices (one simplex by default).

    Args:
        template: an instance of the architecture.
        vertices: the K vertices, as modules, state dicts or checkpoint paths.
        fixed: indices of the vertices kept fixed in training (default: all).
        simplexes: each simplex as a sequence of vertex indices (default: one
            simplex of all K vertices).

    Points are given by barycentric coordinates over all vertices, ``c [K]``
    (or ``[n, K]``), or by ``alpha`` on one simplex (``simplex=i``). The
    vertices' own buffers are kept, so a fixed vertex's point reproduces its
    model exactly; elsewhere BatchNorm statistics must be recomputed.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> a, b, c = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(3, 2)
        >>> tri = SimplexModel(a, [a, b, c])
        >>> w = tri.weights_at(torch.tensor([0.2, 0.3, 0.5]), simplex=0)["weight"]
        >>> torch.allclose(w, 0.2 * a.weight + 0.3 * b.weight + 0.5 * c.weight)
        True
    """

    def __init__(self, template: nn.Module, vertices: Sequence[Source], fixed: Optional[Sequence[int]] = None,
                 simplexes: Optional[Sequence[Sequence[int]]] = None):
        K = len(vertices)
        if K < 2:
            raise ValueError(f"a simplex needs at least 2 vertices, got {K}")
        simplexes = [tuple(range(K))] if simplexes is None else [tuple(int(v) for v in s) for s in simplexes]
        for s in simplexes:
            if len(s) < 2 or len(set(s)) != len(s) or not all(0 <= v < K for v in s):
                raise ValueError(f"simplex {s} must list >= 2 distinct vertex indices in [0, {K})")
        fixed = list(range(K)) if fixed is None else sorted({int(v) for v in fixed})
        if not all(0 <= v < K for v in fixed):
            raise ValueError(f"fixed vertices {fixed} must lie in [0, {K})")
        super().__init__(template)
        self.simplexes: List[Tuple[int, ...]] = simplexes
        states = [load_state_dict(v) for v in vertices]
        self._hold_bends(torch.stack([self._flat_state(s, f"vertex {k}") for k, s in enumerate(states)]), fixed)
        names = [n for n, _ in self.net.named_buffers()]
        for n in names:  # live buffers start as vertex 0's
            if n in states[0]:
                self.net.get_buffer(n).copy_(states[0][n])
        self.vertex_buffers = nn.ModuleList(
            [_BufferStore({n: s.get(n, self.net.get_buffer(n)) for n in names}) for s in states])

    @classmethod
    def connecting(cls, template: nn.Module, modes: Sequence[Source], free_vertices: int = 1,
                   init: str = "mean", seed: int = 0) -> "SimplexModel":
        """The mode-connecting complex: N fixed modes, m shared free vertices, simplex i = {mode_i, v_1..v_m}.

        Vertices are ordered modes first (0..N-1), then the free ones.
        ``init="mean"`` starts every free vertex at the modes' mean (for m ≥ 2
        a degenerate simplex, whose vertices separate in training as each gets
        its own α); ``"random"`` gives free vertex j a fresh initialisation of
        the template seeded by ``seed + j``.
        """
        if len(modes) < 2:
            raise ValueError(f"a mode-connecting complex needs at least 2 modes, got {len(modes)}")
        if isinstance(free_vertices, bool) or int(free_vertices) != free_vertices or free_vertices < 1:
            raise ValueError(f"free_vertices must be an integer >= 1, got {free_vertices!r}")
        if init not in ("mean", "random"):
            raise ValueError(f"init must be 'mean' or 'random', got {init!r}")
        layout = FlatLayout.of(template)
        states = [load_state_dict(m) for m in modes]
        for k, s in enumerate(states):
            _check_compatible(layout, s, f"mode {k}")
        N, m = len(states), int(free_vertices)
        if init == "mean":
            mean = {n: torch.stack([s[n] for s in states]).mean(0) for n in layout.names}
            free = [mean] * m
        else:
            free = [layout.unflatten(_fresh_init(template, layout, seed + j)) for j in range(1, m + 1)]
        return cls(template, [*states, *free], fixed=range(N),
                   simplexes=[(i, *range(N, N + m)) for i in range(N)])

    # ------------------------------------------------------------------ points
    @property
    def num_simplexes(self) -> int:
        """Number of simplexes of the complex."""
        return len(self.simplexes)

    def coefficients(self, alpha, simplex: int = 0, check: bool = True) -> torch.Tensor:
        """c ``[..., K]``: ``alpha [..., len(simplex)]`` placed on the vertices of simplex ``simplex``."""
        if not 0 <= int(simplex) < self.num_simplexes:
            raise ValueError(f"simplex {simplex} does not exist; the complex has {self.num_simplexes}")
        idx = self.simplexes[int(simplex)]
        a = _as_weights(alpha, len(idx), check, f"alpha of simplex {simplex}").to(self.fixed_bends)
        c = a.new_zeros((*a.shape[:-1], self.num_bends))
        c[..., list(idx)] = a
        return c

    def _c(self, alpha, simplex: Optional[int], check: bool) -> torch.Tensor:
        """c from ``alpha`` on simplex ``simplex``, or ``alpha`` itself as c when ``simplex`` is None."""
        if simplex is None:
            c = _as_weights(alpha, self.num_bends, check, "c (coordinates over all vertices)")
            return c.to(self.fixed_bends)
        return self.coefficients(alpha, simplex, check)

    def flat_weights_at(self, alpha, simplex: Optional[int] = None, check: bool = True) -> torch.Tensor:
        """θ flattened, ``[P]`` or ``[n, P]``: at ``alpha`` on ``simplex``, or at c ``[K]`` if ``simplex`` is None."""
        return self.flat_combination(self._c(alpha, simplex, check))

    def training_weights(self, c: torch.Tensor, weight_decay: float = 0.0) -> Dict[str, torch.Tensor]:
        """θ at coordinates ``c [K]`` (unchecked) for ``fit_simplex``'s step, weight decay at θ in its backward
        (:meth:`BendsModel.training_parameters`)."""
        return self.training_parameters(c, weight_decay)

    def weights_at(self, alpha, simplex: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Parameters at the point: name -> tensor (differentiable w.r.t. the free vertices)."""
        return self.unflatten(self.flat_weights_at(alpha, simplex))

    def forward(self, x, alpha, simplex: Optional[int] = None):
        """Output of the network at the point ``alpha`` (on ``simplex``, or c over all vertices)."""
        return self.forward_flat(x, self.flat_weights_at(alpha, simplex))

    def sample(self, generator: Optional[torch.Generator] = None) -> Tuple[int, torch.Tensor]:
        """(simplex i ~ uniform, c ``[K]`` with α ~ Dirichlet(1) on it): one draw of the training distribution."""
        i = int(torch.randint(self.num_simplexes, (), generator=generator))
        return i, self.coefficients(uniform_simplex(len(self.simplexes[i]), generator), i, check=False)

    def log_volume(self, simplex: int = 0) -> torch.Tensor:
        """log volume of simplex ``simplex`` (:func:`simplex_log_volume`), differentiable w.r.t. free vertices."""
        eye = torch.eye(self.num_bends, dtype=self.fixed_bends.dtype, device=self.fixed_bends.device)
        return simplex_log_volume(self.flat_combination(eye[list(self.simplexes[int(simplex)])]))

    def point(self, alpha, simplex: Optional[int] = None) -> nn.Module:
        """A standalone network at the point (``layout.module_at``), in this model's train/eval mode.

        Buffers: at a fixed vertex that vertex's own, so the vertex model is
        reproduced exactly; elsewhere the current live buffers (recompute BN).
        """
        c = self._c(alpha, simplex, True)
        if c.dim() != 1:
            raise ValueError("point() takes a single point")
        buffers = None
        hot = torch.nonzero(c).flatten().tolist()
        if len(hot) == 1 and hot[0] in self.fixed_idx and float(c[hot[0]]) == 1.0:
            buffers = self.vertex_buffers[hot[0]].as_dict()
        with torch.no_grad():
            model = self.layout.module_at(self.net, self.flat_combination(c), buffers)
        return model.train(self.training)

    def vertex_model(self, k: int) -> nn.Module:
        """Vertex ``k`` as a standalone network (its own buffers when it is fixed)."""
        c = torch.zeros(self.num_bends)
        c[int(k)] = 1.0
        return self.point(c)

    # ------------------------------------------------------------ checkpoints
    def describe(self) -> dict:
        """Plain-data description of the complex (for checkpoints)."""
        return {"simplexes": [list(s) for s in self.simplexes], "fixed": list(self.fixed_idx),
                "num_vertices": self.num_bends,
                "vertices": {n: v.detach().cpu().clone() for n, v in self.bends_by_name().items()},
                "buffers": {n: v.detach().cpu().clone() for n, v in self.net.named_buffers()},
                "vertex_buffers": [{n: v.cpu().clone() for n, v in b.as_dict().items()}
                                   for b in self.vertex_buffers]}

    @classmethod
    def from_description(cls, template: nn.Module, desc: Mapping) -> "SimplexModel":
        """Rebuild a complex from ``describe()`` output and a template instance."""
        vertices = desc["vertices"]
        states = []
        for k in range(int(desc["num_vertices"])):
            state = {n: v[k] for n, v in vertices.items()}
            state.update(desc["vertex_buffers"][k])
            states.append(state)
        model = cls(template, states, fixed=desc["fixed"], simplexes=desc["simplexes"])
        with torch.no_grad():
            for n, v in desc.get("buffers", {}).items():
                model.net.get_buffer(n).copy_(v)
        return model

    def __repr__(self) -> str:  # the stripped template cannot print itself
        return (f"SimplexModel(vertices={self.num_bends}, fixed={self.fixed_idx}, simplexes={self.simplexes}, "
                f"template={type(self.net).__name__}, parameters_per_point={self.num_parameters})")


def _as_weights(alpha, k: int, check: bool, what: str) -> torch.Tensor:
    """``alpha`` as a float tensor ``[k]`` or ``[n, k]``; with ``check``: ≥ 0 and summing to 1."""
    a = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(alpha, dtype=torch.float64)
    a = a if a.is_floating_point() else a.double()
    if a.dim() not in (1, 2) or a.shape[-1] != k:
        raise ValueError(f"{what} must have shape [{k}] or [n, {k}], got {tuple(a.shape)}")
    if check and a.device.type == "cpu":
        if not torch.isfinite(a).all() or (a < 0).any():
            raise ValueError(f"{what} must be finite and >= 0, got {a.tolist()}")
        if ((a.double().sum(-1) - 1).abs() > _SUM_TOL).any():
            raise ValueError(f"{what} must sum to 1 (a point of the probability simplex), got sums "
                             f"{a.double().sum(-1).tolist()}")
    return a


def save_simplex(path, model: SimplexModel, meta: Mapping, **extra):
    """Write a self-describing 'simplex' checkpoint (``meta``: ``arch``, ``arch_kwargs``, ``input_shape``,
    ``num_classes``, usually ``dataset`` and ``seed``), as :func:`~modeconn.core.curve_model.save_curve`."""
    return save_described(path, "simplex", model, meta, **extra)


def load_simplex(path, map_location="cpu"):
    """Rebuild the SimplexModel stored in a 'simplex' checkpoint; returns (model, metadata)."""
    return load_described(path, "simplex", SimplexModel, map_location)
