"""Curvature of the loss: extreme Hessian eigenvalues, trace and sharpness along a path.

Everything here works through :class:`~modeconn.geometry.hessian_operator.HessianOperator`
(the Hessian of the mean data loss as ``v -> H v``; its module docstring
states the loss, the eval-mode convention, ``bn_stats`` and what ``data``
must be). Nothing is re-implemented: the eigenvalues come from Lanczos
(``scipy.sparse.linalg.eigsh``) on a ``LinearOperator`` wrapping the
product, the trace from Hutchinson's estimator with Rademacher vectors (as
PyHessian does).

Hooks. Functions that run many products take ``hooks``
(:class:`modeconn.runtime.Hooks`): ``hooks.advance(n)`` is told the number
of units just finished. A unit is one product, i.e. one pass over the data,
except in :func:`sharpness_along` where it is one point of the path.

Li et al. (2018) map ``|λmin / λmax|`` over a loss surface: where the ratio
is small the surface is convex in every direction, not only along the two
plotted ones, so the apparent convexity of a 2-D slice is real there.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, eigsh
from torch import nn

from modeconn.geometry.hessian_operator import HessianOperator, LossLike, hessian_vector_product
from modeconn.geometry.lanczos import lanczos_extreme
from modeconn.runtime import Hooks

WHICH = ("LA", "SA", "LM")
# Lanczos basis size for k eigenvalues: max(2k+1, NCV) (capped at P), scipy's default
NCV = 20

__all__ = [
    "HessianOperator", "HessianEigs", "ExtremeEigenvalues", "Sharpness",
    "hessian_vector_product", "hessian_eigenvalues", "hessian_extreme_eigenvalues",
    "hessian_trace", "sharpness_along", "curvature_ratio",
]


# ----------------------------------------------------------------- results
@dataclass
class HessianEigs:
    """Eigenvalues of the Hessian from Lanczos.

    ``eigenvalues`` are ordered by ``which``: 'LA' largest first, 'SA'
    smallest first, 'LM' largest magnitude first. ``eigenvectors`` is
    ``[P, k]`` (column i belongs to eigenvalue i) when requested, else None.
    """
    eigenvalues: np.ndarray
    eigenvectors: Optional[np.ndarray]
    which: str
    num_params: int
    num_matvecs: int
    seconds: float


class ExtremeEigenvalues(NamedTuple):
    """``(lambda_max, lambda_min)``; unpacks as a pair. ``ratio`` = ``|λmin / λmax|``."""
    lambda_max: float
    lambda_min: float

    @property
    def ratio(self) -> float:
        """``|λmin / λmax|`` (:func:`curvature_ratio`)."""
        return curvature_ratio(self.lambda_max, self.lambda_min)


@dataclass
class Sharpness:
    """Extreme eigenvalues per point of a path (numpy arrays, one entry per model)."""
    lambda_max: np.ndarray
    lambda_min: np.ndarray
    ratio: np.ndarray
    ts: Optional[np.ndarray] = None
    num_matvecs: int = 0
    seconds: float = 0.0

    def as_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (lists of floats; NaN/inf kept as floats)."""
        d = {"lambda_max": self.lambda_max.tolist(), "lambda_min": self.lambda_min.tolist(),
             "ratio": self.ratio.tolist(), "num_matvecs": self.num_matvecs, "seconds": self.seconds}
        if self.ts is not None:
            d["ts"] = self.ts.tolist()
        return d


def curvature_ratio(lambda_max: float, lambda_min: float) -> float:
    """``|λmin / λmax|`` (Li et al. 2018): near 0 where the surface is locally convex.

    ``inf`` when λmax = 0 ≠ λmin, ``nan`` when both are 0.
    """
    lmax, lmin = float(lambda_max), float(lambda_min)
    if lmax == 0.0:
        return float("nan") if lmin == 0.0 else float("inf")
    return abs(lmin / lmax)


# --------------------------------------------------------------- functions
def _check_k(k: int, num_params: int) -> int:
    """``k`` as an int, after checking 1 <= k < P (Lanczos cannot return the whole spectrum)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer, got {k!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k >= num_params:
        raise ValueError(f"k={k} eigenvalues need k < P, the number of parameters (P={num_params}); "
                         f"Lanczos cannot return all of them")
    return k


def _check_tol(tol: float, maxiter: Optional[int]) -> None:
    """Raise unless ``tol`` is finite and >= 0 and ``maxiter`` is None or >= 1."""
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    if maxiter is not None and int(maxiter) < 1:
        raise ValueError(f"maxiter must be >= 1 or None, got {maxiter}")


def _check_ncv(ncv: Optional[int], k: int, num_params: int) -> int:
    """The Lanczos basis size: ``ncv`` after checking k < ncv <= P, or the default ``max(2k+1, NCV)`` capped at P."""
    if ncv is None:
        return min(num_params, max(2 * k + 1, NCV))
    if isinstance(ncv, bool) or not isinstance(ncv, (int, np.integer)):
        raise ValueError(f"ncv must be an integer or None, got {ncv!r}")
    if not k < int(ncv) <= num_params:
        raise ValueError(f"ncv={ncv} (Lanczos basis size) must satisfy k < ncv <= P with k={k}, "
                         f"P={num_params} parameters")
    return int(ncv)


def _shifted_product(op: HessianOperator, v: torch.Tensor, shift: float, hooks: Optional[Hooks]) -> torch.Tensor:
    """``(H - shift·I) v`` in float64 on the CPU (``as_linear_operator``'s product, kept in torch)."""
    out = op.matvec(v).to(device="cpu", dtype=torch.float64)
    if hooks is not None:
        hooks.advance(1)
    return out - shift * v if shift else out


def _eigsh(op: HessianOperator, k: int, which: str, tol: float, maxiter: Optional[int], seed: int,
           shift: float = 0.0, return_eigenvectors: bool = False, hooks: Optional[Hooks] = None,
           ncv: Optional[int] = None):
    """``(eigenvalues, eigenvectors or None)`` of ``H - shift·I``, start vector from ``seed``.

    λmax alone (k = 1, 'LA'): Lanczos checked after every product
    (:func:`~modeconn.geometry.lanczos.lanczos_extreme`, ARPACK's stopping
    rule), continued by ARPACK from its Ritz vector if ``ncv`` steps do not
    converge. Otherwise ARPACK (``eigsh``) directly: at the bottom of a
    Hessian spectrum (a cluster around 0) a small residual certifies an
    eigenvalue near the Ritz value, not the smallest one, and checked early
    it stopped in the cluster (λmin -0.0015 for -4.8 on a preresnet, tol
    1e-2); ARPACK's full first basis of ``ncv`` vectors does not.
    """
    ncv = _check_ncv(ncv, k, op.num_params)   # before any product
    v0 = np.random.default_rng(seed).standard_normal(op.num_params)
    if k == 1 and which == "LA":
        res = lanczos_extreme(lambda v: _shifted_product(op, v, shift, hooks), torch.from_numpy(v0), which, tol,
                              max_steps=ncv)
        vec = res.vector.numpy()
        if res.converged:
            return np.array([res.value]), (vec[:, None] if return_eigenvectors else None)
        v0 = vec
    try:
        out = eigsh(op.as_linear_operator(shift=shift, hooks=hooks), k=k, which=which, tol=tol, maxiter=maxiter,
                    v0=v0, ncv=ncv, return_eigenvectors=return_eigenvectors)
    except ArpackNoConvergence as e:
        raise RuntimeError(f"Lanczos did not converge to {k} eigenvalue(s) (which={which!r}) within "
                           f"maxiter={maxiter} restarts at tol={tol} (converged: {list(e.eigenvalues)}); "
                           f"raise maxiter or tol") from e
    vals, vecs = (out if return_eigenvectors else (out, None))
    return np.asarray(vals, dtype=np.float64), vecs


def hessian_eigenvalues(model: nn.Module, loss_fn: LossLike, data: Iterable, k: int = 1, which: str = "LA",
                        tol: float = 1e-3, maxiter: Optional[int] = None, seed: int = 0, *,
                        return_eigenvectors: bool = False, param_names: Optional[Sequence[str]] = None,
                        dtype: Optional[torch.dtype] = None, mode: Optional[str] = None, bn_stats: str = "running",
                        reuse_graph: Optional[bool] = None, ncv: Optional[int] = None,
                        hooks: Optional[Hooks] = None) -> HessianEigs:
    """The k extreme eigenvalues of the Hessian by Lanczos (``scipy.sparse.linalg.eigsh``).

    ``which``: 'LA' (largest algebraic, default: the top of the spectrum,
    λmax first), 'SA' (smallest algebraic) or 'LM' (largest magnitude).
    ``tol`` is ARPACK's relative accuracy of each eigenvalue (0 = machine
    precision: it stops when every Ritz value's residual estimate is below
    ``tol·|value|``), ``maxiter`` its number of restarts (default ``10·P``),
    ``ncv`` its Lanczos basis size (k < ncv <= P; default ``max(2k+1, 20)``,
    larger helps clustered spectra). For λmax alone (k = 1, 'LA') the same
    test runs after every product (:mod:`~modeconn.geometry.lanczos`), so it
    costs the products it needs, not at least ncv + 1 as in ARPACK.
    ``seed`` fixes the start vector, so results are reproducible. Each
    product is one pass over ``data``; a typical run needs a few tens.

    Raises ValueError for k >= P (the number of parameters), empty data or
    a bad ``which`` or ``ncv``; RuntimeError when Lanczos does not converge.
    The other keywords are :class:`HessianOperator`'s (``reuse_graph``:
    build the gradient graph once, default for list/tuple data);
    ``hooks.advance(1)`` per product.

    Example:
        >>> from torch import nn
        >>> model = nn.Linear(3, 1, bias=False).double()
        >>> x, y = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)), torch.zeros(3, dtype=torch.float64)
        >>> def loss(out, y):     # 0.5 · mean squared error: H = XᵀX / n = diag(1, 4, 9) / 3
        ...     return 0.5 * (out.squeeze(-1) - y).pow(2).mean()
        >>> res = hessian_eigenvalues(model, loss, [(x, y)], k=2, tol=1e-10)
        >>> res.eigenvalues.round(6).tolist()
        [3.0, 1.333333]
    """
    if which not in WHICH:
        raise ValueError(f"unknown which {which!r}; choose one of {WHICH}")
    _check_tol(tol, maxiter)
    op = HessianOperator(model, loss_fn, data, param_names=param_names, dtype=dtype, mode=mode, bn_stats=bn_stats,
                         reuse_graph=reuse_graph)
    k = _check_k(k, op.num_params)
    t0 = time.perf_counter()
    vals, vecs = _eigsh(op, k, which, tol, maxiter, seed, return_eigenvectors=return_eigenvectors,
                        hooks=hooks, ncv=ncv)
    if which == "LA":
        order = np.argsort(-vals)
    elif which == "SA":
        order = np.argsort(vals)
    else:
        order = np.argsort(-np.abs(vals))
    vals = vals[order]
    if vecs is not None:
        vecs = vecs[:, order]
    return HessianEigs(eigenvalues=vals, eigenvectors=vecs, which=which, num_params=op.num_params,
                       num_matvecs=op.num_matvecs, seconds=time.perf_counter() - t0)


def _extreme(op: HessianOperator, tol: float, maxiter: Optional[int], seed: int,
             hooks: Optional[Hooks] = None, ncv: Optional[int] = None) -> ExtremeEigenvalues:
    """λmax by Lanczos, then λmin as the largest-magnitude eigenvalue of ``H - λmax·I`` plus λmax (ARPACK)."""
    if op.num_params == 1:
        h = float(op.matvec(torch.ones(1)))
        if hooks is not None:
            hooks.advance(1)
        return ExtremeEigenvalues(h, h)
    lmax = float(_eigsh(op, 1, "LA", tol, maxiter, seed, hooks=hooks, ncv=ncv)[0][0])
    # H - λmax·I has spectrum in [λmin - λmax, ~0]: its largest-magnitude eigenvalue is λmin - λmax
    shifted = float(_eigsh(op, 1, "LM", tol, maxiter, seed + 1, shift=lmax, hooks=hooks, ncv=ncv)[0][0])
    lmin = min(shifted + lmax, lmax)
    return ExtremeEigenvalues(lmax, lmin)


def hessian_extreme_eigenvalues(model: nn.Module, loss_fn: LossLike, data: Iterable, tol: float = 1e-3,
                                maxiter: Optional[int] = None, seed: int = 0, *,
                                param_names: Optional[Sequence[str]] = None, dtype: Optional[torch.dtype] = None,
                                mode: Optional[str] = None, bn_stats: str = "running",
                                reuse_graph: Optional[bool] = None, ncv: Optional[int] = None,
                                hooks: Optional[Hooks] = None) -> ExtremeEigenvalues:
    """``(λmax, λmin)`` of the Hessian; ``.ratio`` is ``|λmin / λmax|``.

    λmax by Lanczos ('LA'); λmin by a shift: the largest-magnitude eigenvalue
    of ``H - λmax·I`` is ``λmin - λmax``, and ``λmin`` is that plus λmax. Its
    error is about ``tol·(λmax - λmin)`` (relative to the spread, not to λmin).
    Both Lanczos runs share one operator (with ``reuse_graph``, one graph);
    ``seed`` draws λmax's start vector and ``seed + 1`` λmin's. The keywords
    are :func:`hessian_eigenvalues`'.
    """
    _check_tol(tol, maxiter)
    op = HessianOperator(model, loss_fn, data, param_names=param_names, dtype=dtype, mode=mode, bn_stats=bn_stats,
                         reuse_graph=reuse_graph)
    return _extreme(op, tol, maxiter, seed, hooks, ncv)


def hessian_trace(model: nn.Module, loss_fn: LossLike, data: Iterable, num_samples: int = 100, seed: int = 0, *,
                  vectors_per_pass: int = 1, param_names: Optional[Sequence[str]] = None,
                  dtype: Optional[torch.dtype] = None, mode: Optional[str] = None, bn_stats: str = "running",
                  reuse_graph: Optional[bool] = None, hooks: Optional[Hooks] = None) -> Tuple[float, float]:
    """Hutchinson estimate of ``tr H``: ``(mean, stderr)`` of ``vᵀHv`` over
    ``num_samples`` Rademacher vectors ``v`` (entries ±1, drawn from ``seed``).

    ``stderr`` is the sample standard deviation over ``sqrt(num_samples)``.
    ``vectors_per_pass`` > 1 pushes that many vectors through each pass over
    the data at once (``torch.func.vmap``): fewer passes over the data (worth
    it when loading is the cost), more memory; per vector it is not faster on
    CPU. ``reuse_graph`` (default for list/tuple data) builds the gradient
    graph once for all vectors. ``hooks.advance(m)`` after each pass of m vectors.
    """
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2 (the standard error needs two), got {num_samples!r}")
    if int(vectors_per_pass) < 1:
        raise ValueError(f"vectors_per_pass must be >= 1, got {vectors_per_pass}")
    num_samples, vectors_per_pass = int(num_samples), int(vectors_per_pass)
    op = HessianOperator(model, loss_fn, data, param_names=param_names, dtype=dtype, mode=mode, bn_stats=bn_stats,
                         reuse_graph=reuse_graph)
    gen = torch.Generator().manual_seed(int(seed))
    hooks = hooks or Hooks()
    samples = []
    done = 0
    while done < num_samples:
        m = min(vectors_per_pass, num_samples - done)
        vs = (torch.randint(0, 2, (m, op.num_params), generator=gen) * 2 - 1).to(op.dtype)
        if m == 1:
            hv = op.matvec(vs[0])[None]
        else:
            hv = op.matmat(vs)
        samples.append((vs.to(hv.device) * hv).sum(1).double().cpu())
        done += m
        hooks.advance(m)
    s = torch.cat(samples)
    return float(s.mean()), float(s.std(unbiased=True) / math.sqrt(num_samples))


def sharpness_along(models: Iterable[nn.Module], loss_fn: LossLike, data: Iterable, tol: float = 1e-3,
                    maxiter: Optional[int] = None, seed: int = 0, *, ts: Optional[Sequence[float]] = None,
                    param_names: Optional[Sequence[str]] = None, dtype: Optional[torch.dtype] = None,
                    mode: Optional[str] = None, bn_stats: str = "running", reuse_graph: Optional[bool] = None,
                    ncv: Optional[int] = None, hooks: Optional[Hooks] = None) -> Sharpness:
    """λmax, λmin and ``|λmin/λmax|`` at every model of a path (e.g.
    ``[curve.point(t) for t in ts]``, BN statistics recomputed first).

    ``models`` may be a generator, so only one point needs to live at a time.
    ``ts`` (optional) is stored in the result as the points' labels. Same
    Lanczos settings for every point (keywords as :func:`hessian_eigenvalues`;
    with ``reuse_graph`` one point's graphs live at a time);
    ``hooks.advance(1)`` after each point.
    """
    _check_tol(tol, maxiter)
    hooks = hooks or Hooks()
    t0 = time.perf_counter()
    lmax, lmin, matvecs = [], [], 0
    for model in models:
        op = HessianOperator(model, loss_fn, data, param_names=param_names, dtype=dtype, mode=mode,
                             bn_stats=bn_stats, reuse_graph=reuse_graph)
        e = _extreme(op, tol, maxiter, seed, ncv=ncv)
        lmax.append(e.lambda_max)
        lmin.append(e.lambda_min)
        matvecs += op.num_matvecs
        hooks.advance(1)
    if not lmax:
        raise ValueError("models is empty: sharpness_along needs at least one point")
    if ts is not None:
        ts = np.asarray(ts, dtype=np.float64)
        if ts.shape != (len(lmax),):
            raise ValueError(f"ts has {ts.size} entries but there are {len(lmax)} models")
    lmax_a, lmin_a = np.asarray(lmax), np.asarray(lmin)
    ratio = np.asarray([curvature_ratio(a, b) for a, b in zip(lmax, lmin)])
    return Sharpness(lambda_max=lmax_a, lambda_min=lmin_a, ratio=ratio, ts=ts, num_matvecs=matvecs,
                     seconds=time.perf_counter() - t0)
