"""One-call alignment of model B to model A."""
from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from modeconn.alignment.infer import infer_permutation_spec
from modeconn.alignment.matching import (ActivationMatchingInfo, WeightMatchingInfo, activation_matching,
                       weight_matching, weight_similarity)
from modeconn.alignment.permute import apply_permutation
from modeconn.alignment.spec import PermutationSpec, check_same_architecture, state_dict_of

__all__ = ["GroupAlignment", "AlignmentReport", "align"]

METHODS = ("weight", "activation")


@dataclass
class GroupAlignment:
    """How well one group's units match, before (identity) and after alignment."""

    size: int
    before: float
    after: float


@dataclass
class AlignmentReport:
    """Result summary of :func:`align`.

    ``metric`` is ``"cosine"`` (mean cosine similarity of matched units'
    weights, for ``method="weight"``) or ``"correlation"`` (mean correlation of
    matched units' activations, for ``method="activation"``).  ``reasons`` and
    ``fixed`` come from the spec: what was left unpermuted and why.
    """

    method: str
    metric: str
    groups: Dict[str, GroupAlignment]
    reasons: List[str] = field(default_factory=list)
    fixed: List[str] = field(default_factory=list)
    info: Optional[Union[WeightMatchingInfo, ActivationMatchingInfo]] = None

    @property
    def mean_before(self) -> float:
        vals = [g.before for g in self.groups.values()]
        return sum(vals) / len(vals) if vals else float("nan")

    @property
    def mean_after(self) -> float:
        vals = [g.after for g in self.groups.values()]
        return sum(vals) / len(vals) if vals else float("nan")

    def as_dict(self) -> Dict[str, Any]:
        """The report as plain data (dicts, lists, floats, ints, strings, None).

        Safe to store in a checkpoint loaded with ``weights_only=True`` and to
        write as JSON.  Non-finite floats (a group without observations) become
        None.  Keys: method, metric, mean_before, mean_after, groups (name ->
        size/before/after), reasons, fixed, info (the matching trace, or None).
        """
        return {
            "method": self.method,
            "metric": self.metric,
            "mean_before": _plain(self.mean_before),
            "mean_after": _plain(self.mean_after),
            "groups": {k: {"size": int(g.size), "before": _plain(g.before), "after": _plain(g.after)}
                       for k, g in self.groups.items()},
            "reasons": [str(r) for r in self.reasons],
            "fixed": [str(f) for f in self.fixed],
            "info": _plain(dataclasses.asdict(self.info)) if self.info is not None else None,
        }

    def summary(self) -> str:
        """Multi-line text table (the library never prints; callers may)."""
        lines = [f"alignment by {self.method} matching: {len(self.groups)} groups, "
                 f"mean {self.metric} {self.mean_before:.3f} -> {self.mean_after:.3f}"]
        for k, g in self.groups.items():
            lines.append(f"  {k:<32s} {g.size:5d} units  {g.before:7.3f} -> {g.after:7.3f}")
        for r in self.reasons:
            lines.append(f"  fixed: {r}")
        return "\n".join(lines)


def _plain(obj: Any) -> Any:
    """Nested dicts/lists of Python scalars and strings; non-finite floats -> None."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _plain(obj.detach().cpu().tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        v = float(obj)
        return v if math.isfinite(v) else None
    return str(obj)


def _first_input(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise ValueError(
        f"loader batches must be tensors or (x, y) tuples with a tensor x, got {type(batch).__name__}")


def align_models(model_a, model_b, method: str = "weight", loader=None, spec: Optional[PermutationSpec] = None,
          example_input=None, seed: int = 0, *, max_iter: int = 100, max_batches: Optional[int] = None,
          device=None):
    """Permute the hidden units of ``model_b`` to line up with ``model_a``.

    ``method="weight"``: Git Re-Basin weight matching (no data needed);
    ``method="activation"``: correlation matching over ``loader``.  When
    ``spec`` is None it is inferred from ``model_a`` (an ``nn.Module``) with
    ``example_input``, which defaults to the first batch of ``loader``; the
    weight method without a loader needs ``example_input`` (a 1-sample batch).

    Returns ``(aligned_b, perm, report)``: ``aligned_b`` has the type of
    ``model_b`` (a deep copy for a module, a new dict for a state dict) and
    computes the same function as ``model_b``.  Raises ValueError for an
    unknown method, missing inputs, or models of different architectures
    (naming the first differing parameter and both shapes).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_same_architecture(model_a, model_b)
    if method == "activation":
        if loader is None:
            raise ValueError("method='activation' needs a loader")
        if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
            raise ValueError("method='activation' needs nn.Module models, not state dicts")
    if spec is None:
        if not isinstance(model_a, nn.Module):
            raise ValueError("spec is required when model_a is a state dict (inference needs the module)")
        if example_input is None:
            if loader is None:
                raise ValueError(
                    "example_input is required to infer the spec for method='weight' without a loader "
                    "(pass a 1-sample batch, e.g. x[:1], or a spec)")
            it = iter(loader)
            try:
                first = next(it)
            except StopIteration:
                raise ValueError("loader yielded no batches") from None
            example_input = _first_input(first)
            if it is loader:  # a one-shot iterator: put the batch back
                loader = itertools.chain([first], it)
        spec = infer_permutation_spec(model_a, example_input)
    elif not isinstance(spec, PermutationSpec):
        raise ValueError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    spec.validate(state_dict_of(model_a))

    if method == "weight":
        perm, info = weight_matching(model_a, model_b, spec, seed=seed, max_iter=max_iter)
        before = weight_similarity(model_a, model_b, spec, None)
        after = weight_similarity(model_a, model_b, spec, perm)
        metric = "cosine"
    else:
        perm, info = activation_matching(model_a, model_b, loader, spec, device=device,
                                         max_batches=max_batches)
        before = {k: info.correlation_before.get(k, float("nan")) for k in spec.groups}
        after = {k: info.correlation_after.get(k, float("nan")) for k in spec.groups}
        metric = "correlation"
    aligned_b = apply_permutation(model_b, spec, perm)
    groups = OrderedDict((k, GroupAlignment(g.size, before[k], after[k])) for k, g in spec.groups.items())
    report = AlignmentReport(method, metric, groups, list(spec.reasons), list(spec.fixed), info)
    return aligned_b, perm, report
