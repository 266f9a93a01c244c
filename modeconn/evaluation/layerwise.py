"""Layer-wise barriers: which layers make the barrier between two networks (Adilova et al. 2024).

Adilova, Andriushchenko, Kamp, Fischer, Jaggi, "Layer-wise Linear Mode
Connectivity" (ICLR 2024). For a group G of parameters (a parameter, a
module, a top-level block: :func:`~modeconn.core.param_groups.parameter_groups`)
the *layer-wise* path interpolates only G while every other parameter stays
at the base endpoint:

    θ_G(t) = θ_A + t·M_G ⊙ (θ_B − θ_A)      (base "a"; base "b" swaps A and B)

with ``M_G`` the 0/1 mask of G's entries; its barrier says how much G alone
breaks the model. The *cumulative* path interpolates the first k groups at
once (in network order), so the last cumulative path is the straight line
A -> B itself. Every path is a straight line between two points of one
parameter space, so all points of all groups are evaluated by the batched
engine of :func:`~modeconn.evaluation.points.evaluate_points` (BN statistics
recomputed per point) and barriers are those of
:mod:`modeconn.evaluation.barriers`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from modeconn.core.curve_model import linear_path
from modeconn.core.param_groups import GroupsLike, parameter_groups
from modeconn.evaluation.barriers import barrier, check_barrier_metric
from modeconn.evaluation.points import evaluate_points
from modeconn.runtime import Hooks, Runtime

__all__ = ["LayerwiseResult", "layerwise_barriers"]

BASES = ("a", "b")


@dataclass
class LayerwiseResult:
    """Metrics along every layer-wise (and cumulative) path; arrays indexed like ``ts``.

    ``groups`` maps group name -> parameter names, in network order;
    ``single[g][metric]`` is the path interpolating group g alone,
    ``cumulative[g][metric]`` the path interpolating every group up to and
    including g (None when not computed). Metrics: ``train_loss``,
    ``train_error``, ``test_loss``, ``test_error`` (the splits given).
    """

    ts: np.ndarray
    groups: "OrderedDict[str, List[str]]"
    base: str
    single: Dict[str, Dict[str, np.ndarray]]
    cumulative: Optional[Dict[str, Dict[str, np.ndarray]]] = None

    def barriers(self, metric: str = "test_loss", reference: str = "interp",
                 cumulative: bool = False) -> "OrderedDict[str, float]":
        """Group -> barrier height of ``metric`` on its path (``cumulative`` for the first-k paths)."""
        table = self.cumulative if cumulative else self.single
        if table is None:
            raise ValueError("the cumulative paths were not computed (cumulative=False)")
        check_barrier_metric(metric)
        return OrderedDict((g, barrier(self.ts, table[g][metric], reference)[0]) for g in self.groups)

    def to_dict(self, reference: str = "interp") -> dict:
        """Plain data: ts, groups, every array and the barriers of every metric."""
        metrics = list(next(iter(self.single.values())))
        d = {"ts": self.ts.tolist(), "base": self.base, "reference": reference,
             "groups": {g: list(n) for g, n in self.groups.items()}}
        for kind in ("single", "cumulative"):
            table = getattr(self, kind)
            if table is None:
                continue
            d[kind] = {g: {m: np.asarray(v).tolist() for m, v in table[g].items()} for g in self.groups}
            d[f"{kind}_barriers"] = {m: dict(self.barriers(m, reference, kind == "cumulative")) for m in metrics}
        return d


def _masks(line, groups: Dict[str, List[str]]) -> torch.Tensor:
    """``[G, P]`` 0/1 masks of each group's entries in the line's flat layout."""
    offsets, start = {}, 0
    for name, numel in zip(line.layout.names, line.layout.numels):
        offsets[name] = (start, start + numel)
        start += numel
    masks = torch.zeros(len(groups), start, dtype=line.fixed_bends.dtype, device=line.fixed_bends.device)
    for i, names in enumerate(groups.values()):
        for n in names:
            masks[i, offsets[n][0]:offsets[n][1]] = 1
    return masks


def _metrics(origin: torch.Tensor, delta: torch.Tensor, masks: torch.Tensor, coeff: torch.Tensor, line,
             loaders: tuple, points_per_pass: int, runtime, hooks) -> Dict[str, np.ndarray]:
    """Loss and error arrays ``[masks, ts]`` of the points ``origin + coeff_j·mask_i ⊙ delta``.

    Points are built chunk by chunk (never all at once: ``masks × ts`` points
    of a large model do not fit in memory) and run through the batched engine.
    """
    pairs = [(i, j) for i in range(len(masks)) for j in range(len(coeff))]
    parts = []
    for lo in range(0, len(pairs), points_per_pass):
        idx = torch.tensor(pairs[lo:lo + points_per_pass], device=masks.device)
        flats = origin + coeff[idx[:, 1], None] * masks[idx[:, 0]] * delta
        parts.append(evaluate_points(line, flats, *loaders, runtime=runtime))
        hooks.advance(len(flats))
    arr = {k: np.concatenate([p[k] for p in parts]).reshape(len(masks), len(coeff)) for k in parts[0]}
    out = {}
    for split in ("train", "test"):
        if f"{split}_loss" in arr:
            out[f"{split}_loss"], out[f"{split}_error"] = arr[f"{split}_loss"], 1 - arr[f"{split}_acc"]
    return out


@torch.no_grad()
def layerwise_barriers(model_a: nn.Module, model_b: nn.Module, train_loader: Optional[Iterable],
                       test_loader: Optional[Iterable], groups: GroupsLike = "module", *, base: str = "a",
                       cumulative: bool = True, num_points: int = 11, ts: Optional[Sequence[float]] = None,
                       bn_loader: Optional[Iterable] = None, points_per_pass: int = 8,
                       runtime: Optional[Runtime] = None, hooks: Optional[Hooks] = None) -> LayerwiseResult:
    """Barriers of the layer-wise (and cumulative) paths between ``model_a`` and ``model_b``.

    Args:
        model_a, model_b: two networks of one architecture (align B first to
            ask which layers remain after alignment).
        train_loader, test_loader: evaluation data (either may be None, not both).
        groups: ``"parameter"``, ``"module"``, ``"block"`` or a mapping group
            -> parameter names (:func:`~modeconn.core.param_groups.parameter_groups`).
        base: ``"a"``: the other parameters stay at A; ``"b"``: at B (the
            interpolated group then runs from A's values to B's all the same).
        cumulative: also the paths interpolating the first k groups.
        num_points / ts: points per path (barriers need t=0 and t=1).
        bn_loader: data for BN statistics per point (default ``train_loader``).
        points_per_pass, runtime: as in :func:`~modeconn.evaluation.path.evaluate_path`.
        hooks: ``progress(n)`` with the number of points finished.
    """
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    if train_loader is None and test_loader is None:
        raise ValueError("give a train_loader or a test_loader (or both)")
    ts_arr = np.linspace(0.0, 1.0, int(num_points)) if ts is None else np.asarray(ts, dtype=float)
    if ts_arr.ndim != 1 or len(ts_arr) < 2 or ts_arr.min() < 0 or ts_arr.max() > 1:
        raise ValueError("ts must hold at least two values in [0, 1] (barriers need t=0 and t=1)")
    grouping = parameter_groups(model_a, groups)
    line = linear_path(model_a, model_b)
    a, b = line.fixed_bends[0], line.fixed_bends[1]
    t = torch.tensor(ts_arr, dtype=a.dtype, device=a.device)
    # base a: θ(t) = A + t·M ⊙ (B − A); base b: θ(t) = B + (t − 1)·M ⊙ (B − A), the group from A's values to B's
    origin, coeff = (a, t) if base == "a" else (b, t - 1)
    single = _masks(line, grouping)
    masks = torch.cat([single, single.cumsum(0).clamp(max=1)]) if cumulative else single
    loaders = (train_loader, test_loader, train_loader if bn_loader is None else bn_loader)
    per = _metrics(origin, b - a, masks, coeff, line, loaders, points_per_pass, runtime, hooks or Hooks())
    names, G = list(grouping), len(grouping)
    single_t = {g: {m: per[m][i] for m in per} for i, g in enumerate(names)}
    cum_t = {g: {m: per[m][G + i] for m in per} for i, g in enumerate(names)} if cumulative else None
    return LayerwiseResult(ts=ts_arr, groups=grouping, base=base, single=single_t, cumulative=cum_t)
