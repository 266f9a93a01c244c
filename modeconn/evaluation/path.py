"""Evaluate a path of networks: loss, error and NLL along t, arc length, barriers.

Any path is a :class:`~modeconn.core.curve_model.CurveModel`: a fitted curve,
``linear_path(a, b)`` (``PolyChain(2)``) or ``chain_path([...])`` (every bend
fixed). The points are evaluated in chunks of ``points_per_pass`` by the
batched engine (:func:`~modeconn.evaluation.points.evaluate_points`), BN
statistics recomputed at every point over the training data
(:mod:`modeconn.evaluation.bn`). Barriers of the result are defined in
:mod:`modeconn.evaluation.barriers`.

Several processes (torchrun, :mod:`modeconn.runtime.distributed`):
``evaluate_path`` gives each rank a contiguous share of the chunks of points
and gathers the results, so every rank returns the whole :class:`PathResult`.
One rank per point: a rank evaluates its points over the *whole* training and
test data (the BN statistics of a point are recomputed by the rank that owns
it), so no communication happens inside the BN pass and the numbers are
exactly those of a single process evaluating the same chunks of points.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from modeconn.core.curve_model import CurveModel
from modeconn.core.curves import PolyChain
from modeconn.evaluation.barriers import BARRIER_REFERENCES, barrier, check_barrier_metric, has_endpoints
from modeconn.evaluation.bn import batchnorm_modules
from modeconn.evaluation.input_span import Span
from modeconn.evaluation.points import evaluate_points
from modeconn.runtime import Hooks, Runtime
from modeconn.runtime import distributed as _dist

__all__ = ["METRICS", "PathResult", "evaluate_path", "endpoint_line", "points_of_this_rank", "path_result", "barrier"]

METRICS = ("train_loss", "train_nll", "train_acc", "train_error",
           "test_loss", "test_nll", "test_acc", "test_error")


# -------------------------------------------------------------------- result
@dataclass
class PathResult:
    """Metrics along a path. Arrays are indexed like ``ts``.

    ``*_nll`` is the mean cross-entropy; ``*_loss`` adds the weight-decay
    term ``0.5 * weight_decay * ||θ(t)||²`` (equal to the NLL when
    ``weight_decay`` is 0). ``segment_lengths[i] = ||θ(t_{i+1}) - θ(t_i)||``;
    ``arc_length`` is their cumulative sum starting at 0. ``linear`` holds the
    straight line between the same endpoints when it was evaluated alongside.
    """

    ts: np.ndarray
    train_loss: np.ndarray
    train_nll: np.ndarray
    train_acc: np.ndarray
    train_error: np.ndarray
    test_loss: np.ndarray
    test_nll: np.ndarray
    test_acc: np.ndarray
    test_error: np.ndarray
    segment_lengths: np.ndarray
    arc_length: np.ndarray
    name: str = "path"
    bn_recomputed: bool = False
    linear: Optional["PathResult"] = None
    extra: Dict[str, np.ndarray] = field(default_factory=dict)

    def values(self, metric: str) -> np.ndarray:
        """The array of ``metric`` (one of :data:`METRICS` or a key of ``extra``)."""
        if metric not in METRICS and metric not in self.extra:
            raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
        return self.extra[metric] if metric in self.extra else getattr(self, metric)

    def barrier(self, metric: str = "test_loss", reference: str = "interp") -> float:
        """Barrier height of a loss or error ``metric`` (:func:`~modeconn.evaluation.barriers.barrier`).

        Raises ``ValueError`` for an accuracy metric and when ``ts`` lacks t=0 or t=1.
        """
        return barrier(self.ts, self.values(check_barrier_metric(metric)), reference)[0]

    def barrier_t(self, metric: str = "test_loss", reference: str = "interp") -> float:
        """The t at which the barrier's maximum sits (same contract as :meth:`barrier`)."""
        return barrier(self.ts, self.values(check_barrier_metric(metric)), reference)[1]

    def summary(self, metric: str) -> Dict[str, float]:
        """min, max, mean over t, and the arc-length-weighted mean (Garipov et al.)."""
        v = self.values(metric)
        dl = self.segment_lengths
        mid = 0.5 * (v[:-1] + v[1:])
        weighted = float(np.sum(mid * dl) / np.sum(dl)) if np.sum(dl) > 0 else float(np.mean(v))
        return {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()), "weighted_mean": weighted}

    def barrier_table(self, metrics: Sequence[str] = ("train_loss", "train_error", "test_loss", "test_error"),
                      ) -> List[dict]:
        """Rows (path, metric, reference, height, t) for this path and its linear companion."""
        rows = []
        for res in [self] + ([self.linear] if self.linear is not None else []):
            for m in metrics:
                values = res.values(check_barrier_metric(m))
                for ref in BARRIER_REFERENCES:
                    h, t = barrier(res.ts, values, ref)
                    rows.append({"path": res.name, "metric": m, "reference": ref, "barrier": h, "t": t})
        return rows

    def _extra_curves(self) -> List[str]:
        """Keys of ``extra`` holding a loss or error at every t (e.g. the robust metrics): barriers apply."""
        return [k for k, v in self.extra.items() if k.endswith(("_loss", "_error")) and np.ndim(v) == 1
                and len(v) == len(self.ts)]

    def to_dict(self) -> dict:
        """Plain data: every array, summaries, and barriers of the loss/error metrics (when ts has 0 and 1)."""
        d = {"name": self.name, "bn_recomputed": self.bn_recomputed, "ts": self.ts.tolist(),
             "segment_lengths": self.segment_lengths.tolist(), "arc_length": self.arc_length.tolist()}
        for m in METRICS:
            d[m] = self.values(m).tolist()
        for k, v in self.extra.items():
            d[k] = np.asarray(v).tolist()
        d["summary"] = {m: self.summary(m) for m in METRICS}
        if has_endpoints(self.ts):
            d["barriers"] = {}
            for m in (m for m in METRICS + tuple(self._extra_curves()) if not m.endswith("_acc")):
                hts = {r: barrier(self.ts, self.values(m), r) for r in BARRIER_REFERENCES}
                d["barriers"][m] = {r: {"barrier": h, "t": t} for r, (h, t) in hts.items()}
        if self.linear is not None:
            d["linear"] = self.linear.to_dict()
        return d


# ---------------------------------------------------------------- the points
def _grid(num_points: int) -> np.ndarray:
    if num_points < 2:
        raise ValueError(f"num_points must be at least 2 (the two endpoints), got {num_points}")
    return np.linspace(0.0, 1.0, num_points)


def endpoint_line(curve: CurveModel) -> CurveModel:
    """The straight line between a curve's current first and last bends (with their buffers)."""
    bends = curve.bends_by_name()
    start = {n: v[0] for n, v in bends.items()}
    end = {n: v[-1] for n, v in bends.items()}
    start.update(curve.endpoint_buffers(0))
    end.update(curve.endpoint_buffers(1))
    return CurveModel(curve.point(0.0), start, end, PolyChain(2)).to(curve.fixed_bends.device)


def _chunk_plan(n: int, points_per_pass: int, sharded: bool):
    """(points per pass, first index of every chunk, this rank's chunk numbers)."""
    if sharded:  # every rank gets at least one chunk when there are enough points
        points_per_pass = min(points_per_pass, math.ceil(n / _dist.get_world_size()))
    starts = list(range(0, n, points_per_pass))
    mine = range(*_dist.shard(len(starts))) if sharded else range(len(starts))
    return points_per_pass, starts, mine


def points_of_this_rank(num_points: int, points_per_pass: int = 8, runtime: Optional[Runtime] = None) -> int:
    """How many of ``num_points`` points :func:`evaluate_path` evaluates on this rank (for progress bars)."""
    sharded = (runtime or Runtime()).sharded()
    ppp, starts, mine = _chunk_plan(int(num_points), int(points_per_pass), sharded)
    return sum(min(ppp, num_points - starts[i]) for i in mine)


def _evaluate_chunks(path: CurveModel, ts: np.ndarray, loaders: tuple, use_bn: bool, points_per_pass: int,
                     runtime: Runtime, hooks: Hooks):
    """(metric arrays over all ts, θ(ts) [n, P]): this rank's chunks evaluated, every rank's gathered."""
    device = path.fixed_bends.device
    t_tensor = torch.tensor(ts, dtype=path.fixed_bends.dtype)
    sharded = runtime.sharded()
    points_per_pass, starts, mine = _chunk_plan(len(ts), points_per_pass, sharded)
    results, flats_all, scratch = {}, [], {}
    # a curve's θ(t) = Σ_k c_k(t) bend_k: the layers reading the input share products (other bends
    # models, e.g. a simplex complex whose "ts" are coordinates, evaluate every point on its own)
    bends = list(path.bends) if isinstance(path, CurveModel) else None
    for i, lo in enumerate(starts):
        ts_i = t_tensor[lo:lo + points_per_pass].to(device)
        flats = path.flat_weights_at(ts_i, check=False).detach()
        flats_all.append(flats)
        if i in mine:
            span = None if bends is None else Span(path.coefficients(ts_i, check=False).detach(), bends)
            results[i] = evaluate_points(path, flats, *loaders, recompute_bn=use_bn, runtime=runtime,
                                         scratch=scratch, span=span)
            hooks.advance(len(flats))
    if sharded:  # one rank per point: gather every rank's chunks (plain numpy arrays)
        for part in _dist.all_gather_object(results):
            results.update(part)
    chunks = [results[i] for i in range(len(starts))]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}, torch.cat(flats_all)


def path_result(ts: np.ndarray, arr: Dict[str, np.ndarray], flats: torch.Tensor, weight_decay: float,
                 name: str, use_bn: bool) -> PathResult:
    """A :class:`PathResult` from the NLL/accuracy arrays and the points θ(ts)."""
    penalty = (0.5 * weight_decay * flats.double().pow(2).sum(1)).cpu().numpy() if weight_decay else 0.0
    seg = (flats[1:] - flats[:-1]).double().norm(dim=1).cpu().numpy()
    return PathResult(
        ts=ts, train_loss=arr["train_loss"] + penalty, train_nll=arr["train_loss"], train_acc=arr["train_acc"],
        train_error=1 - arr["train_acc"], test_loss=arr["test_loss"] + penalty, test_nll=arr["test_loss"],
        test_acc=arr["test_acc"], test_error=1 - arr["test_acc"], segment_lengths=seg,
        arc_length=np.concatenate([[0.0], np.cumsum(seg)]), name=name, bn_recomputed=use_bn)


# ---------------------------------------------------------------------- API
@torch.no_grad()
def evaluate_path(path: CurveModel, train_loader: Iterable, test_loader: Iterable, num_points: int = 61,
                  ts: Optional[Sequence[float]] = None, bn_loader: Optional[Iterable] = None,
                  points_per_pass: int = 8, recompute_bn: bool = True, with_linear: bool = False,
                  weight_decay: float = 0.0, name: str = "curve", runtime: Optional[Runtime] = None,
                  hooks: Optional[Hooks] = None) -> PathResult:
    """Loss, NLL, accuracy and error along ``path`` on train and test data.

    Args:
        path: a CurveModel (fitted curve, ``linear_path``, ``chain_path``).
        train_loader, test_loader: evaluation data in fixed order, without
            augmentation (e.g. ``dataset.eval_loader("train")``).
        num_points: evenly spaced ts in [0, 1]; or ``ts`` in any order
            (barriers need 0 and 1).
        bn_loader: data for the BN statistics recomputed at every point
            (default ``train_loader``; dropout off); ``recompute_bn=False``
            keeps the template's buffers.
        points_per_pass: points sharing one pass over the data (memory grows with it).
        with_linear: also evaluate the straight line between the endpoints (``result.linear``).
        weight_decay: ``loss = nll + 0.5 * weight_decay * ||θ(t)||²`` (Garipov et al.).
        name: the result's name.
        runtime: amp, compile; ``distributed`` shares the points among ranks
            and gathers the result on every rank.
        hooks: ``progress(n)`` with the number of points this rank finished.

    Example:
        >>> from modeconn.core.curve_model import linear_path
        >>> from modeconn.data import TensorLoader
        >>> from modeconn.evaluation.model import evaluate
        >>> _ = torch.manual_seed(0)
        >>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        >>> data = TensorLoader(torch.randn(64, 4), torch.randint(0, 3, (64,)), batch_size=32)
        >>> res = evaluate_path(linear_path(a, b), data, data, num_points=5)
        >>> res.ts.tolist()
        [0.0, 0.25, 0.5, 0.75, 1.0]
        >>> bool(abs(res.test_nll[0] - evaluate(a, data)["nll"]) < 1e-6)   # t=0 is network a
        True
    """
    ts_arr = _grid(num_points) if ts is None else np.asarray(ts, dtype=float)
    if ts_arr.ndim != 1 or len(ts_arr) < 1:
        raise ValueError("ts must be a non-empty 1-D sequence of values in [0, 1]")
    if points_per_pass < 1:
        raise ValueError(f"points_per_pass must be >= 1, got {points_per_pass}")
    path.coefficients(torch.tensor(ts_arr, dtype=path.fixed_bends.dtype))  # validates ts
    runtime, hooks = runtime or Runtime(), hooks or Hooks()
    bn_loader = train_loader if bn_loader is None else bn_loader
    use_bn = recompute_bn and bool(batchnorm_modules(path.net))
    arr, flats = _evaluate_chunks(path, ts_arr, (train_loader, test_loader, bn_loader), use_bn,
                                  points_per_pass, runtime, hooks)
    result = path_result(ts_arr, arr, flats, weight_decay, name, use_bn)
    if with_linear:
        result.linear = evaluate_path(endpoint_line(path), train_loader, test_loader, ts=ts_arr,
                                      bn_loader=bn_loader, points_per_pass=points_per_pass,
                                      recompute_bn=recompute_bn, weight_decay=weight_decay, name="linear",
                                      runtime=runtime, hooks=hooks)
    return result
