"""One report of every sharpness measure of a trained network (flat vs sharp minima).

:func:`sharpness_report` gathers, for one model:

* the extreme Hessian eigenvalues λmax, λmin and ``|λmin/λmax|``
  (:func:`~modeconn.geometry.hessian.hessian_extreme_eigenvalues`, Lanczos);
* the Hessian trace by Hutchinson's estimator with its standard error
  (:func:`~modeconn.geometry.hessian.hessian_trace`);
* the curvature at 0 of the filter-normalised 1-D slice ``L(θ + a·d)``
  (Li et al. 2018: ``d`` a Gaussian direction, each filter rescaled to the
  norm of the weight's filter, biases and BN weights left out), the second
  coefficient of a least-squares parabola through the slice's points with
  ``|a| ≤ fit_radius`` (exact for a quadratic loss: ``dᵀHd``);
* ε-sharpness (Keskar et al. 2017, Eq. 4 with A = I): the largest loss
  increase over the box ``|δ_i| ≤ ε(|θ_i| + 1)``, found by :func:`epsilon_sharpness`
  (projected sign-gradient ascent), also as Keskar's percentage
  ``100·(max L(θ+δ) − L(θ)) / (1 + L(θ))``;
* train and test loss and accuracy, and the generalisation gap.

Conventions. The Hessian quantities and ε-sharpness are those of the mean loss
over ``hessian_data`` with the network in eval mode (BatchNorm with its
running statistics; :mod:`~modeconn.geometry.hessian_operator`). The slice is
evaluated by :func:`~modeconn.geometry.grid.evaluate_grid` over the whole
``train_data``, with BN statistics recomputed at every point.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from modeconn.core.param_groups import GroupsLike, parameter_groups
from modeconn.evaluation.model import evaluate
from modeconn.geometry.directions import flatten_parameters, random_plane
from modeconn.geometry.grid import GridResult, evaluate_grid
from modeconn.geometry.hessian import HessianOperator, hessian_extreme_eigenvalues, hessian_trace
from modeconn.runtime import Hooks

__all__ = ["EpsilonSharpness", "SharpnessReport", "epsilon_sharpness", "slice_curvature", "sharpness_report",
           "ModuleCurvature", "module_curvature"]


@dataclass
class EpsilonSharpness:
    """Result of :func:`epsilon_sharpness`: the loss at θ, the largest loss found in the box, and how."""
    epsilon: float
    steps: int
    loss: float
    max_loss: float

    @property
    def increase(self) -> float:
        """``max L(θ+δ) − L(θ)``."""
        return self.max_loss - self.loss

    @property
    def keskar(self) -> float:
        """Keskar et al.'s ε-sharpness in percent: ``100·increase / (1 + L(θ))``."""
        return 100.0 * self.increase / (1.0 + self.loss)


@dataclass
class SharpnessReport:
    """Every sharpness measure of one model (see the module docstring); ``slice`` is the 1-D slice."""
    lambda_max: float
    lambda_min: float
    ratio: float
    trace: float
    trace_stderr: float
    trace_samples: int
    slice_curvature: float
    epsilon: EpsilonSharpness
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    num_params: int
    slice: GridResult

    @property
    def gap(self) -> Dict[str, float]:
        """Generalisation gap: ``test_loss − train_loss`` and ``train_acc − test_acc``."""
        return {"loss": self.test_loss - self.train_loss, "acc": self.train_acc - self.test_acc}

    def row(self) -> Dict[str, Any]:
        """The report as one flat table row (no arrays)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("slice", "epsilon")}
        e = self.epsilon
        d.update(epsilon=e.epsilon, ascent_steps=e.steps, epsilon_increase=e.increase,
                 epsilon_sharpness=e.keskar, loss_gap=self.gap["loss"], acc_gap=self.gap["acc"])
        return d


@torch.no_grad()
def epsilon_sharpness(op: HessianOperator, epsilon: float = 1e-3, steps: int = 20, seed: int = 0,
                      hooks: Optional[Hooks] = None) -> EpsilonSharpness:
    """The largest mean loss over the box ``|δ_i| ≤ b_i = ε(|θ_i| + 1)`` around ``op.theta`` (Keskar et al. 2017).

    Projected sign-gradient ascent (the box is an ℓ∞ ball per coordinate):
    from a uniform random start in the box (``seed``; at a minimum the
    gradient vanishes), ``δ ← clip(δ + α ⊙ sign ∇L(θ+δ), −b, b)`` with
    ``α = 2.5·b/steps`` (Madry et al. 2018's step), ``steps`` times; each step
    is one pass over ``op.data``. Returned: the largest loss seen (a lower
    bound of the box maximum, exact at a vertex-maximal quadratic).
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    hooks = hooks or Hooks()
    theta = op.theta
    bound = epsilon * (theta.abs() + 1)
    gen = torch.Generator().manual_seed(int(seed))
    delta = ((torch.rand(theta.shape, generator=gen, dtype=torch.float64) * 2 - 1).to(theta) * bound)
    loss0 = float(op.loss_and_grad(theta)[0])
    best = loss0
    for _ in range(int(steps)):
        value, g = op.loss_and_grad(theta + delta)
        best = max(best, float(value))
        delta = torch.maximum(torch.minimum(delta + 2.5 * bound / steps * g.sign(), bound), -bound)
        hooks.advance(1)
    best = max(best, float(op.loss_and_grad(theta + delta)[0]))
    return EpsilonSharpness(epsilon=float(epsilon), steps=int(steps), loss=loss0, max_loss=best)


def slice_curvature(xs: Sequence[float], losses: Sequence[float], fit_radius: float) -> float:
    """``d²L/da²`` at ``a = 0`` of a 1-D slice: twice the quadratic coefficient of the least-squares parabola
    through the points with ``|a| ≤ fit_radius`` (at least three needed)."""
    xs, losses = np.asarray(xs, float), np.asarray(losses, float)
    near = (np.abs(xs) <= fit_radius + 1e-12) & np.isfinite(losses)
    if near.sum() < 3:
        raise ValueError(f"the slice has {int(near.sum())} point(s) within |a| <= {fit_radius}; the curvature "
                         "fit needs at least 3: widen fit_radius or add steps")
    return float(2.0 * np.polyfit(xs[near], losses[near], 2)[0])


def sharpness_report(model: nn.Module, train_data: Iterable, test_data: Optional[Iterable] = None, *,
                     hessian_data: Optional[Iterable] = None, tol: float = 1e-3,
                     maxiter: Optional[int] = None, trace_samples: int = 100, epsilon: float = 1e-3,
                     ascent_steps: int = 20, slice_xs: Sequence[float] = tuple(np.linspace(-1, 1, 21)),
                     fit_radius: float = 0.2, seed: int = 0, dtype: Optional[torch.dtype] = None,
                     bn_data: Optional[Iterable] = None, hooks: Optional[Hooks] = None) -> SharpnessReport:
    """Every sharpness measure of a classifier ``model`` (see the module docstring) in one :class:`SharpnessReport`.

    Every loss is the mean cross-entropy (the slice's and the metrics' are).

    Args:
        model: the trained network (only read; put it on its device first).
        train_data, test_data: batches for the losses, accuracies and the slice
            (BN statistics of slice points from ``bn_data``, default ``train_data``).
        hessian_data: batches for the Hessian and ε-sharpness (default
            ``train_data``); must yield the same samples every time.
        tol, maxiter: Lanczos settings; ``trace_samples``: Hutchinson vectors.
        epsilon, ascent_steps: ε-sharpness box and ascent steps.
        slice_xs, fit_radius, seed: slice coordinates, the ``|a|`` used for
            the curvature fit, the seed of the direction (and of Lanczos,
            Hutchinson and the ascent's start).
        dtype: compute the Hessian quantities in this dtype (e.g. float64).
        hooks: ``hooks.advance(1)`` per Hessian product, ascent step, slice point.
    """
    hooks = hooks or Hooks()
    hessian_data = train_data if hessian_data is None else hessian_data
    eig = hessian_extreme_eigenvalues(model, None, hessian_data, tol, maxiter, seed, dtype=dtype, hooks=hooks)
    trace, stderr = hessian_trace(model, None, hessian_data, trace_samples, seed, dtype=dtype, hooks=hooks)
    op = HessianOperator(model, None, hessian_data, dtype=dtype)
    eps = epsilon_sharpness(op, epsilon, ascent_steps, seed, hooks)
    origin = flatten_parameters(model)
    line = random_plane(origin, model, dims=1, norm="filter", ignore_1d=True, seed=seed)
    grid = evaluate_grid(model, line, np.asarray(slice_xs, float), None, train_data, test_data, bn_data, hooks=hooks)
    train = evaluate(model, train_data)
    test = evaluate(model, test_data) if test_data is not None else {"loss": math.nan, "acc": math.nan}
    return SharpnessReport(lambda_max=eig.lambda_max, lambda_min=eig.lambda_min, ratio=eig.ratio, trace=trace,
                           trace_stderr=stderr, trace_samples=int(trace_samples),
                           slice_curvature=slice_curvature(grid.xs, grid.arrays["train_loss"], fit_radius),
                           epsilon=eps, train_loss=train["loss"], train_acc=train["acc"], test_loss=test["loss"],
                           test_acc=test["acc"], num_params=op.num_params, slice=grid)


@dataclass
class ModuleCurvature:
    """The Hessian restricted to one group of parameters: its extreme eigenvalues and trace."""
    group: str
    params: List[str]
    num_params: int
    lambda_max: float
    lambda_min: float
    trace: float
    trace_stderr: float


def module_curvature(model: nn.Module, data: Iterable, groups: GroupsLike = "module", *, tol: float = 1e-3,
                     maxiter: Optional[int] = None, trace_samples: int = 100, seed: int = 0,
                     dtype: Optional[torch.dtype] = None, hooks: Optional[Hooks] = None) -> List[ModuleCurvature]:
    """Per-module curvature: λmax, λmin and the Hutchinson trace of each diagonal block ``H_GG`` of the Hessian.

    ``H_GG`` is the Hessian of the mean loss over ``data`` with respect to the
    parameters of group G only, the others fixed (the products of
    :class:`~modeconn.geometry.hessian_operator.HessianOperator` with
    ``param_names``): which layers are sharp (PyHessian's per-module
    eigenvalues, stage-wise trace). The blocks' traces sum to ``tr H``;
    ``λmax(H_GG) ≤ λmax(H)`` (a block of a symmetric matrix). ``groups`` as in
    :func:`~modeconn.core.param_groups.parameter_groups`; conventions (eval
    mode, BN running statistics) those of the operator. Cross-entropy loss.
    """
    out = []
    for g, names in parameter_groups(model, groups).items():
        eig = hessian_extreme_eigenvalues(model, None, data, tol, maxiter, seed, param_names=names, dtype=dtype,
                                          hooks=hooks)
        trace, stderr = hessian_trace(model, None, data, trace_samples, seed, param_names=names, dtype=dtype,
                                      hooks=hooks)
        numel = sum(model.get_parameter(n).numel() for n in names)
        out.append(ModuleCurvature(g, list(names), numel, eig.lambda_max, eig.lambda_min, trace, stderr))
    return out
