"""Finding the permutation that aligns model B to model A.

* :func:`weight_matching`: Git Re-Basin's coordinate descent on the inner
  product of matched weights (Ainsworth et al. 2023).
* :func:`activation_matching`: Hungarian matching of per-unit activation
  correlations over a data loader (Tatro et al. 2020; Jordan et al. 2022).

Both return ``(perm, info)`` where ``perm`` maps every group of the spec to a
LongTensor such that ``apply_permutation(b, spec, perm)`` is aligned with A.
The forward passes that read activations live in
:mod:`~modeconn.alignment.observe`.
"""
from __future__ import annotations

import copy
import itertools
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from modeconn.alignment.greedy import greedy_start
from modeconn.alignment.observe import ActivationRecorder, PointStats, batch_inputs, unit_matrix
from modeconn.alignment.permute import apply_permutation, permute_tensor, segment_rows
from modeconn.alignment.signatures import signature_permutation
from modeconn.alignment.spec import AxisRef, PermutationSpec, check_same_architecture, state_dict_of
from modeconn.evaluation.model import eval_mode

__all__ = [
    "WeightMatchingInfo",
    "ActivationMatchingInfo",
    "weight_matching",
    "activation_matching",
    "weight_similarity",
]

DEFAULT_INIT = "greedy"
INITS = (DEFAULT_INIT, "identity", "sorted")  # starts of weight matching's first descent
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class WeightMatchingInfo:
    """Trace of :func:`weight_matching`.

    ``objectives[k]`` is the total inner product of matched weights
    ``sum_w <A_w, P(B_w)>`` after sweep ``k + 1``; ``initial_objective`` is its
    value for the identity permutation (B as given) and ``start_objective`` its
    value where the returned descent started (``start``: B as given, the greedy
    or sorted start, a random restart's).  ``start_objective`` and
    ``objectives`` never decrease; with ``init`` "identity" or "greedy", the
    last objective is at least ``initial_objective``.
    """

    initial_objective: float
    objectives: List[float]
    sweeps: int
    converged: bool
    seed: int
    names: List[str] = field(default_factory=list)  # parameters entering the objective
    restart_objectives: List[float] = field(default_factory=list)  # final objective of every restart
    best_restart: int = 0
    start_objective: Optional[float] = None  # where the returned descent started (its B, permuted by its start)
    start: str = "identity"  # that start: "identity" (B as given), "greedy", "sorted" or "random"


@dataclass
class ActivationMatchingInfo:
    """Statistics of :func:`activation_matching`.

    ``correlation_before``/``correlation_after``: per group, the mean
    correlation of matched units for the identity / the found permutation
    (averaged over the group's observation points).  ``num_samples``: rows of
    statistics per group (batch x spatial positions, summed over points).
    ``unobserved``: groups without observation points (kept at the identity).
    """

    num_batches: int
    num_samples: Dict[str, int]
    correlation_before: Dict[str, float]
    correlation_after: Dict[str, float]
    unobserved: List[str] = field(default_factory=list)


# ---------------------------------------------------------------------- utils
def _param_names(model_or_state_dict) -> List[str]:
    """Names that enter the weight-matching objective: parameters, not BN statistics."""
    if isinstance(model_or_state_dict, nn.Module):
        return [n for n, _ in model_or_state_dict.named_parameters()]
    sd = state_dict_of(model_or_state_dict)
    return [k for k, v in sd.items() if v.is_floating_point() and not k.endswith(_BUFFER_SUFFIXES)]


def _prepare(a, b, spec: PermutationSpec, dtype: Optional[torch.dtype] = torch.float64):
    """Check ``a``, ``b`` and ``spec`` against each other; return the matched parameters on the CPU.

    Returns ``(names, A, B, entries)``: the parameters the spec covers, their
    copies in ``dtype`` (None: the weights' own precision, float64 if any of
    them is float64, else float32), and each one's ``(group, AxisRef)`` list.
    """
    sd_a, sd_b = state_dict_of(a), state_dict_of(b)
    check_same_architecture(sd_a, sd_b)
    spec.validate(sd_a)
    covered = set(spec.covered())
    names = [n for n in _param_names(a) if n in covered]
    if dtype is None:
        wide = any(sd[n].dtype == torch.float64 for sd in (sd_a, sd_b) for n in names)
        dtype = torch.float64 if wide else torch.float32
    A = {n: sd_a[n].detach().to(device="cpu", dtype=dtype) for n in names}
    B = {n: sd_b[n].detach().to(device="cpu", dtype=dtype) for n in names}
    entries = {n: e for n, e in spec.entries_by_name().items() if n in A}
    return names, A, B, entries


def weight_similarity(a, b, spec: PermutationSpec,
                      perm: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, float]:
    """Per group, the mean cosine similarity of matched units' weights.

    A unit's weight vector concatenates its slices of every parameter the
    group permutes (its row of the layer that opens it, its column in the next
    layer, its BN scale/shift...).  B is permuted by ``perm`` (identity if
    None) before comparing.
    """
    _, A, B, entries = _prepare(a, b, spec)
    perms = spec.check_permutation(perm or {})
    sizes = {k: g.size for k, g in spec.groups.items()}
    Bp = {n: permute_tensor(B[n], entries[n], perms, sizes) for n in entries}
    out: Dict[str, float] = OrderedDict()
    for gname, g in spec.groups.items():
        refs = [r for r in g.axes if r.name in A]
        if not refs:
            out[gname] = float("nan")
            continue
        ra = torch.cat([segment_rows(A[r.name], r, g.size) for r in refs], dim=1)
        rb = torch.cat([segment_rows(Bp[r.name], r, g.size) for r in refs], dim=1)
        cos = (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-300)
        out[gname] = float(cos.mean())
    return out


# -------------------------------------------------------------- weight matching
class _WeightMatcher:
    """Coordinate-descent state of :func:`weight_matching`: current permutations and cached costs.

    ``current`` is the objective ``sum_w <A_w, P(B_w)>`` of ``perms``, kept up
    to date in float64 by adding each accepted step's gain.
    """

    def __init__(self, a, b, spec: PermutationSpec):
        """Check the inputs and set up the identity permutation, its objective and the caches."""
        names, A, B, self.entries = _prepare(a, b, spec, dtype=None)
        self.names, self.A, self.B = names, A, B
        self.sizes = {k: g.size for k, g in spec.groups.items()}
        self.perms: Dict[str, torch.Tensor] = spec.identity()
        self.refs_of = {k: [r for r in g.axes if r.name in A] for k, g in spec.groups.items()}
        self.initial = math.fsum(float((A[n].double() * B[n].double()).sum()) for n in names)
        scale = math.sqrt(sum(float(A[n].double().pow(2).sum()) for n in names)) * \
            math.sqrt(sum(float(B[n].double().pow(2).sum()) for n in names))
        self.tol = 1e-10 * max(scale, 1e-300)  # gains below this are rounding noise
        self.current = self.initial
        # per (group, axis): A's rows (fixed), and the groups whose permutations B's rows depend on
        self.a_rows = {(g, r): segment_rows(A[r.name], r, self.sizes[g]).contiguous()
                       for g, refs in self.refs_of.items() for r in refs}
        self.deps = {(g, r): list(OrderedDict.fromkeys(h for h, r2 in self.entries[r.name] if r2 != r))
                     for g, refs in self.refs_of.items() for r in refs}
        # linear in g: no parameter carries g on two axes (disjoint slices of one axis, such as
        # packed q/k/v rows, are fine), so a gain is a sum over moved rows
        self.linear = {g: all(c == 1 for c in Counter(name for name, _ in {(r.name, r.axis) for r in refs}).values())
                       for g, refs in self.refs_of.items()}
        self.version = {k: 0 for k in spec.groups}
        self.cache: Dict[Tuple[str, AxisRef], Tuple[tuple, torch.Tensor, torch.Tensor]] = {}
        self.solved: Dict[str, tuple] = {}

    def contribution(self, g: str, r: AxisRef):
        """(key, B's rows for axis r with every other permutation applied, A_rows @ B_rows.T as float64).

        Cached per (group, axis) under the versions of the groups it depends on.  When one of
        them changed, usually only a few columns of B's rows moved: the product is then
        updated by those columns' difference instead of being recomputed.
        """
        key = tuple(self.version[h] for h in self.deps[(g, r)])
        hit = self.cache.get((g, r))
        if hit is not None and hit[0] == key:
            return key, hit[1], hit[2]
        b_rows = segment_rows(permute_tensor(self.B[r.name], self.entries[r.name], self.perms, self.sizes, skip=r),
                              r, self.sizes[g]).contiguous()
        ar = self.a_rows[(g, r)]
        if hit is not None:
            # only the columns a changed permutation moved: update the product by their difference
            changed = (b_rows != hit[1]).any(0).nonzero().squeeze(1)
            if len(changed) <= b_rows.shape[1] // 2:
                c = hit[2] + (ar.index_select(1, changed) @
                              (b_rows.index_select(1, changed) - hit[1].index_select(1, changed)).T).double()
                self.cache[(g, r)] = (key, b_rows, c)
                return key, b_rows, c
        c = (ar @ b_rows.T).double()
        self.cache[(g, r)] = (key, b_rows, c)
        return key, b_rows, c

    def objective(self, names: List[str], perms: Mapping[str, torch.Tensor]) -> float:
        """``sum_w <A_w, P(B_w)>`` over ``names`` in float64, for permutations ``perms``."""
        return math.fsum(float((self.A[n].double() *
                                permute_tensor(self.B[n], self.entries[n], perms, self.sizes).double()).sum())
                         for n in names)

    def gain(self, g: str, parts, old: torch.Tensor, new: torch.Tensor) -> float:
        """Change of the objective when group ``g`` goes from ``old`` to ``new`` (others fixed)."""
        refs = self.refs_of[g]
        if not self.linear[g]:  # a parameter with this group on two axes: evaluate the objective itself
            names = list(OrderedDict.fromkeys(r.name for r in refs))
            trial = dict(self.perms)
            trial[g] = new
            return self.objective(names, trial) - self.objective(names, self.perms)
        # the objective is linear in this group's permutation: sum the changed rows' products
        moved = (new != old).nonzero().squeeze(1)
        gain = 0.0
        for r, (_, b_rows, _) in zip(refs, parts):
            ar = self.a_rows[(g, r)].index_select(0, moved).double()
            diff = b_rows.index_select(0, new[moved]).double() - b_rows.index_select(0, old[moved]).double()
            gain += float((ar * diff).sum())
        return gain

    def step(self, g: str) -> bool:
        """Re-solve group ``g`` with the Hungarian algorithm; True if its permutation improved."""
        refs = self.refs_of[g]
        if not refs:
            return False
        parts = [self.contribution(g, r) for r in refs]
        state = (self.version[g],) + tuple(p[0] for p in parts)
        if self.solved.get(g) == state:
            return False  # the same cost matrix and permutation as when g was last solved: same outcome
        self.solved[g] = state
        old = self.perms[g]
        cost = parts[0][2].clone()
        for p in parts[1:]:
            cost += p[2]
        _, col = linear_sum_assignment(cost.numpy(), maximize=True)
        new = torch.as_tensor(col, dtype=torch.long)
        if torch.equal(new, old):
            return False
        gain = self.gain(g, parts, old, new)
        if not gain > self.tol:
            return False
        self.perms[g] = new
        self.version[g] += 1
        self.solved[g] = (self.version[g],) + state[1:]
        self.current += gain
        return True


def _descent(a, b, spec: PermutationSpec, seed: int, max_iter: int, greedy: bool = False):
    """One coordinate descent from the identity (B as given), or from :func:`greedy_start` when ``greedy``:
    ``(perms, WeightMatchingInfo)`` (see :func:`weight_matching`)."""
    matcher = _WeightMatcher(a, b, spec)
    if greedy:
        greedy_start(matcher, spec)
    start = matcher.current
    history: List[float] = []
    rng = np.random.default_rng(seed)
    gnames = list(spec.groups)
    converged = False
    sweeps = 0
    for _ in range(max_iter):
        sweeps += 1
        improved = False
        for gi in rng.permutation(len(gnames)):
            improved = matcher.step(gnames[int(gi)]) or improved
        history.append(matcher.current)
        if not improved:
            converged = True
            break
    return matcher.perms, WeightMatchingInfo(matcher.initial, history, sweeps, converged, seed, matcher.names,
                                             start_objective=start, start="greedy" if greedy else "identity")


def _best_descent(a, b, spec: PermutationSpec, seed: int, max_iter: int, restarts: int, init: str):
    """The restarts of :func:`weight_matching`: the descent that reached the highest objective."""
    best, finals, identity_objective, first = None, [], None, None
    if init == "sorted":
        names, A, B, _ = _prepare(a, b, spec)
        identity_objective = math.fsum(float((A[n] * B[n]).sum()) for n in names)
        first = signature_permutation(A, B, spec)
    for r in range(restarts):
        start = spec.random_permutation(seed + r) if r else first
        b_r = b if start is None else apply_permutation(state_dict_of(b), spec, start)
        perm, info = _descent(a, b_r, spec, seed + r, max_iter)
        if init == "greedy" and not r:  # also from the greedy start, same visiting order: the higher end wins
            other = _descent(a, b, spec, seed, max_iter, greedy=True)
            if other[1].objectives[-1] > info.objectives[-1]:
                perm, info = other
        if start is not None:
            info.start = "random" if r else "sorted"
        if start is not None:  # B shuffled by `start`, then by `perm`: unit i is B's start[perm[i]]
            perm = {g: start[g][p] for g, p in perm.items()}
        finals.append(info.objectives[-1] if info.objectives else info.initial_objective)
        if identity_objective is None:  # the first descent started from B as given
            identity_objective = info.initial_objective
        if best is None or finals[-1] > finals[best[2]]:
            best = (perm, info, r)
    perm, info, r = best
    info.initial_objective = identity_objective  # of B as given, whichever start won
    info.restart_objectives, info.best_restart = finals, r
    return perm, info


def weight_matching(a, b, spec: PermutationSpec, seed: int = 0, max_iter: int = 100, restarts: int = 1,
                    init: str = DEFAULT_INIT):
    """Git Re-Basin weight matching of ``b`` to ``a`` (modules or state dicts).

    Coordinate descent over groups, visited in a random order each sweep
    (``numpy.random.default_rng(seed)``): for group ``g``, with every other
    group's current permutation applied to B (and ``g``'s own on any other
    axis of the same parameter), the cost matrix is
    ``C[i, j] = sum over g's axes of <A_w[unit i], B_w[unit j]>`` (contracted
    over all other axes) and ``linear_sum_assignment(C, maximize=True)`` gives
    the new permutation, accepted only if it increases the objective.  Stops
    when a full sweep changes nothing, or after ``max_iter`` sweeps.  Only
    parameters enter the objective (BatchNorm running statistics are permuted
    by :func:`apply_permutation` but not matched).

    Precision and speed: the cost matrices are products of the weights in
    their own precision (float32 unless a weight is float64; half precision is
    widened to float32), summed in float64; the objective and the gain that
    decides whether a new permutation is accepted are computed in float64
    from the exact weight values, so the objective never decreases.  Each
    axis's contribution to a cost matrix is cached and updated only when a
    permutation it depends on has changed (by the moved columns alone when
    they are fewer than half), and a group none of whose inputs changed since
    it was last solved is not solved again.

    Starts. Descent stops in a local optimum, and from B as given (``init="identity"``) a poor
    one: each group's cost is half noise while its neighbours are unaligned (two random VGG11:
    245.8). The default ``init="greedy"`` (:mod:`~modeconn.alignment.greedy`) first aligns the
    network from its input, group by group in the spec's order, each on the parameters whose other
    groups are already aligned (VGG11: 270.7); it recovers a permutation of A exactly when the units'
    rows differ. It is not always better (tiny random MLPs, widths 4/16/64, 40 pairs each: worse than
    the identity's in 4/15/1; a trained GPT pair: 320.75 vs 320.88), so descent from B as given runs
    too, with the same seed, and the higher final objective wins (B as given on a tie): the result is
    never below ``init="identity"``'s.
    ``init="sorted"`` starts from the units matched by their sorted weights
    (:mod:`~modeconn.alignment.signatures`), exact on a permutation of A even where rows tie
    (constant norm weights at a zoo's initialisation). ``restarts = k > 1`` also starts from
    ``spec.random_permutation(seed + r)``, 0 < r < k, and keeps the highest objective (the earliest on a tie).

    Returns ``(perm, WeightMatchingInfo)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modeconn.alignment import apply_permutation, infer_permutation_spec
        >>> _ = torch.manual_seed(0)
        >>> a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> spec = infer_permutation_spec(a, torch.randn(1, 4))
        >>> shuffle = {"0": torch.randperm(8)}
        >>> perm, info = weight_matching(a, apply_permutation(a, spec, shuffle), spec)
        >>> torch.equal(perm["0"], torch.argsort(shuffle["0"])), info.converged
        (True, True)
    """
    for name, value in (("max_iter", max_iter), ("restarts", restarts)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return _best_descent(a, b, spec, seed, max_iter, restarts, init)


# ---------------------------------------------------------- activation matching
def _module_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model without any)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself if it is wholly on ``device``, else a copy moved there (never moves the input)."""
    if all(t.device == device for t in itertools.chain(model.parameters(), model.buffers())):
        return model
    return copy.deepcopy(model).to(device)


def _collect_statistics(ma: nn.Module, mb: nn.Module, loader, max_batches: Optional[int], device,
                        observed: Dict[str, Any], where: Dict[str, str]):
    """One pass over ``loader`` in eval mode; ``(stats per (group, point index), number of batches)``."""
    names = list(where)
    stats: Dict[Tuple[str, int], PointStats] = {}
    nb = 0
    with eval_mode(ma, mb), torch.no_grad():
        rec_a, rec_b = ActivationRecorder(ma, names, where), ActivationRecorder(mb, names, where)
        for x in batch_inputs(loader, max_batches):
            x = x.to(device)
            acts_a, acts_b = rec_a(x), rec_b(x)
            for k, g in observed.items():
                for i, p in enumerate(g.observe):
                    xa = unit_matrix(acts_a[p.node], p, g.size, k)
                    xb = unit_matrix(acts_b[p.node], p, g.size, k)
                    st = stats.get((k, i))
                    if st is None:
                        st = stats[(k, i)] = PointStats.zeros(g.size, xa.device)
                    st.add(xa, xb)
            nb += 1
    return stats, nb


def activation_matching(a: nn.Module, b: nn.Module, loader, spec: PermutationSpec,
                        device=None, max_batches: Optional[int] = None):
    """Match the units of ``b`` to ``a`` by the correlation of their activations (Tatro et al. 2020).

    One eval-mode pass over ``loader``; float64 correlations per observation point (spatial
    positions are samples), the Hungarian algorithm on their mean. Unobserved groups keep the
    identity. Returns ``(perm, ActivationMatchingInfo)``.

    Example:
        >>> from modeconn.alignment import apply_permutation, infer_permutation_spec
        >>> _ = torch.manual_seed(0)
        >>> a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> spec = infer_permutation_spec(a, torch.randn(1, 4))
        >>> shuffle = {"0": torch.randperm(8)}
        >>> perm, info = activation_matching(a, apply_permutation(a, spec, shuffle), [torch.randn(64, 4)], spec)
        >>> torch.equal(perm["0"], torch.argsort(shuffle["0"])), info.num_batches
        (True, 1)
    """
    if not isinstance(a, nn.Module) or not isinstance(b, nn.Module):
        raise ValueError("activation_matching needs nn.Module models (not state dicts) to run forward passes")
    if loader is None:
        raise ValueError("activation_matching needs a loader of input batches")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    check_same_architecture(a, b)
    spec.validate(a)
    device = torch.device(device) if device is not None else _module_device(a)
    ma, mb = _on_device(a, device), _on_device(b, device)

    observed = {k: g for k, g in spec.groups.items() if g.observe}
    unobserved = [k for k, g in spec.groups.items() if not g.observe]
    if not observed:
        raise ValueError("no group of the spec has observation points; use method='weight' "
                         "or give PermutationGroup.observe")
    where: Dict[str, str] = {}
    for k, g in observed.items():
        for p in g.observe:
            where.setdefault(p.node, k)
    stats, nb = _collect_statistics(ma, mb, loader, max_batches, device, observed, where)
    if nb == 0:
        raise ValueError("loader yielded no batches")

    perm: Dict[str, torch.Tensor] = spec.identity()
    before: Dict[str, float] = OrderedDict()
    after: Dict[str, float] = OrderedDict()
    samples: Dict[str, int] = OrderedDict()
    for k, g in observed.items():
        corr = torch.zeros(g.size, g.size, dtype=torch.float64)
        for i in range(len(g.observe)):
            corr += stats[(k, i)].correlation().cpu()
        corr /= len(g.observe)  # a group observed at several points (residual stages): their mean
        _, col = linear_sum_assignment(corr.numpy(), maximize=True)
        p = torch.as_tensor(col, dtype=torch.long)
        rows = torch.arange(g.size)
        perm[k] = p
        before[k] = float(corr.diagonal().mean())
        after[k] = float(corr[rows, p].mean())
        samples[k] = sum(stats[(k, i)].n for i in range(len(g.observe)))
    info = ActivationMatchingInfo(nb, samples, before, after, unobserved)
    return perm, info
