"""Ensembles: evaluate several networks as one (mean of softmax probabilities).

* :func:`evaluate_ensemble` — accuracy, NLL and calibration of an ensemble
  as members are added, in one pass over the data -> :class:`EnsembleResult`;
* :func:`curve_ensemble` — the point networks of a fitted curve, BN
  statistics recomputed per point, ready for :func:`evaluate_ensemble`;
* :func:`simplex_ensemble` — networks sampled from a simplex or complex, likewise;
* :func:`load_members` — modules from a mix of modules and checkpoint paths.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modeconn.evaluation.bn import has_batchnorm, recompute_bn
from modeconn.evaluation.model import MetricSums, eval_mode
from modeconn.runtime.checkpoints import load_model, load_state_dict

Member = Union[nn.Module, str, os.PathLike]

__all__ = ["evaluate_ensemble", "EnsembleResult", "curve_ensemble", "simplex_ensemble", "load_members", "ECE_BINS",
           "frozen"]

ECE_BINS = 15


def frozen(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with gradients off and dropped (a finished ensemble member)."""
    for p in module.parameters():
        p.grad = None
        p.requires_grad_(False)
    return module.eval()


# ----------------------------------------------------------------- members
def load_members(members: Sequence[Member], template: Optional[nn.Module] = None,
                 map_location="cpu") -> List[nn.Module]:
    """Modules from a mix of modules and checkpoint paths (modules are passed through).

    A path is loaded with :func:`~modeconn.runtime.checkpoints.load_model` or, when
    ``template`` is given, as a copy of ``template`` holding the file's state
    dict (for checkpoints that do not name a registered architecture).
    """
    out = []
    for m in members:
        if isinstance(m, nn.Module):
            out.append(m)
        elif template is not None:
            net = copy.deepcopy(template).to(map_location)
            net.load_state_dict(load_state_dict(m))
            out.append(net.eval())
        else:
            out.append(load_model(m, map_location=map_location)[0].eval())
    return out


def curve_ensemble(curve, ts: Sequence[float], bn_loader: Optional[Iterable] = None) -> List[nn.Module]:
    """The networks at ``ts`` along a fitted curve, BN statistics recomputed per point.

    Every point (endpoints included) gets statistics computed over
    ``bn_loader`` (required when the network has BatchNorm). Returns
    standalone modules in eval mode, for :func:`evaluate_ensemble`.

    Example:
        >>> from modeconn.core.curve_model import CurveModel
        >>> from modeconn.data import TensorLoader
        >>> _ = torch.manual_seed(0)
        >>> a, b = (nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)) for _ in range(2))
        >>> data = TensorLoader(torch.randn(16, 4), torch.randint(0, 3, (16,)), batch_size=8)
        >>> members = curve_ensemble(CurveModel(a, a, b), [0.0, 0.5, 1.0], bn_loader=data)
        >>> len(members), int(members[1][1].num_batches_tracked), members[1].training
        (3, 2, False)
        >>> evaluate_ensemble(members, data).final["members"]
        3
    """
    ts = [float(t) for t in ts]
    if not ts:
        raise ValueError("ts is empty: an ensemble needs at least one point")
    return _members_at([curve.point(t) for t in ts], bn_loader)


def simplex_ensemble(model, num_samples: int, seed: int = 0, bn_loader: Optional[Iterable] = None
                     ) -> List[nn.Module]:
    """``num_samples`` networks drawn from a simplex or complex, BN statistics recomputed per sample.

    Each sample is a draw of the training distribution
    (:meth:`~modeconn.core.simplex.SimplexModel.sample`: a uniform simplex,
    α ~ Dirichlet(1) on it) from a generator seeded by ``seed`` (Benton et
    al. 2021's simplex ensembles). Returns standalone modules in eval mode,
    for :func:`evaluate_ensemble`.

    Example:
        >>> from modeconn.core.simplex import SimplexModel
        >>> _ = torch.manual_seed(0)
        >>> nets = [nn.Linear(4, 3) for _ in range(3)]
        >>> members = simplex_ensemble(SimplexModel(nets[0], nets), 5, seed=1)
        >>> len(members), members[0].training
        (5, False)
    """
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    gen = torch.Generator().manual_seed(int(seed))
    return _members_at([model.point(model.sample(gen)[1]) for _ in range(int(num_samples))], bn_loader)


def _members_at(points: List[nn.Module], bn_loader: Optional[Iterable]) -> List[nn.Module]:
    """``points`` with BN statistics recomputed over ``bn_loader`` (required with BatchNorm), frozen."""
    if has_batchnorm(points[0]):
        if bn_loader is None:
            raise ValueError("the network has BatchNorm: pass bn_loader (training data) so each point's "
                             "statistics can be recomputed")
        for p in points:
            recompute_bn(p, bn_loader)
    return [frozen(p) for p in points]


# -------------------------------------------------------------- evaluation
@dataclass
class EnsembleResult:
    """Metrics of an ensemble as members are added, and of each member alone.

    Arrays have one entry per member. ``acc[k]``, ``nll[k]``, ``ece[k]``
    belong to the ensemble of the first ``k + 1`` members (mean of their
    softmax probabilities); ``member_*[k]`` to member k alone. NLL is the mean
    of ``-log p̄(y|x)``; ECE uses ``num_bins`` equal-width confidence bins
    ``(b/B, (b+1)/B]`` and is ``Σ_b (n_b / n) |acc_b - conf_b|``.
    """

    acc: np.ndarray
    nll: np.ndarray
    ece: np.ndarray
    member_acc: np.ndarray
    member_nll: np.ndarray
    member_ece: np.ndarray
    n: int
    num_bins: int = ECE_BINS

    @property
    def error(self) -> np.ndarray:
        """1 - acc, per ensemble size."""
        return 1.0 - self.acc

    @property
    def final(self) -> Dict[str, float]:
        """Metrics of the whole ensemble."""
        return {"acc": float(self.acc[-1]), "nll": float(self.nll[-1]), "ece": float(self.ece[-1]),
                "error": float(1.0 - self.acc[-1]), "members": len(self.acc)}

    def to_dict(self) -> dict:
        """Plain data: ``{"n", "num_bins", "ensemble": [...], "members": [...]}``."""
        return {"n": self.n, "num_bins": self.num_bins,
                "ensemble": [{"members": k + 1, "acc": float(a), "nll": float(l), "ece": float(e),
                              "error": float(1 - a)}
                             for k, (a, l, e) in enumerate(zip(self.acc, self.nll, self.ece))],
                "members": [{"index": k, "acc": float(a), "nll": float(l), "ece": float(e),
                             "error": float(1 - a)}
                            for k, (a, l, e) in enumerate(zip(self.member_acc, self.member_nll,
                                                              self.member_ece))]}


@torch.no_grad()
def evaluate_ensemble(models: Sequence[Member], loader: Iterable, bn_loader: Optional[Iterable] = None,
                      num_bins: int = ECE_BINS, template: Optional[nn.Module] = None,
                      map_location="cpu") -> EnsembleResult:
    """Accuracy, NLL and ECE of the ensemble of ``models`` (sizes 1..n) and of each member.

    The ensemble predicts the mean of the members' softmax probabilities
    (not of their logits), in the given order. One pass over ``loader``: each
    batch goes through every member; sums are float64 tensors (no ``.item()``
    per batch; one :class:`~modeconn.evaluation.model.MetricSums` for the
    growing ensembles, one for the members). Mean probabilities of growing
    prefixes are computed in the log domain (``logcumsumexp``), so NLL stays
    finite for confident members.

    Args:
        models: modules and/or checkpoint paths (loaded with
            :func:`load_members`, all held in memory during the pass).
        loader: evaluation batches ``(x, y)`` with integer class labels.
        bn_loader: if given, each member's BatchNorm statistics are
            recomputed over it first (**in place** for modules passed in).
        num_bins: ECE bins (15, equal width).
        template, map_location: how paths are loaded (see :func:`load_members`).

    Modules are evaluated in eval mode and their train/eval mode restored.
    BN statistics (``bn_loader``) are :func:`~modeconn.evaluation.bn.recompute_bn`'s:
    the same numbers :func:`~modeconn.evaluation.path.evaluate_path` uses.

    Example:
        >>> from modeconn.data import TensorLoader
        >>> _ = torch.manual_seed(0)
        >>> nets = [nn.Linear(4, 3) for _ in range(3)]
        >>> data = TensorLoader(torch.randn(32, 4), torch.randint(0, 3, (32,)), batch_size=8)
        >>> res = evaluate_ensemble(nets, data)
        >>> len(res.nll), res.n
        (3, 32)
        >>> bool(res.nll[-1] <= res.member_nll.mean())  # -log of a mean <= mean of -logs (Jensen)
        True
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    members = load_members(list(models), template, map_location)
    if not members:
        raise ValueError("an ensemble needs at least one member")
    if bn_loader is not None:
        for m in members:
            recompute_bn(m, bn_loader)
    ens, mem = MetricSums(num_bins), MetricSums(num_bins)
    log_k = None
    with eval_mode(*members):
        for x, y in loader:
            logp = F.log_softmax(torch.stack([m(x) for m in members]).double(), dim=-1)  # [M, B, C]
            if logp.dim() == 4:  # a language model's [M, B, T, V]: every token with a target is a sample
                logp, y = logp.flatten(1, 2), y.reshape(-1)
                logp, y = logp[:, y >= 0], y[y >= 0]
            if log_k is None:
                log_k = torch.arange(1, len(members) + 1, dtype=torch.float64, device=logp.device).log()
            mem.add(logp, y)
            # log of the mean probability of the first k+1 members, for every k at once
            ens.add(torch.logcumsumexp(logp, dim=0) - log_k.view(-1, 1, 1), y)
    e, m = ens.means(), mem.means()
    return EnsembleResult(e["acc"], e["loss"], e["ece"], m["acc"], m["loss"], m["ece"], ens.n, num_bins)
