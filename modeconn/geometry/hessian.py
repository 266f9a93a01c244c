"""Curvature of the loss: Hessian-vector products, extreme eigenvalues, trace.

The loss is the mean over the data,

    L(θ) = (1/N) Σ_b n_b · loss_fn(functional_call(model, θ, x_b), y_b),

where each batch's ``loss_fn`` is a mean over its ``n_b`` samples, so the
product over several batches is the sample-weighted average of the per-batch
products: exactly the full-data Hessian times ``v``. θ is the model's
``named_parameters`` (those with ``requires_grad``, or the subset
``param_names``) flattened, in that order, into one vector of length P.

Products are built with ``torch.func`` (forward-over-reverse,
``jvp(grad(L))``; ``mode="reverse"`` uses ``vjp`` of ``grad`` for models with
an op that has no forward-mode derivative). Nothing is re-implemented: the
eigenvalues come from Lanczos (``scipy.sparse.linalg.eigsh``) on a
``LinearOperator`` wrapping the product, the trace from Hutchinson's
estimator with Rademacher vectors (as PyHessian does).

Mode and buffers. During every product the model is in **eval mode**
(dropout off, BatchNorm normalising with its running statistics as they
are: recompute them first with :func:`modeconn.bn.recompute_bn` for a point of
a curve), and its previous mode is restored afterwards. Buffers are read,
never written. ``bn_stats="batch"`` instead normalises every BatchNorm layer
with the statistics of the batch at hand (the function SGD differentiates);
that Hessian then depends on how the data is batched.

Data. ``data`` is a list of ``(x, y)`` batches or any loader yielding them;
it is iterated once per product, so it must yield the same samples every
time (no random augmentation; the order does not matter). Batches are moved
to the device of the model's parameters.

Progress. Functions that run many products take ``progress``: either a
tqdm-like object (``progress.update(1)`` per unit) or a callable
``progress(done, total)`` (``total`` is ``None`` when unknown, as for Lanczos).
A unit is one product, i.e. one pass over the data, except in
:func:`sharpness_along` where it is one point of the path.

Li et al. (2018) map ``|λmin / λmax|`` over a loss surface: where the ratio
is small the surface is convex in every direction, not only along the two
plotted ones, so the apparent convexity of a 2-D slice is real there.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from modeconn.evaluation.model import eval_mode

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LossLike = Union[None, str, LossFn]
Progress = Union[None, Callable[[int, Optional[int]], None], Any]

MODES = ("forward", "reverse")
BN_STATS = ("running", "batch")
WHICH = ("LA", "SA", "LM")

__all__ = [
    "HessianOperator", "HessianEigs", "ExtremeEigenvalues", "Sharpness",
    "hessian_vector_product", "hessian_eigenvalues", "hessian_extreme_eigenvalues",
    "hessian_trace", "sharpness_along", "curvature_ratio",
]


def _get_loss(loss_fn: LossLike) -> LossFn:
    """``None``/'cross_entropy' (default), 'mse' (``F.mse_loss``, no 1/2) or a callable."""
    if loss_fn is None or loss_fn == "cross_entropy":
        return F.cross_entropy
    if callable(loss_fn):
        return loss_fn
    if loss_fn == "mse":
        return lambda out, y: F.mse_loss(out, y.reshape(out.shape).to(out.dtype))
    raise ValueError(f"unknown loss_fn {loss_fn!r}; use 'cross_entropy', 'mse', None or a callable (out, y) -> scalar")


class _Reporter:
    """Adapts ``progress`` (tqdm-like or ``f(done, total)``) to one ``step()`` call."""

    def __init__(self, progress: Progress, total: Optional[int]):
        self.progress, self.total, self.done = progress, total, 0

    def step(self) -> None:
        self.done += 1
        if self.progress is None:
            return
        if hasattr(self.progress, "update"):
            self.progress.update(1)
        else:
            self.progress(self.done, self.total)


def _batch_size(x, y) -> int:
    if isinstance(y, torch.Tensor) and y.dim() > 0:
        return int(y.shape[0])
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        return int(x.shape[0])
    return len(y)


class HessianOperator:
    """The Hessian of the mean data loss as a linear map ``v -> H v`` on flat vectors.

    Args:
        model: any ``nn.Module``; only read (its parameters are the point θ).
        loss_fn: ``(out, y) -> scalar`` mean loss; ``None`` = cross-entropy;
            'mse' for ``F.mse_loss``.
        data: list of ``(x, y)`` batches or a loader yielding them (see the
            module docstring).
        param_names: parameters to differentiate, by name (default: every
            ``named_parameters`` entry with ``requires_grad``); the others
            stay fixed at their values.
        dtype: compute in this floating dtype (e.g. ``torch.float64`` for
            tests); parameters, buffers and floating inputs/targets are cast.
            Default: the parameters' dtype.
        mode: 'forward' (``jvp`` of ``grad``, default) or 'reverse'
            (``vjp`` of ``grad``).
        bn_stats: 'running' (BatchNorm uses its running statistics, default)
            or 'batch' (statistics of each batch).

    Attributes: ``num_params`` (P), ``param_names``, ``shapes``, ``dtype``,
    ``device``, ``num_matvecs`` (products computed so far; a :meth:`matmat`
    of m vectors counts m).
    """

    def __init__(self, model: nn.Module, loss_fn: LossLike, data: Iterable, *,
                 param_names: Optional[Sequence[str]] = None, dtype: Optional[torch.dtype] = None,
                 mode: str = "forward", bn_stats: str = "running"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        if bn_stats not in BN_STATS:
            raise ValueError(f"unknown bn_stats {bn_stats!r}; choose one of {BN_STATS}")
        if data is None:
            raise ValueError("data is None; pass a list of (x, y) batches or a loader")
        if hasattr(data, "__len__") and len(data) == 0:
            raise ValueError("data is empty: the Hessian of a loss needs at least one (x, y) batch")
        self.model, self.loss_fn, self.data = model, _get_loss(loss_fn), data
        self.mode, self.bn_stats = mode, bn_stats

        named = dict(model.named_parameters())
        if param_names is None:
            param_names = [n for n, p in named.items() if p.requires_grad]
        else:
            if isinstance(param_names, str):
                param_names = [param_names]
            param_names = list(param_names)
            unknown = [n for n in param_names if n not in named]
            if unknown:
                raise ValueError(f"unknown parameter name(s) {unknown}; the model has {list(named)}")
            if len(set(param_names)) != len(param_names):
                raise ValueError(f"param_names has duplicates: {param_names}")
        if not param_names:
            raise ValueError("no parameters to differentiate (the model has no parameters with "
                             "requires_grad, or param_names is empty)")
        self.param_names: List[str] = list(param_names)
        first = named[self.param_names[0]]
        self.device = first.device
        self.dtype = dtype if dtype is not None else first.dtype
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {self.dtype}")

        def cast(t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            return t.to(self.dtype) if t.is_floating_point() else t

        self.shapes = [tuple(named[n].shape) for n in self.param_names]
        self.numels = [named[n].numel() for n in self.param_names]
        self.num_params = int(sum(self.numels))
        self.theta = torch.cat([cast(named[n]).reshape(-1) for n in self.param_names])
        # everything else the forward reads, fixed (cast so dtypes agree)
        chosen = set(self.param_names)
        self.fixed: Dict[str, Optional[torch.Tensor]] = {
            n: cast(p) for n, p in named.items() if n not in chosen}
        self.fixed.update({n: cast(b) for n, b in model.named_buffers()})
        if bn_stats == "batch":
            for mod_name, mod in model.named_modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    prefix = f"{mod_name}." if mod_name else ""
                    for b in ("running_mean", "running_var", "num_batches_tracked"):
                        if getattr(mod, b, None) is not None:
                            self.fixed[prefix + b] = None
        self.num_matvecs = 0

    # ------------------------------------------------------------ internals
    def unflatten(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Flat vector (length P) -> dict name -> tensor of the parameter's shape."""
        return {n: c.view(s) for n, c, s in zip(self.param_names, flat.split(self.numels), self.shapes)}

    def _prepare(self, v: torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(v)
        if v.shape[-1:] != (self.num_params,):
            raise ValueError(f"vector length {tuple(v.shape)} does not match the number of parameters "
                             f"P={self.num_params}")
        return v.to(device=self.device, dtype=self.dtype)

    def _move(self, t):
        if isinstance(t, torch.Tensor):
            t = t.to(self.device)
            return t.to(self.dtype) if t.is_floating_point() else t
        return t

    def _batch_hvp(self, x, y, v: torch.Tensor, batched: bool) -> torch.Tensor:
        def batch_loss(flat):
            params = dict(self.fixed)
            params.update(self.unflatten(flat))
            return self.loss_fn(functional_call(self.model, params, (x,)), y)

        g = grad(batch_loss)
        if self.mode == "forward":
            def hvp(t):
                return jvp(g, (self.theta,), (t,))[1]
        else:
            _, pullback = vjp(g, self.theta)

            def hvp(t):
                return pullback(t)[0]
        try:
            with warnings.catch_warnings():
                # torch's first forward-AD call scripts its jvp decompositions and warns
                # that torch.jit.script is deprecated: torch-internal, nothing a user can act on
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated",
                                        category=FutureWarning)
                return vmap(hvp)(v) if batched else hvp(v)
        except NotImplementedError as e:
            if self.mode == "forward":
                raise NotImplementedError(f"{e}\nAn op of this model has no forward-mode derivative; "
                                          f"use mode='reverse'.") from e
            raise

    def _apply(self, v: torch.Tensor, batched: bool) -> torch.Tensor:
        total, n = None, 0
        with eval_mode(self.model):
            for x, y in self.data:
                x, y = self._move(x), self._move(y)
                nb = _batch_size(x, y)
                if nb == 0:
                    continue
                hv = self._batch_hvp(x, y, v, batched) * nb
                total = hv if total is None else total + hv
                n += nb
        if n == 0:
            raise ValueError("data yielded no samples: the Hessian of a loss needs at least one (x, y) batch")
        self.num_matvecs += v.shape[0] if batched else 1
        return (total / n).detach()

    # ---------------------------------------------------------------- public
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for one flat vector ``v`` (length P); one pass over the data."""
        v = self._prepare(v)
        if v.dim() != 1:
            raise ValueError(f"matvec takes a 1-D vector, got shape {tuple(v.shape)}")
        return self._apply(v, batched=False)

    __call__ = matvec

    def matmat(self, vs: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
        """``H v`` for each row of ``vs`` ([m, P]); ``torch.func.vmap`` over the
        vectors, ``chunk`` rows (default all) per pass over the data."""
        vs = self._prepare(vs)
        if vs.dim() != 2:
            raise ValueError(f"matmat takes a 2-D [m, P] tensor, got shape {tuple(vs.shape)}")
        chunk = vs.shape[0] if chunk is None else int(chunk)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        return torch.cat([self._apply(c, batched=True) for c in vs.split(chunk)])

    def as_linear_operator(self, shift: float = 0.0, progress: Progress = None) -> LinearOperator:
        """A float64 ``scipy.sparse.linalg.LinearOperator`` for ``H - shift·I``."""
        reporter = _Reporter(progress, None)

        def mv(v: np.ndarray) -> np.ndarray:
            v = np.asarray(v, dtype=np.float64).reshape(-1)
            out = self.matvec(torch.from_numpy(v)).to(device="cpu", dtype=torch.float64).numpy()
            reporter.step()
            return out - shift * v if shift else out

        return LinearOperator((self.num_params, self.num_params), matvec=mv, rmatvec=mv, dtype=np.float64)


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
def hessian_vector_product(model: nn.Module, loss_fn: LossLike, data: Iterable, v: torch.Tensor, *,
                           param_names: Optional[Sequence[str]] = None, dtype: Optional[torch.dtype] = None,
                           mode: str = "forward", bn_stats: str = "running") -> torch.Tensor:
    """``H v`` for the flat vector ``v`` (length P, parameters in ``named_parameters``
    order), H the Hessian of the mean loss over ``data``.

    For many products build a :class:`HessianOperator` once instead.
    """
    op = HessianOperator(model, loss_fn, data, param_names=param_names, dtype=dtype, mode=mode, bn_stats=bn_stats)
    return op.matvec(v)


def _check_k(k: int, num_params: int) -> int:
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
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    if maxiter is not None and int(maxiter) < 1:
        raise ValueError(f"maxiter must be >= 1 or None, got {maxiter}")


def _eigsh(op: HessianOperator, k: int, which: str, tol: float, maxiter: Optional[int], seed: int,
           shift: float = 0.0, return_eigenvectors: bool = False, progress: Progress = None):
    v0 = np.random.default_rng(seed).standard_normal(op.num_params)
    A = op.as_linear_operator(shift=shift, progress=progress)
    try:
        out = eigsh(A, k=k, which=which, tol=tol, maxiter=maxiter, v0=v0,
                    return_eigenvectors=return_eigenvectors)
    except ArpackNoConvergence as e:
        raise RuntimeError(f"Lanczos did not converge to {k} eigenvalue(s) (which={which!r}) within "
                           f"maxiter={maxiter} restarts at tol={tol} (converged: {list(e.eigenvalues)}); "
                           f"raise maxiter or tol") from e
    vals, vecs = (out if return_eigenvectors else (out, None))
    return np.asarray(vals, dtype=np.float64), vecs


def hessian_eigenvalues(model: nn.Module, loss_fn: LossLike, data: Iterable, k: int = 1, which: str = "LA",
                        tol: float = 1e-3, maxiter: Optional[int] = None, seed: int = 0, *,
                        return_eigenvectors: bool = False, param_names: Optional[Sequence[str]] = None,
                        dtype: Optional[torch.dtype] = None, mode: str = "forward", bn_stats: str = "running",
                        progress: Progress = None) -> HessianEigs:
    """The k extreme eigenvalues of the Hessian by Lanczos (``scipy.sparse.linalg.eigsh``).

    ``which``: 'LA' (largest algebraic, default: the top of the spectrum,
    λmax first), 'SA' (smallest algebraic) or 'LM' (largest magnitude).
    ``tol`` is ARPACK's relative accuracy of each eigenvalue (0 = machine
    precision), ``maxiter`` its number of restarts (default ``10·P``).
    ``seed`` fixes the start vector, so results are reproducible. Each
    product is one pass over ``data``; a typical run needs a few tens.

    Raises ValueError for k >= P (the number of parameters), empty data or
    a bad ``which``; RuntimeError when Lanczos does not converge.
    """
    if which not in WHICH:
        raise ValueError(f"unknown which {which!r}; choose one of {WHICH}")
    _check_tol(tol, maxiter)
    op = HessianOperator(model, loss_fn, data, param_names=param_names, dtype=dtype, mode=mode, bn_stats=bn_stats)
    k = _check_k(k, op.num_params)
    t0 = time.perf_counter()
    vals, vecs = _eigsh(op, k, which, tol, maxiter, seed, return_eigenvectors=return_eigenvectors,
                        progress=progress)
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
             progress: Progress = None) -> ExtremeEigenvalues:
    if op.num_params == 1:
        h = float(op.matvec(torch.ones(1)))
        return ExtremeEigenvalues(h, h)
    lmax = float(_eigsh(op, 1, "LA", tol, maxiter, seed, progress=progress)[0][0])
    # H - λmax·I has spectrum in [λmin - λmax, ~0]: its largest-magnitude eigenvalue is λmin - λmax
    shifted = float(_eigsh(op, 1, "LM", tol, maxiter, seed + 1, shift=lmax, progress=progress)[0][0])
    lmin = min(shifted + lmax, lmax)
    return ExtremeEigenvalues(lmax, lmin)


def hessian_extreme_eigenvalues(model: nn.Module, loss_fn: LossLike, data: Iterable, tol: float = 1e-3,
                                maxiter: Optional[int] = None, seed: int = 0, *,
                                param_names: Optional[Sequence[str]] = None, dtype: Optional[torch.dtype] = None,
                                mode: str = "forward", bn_stats: str = "running",
                                progress: Progress = None) -> ExtremeEigenvalues:
    """``(λmax, λmin)`` of the Hessian; ``.ratio`` is ``|λmin / λmax|``.

    λmax by Lanczos ('LA'); λmin by a shift: the largest-magnitude eigenvalue
    of ``H - λmax·I`` is ``λmin - λmax``, and ``λmin`` is that plus λmax. Its
    error is about ``tol·(λmax - λmin)`` (relative to the spread, not to λmin).
    """
    _check_tol(tol, maxiter)
    op = HessianOperator(model, loss_fn, data, param_names=param_names, dtype=dtype, mode=mode, bn_stats=bn_stats)
    return _extreme(op, tol, maxiter, seed, progress)


def hessian_trace(model: nn.Module, loss_fn: LossLike, data: Iterable, num_samples: int = 100, seed: int = 0, *,
                  vectors_per_pass: int = 1, param_names: Optional[Sequence[str]] = None,
                  dtype: Optional[torch.dtype] = None, mode: str = "forward", bn_stats: str = "running",
                  progress: Progress = None) -> Tuple[float, float]:
    """Hutchinson estimate of ``tr H``: ``(mean, stderr)`` of ``vᵀHv`` over
    ``num_samples`` Rademacher vectors ``v`` (entries ±1, drawn from ``seed``).

    ``stderr`` is the sample standard deviation over ``sqrt(num_samples)``.
    ``vectors_per_pass`` > 1 pushes that many vectors through each pass over
    the data at once (``torch.func.vmap``): fewer passes over the data (worth
    it when loading is the cost), more memory; per vector it is not faster on
    CPU. Progress counts vectors.
    """
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2 (the standard error needs two), got {num_samples!r}")
    if int(vectors_per_pass) < 1:
        raise ValueError(f"vectors_per_pass must be >= 1, got {vectors_per_pass}")
    num_samples, vectors_per_pass = int(num_samples), int(vectors_per_pass)
    op = HessianOperator(model, loss_fn, data, param_names=param_names, dtype=dtype, mode=mode, bn_stats=bn_stats)
    gen = torch.Generator().manual_seed(int(seed))
    reporter = _Reporter(progress, num_samples)
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
        for _ in range(m):
            reporter.step()
    s = torch.cat(samples)
    return float(s.mean()), float(s.std(unbiased=True) / math.sqrt(num_samples))


def sharpness_along(models: Iterable[nn.Module], loss_fn: LossLike, data: Iterable, tol: float = 1e-3,
                    maxiter: Optional[int] = None, seed: int = 0, *, ts: Optional[Sequence[float]] = None,
                    param_names: Optional[Sequence[str]] = None, dtype: Optional[torch.dtype] = None,
                    mode: str = "forward", bn_stats: str = "running", progress: Progress = None) -> Sharpness:
    """λmax, λmin and ``|λmin/λmax|`` at every model of a path (e.g.
    ``[curve.point(t) for t in ts]``, BN statistics recomputed first).

    ``models`` may be a generator, so only one point needs to live at a time.
    ``ts`` (optional) is stored in the result as the points' labels. Same
    Lanczos settings for every point; progress counts points.
    """
    _check_tol(tol, maxiter)
    total = len(models) if hasattr(models, "__len__") else None
    if total == 0:
        raise ValueError("models is empty: sharpness_along needs at least one point")
    reporter = _Reporter(progress, total)
    t0 = time.perf_counter()
    lmax, lmin, matvecs = [], [], 0
    for model in models:
        op = HessianOperator(model, loss_fn, data, param_names=param_names, dtype=dtype, mode=mode,
                             bn_stats=bn_stats)
        e = _extreme(op, tol, maxiter, seed)
        lmax.append(e.lambda_max)
        lmin.append(e.lambda_min)
        matvecs += op.num_matvecs
        reporter.step()
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
