"""REPAIR: renormalise the activations of an interpolated network (Jordan et al. 2023).

Jordan, Sedghi, Saukh, Entezari, Neyshabur, "REPAIR: REnormalizing Permuted
Activations for Interpolation Repair" (ICLR 2023). Between two aligned
networks A and B, the point θ(t) = (1 − t)·θ_A + t·θ_B suffers *variance
collapse*: its hidden units' pre-activations have a smaller spread than in
either endpoint, and the collapse compounds with depth. REPAIR measures, for
every hidden channel c at a pre-activation (the output of a Linear or Conv
before its nonlinearity), the mean μ and standard deviation σ over data in A,
in B and in θ(t), and rescales θ(t)'s channel to the interpolated targets

    μ*_c = (1 − t)·μ_A,c + t·μ_B,c,    σ*_c = (1 − t)·σ_A,c + t·σ_B,c,
    y'_c = s_c·(y_c − μ_c) + μ*_c,     s_c = σ*_c / σ_c,

folded into the layer: ``W_c ← s_c·W_c``, ``b_c ← s_c·(b_c − μ_c) + μ*_c``, so
the result is a plain module of the same architecture.

Which channels: the permutation spec's groups
(:func:`~modeconn.alignment.infer.infer_permutation_spec`) name the hidden
units; a group's producing layer is a Linear/Conv whose ``weight`` axis 0 is
the whole group (output logits are in no group and are never touched). Layers
are corrected one at a time in forward order, each measured after the earlier
corrections, so the statistics of every corrected channel equal their targets
on the data used (up to channels with σ = 0, which are left unscaled).

BatchNorm networks: a group that contains a BatchNorm layer is corrected by
the statistics reset modeconn already does everywhere
(:func:`~modeconn.evaluation.bn.recompute_bn`): a BN layer normalises its
input with the statistics of the point itself and then applies the
interpolated affine ``(γ(t), β(t))`` — Jordan et al. Section 4.2 note that
for BN networks REPAIR *is* this reset. Such groups take that one code path;
the evaluation of a repaired path then equals the plain BN-recomputed path.
"""
from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from modeconn.alignment.infer import infer_permutation_spec
from modeconn.alignment.observe import batch_input, batch_inputs
from modeconn.alignment.spec import PermutationSpec, check_same_architecture
from modeconn.core.curve_model import linear_path
from modeconn.evaluation.bn import has_batchnorm, recompute_bn
from modeconn.evaluation.model import eval_mode
from modeconn.evaluation.path import PathResult, path_result
from modeconn.evaluation.points import evaluate_points
from modeconn.runtime import Hooks, Runtime

__all__ = ["RepairReport", "Repair", "repair", "repair_plan", "channel_statistics", "fold_affine",
           "evaluate_repaired_path"]

FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
ZERO_STD = 1e-8  # a channel whose σ is below this is constant on the data: shifted, never scaled


@dataclass
class RepairReport:
    """What :meth:`Repair.at` did at one t.

    ``layers``: corrected module -> ``group``, ``channels``, ``std_ratio``
    (mean over channels of σ_c(t)/σ*_c before the correction: below 1 is
    variance collapse), ``mean_shift`` (mean over channels of
    ``|μ_c − μ*_c| / σ*_c``). ``bn_groups``: groups corrected by the BN
    statistics reset. ``skipped``: what was left alone and why.
    """

    t: float
    layers: Dict[str, Dict[str, float]] = field(default_factory=dict)
    bn_groups: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """Plain data (for JSON)."""
        return {"t": float(self.t), "layers": {k: dict(v) for k, v in self.layers.items()},
                "bn_groups": list(self.bn_groups), "skipped": list(self.skipped)}


def _is_bn(module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def _group_targets(gname: str, group, modules: Dict[str, nn.Module], skipped: List[str]) -> List[str]:
    """The Linear/Conv modules producing the whole of group ``gname`` (reasons for others into ``skipped``)."""
    found = []
    for a in group.axes:
        if a.axis != 0 or not a.name.endswith(".weight"):
            continue
        mod_name = a.name[:-len(".weight")]
        m = modules.get(mod_name)
        if not isinstance(m, FOLDABLE):
            continue
        whole = a.offset == 0 and a.inner == 1 and getattr(a, "outer", 1) in (1, None) \
            and m.weight.shape[0] == group.size
        if not whole:
            skipped.append(f"{mod_name}: group '{gname}' covers only part of its outputs")
        elif m.bias is None:
            skipped.append(f"{mod_name}: no bias to fold the shift into (group '{gname}')")
        else:
            found.append(mod_name)
    if not found and not any("group '" + gname + "'" in s for s in skipped):
        skipped.append(f"group '{gname}': no Linear/Conv produces it")
    return found


@torch.no_grad()
def repair_plan(model: nn.Module, spec: PermutationSpec, example_input: torch.Tensor
                ) -> Tuple[List[Tuple[str, str]], List[str], List[str]]:
    """``(targets, bn_groups, skipped)``: what REPAIR corrects in ``model`` and how.

    ``targets`` are ``(module name, group name)`` pairs in forward order (one
    forward of ``example_input`` tells it); a module must run exactly once per
    forward. ``bn_groups`` are the groups holding a BatchNorm layer (their
    correction is the BN statistics reset); ``skipped`` explains the rest.
    """
    modules = dict(model.named_modules())
    targets, bn_groups, skipped = {}, [], []
    for gname, g in spec.groups.items():
        if any(a.axis == 0 and _is_bn(modules.get(a.name.rsplit(".", 1)[0])) for a in g.axes):
            bn_groups.append(gname)
            continue
        for mod_name in _group_targets(gname, g, modules, skipped):
            targets[mod_name] = gname
    calls: Dict[str, int] = OrderedDict()
    handles = [modules[n].register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
               for n in targets]
    try:
        with eval_mode(model):
            model(example_input.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    for n in targets:
        if calls.get(n, 0) != 1:
            skipped.append(f"{n}: runs {calls.get(n, 0)} times per forward pass")
    ordered = [(n, targets[n]) for n in calls if calls[n] == 1]
    return ordered, bn_groups, skipped


def _channel_matrix(out: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``[samples, channels]`` float64: channels last for Linear, at dim 1 for Conv (positions are samples)."""
    out = out.detach().double()
    if not isinstance(module, nn.Linear):
        out = out.movedim(1, -1)
    return out.reshape(-1, out.shape[-1])


@torch.no_grad()
def channel_statistics(model: nn.Module, module_names: Sequence[str], loader: Iterable,
                       max_batches: Optional[int] = None) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel ``(mean, std)`` (float64, population std) of each module's output over ``loader``.

    The model runs in eval mode; a Conv's spatial positions count as samples.
    Batches are tensors or ``(x, y)``; inputs go to the model's device.
    """
    modules = dict(model.named_modules())
    sums: Dict[str, list] = {n: [0.0, 0.0, 0] for n in module_names}

    def record(name):
        def hook(mod, inp, out):
            m = _channel_matrix(out, mod)
            s = sums[name]
            s[0], s[1], s[2] = s[0] + m.sum(0), s[1] + (m * m).sum(0), s[2] + m.shape[0]
        return hook
    handles = [modules[n].register_forward_hook(record(n)) for n in module_names]
    device = next(model.parameters()).device
    try:
        with eval_mode(model):
            for x in batch_inputs(loader, max_batches):
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, (s1, s2, count) in sums.items():
        if count == 0:
            raise ValueError(f"module '{n}' saw no data: the loader yielded no batches")
        mean = s1 / count
        out[n] = (mean, (s2 / count - mean * mean).clamp_min(0).sqrt())
    return out


@torch.no_grad()
def fold_affine(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    """Fold ``y'_c = scale_c·y_c + shift_c`` into a Linear/Conv in place: ``W_c ← s_c·W_c, b_c ← s_c·b_c + shift_c``.

    Exact: the module afterwards computes its old output followed by the
    per-channel affine map (output channels on weight axis 0).
    """
    if not isinstance(module, FOLDABLE) or module.bias is None:
        raise ValueError(f"fold_affine needs a Linear/Conv with a bias, got {type(module).__name__}")
    w, b = module.weight, module.bias
    w.mul_(scale.to(w).view(-1, *([1] * (w.dim() - 1))))
    b.mul_(scale.to(b)).add_(shift.to(b))
    return module


def _first_input(loader) -> Tuple[torch.Tensor, Iterable]:
    """(the first batch's input, a loader still yielding every batch: a one-shot iterator gets it back)."""
    it = iter(loader)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("the REPAIR loader yielded no batches: REPAIR needs data") from None
    return batch_input(first), (itertools.chain([first], it) if it is loader else loader)


class Repair:
    """REPAIR between two aligned networks: endpoint statistics measured once, any t corrected by :meth:`at`.

    Args:
        model_a, model_b: the endpoints (nn.Modules of one architecture), B
            already aligned to A (e.g. ``align_models(a, b)[0]``); REPAIR
            does not permute.
        loader: data for every statistic (training data without
            augmentation), batches ``x`` or ``(x, y)``; it is read many times.
        spec: the hidden units (default: inferred from ``model_a`` on the
            first batch, or on ``example_input``).
        max_batches: use only the first N batches of ``loader`` (kept in memory).

    Attributes: ``targets`` (module, group) in forward order, ``bn_groups``,
    ``skipped`` (see :func:`repair_plan`), ``stats_a``/``stats_b`` (module ->
    (mean, std)), ``line`` (the straight line A -> B).
    """

    def __init__(self, model_a: nn.Module, model_b: nn.Module, loader: Iterable,
                 spec: Optional[PermutationSpec] = None, example_input=None, max_batches: Optional[int] = None):
        if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
            raise ValueError("REPAIR needs the two endpoints as nn.Modules (their activations are measured)")
        check_same_architecture(model_a, model_b)
        if max_batches is not None:
            loader = list(itertools.islice(iter(loader), int(max_batches)))
        first, loader = _first_input(loader)
        if not isinstance(loader, (list, tuple)) and iter(loader) is loader:
            loader = list(loader)  # a one-shot iterator cannot be read many times
        self.loader = loader
        spec = spec if spec is not None else infer_permutation_spec(model_a, first if example_input is None
                                                                    else example_input)
        self.targets, self.bn_groups, self.skipped = repair_plan(model_a, spec, first)
        names = [n for n, _ in self.targets]
        self.stats_a = channel_statistics(model_a, names, loader) if names else {}
        self.stats_b = channel_statistics(model_b, names, loader) if names else {}
        self.line = linear_path(model_a, model_b)

    def at(self, t: float, point: Optional[nn.Module] = None) -> Tuple[nn.Module, RepairReport]:
        """``(corrected copy, report)`` of θ(t) on the line A -> B, or of ``point`` with the targets at t.

        ``point`` (e.g. ``curve.point(t)``) is corrected towards the same
        interpolated endpoint statistics; it is copied, never changed.
        """
        t = float(t)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must lie in [0, 1], got {t}")
        model = self.line.point(t) if point is None else copy.deepcopy(point)
        report = RepairReport(t, bn_groups=list(self.bn_groups), skipped=list(self.skipped))
        bn = has_batchnorm(model)
        if bn:
            recompute_bn(model, self.loader)  # the BN groups' REPAIR (Jordan et al. 2023, Section 4.2)
        modules = dict(model.named_modules())
        for i, (name, group) in enumerate(self.targets):
            if bn and i:  # BN layers between corrected layers see the corrections so far
                recompute_bn(model, self.loader)
            mean, std = channel_statistics(model, [name], self.loader)[name]
            (mean_a, std_a), (mean_b, std_b) = self.stats_a[name], self.stats_b[name]
            target_mean, target_std = (1 - t) * mean_a + t * mean_b, (1 - t) * std_a + t * std_b
            scale = torch.where(std > ZERO_STD, target_std / std.clamp_min(ZERO_STD), torch.ones_like(std))
            fold_affine(modules[name], scale, target_mean - scale * mean)
            safe = target_std.clamp_min(ZERO_STD)
            report.layers[name] = {"group": group, "channels": int(mean.numel()),
                                   "std_ratio": float((std / safe).mean()),
                                   "mean_shift": float(((mean - target_mean).abs() / safe).mean())}
        if bn and self.targets:
            recompute_bn(model, self.loader)
        return model, report


def repair(model_a: nn.Module, model_b: nn.Module, t: float, loader: Iterable, *,
           spec: Optional[PermutationSpec] = None, example_input=None, max_batches: Optional[int] = None,
           point: Optional[nn.Module] = None) -> Tuple[nn.Module, RepairReport]:
    """The REPAIRed network at ``t`` between aligned ``model_a`` and ``model_b`` (module docstring).

    Returns ``(corrected copy, RepairReport)``; the inputs are never changed.
    For many t build a :class:`Repair` once (the endpoint statistics are
    measured once). ``point``: correct this network (e.g. a curve's point at
    t) instead of the straight line's.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> a = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> b = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> x = torch.randn(64, 4)
        >>> mid, report = repair(a, b, 0.5, [x])
        >>> list(report.layers)
        ['0']
        >>> mean, std = channel_statistics(mid, ["0"], [x])["0"]
        >>> (mean_a, std_a), (mean_b, std_b) = (channel_statistics(m, ["0"], [x])["0"] for m in (a, b))
        >>> bool(torch.allclose(std, (std_a + std_b) / 2))
        True
    """
    return Repair(model_a, model_b, loader, spec=spec, example_input=example_input,
                  max_batches=max_batches).at(t, point=point)


@torch.no_grad()
def evaluate_repaired_path(model_a: nn.Module, model_b: nn.Module, train_loader: Iterable,
                           test_loader: Iterable, num_points: int = 21, *, ts: Optional[Sequence[float]] = None,
                           repair_loader: Optional[Iterable] = None, spec: Optional[PermutationSpec] = None,
                           max_batches: Optional[int] = None, points_per_pass: int = 8, name: str = "repair",
                           runtime: Optional[Runtime] = None, hooks: Optional[Hooks] = None) -> PathResult:
    """The straight line A -> B with REPAIR at every point, as a :class:`~modeconn.evaluation.path.PathResult`.

    Every point is corrected by :class:`Repair` (statistics over
    ``repair_loader``, default ``train_loader``), then all points go through
    the batched engine of :func:`~modeconn.evaluation.path.evaluate_path`,
    BN statistics recomputed per point. A network whose groups all hold
    BatchNorm has nothing to fold: its repaired path *is* the BN-recomputed
    line, evaluated by the same code. ``segment_lengths`` measure the
    corrected points. ``hooks.progress(n)``: points finished.
    """
    ts_arr = np.linspace(0.0, 1.0, int(num_points)) if ts is None else np.asarray(ts, dtype=float)
    if ts_arr.ndim != 1 or len(ts_arr) < 1 or ts_arr.min() < 0 or ts_arr.max() > 1:
        raise ValueError("ts must be a non-empty 1-D sequence of values in [0, 1]")
    hooks = hooks or Hooks()
    rep = Repair(model_a, model_b, train_loader if repair_loader is None else repair_loader, spec=spec,
                 max_batches=max_batches)
    line = rep.line
    if rep.targets:
        flats = torch.stack([line.layout.flatten(rep.at(t)[0]) for t in ts_arr]).to(line.fixed_bends)
    else:
        flats = line.flat_weights_at(torch.tensor(ts_arr, dtype=line.fixed_bends.dtype)).detach()
    parts = []
    for lo in range(0, len(ts_arr), points_per_pass):
        parts.append(evaluate_points(line, flats[lo:lo + points_per_pass], train_loader, test_loader,
                                     bn_loader=rep.loader, runtime=runtime))
        hooks.advance(len(parts[-1]["train_loss"]))
    arr = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return path_result(ts_arr, arr, flats, 0.0, name, has_batchnorm(line.net))
