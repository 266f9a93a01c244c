"""Loss barriers along a path: how far a metric M(t) rises above its endpoints.

For a loss or an error M sampled at ``ts`` (which must include both
endpoints t = 0 and t = 1), with endpoint values M(0), M(1):

* ``"interp"`` (Entezari et al. 2022): ``max_t [M(t) - ((1-t) M(0) + t M(1))]``
* ``"mean"`` (Frankle et al. 2020; Ainsworth et al. 2023): ``max_t M(t) - (M(0) + M(1)) / 2``
* ``"max"``: ``max_t M(t) - max(M(0), M(1))``

The barrier's t is where that maximum sits (for ``"interp"`` it can differ
from the argmax of M itself). A barrier is a height of something to be kept
low, so it is not defined for an accuracy: use the error instead.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["BARRIER_REFERENCES", "barrier_profile", "barrier", "has_endpoints", "check_barrier_metric"]

BARRIER_REFERENCES = ("interp", "mean", "max")


def has_endpoints(ts) -> bool:
    """True when ``ts`` contains both t = 0 and t = 1 (so barriers are defined)."""
    ts = np.asarray(ts, float)
    return bool(np.any(ts == 0.0) and np.any(ts == 1.0))


def check_barrier_metric(metric: str) -> str:
    """``metric`` itself, or ``ValueError`` when it is an accuracy (``*_acc``)."""
    if metric.endswith("_acc") or metric == "acc":
        error = metric[:-len("acc")] + "error"
        raise ValueError(f"barrier of an accuracy ({metric!r}) is not defined: a barrier is the rise of a loss "
                         f"or an error above the endpoints; use {error!r}")
    return metric


def _sorted_with_endpoints(ts, values) -> Tuple[np.ndarray, np.ndarray]:
    ts, values = np.asarray(ts, float), np.asarray(values, float)
    if ts.shape != values.shape or ts.ndim != 1 or len(ts) < 2:
        raise ValueError(f"ts and values must be 1-D of equal length >= 2, got {ts.shape} and {values.shape}")
    order = np.argsort(ts, kind="stable")
    ts, values = ts[order], values[order]
    missing = [f"t={e:g}" for e, at in ((0.0, ts[0]), (1.0, ts[-1])) if at != e]
    if missing:
        raise ValueError(f"a barrier needs the endpoints t=0 and t=1 among ts; missing {' and '.join(missing)} "
                         f"(ts run from {ts[0]:g} to {ts[-1]:g})")
    return ts, values


def barrier_profile(ts, values, reference: str = "interp") -> Tuple[np.ndarray, np.ndarray]:
    """(sorted ts, M(t) minus the reference level at every t); definitions in the module docstring.

    ``ts`` may come in any order (values are paired with them); they must
    lie in [0, 1] and include 0 and 1, else ``ValueError`` names what is missing.
    """
    ts, values = _sorted_with_endpoints(ts, values)
    m0, m1 = values[0], values[-1]
    if reference == "interp":
        return ts, values - ((1 - ts) * m0 + ts * m1)
    if reference == "mean":
        return ts, values - 0.5 * (m0 + m1)
    if reference == "max":
        return ts, values - max(m0, m1)
    raise ValueError(f"unknown barrier reference {reference!r}; choose one of {BARRIER_REFERENCES}")


def barrier(ts, values, reference: str = "interp") -> Tuple[float, float]:
    """(height, t at the maximum) of the barrier of a loss or error ``values`` along ``ts``.

    Args:
        ts: the points of the path, in any order; must include t=0 and t=1.
        values: M at each of ``ts`` (a loss or an error, not an accuracy).
        reference: ``"interp"``, ``"mean"`` or ``"max"`` (module docstring).

    Example:
        >>> ts = [0.0, 0.25, 0.5, 0.75, 1.0]
        >>> loss = [1.0, 2.5, 3.5, 3.6, 3.0]      # M peaks at t=0.75, its rise above the line at t=0.5
        >>> barrier(ts, loss, "interp")          # 3.5 - (0.5 * 1 + 0.5 * 3)
        (1.5, 0.5)
        >>> barrier(ts, loss, "max")             # 3.6 - max(1, 3)
        (0.6000000000000001, 0.75)
        >>> barrier([0.5, 1.0, 0.0], [2.0, 1.0, 1.0])  # unsorted ts are paired with their values
        (1.0, 0.5)
    """
    ts, prof = barrier_profile(ts, values, reference)
    i = int(np.argmax(prof))
    return float(prof[i]), float(ts[i])
