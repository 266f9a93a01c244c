"""Curve and permutation optimised together: proximal alternating minimisation (PAM, Tatro et al. 2020, §3.3).

Tatro et al. ask whether the permutation found by aligning B to A is locally
optimal *for the curve*: they minimise the curve's loss over both the curve's
free bends θ and the permutation P of the free endpoint B by alternating

1. a curve step with P fixed: fit the curve's free bends between A and P(B)
   (:func:`~modeconn.training.loop.fit_curve`);
2. a permutation step with the curve fixed: the assignment problem
   ``P ← argmax_P Σ_w ⟨T_w, P(B_w)⟩ + λ Σ_g ⟨P_g, P_g^prev⟩`` where T is the
   curve's bend next to B (the middle bend of a Bezier(3)). For permutation
   matrices ``‖P(B)‖`` and ``‖P‖`` are constant, so this is
   ``argmin_P ½‖T − P(B)‖² + ½λ‖P − P^prev‖²_F``: weight matching
   (Ainsworth et al. 2023) of B to the bend, with the proximal term keeping P
   near the previous permutation (λ = 0: plain weight matching to the bend).

The proximal term enters :func:`~modeconn.alignment.matching.weight_matching`
unchanged as one extra matrix per group: B is first permuted by ``P^prev``, and
both sides get ``√λ · I`` permuted by the group on its rows, so keeping a
unit in place earns λ; the coordinate descent then starts at ``P^prev``.
Each round reports how many units the permutation moved and the curve's
barrier, so one sees whether the alignment was already a fixed point.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch

from modeconn.alignment.matching import weight_matching
from modeconn.alignment.permute import apply_permutation
from modeconn.alignment.spec import AxisRef, PermutationGroup, PermutationSpec, state_dict_of
from modeconn.core.curve_model import CurveModel
from modeconn.evaluation.path import evaluate_path
from modeconn.runtime import Hooks
from modeconn.training.loop import fit_curve

__all__ = ["proximal_weight_matching", "permutation_update", "set_end", "pam_fit", "PAMRound", "PAMResult"]

_PROX = "__proximal__."


def compose(first: Mapping[str, torch.Tensor], then: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The permutation of applying ``first`` and then ``then``: ``P(B)[i] = B[first[then[i]]]`` per group."""
    return {g: first[g][then[g]] for g in first}


def proximal_weight_matching(target, b, spec: PermutationSpec, previous: Optional[Mapping[str, torch.Tensor]] = None,
                             proximal: float = 0.0, seed: int = 0, max_iter: int = 100):
    """``argmax_P Σ_w ⟨T_w, P(B_w)⟩ + λ Σ_g #{i : P_g[i] = P_g^prev[i]}`` by :func:`weight_matching`:
    descent from ``P^prev``, or from its greedy start (the reward included) when that scores higher.

    Args:
        target, b: modules or state dicts of one architecture (T and B).
        spec: their permutation spec.
        previous: ``P^prev`` (group -> LongTensor; default identity).
        proximal: λ >= 0, the reward per unit kept where ``P^prev`` put it
            (in the units of the weights' inner products).
        seed, max_iter: of the coordinate descent.

    Returns ``(perm, WeightMatchingInfo)``; ``perm`` aligns ``b`` to ``target``
    (``apply_permutation(b, spec, perm)``), its objective includes the proximal reward.
    """
    if not (math.isfinite(proximal) and proximal >= 0):
        raise ValueError(f"proximal (the PAM weight λ) must be a finite number >= 0, got {proximal!r}")
    previous = spec.check_permutation(dict(previous or {}))
    moved_b = apply_permutation(state_dict_of(b), spec, previous)
    t_sd = OrderedDict(state_dict_of(target))
    groups = OrderedDict((k, PermutationGroup(g.size, list(g.axes), list(g.observe))) for k, g in spec.groups.items())
    if proximal > 0:
        dtype = next(v.dtype for v in t_sd.values() if v.is_floating_point())
        for k, g in spec.groups.items():
            eye = math.sqrt(proximal) * torch.eye(g.size, dtype=dtype)
            t_sd[_PROX + k], moved_b[_PROX + k] = eye, eye.clone()
            groups[k].axes.append(AxisRef(_PROX + k, 0))
    augmented = PermutationSpec(groups, fixed=list(spec.fixed), reasons=list(spec.reasons))
    step, info = weight_matching(t_sd, moved_b, augmented, seed=seed, max_iter=max_iter)
    return compose(previous, step), info


def _bend_next_to_end(curve: CurveModel) -> Dict[str, torch.Tensor]:
    """The parameters of the curve's second-to-last bend (the one the end endpoint pulls on), on the CPU."""
    return {n: v[-2].detach().cpu() for n, v in curve.bends_by_name().items()}


def permutation_update(curve: CurveModel, end_state: Mapping[str, torch.Tensor], spec: PermutationSpec,
                       previous: Optional[Mapping[str, torch.Tensor]] = None, proximal: float = 0.0,
                       seed: int = 0):
    """PAM's permutation step with the curve fixed: :func:`proximal_weight_matching` of the end network
    ``end_state`` (unpermuted B) to the curve's bend next to its end. Returns ``(perm, info)``."""
    bend = _bend_next_to_end(curve)
    b_params = {n: torch.as_tensor(end_state[n]).detach().cpu() for n in bend}
    full = spec.check_permutation(dict(previous or {}))
    reduced = _parameter_spec(spec, bend)
    perm, info = proximal_weight_matching(bend, b_params, reduced, {k: full[k] for k in reduced.groups}, proximal,
                                          seed)
    return {**full, **perm}, info


def _parameter_spec(spec: PermutationSpec, params: Mapping[str, torch.Tensor]) -> PermutationSpec:
    """``spec`` restricted to the axes of parameters in ``params`` (the bends hold no buffers); groups
    without such an axis are left out (they keep their permutation)."""
    groups = OrderedDict((k, PermutationGroup(g.size, [a for a in g.axes if a.name in params], list(g.observe)))
                         for k, g in spec.groups.items() if any(a.name in params for a in g.axes))
    return PermutationSpec(groups, fixed=[n for n in spec.fixed if n in params], reasons=list(spec.reasons))


def set_end(curve: CurveModel, state: Mapping[str, torch.Tensor]) -> None:
    """Replace the curve's end bend and end buffers by ``state`` (the other bends stay)."""
    bends = curve.bends_by_name()
    for n, v in bends.items():
        v[-1] = torch.as_tensor(state[n]).to(v)
    curve.load_bends(bends)
    with torch.no_grad():
        for n, buf in curve.end_buffers.as_dict().items():
            if n in state:
                buf.copy_(state[n])


def moved_fraction(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """Per group the fraction of units whose partner changed, and ``"total"`` over all units."""
    out = {g: float((old[g] != new[g]).double().mean()) for g in old}
    units = sum(len(old[g]) for g in old)
    out["total"] = sum(float((old[g] != new[g]).sum()) for g in old) / max(units, 1)
    return out


@dataclass
class PAMRound:
    """One round: the curve step's last-epoch loss and barrier, then the permutation step's movement."""

    round: int
    train_loss: float
    barrier: float           # test-loss barrier of the curve after its step (permutation of the round's start)
    moved: Dict[str, float]  # fraction of units whose partner the permutation step changed ("total": all)
    objective: float         # ⟨bend, P(B)⟩ + λ·(units kept) after the permutation step
    barrier_after: float     # test-loss barrier with the new permutation, bends unchanged


@dataclass
class PAMResult:
    """Every round of :func:`pam_fit`, the final permutation (group -> LongTensor), the curve history and
    the permutation after each round (``perms[r]``)."""

    rounds: List[PAMRound]
    perm: Dict[str, torch.Tensor]
    history: List[dict] = field(default_factory=list)
    perms: List[Dict[str, torch.Tensor]] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        """Plain data for JSON."""
        return {"rounds": [r.__dict__ for r in self.rounds], "perm": {k: v.tolist() for k, v in self.perm.items()}}


def pam_fit(curve: CurveModel, end_state: Mapping[str, torch.Tensor], spec: PermutationSpec, train_loader: Iterable,
            eval_loaders: tuple, rounds: int = 3, epochs_per_round: int = 5, proximal: float = 0.0,
            initial: Optional[Mapping[str, torch.Tensor]] = None, num_points: int = 11, seed: int = 0,
            fit_kwargs: Optional[dict] = None, hooks: Optional[Hooks] = None) -> PAMResult:
    """Alternate curve steps and permutation steps of the end endpoint (PAM, Tatro et al. 2020).

    Args:
        curve: the curve, built between A and ``P(end_state)`` with ``P = initial`` (or identity): its
            middle bends are where the first curve step starts.
        end_state: the unpermuted end network B (state dict).
        spec: the permutation spec of the architecture.
        train_loader: for the curve steps; ``eval_loaders`` = ``(train, test[, bn])`` for the barriers.
        rounds, epochs_per_round: each round is a fresh :func:`fit_curve` run of ``epochs_per_round``
            epochs (its own schedule, seed ``seed + round``) then one permutation step.
        proximal: λ of :func:`proximal_weight_matching`.
        num_points: evenly spaced t of each barrier evaluation.
        fit_kwargs: more arguments of :func:`fit_curve` (lr, weight_decay, ...).
        hooks: handed to every :func:`fit_curve`.

    Returns:
        A :class:`PAMResult`; the curve ends fitted between A and the final ``P(B)``.
    """
    if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    perm = spec.check_permutation(dict(initial or {}))
    set_end(curve, apply_permutation(end_state, spec, perm))
    train, test, *bn = eval_loaders

    def barrier_now() -> float:
        res = evaluate_path(curve, train, test, num_points, bn_loader=bn[0] if bn else None)
        return res.barrier("test_loss")

    out: List[PAMRound] = []
    history: List[dict] = []
    perms: List[Dict[str, torch.Tensor]] = []
    for r in range(int(rounds)):
        hist = fit_curve(curve, train_loader, epochs_per_round, seed=seed + r, hooks=hooks, **(fit_kwargs or {}))
        history.extend({**h, "epoch": r * epochs_per_round + h["epoch"], "round": r + 1} for h in hist)
        before = barrier_now()
        new, info = permutation_update(curve, end_state, spec, perm, proximal, seed)
        moved = moved_fraction(perm, new)
        perm = new
        perms.append(new)
        set_end(curve, apply_permutation(end_state, spec, perm))
        out.append(PAMRound(r + 1, hist[-1]["loss"], before, moved, info.objectives[-1], barrier_now()))
    return PAMResult(out, perm, history, perms)
