"""Finding the permutation that aligns model B to model A.

* :func:`weight_matching`: Git Re-Basin's coordinate descent on the inner
  product of matched weights (Ainsworth et al. 2023).
* :func:`activation_matching`: Hungarian matching of per-unit activation
  correlations over a data loader (Tatro et al. 2020; Jordan et al. 2022).

Both return ``(perm, info)`` where ``perm`` maps every group of the spec to a
LongTensor such that ``apply_permutation(b, spec, perm)`` is aligned with A.
"""
from __future__ import annotations

import copy
import itertools
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import fx, nn

from modeconn.alignment.permute import permute_tensor, segment_rows
from modeconn.alignment.spec import AxisRef, ObservePoint, PermutationSpec, check_same_architecture, state_dict_of
from modeconn.evaluation.model import eval_mode

__all__ = [
    "WeightMatchingInfo",
    "ActivationMatchingInfo",
    "weight_matching",
    "activation_matching",
    "weight_similarity",
]

_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class WeightMatchingInfo:
    """Trace of :func:`weight_matching`.

    ``objectives[k]`` is the total inner product of matched weights
    ``sum_w <A_w, P(B_w)>`` after sweep ``k + 1``; ``initial_objective`` is its
    value for the identity permutation.  The sequence never decreases.
    """

    initial_objective: float
    objectives: List[float]
    sweeps: int
    converged: bool
    seed: int
    names: List[str] = field(default_factory=list)  # parameters entering the objective


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


def _prepare(a, b, spec: PermutationSpec):
    sd_a, sd_b = state_dict_of(a), state_dict_of(b)
    check_same_architecture(sd_a, sd_b)
    spec.validate(sd_a)
    covered = set(spec.covered())
    names = [n for n in _param_names(a) if n in covered]
    A = {n: sd_a[n].detach().to(device="cpu", dtype=torch.float64) for n in names}
    B = {n: sd_b[n].detach().to(device="cpu", dtype=torch.float64) for n in names}
    entries = {n: e for n, e in spec.entries_by_name().items() if n in A}
    return A, B, entries


def weight_similarity(a, b, spec: PermutationSpec,
                      perm: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, float]:
    """Per group, the mean cosine similarity of matched units' weights.

    A unit's weight vector concatenates its slices of every parameter the
    group permutes (its row of the layer that opens it, its column in the next
    layer, its BN scale/shift...).  B is permuted by ``perm`` (identity if
    None) before comparing.
    """
    A, B, entries = _prepare(a, b, spec)
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
def weight_matching(a, b, spec: PermutationSpec, seed: int = 0, max_iter: int = 100):
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

    Returns ``(perm, WeightMatchingInfo)``.
    """
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    sd_a, sd_b = state_dict_of(a), state_dict_of(b)
    check_same_architecture(sd_a, sd_b)
    spec.validate(sd_a)
    covered = set(spec.covered())
    all_names = [n for n in _param_names(a) if n in covered]
    wide = any(sd[n].dtype == torch.float64 for sd in (sd_a, sd_b) for n in all_names)
    work = torch.float64 if wide else torch.float32  # exact copies of the weights' values
    A = {n: sd_a[n].detach().to(device="cpu", dtype=work) for n in all_names}
    B = {n: sd_b[n].detach().to(device="cpu", dtype=work) for n in all_names}
    entries = {n: e for n, e in spec.entries_by_name().items() if n in A}
    sizes = {k: g.size for k, g in spec.groups.items()}
    perms: Dict[str, torch.Tensor] = spec.identity()
    refs_of = {k: [r for r in g.axes if r.name in A] for k, g in spec.groups.items()}

    initial = math.fsum(float((A[n].double() * B[n].double()).sum()) for n in all_names)
    scale = math.sqrt(sum(float(A[n].double().pow(2).sum()) for n in all_names)) * \
        math.sqrt(sum(float(B[n].double().pow(2).sum()) for n in all_names))
    tol = 1e-10 * max(scale, 1e-300)

    # per (group, axis): A's rows (fixed), and the groups whose permutations B's rows depend on
    a_rows = {(g, r): segment_rows(A[r.name], r, sizes[g]).contiguous() for g, refs in refs_of.items()
              for r in refs}
    deps = {(g, r): list(OrderedDict.fromkeys(h for h, r2 in entries[r.name] if r2 != r))
            for g, refs in refs_of.items() for r in refs}
    linear = {g: all(c == 1 for c in Counter(r.name for r in refs).values()) for g, refs in refs_of.items()}
    version = {k: 0 for k in spec.groups}
    cache: Dict[Tuple[str, AxisRef], Tuple[tuple, torch.Tensor, torch.Tensor]] = {}
    solved: Dict[str, tuple] = {}

    def contribution(g: str, r: AxisRef):
        """(key, B's rows for axis r with every other permutation applied, A_rows @ B_rows.T as float64).

        Cached per (group, axis) under the versions of the groups it depends on.  When one of
        them changed, usually only a few columns of B's rows moved: the product is then
        updated by those columns' difference instead of being recomputed.
        """
        key = tuple(version[h] for h in deps[(g, r)])
        hit = cache.get((g, r))
        if hit is not None and hit[0] == key:
            return key, hit[1], hit[2]
        b_rows = segment_rows(permute_tensor(B[r.name], entries[r.name], perms, sizes, skip=r),
                              r, sizes[g]).contiguous()
        ar = a_rows[(g, r)]
        if hit is not None:
            # only the columns a changed permutation moved: update the product by their difference
            changed = (b_rows != hit[1]).any(0).nonzero().squeeze(1)
            if len(changed) <= b_rows.shape[1] // 2:
                c = hit[2] + (ar.index_select(1, changed) @
                              (b_rows.index_select(1, changed) - hit[1].index_select(1, changed)).T).double()
                cache[(g, r)] = (key, b_rows, c)
                return key, b_rows, c
        c = (ar @ b_rows.T).double()
        cache[(g, r)] = (key, b_rows, c)
        return key, b_rows, c

    def objective(names, p) -> float:
        return math.fsum(float((A[n].double() * permute_tensor(B[n], entries[n], p, sizes).double()).sum())
                         for n in names)

    current = initial
    history: List[float] = []
    rng = np.random.default_rng(seed)
    gnames = list(spec.groups)
    converged = False
    sweeps = 0
    for _ in range(max_iter):
        sweeps += 1
        improved = False
        for gi in rng.permutation(len(gnames)):
            g = gnames[int(gi)]
            refs = refs_of[g]
            if not refs:
                continue
            parts = [contribution(g, r) for r in refs]
            state = (version[g],) + tuple(p[0] for p in parts)
            if solved.get(g) == state:
                continue  # the same cost matrix and permutation as when g was last solved: same outcome
            solved[g] = state
            old = perms[g]
            cost = parts[0][2].clone()
            for p in parts[1:]:
                cost += p[2]
            _, col = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(col, dtype=torch.long)
            if torch.equal(new, old):
                continue
            if linear[g]:
                # the objective is linear in this group's permutation: sum the changed rows' products
                moved = (new != old).nonzero().squeeze(1)
                gain = 0.0
                for r, (_, b_rows, _) in zip(refs, parts):
                    ar = a_rows[(g, r)].index_select(0, moved).double()
                    diff = b_rows.index_select(0, new[moved]).double() - b_rows.index_select(0, old[moved]).double()
                    gain += float((ar * diff).sum())
            else:  # a parameter with this group on two axes: evaluate the objective itself
                names = list(OrderedDict.fromkeys(r.name for r in refs))
                trial = dict(perms)
                trial[g] = new
                gain = objective(names, trial) - objective(names, perms)
            if gain > tol:
                perms[g] = new
                version[g] += 1
                solved[g] = (version[g],) + state[1:]
                current += gain
                improved = True
        history.append(current)
        if not improved:
            converged = True
            break
    info = WeightMatchingInfo(initial, history, sweeps, converged, seed, all_names)
    return perms, info


# ---------------------------------------------------------- activation matching
class _Recorder:
    """Runs a model and returns the tensors at the requested observation points.

    Names are looked up first as torch.fx node names of the traced model (the
    traced graph is cut to return just those nodes), then as module names
    (captured with forward hooks; a module called more than once per forward is
    ambiguous and rejected).
    """

    def __init__(self, model: nn.Module, names: List[str], where: Dict[str, str]):
        self.model = model
        self.names = list(OrderedDict.fromkeys(names))
        gm = None
        try:
            gm = fx.symbolic_trace(model)
        except Exception:
            gm = None
        node_by_name = {n.name: n for n in gm.graph.nodes} if gm is not None else {}
        modules = dict(model.named_modules())
        self.fx_names = [n for n in self.names if n in node_by_name]
        self.hook_names = []
        for n in self.names:
            if n in node_by_name:
                continue
            if n in modules and n != "":
                self.hook_names.append(n)
            else:
                raise ValueError(
                    f"observe point '{n}' of group '{where.get(n, '?')}' is neither a torch.fx node "
                    f"of the traced model nor a submodule name")
        self.runner: Callable = model
        if self.fx_names:
            out = [n for n in gm.graph.nodes if n.op == "output"][0]
            out.args = (tuple(node_by_name[n] for n in self.fx_names),)
            gm.graph.eliminate_dead_code()
            gm.recompile()
            self.runner = gm
        self.hooked = [(n, modules[n]) for n in self.hook_names]

    def __call__(self, x) -> Dict[str, torch.Tensor]:
        captured: Dict[str, List[torch.Tensor]] = {n: [] for n in self.hook_names}
        handles = []
        for n, m in self.hooked:
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, n=n: captured[n].append(out)))
        try:
            res = self.runner(*x) if isinstance(x, tuple) else self.runner(x)
        finally:
            for h in handles:
                h.remove()
        acts: Dict[str, torch.Tensor] = {}
        if self.fx_names:
            for n, t in zip(self.fx_names, res):
                acts[n] = t
        for n, lst in captured.items():
            if len(lst) != 1:
                raise ValueError(
                    f"observe point '{n}': the module ran {len(lst)} times in one forward pass; "
                    f"use a torch.fx node name instead")
            acts[n] = lst[0]
        return acts


def _unit_matrix(t: torch.Tensor, p: ObservePoint, size: int, group: str) -> torch.Tensor:
    """``[samples, size]`` float64 view of a group's units at one observation point."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"observe point '{p.node}' of group '{group}' is not a tensor")
    dim = p.dim % t.dim() if -t.dim() <= p.dim < t.dim() else None
    if dim is None or p.offset + size * p.inner > t.shape[dim]:
        raise ValueError(
            f"observe point '{p.node}' of group '{group}' has shape {tuple(t.shape)}, which does not "
            f"hold {size} units (x{p.inner}) at dim {p.dim} from offset {p.offset}")
    x = t.detach().movedim(dim, -1).narrow(-1, p.offset, size * p.inner)
    x = x.reshape(*x.shape[:-1], size, p.inner).transpose(-1, -2)
    return x.reshape(-1, size).to(torch.float64)


def _batches(loader, max_batches):
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        if isinstance(batch, torch.Tensor):
            yield batch
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            yield batch[0]
        else:
            raise ValueError(
                f"loader batches must be tensors or (x, y) tuples with a tensor x, got {type(batch).__name__}")


def _module_device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _on_device(model: nn.Module, device: torch.device) -> nn.Module:
    if all(t.device == device for t in itertools.chain(model.parameters(), model.buffers())):
        return model
    return copy.deepcopy(model).to(device)


def activation_matching(a: nn.Module, b: nn.Module, loader, spec: PermutationSpec,
                        device=None, max_batches: Optional[int] = None):
    """Match the units of ``b`` to ``a`` by the correlation of their activations.

    One pass over ``loader`` (batches are tensors or ``(x, y)`` tuples) runs
    both models in eval mode (their modes are restored afterwards) and
    captures every group's observation points; spatial positions count as
    samples (``[N, C, H, W] -> [N*H*W, C]``).  Float64 sums, sums of squares and
    cross products give the A-vs-B correlation matrix of each point; a group
    observed at several points (residual stages) uses their mean.  The
    Hungarian algorithm then maximises the total matched correlation.

    ``device``: where to run (default: model A's device; models elsewhere are
    copied there, never moved).  Groups without observation points keep the
    identity and are listed in ``info.unobserved``.  Returns
    ``(perm, ActivationMatchingInfo)``.
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
    names = list(where)

    stats: Dict[Tuple[str, int], List[Any]] = {}
    nb = 0
    with eval_mode(ma, mb), torch.no_grad():
        rec_a, rec_b = _Recorder(ma, names, where), _Recorder(mb, names, where)
        for x in _batches(loader, max_batches):
            x = x.to(device)
            acts_a, acts_b = rec_a(x), rec_b(x)
            for k, g in observed.items():
                for i, p in enumerate(g.observe):
                    xa = _unit_matrix(acts_a[p.node], p, g.size, k)
                    xb = _unit_matrix(acts_b[p.node], p, g.size, k)
                    st = stats.get((k, i))
                    if st is None:
                        z = lambda: torch.zeros(g.size, dtype=torch.float64, device=xa.device)  # noqa: E731
                        st = stats[(k, i)] = [0, z(), z(), z(), z(),
                                              torch.zeros(g.size, g.size, dtype=torch.float64, device=xa.device)]
                    st[0] += xa.shape[0]
                    st[1] += xa.sum(0)
                    st[2] += xb.sum(0)
                    st[3] += (xa * xa).sum(0)
                    st[4] += (xb * xb).sum(0)
                    st[5] += xa.T @ xb
            nb += 1
    if nb == 0:
        raise ValueError("loader yielded no batches")

    perm: Dict[str, torch.Tensor] = spec.identity()
    before: Dict[str, float] = OrderedDict()
    after: Dict[str, float] = OrderedDict()
    samples: Dict[str, int] = OrderedDict()
    for k, g in observed.items():
        corr = torch.zeros(g.size, g.size, dtype=torch.float64)
        total = 0
        for i in range(len(g.observe)):
            n, sa, sb, qa, qb, cross = stats[(k, i)]
            total += n
            ma_, mb_ = sa / n, sb / n
            cov = cross / n - torch.outer(ma_, mb_)
            sd_a = (qa / n - ma_ * ma_).clamp_min(0).sqrt()
            sd_b = (qb / n - mb_ * mb_).clamp_min(0).sqrt()
            denom = torch.outer(sd_a, sd_b)
            c = torch.where(denom > 1e-12, cov / denom.clamp_min(1e-12), torch.zeros_like(cov))
            corr += c.cpu()
        corr /= len(g.observe)
        _, col = linear_sum_assignment(corr.numpy(), maximize=True)
        p = torch.as_tensor(col, dtype=torch.long)
        rows = torch.arange(g.size)
        perm[k] = p
        before[k] = float(corr.diagonal().mean())
        after[k] = float(corr[rows, p].mean())
        samples[k] = total
    info = ActivationMatchingInfo(nb, samples, before, after, unobserved)
    return perm, info
