"""Evaluate a path of networks: loss, error and NLL along t, arc length, barriers.

Any path is a :class:`CurveModel`: a fitted curve, ``linear_path(a, b)``
(``PolyChain(2)``) or ``chain_path([...])`` (every bend fixed).

How it is fast:

* the data are held as tensors (``TensorLoader``), sums stay on the device
  (no ``.item()`` per batch);
* several points are evaluated in one pass: their weights are stacked
  ``[K, P] = C(ts) @ bends`` and the template runs under ``torch.func.vmap``
  over the stacked weights;
* BatchNorm statistics of all K points are recomputed in the same single
  pass over the training data: each BN layer is put in training mode with
  momentum ``1/(k+1)`` at batch k, which is exactly the cumulative average
  that ``torch.optim.swa_utils.update_bn`` computes (equal weight per batch,
  unbiased batch variance), applied to stacked running buffers under vmap.
  Other modules (dropout) stay in eval mode during that pass.

Barriers (``PathResult.barrier``), for a metric M along t with endpoints
M(0), M(1):

* ``"interp"`` (Entezari et al. 2022): ``max_t [M(t) - ((1-t) M(0) + t M(1))]``
* ``"mean"`` (Frankle et al. 2020; Ainsworth et al. 2023): ``max_t M(t) - (M(0) + M(1)) / 2``
* ``"max"``: ``max_t M(t) - max(M(0), M(1))``

Several processes (torchrun, :mod:`modeconn.distributed`): ``evaluate_path``
gives each rank a contiguous share of the chunks of points and gathers the
results, so every rank returns the whole :class:`PathResult`. One rank per
point: a rank evaluates its points over the *whole* training and test data
(the BN statistics of a point are recomputed by the rank that owns it), so no
communication happens inside the BN pass and the numbers are exactly those of
a single process evaluating the same chunks of points.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from modeconn.runtime import distributed as _dist
from modeconn.evaluation.bn import batchnorm_modules
from modeconn.core.curve_model import CurveModel
from modeconn.core.curves import PolyChain
from modeconn.runtime import Runtime

METRICS = ("train_loss", "train_nll", "train_acc", "train_error",
           "test_loss", "test_nll", "test_acc", "test_error")
BARRIER_REFERENCES = ("interp", "mean", "max")


# ------------------------------------------------------------------ barriers
def barrier_profile(ts: np.ndarray, values: np.ndarray, reference: str = "interp") -> np.ndarray:
    """M(t) minus the reference level at every t (see module docstring)."""
    ts, values = np.asarray(ts, float), np.asarray(values, float)
    if ts.shape != values.shape or ts.ndim != 1 or len(ts) < 2:
        raise ValueError(f"ts and values must be 1-D of equal length >= 2, got {ts.shape} and {values.shape}")
    m0, m1 = values[0], values[-1]
    if reference == "interp":
        return values - ((1 - ts) * m0 + ts * m1)
    if reference == "mean":
        return values - 0.5 * (m0 + m1)
    if reference == "max":
        return values - max(m0, m1)
    raise ValueError(f"unknown barrier reference {reference!r}; choose one of {BARRIER_REFERENCES}")


def barrier(ts, values, reference: str = "interp"):
    """(height, t at the maximum) of the barrier of ``values`` along ``ts``."""
    prof = barrier_profile(ts, values, reference)
    i = int(np.argmax(prof))
    return float(prof[i]), float(np.asarray(ts)[i])


# -------------------------------------------------------------------- result
@dataclass
class PathResult:
    """Metrics along a path. Arrays are indexed like ``ts``.

    ``segment_lengths[i] = ||θ(t_{i+1}) - θ(t_i)||``; ``arc_length`` is their
    cumulative sum starting at 0. ``linear`` holds the straight line between
    the same endpoints when it was evaluated alongside.
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
        if metric not in METRICS and metric not in self.extra:
            raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
        return self.extra[metric] if metric in self.extra else getattr(self, metric)

    def barrier(self, metric: str = "test_loss", reference: str = "interp") -> float:
        """Barrier height of ``metric`` (definitions in the module docstring)."""
        return barrier(self.ts, self.values(metric), reference)[0]

    def barrier_t(self, metric: str = "test_loss", reference: str = "interp") -> float:
        """The t at which the barrier's maximum sits."""
        return barrier(self.ts, self.values(metric), reference)[1]

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
                for ref in BARRIER_REFERENCES:
                    h, t = barrier(res.ts, res.values(m), ref)
                    rows.append({"path": res.name, "metric": m, "reference": ref, "barrier": h, "t": t})
        return rows

    def to_dict(self) -> dict:
        d = {"name": self.name, "bn_recomputed": self.bn_recomputed, "ts": self.ts.tolist(),
             "segment_lengths": self.segment_lengths.tolist(), "arc_length": self.arc_length.tolist()}
        for m in METRICS:
            d[m] = self.values(m).tolist()
        for k, v in self.extra.items():
            d[k] = np.asarray(v).tolist()
        d["summary"] = {m: self.summary(m) for m in METRICS}
        d["barriers"] = {m: {r: {"barrier": barrier(self.ts, self.values(m), r)[0],
                                 "t": barrier(self.ts, self.values(m), r)[1]} for r in BARRIER_REFERENCES}
                         for m in METRICS}
        if self.linear is not None:
            d["linear"] = self.linear.to_dict()
        return d


# --------------------------------------------------------------- evaluation
def _batched_forward(net: nn.Module, vectorize: bool = True):
    """``f(params [K,...], buffers [K,...], x) -> [K, B, ...]``: K points on one batch.

    ``vectorize``: one ``vmap`` over the stacked weights; otherwise a loop
    over the K points (each a plain ``functional_call`` on views of the
    stacked tensors, so in-place BN updates land in the stacked buffers).
    """
    if vectorize:
        return vmap(lambda p, b, x: functional_call(net, {**p, **b}, (x,)), in_dims=(0, 0, None))

    def loop(p, b, x):
        K = next(iter(p.values())).shape[0]
        if x.dim() == 4:  # channels-last convolutions are markedly faster on CPUs
            x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        for k in range(K):
            pk = {n: v[k].contiguous(memory_format=torch.channels_last) if v.dim() == 5 else v[k]
                  for n, v in p.items()}
            outs.append(functional_call(net, {**pk, **{n: v[k] for n, v in b.items()}}, (x,)))
        return torch.stack(outs)
    return loop


def vectorize_by_default(net: nn.Module, device: torch.device) -> bool:
    """vmap over points pays on GPUs and for dense layers; on CPUs vmapped convolutions become
    grouped convolutions that run slower than one point after another (measured in
    experiments/bench_eval_path.py), so CPU + convolutions -> loop over points."""
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in net.modules())
    return torch.device(device).type != "cpu" or not has_conv


_COMPILED: "weakref.WeakKeyDictionary[nn.Module, Callable]" = weakref.WeakKeyDictionary()


def _compiled_forward(net: nn.Module):
    """``torch.compile`` of the batched forward, built once per template (eval mode only)."""
    if net not in _COMPILED:
        _COMPILED[net] = torch.compile(_batched_forward(net))
    return _COMPILED[net]


@torch.no_grad()
def bn_statistics(curve: CurveModel, flats: torch.Tensor, loader: Iterable,
                  amp: bool = False) -> Dict[str, torch.Tensor]:
    """BN running statistics of K points ``flats [K, P]`` over ``loader``, in one pass.

    Equal to ``torch.optim.swa_utils.update_bn`` run on each point separately.
    Returns buffer name -> ``[K, *shape]``; empty when the net has no BN.
    ``amp``: the forward under bf16 autocast (statistics stay float32).
    """
    net = curve.net
    bns = batchnorm_modules(net)
    if not bns:
        return {}
    K = flats.shape[0]
    names = {id(m): n for n, m in net.named_modules()}
    buffers = {}
    for m in bns:
        prefix = names[id(m)]
        buffers[f"{prefix}.running_mean"] = torch.zeros(K, *m.running_mean.shape, device=flats.device)
        buffers[f"{prefix}.running_var"] = torch.ones(K, *m.running_var.shape, device=flats.device)
        buffers[f"{prefix}.num_batches_tracked"] = torch.zeros(K, dtype=torch.long, device=flats.device)
    params = curve.unflatten(flats)
    was_training = net.training
    momenta = [m.momentum for m in bns]
    net.eval()
    for m in bns:
        m.train()
    try:
        fwd = _batched_forward(net, vectorize_by_default(net, flats.device))
        for k, batch in enumerate(loader):
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            for m in bns:
                m.momentum = 1.0 / (k + 1)
            with Runtime(amp=amp).autocast(flats.device):
                fwd(params, buffers, x)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        net.train(was_training)
    return buffers


@torch.no_grad()
def _metrics(curve: CurveModel, flats: torch.Tensor, buffers: Dict[str, torch.Tensor], loader: Iterable,
             amp: bool = False, compile: bool = False):
    """Summed cross-entropy and correct counts of K points over loader: ([K], [K], n)."""
    net = curve.net
    was_training = net.training
    net.eval()
    try:
        params = curve.unflatten(flats)
        batched = _compiled_forward(net) if compile else \
            _batched_forward(net, vectorize_by_default(net, flats.device))

        def fwd(p, b, x):
            with Runtime(amp=amp).autocast(flats.device):
                out = batched(p, b, x)
            return out.float() if amp else out

        loss_sum = torch.zeros(flats.shape[0], dtype=torch.float64, device=flats.device)
        correct = torch.zeros(flats.shape[0], dtype=torch.long, device=flats.device)
        n = 0
        for x, y in loader:
            out = fwd(params, buffers, x)                       # [K, B, C]
            K, B = out.shape[:2]
            ce = F.cross_entropy(out.reshape(K * B, -1), y.repeat(K), reduction="none").view(K, B)
            loss_sum += ce.double().sum(1)
            correct += (out.argmax(-1) == y).sum(1)
            n += B
    finally:
        net.train(was_training)
    if n == 0:
        raise ValueError("the loader yielded no samples")
    return loss_sum, correct, n


@torch.no_grad()
def evaluate_points(curve: CurveModel, flats: torch.Tensor, train_loader: Optional[Iterable],
                    test_loader: Optional[Iterable], bn_loader: Optional[Iterable] = None,
                    recompute_bn: bool = True, amp: bool = False, compile: bool = False) -> Dict[str, np.ndarray]:
    """Metrics of K arbitrary points ``flats [K, P]`` of ``curve``'s architecture, in one pass per loader.

    The shared engine of path, grid and plane evaluation. Returns
    ``{"train_loss", "train_acc", "test_loss", "test_acc"}`` arrays of length
    K (a split is left out when its loader is None). BN statistics are
    recomputed per point over ``bn_loader`` (default: ``train_loader``)
    when ``recompute_bn`` and the net has BatchNorm; otherwise the
    template's current buffers are used. ``amp``: forwards under bf16
    autocast; ``compile``: the metric passes through ``torch.compile``.
    """
    flats = flats.detach()
    bn_loader = train_loader if bn_loader is None else bn_loader
    if recompute_bn and batchnorm_modules(curve.net):
        if bn_loader is None:
            raise ValueError("BN statistics need a bn_loader or train_loader")
        buffers = bn_statistics(curve, flats, bn_loader, amp=amp)
    else:
        buffers = {n: b.unsqueeze(0).expand(len(flats), *b.shape) for n, b in curve.net.named_buffers()}
    out = {}
    for split, loader in (("train", train_loader), ("test", test_loader)):
        if loader is None:
            continue
        loss_sum, correct, n = _metrics(curve, flats, buffers, loader, amp=amp, compile=compile)
        out[f"{split}_loss"] = (loss_sum / n).cpu().numpy()
        out[f"{split}_acc"] = (correct.double() / n).cpu().numpy()
    return out


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


def _sharded(distributed: Optional[bool]) -> bool:
    return (_dist.active() if distributed is None else bool(distributed)) and _dist.get_world_size() > 1


def _chunk_plan(n: int, points_per_pass: int, sharded: bool):
    """(points per pass, first index of every chunk, this rank's chunk numbers)."""
    if sharded:  # every rank gets at least one chunk when there are enough points
        points_per_pass = min(points_per_pass, math.ceil(n / _dist.get_world_size()))
    starts = list(range(0, n, points_per_pass))
    mine = range(*_dist.shard(len(starts))) if sharded else range(len(starts))
    return points_per_pass, starts, mine


def points_of_this_rank(num_points: int, points_per_pass: int = 8, distributed: Optional[bool] = None) -> int:
    """How many of ``num_points`` points :func:`evaluate_path` evaluates on this rank (for progress bars)."""
    ppp, starts, mine = _chunk_plan(int(num_points), int(points_per_pass), _sharded(distributed))
    return sum(min(ppp, num_points - starts[i]) for i in mine)


@torch.no_grad()
def evaluate_path(path: CurveModel, train_loader: Iterable, test_loader: Iterable, num_points: int = 61,
                  ts: Optional[Sequence[float]] = None, bn_loader: Optional[Iterable] = None,
                  points_per_pass: int = 8, recompute_bn: bool = True, with_linear: bool = False,
                  weight_decay: float = 0.0,
                  progress: Optional[Callable[[int], None]] = None, name: str = "curve",
                  distributed: Optional[bool] = None, amp: bool = False, compile: bool = False) -> PathResult:
    """Loss, NLL, accuracy and error along ``path`` on train and test data.

    Args:
        path: a CurveModel (fitted curve, ``linear_path``, ``chain_path``).
        train_loader: training data for the train metrics, without
            augmentation and shuffling (e.g. ``dataset.eval_loader("train")``).
        test_loader: test data.
        num_points: evenly spaced ts in [0, 1] (ignored when ``ts`` is given).
        bn_loader: data for BN statistics (default: ``train_loader``).
        points_per_pass: how many points share one pass over the data
            (memory grows with it; 1 = one point at a time).
        recompute_bn: recompute BN statistics at every point (default). With
            False the template's current buffers are used as they are.
        with_linear: also evaluate the straight line between the path's
            endpoints at the same ts; stored in ``result.linear``.
        weight_decay: ``loss = nll + 0.5 * weight_decay * ||θ(t)||²`` as in
            Garipov et al.'s evaluation (default 0: loss equals NLL).
        progress: called with the number of points finished after each chunk
            (by this rank).
        distributed: share the points among the ranks of the process group
            (default ``None``: when one of several ranks is initialised). The
            points are cut into chunks of ``points_per_pass`` (fewer when
            there would be fewer chunks than ranks) and each rank evaluates a
            contiguous run of chunks over all the data; the results are
            gathered so every rank returns the whole result, equal to what
            one process computes with the same chunks.
        amp: forwards under bf16 autocast. compile: ``torch.compile`` of
            the metric passes.
    """
    ts_arr = _grid(num_points) if ts is None else np.asarray(ts, dtype=float)
    if ts_arr.ndim != 1 or len(ts_arr) < 1:
        raise ValueError("ts must be a non-empty 1-D sequence of values in [0, 1]")
    if points_per_pass < 1:
        raise ValueError(f"points_per_pass must be >= 1, got {points_per_pass}")
    bn_loader = train_loader if bn_loader is None else bn_loader
    device = path.fixed_bends.device
    t_tensor = torch.tensor(ts_arr, dtype=path.fixed_bends.dtype)
    path.coefficients(t_tensor)  # validates ts
    use_bn = recompute_bn and bool(batchnorm_modules(path.net))
    sharded = _sharded(distributed)
    points_per_pass, starts, mine = _chunk_plan(len(ts_arr), points_per_pass, sharded)

    results, flats_all = {}, []
    for i, lo in enumerate(starts):
        flats = path.flat_weights_at(t_tensor[lo:lo + points_per_pass].to(device), check=False).detach()
        flats_all.append(flats)
        if i in mine:
            results[i] = evaluate_points(path, flats, train_loader, test_loader, bn_loader, use_bn,
                                         amp=amp, compile=compile)
            if progress is not None:
                progress(len(flats))
    if sharded:  # one rank per point: gather every rank's chunks (plain numpy arrays)
        for part in _dist.all_gather_object(results):
            results.update(part)
    chunks = [results[i] for i in range(len(starts))]
    arr = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    flats = torch.cat(flats_all)
    penalty = (0.5 * weight_decay * flats.double().pow(2).sum(1)).cpu().numpy() if weight_decay else 0.0
    seg = (flats[1:] - flats[:-1]).double().norm(dim=1).cpu().numpy()
    result = PathResult(
        ts=ts_arr, train_loss=arr["train_loss"] + penalty, train_nll=arr["train_loss"], train_acc=arr["train_acc"],
        train_error=1 - arr["train_acc"], test_loss=arr["test_loss"] + penalty, test_nll=arr["test_loss"],
        test_acc=arr["test_acc"], test_error=1 - arr["test_acc"], segment_lengths=seg,
        arc_length=np.concatenate([[0.0], np.cumsum(seg)]), name=name, bn_recomputed=use_bn)
    if with_linear:
        result.linear = evaluate_path(endpoint_line(path), train_loader, test_loader, ts=ts_arr,
                                      bn_loader=bn_loader, points_per_pass=points_per_pass,
                                      recompute_bn=recompute_bn, weight_decay=weight_decay, progress=progress,
                                      name="linear", distributed=distributed, amp=amp, compile=compile)
    return result
