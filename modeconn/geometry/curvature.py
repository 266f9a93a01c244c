"""Hessian eigenvalues at grid points (Li et al. 2018's ``|λmin/λmax|`` maps).

:func:`curvature_metrics` returns a ``point_metrics`` function for
:func:`~modeconn.geometry.grid.evaluate_grid`: at every point it builds the
network (``layout.module_at``, BN statistics recomputed for that point, as
the loss is), and :func:`modeconn.geometry.hessian.sharpness_along` gives
λmax, λmin and ``|λmin/λmax|`` of the mean loss over ``data``. Each point
costs a few tens of Hessian-vector products, each a pass over ``data``: use
a coarse grid or a subset of the data.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Union

import numpy as np
import torch
from torch import nn

from modeconn.core.curve_model import CurveModel
from modeconn.evaluation.bn import bn_statistics, has_batchnorm
from modeconn.geometry.grid import evaluator_for

__all__ = ["curvature_metrics"]


def curvature_metrics(net: Union[nn.Module, CurveModel], data: Iterable, bn_loader: Optional[Iterable] = None,
                      recompute_bn: bool = True, tol: float = 1e-3, maxiter: Optional[int] = None,
                      seed: int = 0, loss_fn=None) -> Callable[[torch.Tensor], Dict[str, np.ndarray]]:
    """``f(flats [K, P]) -> {"lambda_max", "lambda_min", "curvature_ratio"}`` (arrays [K]).

    ``data``: batches the loss (and its Hessian) is averaged over; must
    yield the same samples every time. ``bn_loader`` (default ``data``):
    batches for the BN statistics of each point when ``recompute_bn``;
    otherwise every point keeps ``net``'s current buffers. The network at
    a point is ``layout.module_at`` of the evaluator (:func:`evaluator_for`),
    in eval mode. The rest goes to
    :func:`modeconn.geometry.hessian.sharpness_along`.
    """
    from modeconn.geometry.hessian import sharpness_along

    ev = evaluator_for(net)
    use_bn = bool(recompute_bn and has_batchnorm(ev.net))
    bn_loader = data if bn_loader is None else bn_loader

    def f(flats: torch.Tensor) -> Dict[str, np.ndarray]:
        """λmax, λmin and their ratio at each of the K points ``flats``."""
        stats = bn_statistics(ev, flats, bn_loader) if use_bn else {}
        models = (ev.layout.module_at(ev.net, flats[k], {n: v[k] for n, v in stats.items()}).eval()
                  for k in range(len(flats)))
        s = sharpness_along(models, loss_fn, data, tol=tol, maxiter=maxiter, seed=seed)
        return {"lambda_max": s.lambda_max, "lambda_min": s.lambda_min, "curvature_ratio": s.ratio}

    return f
