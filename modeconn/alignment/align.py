"""One-call alignment of model B to model A."""
from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from modeconn.alignment.infer import infer_permutation_spec
from modeconn.alignment.matching import (DEFAULT_INIT, ActivationMatchingInfo, WeightMatchingInfo,
                                         activation_matching, weight_matching, weight_similarity)
from modeconn.alignment.observe import batch_input
from modeconn.alignment.permute import apply_permutation
from modeconn.alignment.rescale import canonical_scale
from modeconn.alignment.spec import PermutationSpec, check_same_architecture, state_dict_of
from modeconn.runtime.plain import to_plain

__all__ = ["GroupAlignment", "AlignmentReport", "align_models"]

METHODS = ("weight", "activation")


def _finite_mean(values: List[float]) -> float:
    """Mean of the non-NaN ``values`` (NaN when there are none)."""
    vals = [v for v in values if v == v]
    return sum(vals) / len(vals) if vals else float("nan")


@dataclass
class GroupAlignment:
    """How well one group's units match, before (identity) and after alignment."""

    size: int
    before: float
    after: float


@dataclass
class AlignmentReport:
    """Result summary of :func:`align_models`.

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
    rescaled: List[str] = field(default_factory=list)  # groups brought to unit incoming norm before matching

    @property
    def mean_before(self) -> float:
        """Mean of the identity's similarity over the groups that have one (unobserved groups have none); NaN if none."""
        return _finite_mean([g.before for g in self.groups.values()])

    @property
    def mean_after(self) -> float:
        """Mean of the found permutation's similarity over the groups that have one; NaN if none."""
        return _finite_mean([g.after for g in self.groups.values()])

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
            "mean_before": to_plain(self.mean_before),
            "mean_after": to_plain(self.mean_after),
            "groups": {k: {"size": int(g.size), "before": to_plain(g.before), "after": to_plain(g.after)}
                       for k, g in self.groups.items()},
            "reasons": [str(r) for r in self.reasons],
            "fixed": [str(f) for f in self.fixed],
            "info": to_plain(dataclasses.asdict(self.info)) if self.info is not None else None,
            "rescaled": list(self.rescaled),
        }

    def summary(self) -> str:
        """Multi-line text table (the library never prints; callers may)."""
        lines = [f"alignment by {self.method} matching: {len(self.groups)} groups, "
                 f"mean {self.metric} {self.mean_before:.3f} -> {self.mean_after:.3f}"]
        for k, g in self.groups.items():
            lines.append(f"  {k:<32s} {g.size:5d} units  {g.before:7.3f} -> {g.after:7.3f}")
        if self.rescaled:
            lines.append(f"  canonical neuron scale (unit incoming norm) before matching: {', '.join(self.rescaled)}")
        for r in self.reasons:
            lines.append(f"  fixed: {r}")
        return "\n".join(lines)


def _first_input(loader):
    """The model input of ``loader``'s first batch (ValueError without a loader)."""
    if loader is None:
        raise ValueError("rescale=True needs example_input or a loader (a batch to check the rescaling on)")
    return batch_input(next(iter(loader)))


def _resolve_spec(model_a, spec: Optional[PermutationSpec], example_input, loader):
    """The spec to use (given, or inferred from ``model_a``) and the loader to read data from.

    Without ``example_input`` the first batch of ``loader`` is used; a one-shot
    iterator gets that batch put back in front, so no data is lost.
    """
    if spec is not None:
        if not isinstance(spec, PermutationSpec):
            raise ValueError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
        return spec, loader
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
        example_input = batch_input(first)
        if it is loader:  # a one-shot iterator: put the batch back
            loader = itertools.chain([first], it)
    return infer_permutation_spec(model_a, example_input), loader


def _weight_method(model_a, model_b, spec: PermutationSpec, seed: int, max_iter: int, rescale_input=None,
                   restarts: int = 1, init: str = DEFAULT_INIT):
    """Weight matching (on both models' canonical scale when ``rescale_input`` is a batch):
    ``(perm, info, similarity before, after, rescaled groups)``."""
    rescaled: List[str] = []
    if rescale_input is not None:
        if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
            raise ValueError("rescale=True needs nn.Module models, not state dicts")
        model_a, _, rescaled = canonical_scale(model_a, spec, rescale_input)
        model_b, _, _ = canonical_scale(model_b, spec, groups=rescaled)
    perm, info = weight_matching(model_a, model_b, spec, seed=seed, max_iter=max_iter, restarts=restarts,
                                 init=init)
    before = weight_similarity(model_a, model_b, spec, None)
    after = weight_similarity(model_a, model_b, spec, perm)
    return perm, info, before, after, rescaled


def _check_options(method: str, rescale: bool, restarts: int, init: str) -> None:
    """ValueError for an unknown method or a weight-matching option given to another method."""
    if method not in METHODS or (rescale and method != "weight"):
        raise ValueError(f"method must be one of {METHODS} (rescale=True: 'weight'), got {method!r}")
    if method != "weight" and (restarts != 1 or init != DEFAULT_INIT):
        raise ValueError(f"restarts={restarts} and init={init!r} are options of weight matching, not of "
                         f"method={method!r}")


def align_models(model_a, model_b, method: str = "weight", loader=None, spec: Optional[PermutationSpec] = None,
                 example_input=None, seed: int = 0, *, max_iter: int = 100, max_batches: Optional[int] = None,
                 device=None, rescale: bool = False, restarts: int = 1, init: str = DEFAULT_INIT):
    """Permute the hidden units of ``model_b`` to line up with ``model_a``.

    Args:
        model_a, model_b: modules (or state dicts, with a ``spec``) of one architecture.
        method: ``"weight"``: Git Re-Basin weight matching (Ainsworth et al.
            2023, no data); ``"activation"``: correlation of activations over
            ``loader`` (Tatro et al. 2020).
        loader: batches (tensors or ``(x, y)``); needed by the activation method.
        spec: the permutable units; None infers it from ``model_a`` with
            ``example_input`` (default: the first batch of ``loader``).
        seed, max_iter, restarts, init, max_batches, device: passed to the matching function.
        rescale: weight matching on both models' canonical neuron scale (:func:`~modeconn.alignment.rescale.
            canonical_scale`, checked on ``example_input`` or the first batch): a rescaled copy still matches.

    Returns:
        ``(aligned_b, perm, report)``: a copy of ``model_b`` computing the same
        function, each group's permutation and an :class:`AlignmentReport`.
        Raises ValueError for an unknown method, missing inputs or different architectures.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modeconn.alignment import apply_permutation, infer_permutation_spec
        >>> _ = torch.manual_seed(0)
        >>> a = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> spec = infer_permutation_spec(a, torch.randn(1, 4))
        >>> b = apply_permutation(a, spec, spec.random_permutation(seed=1))
        >>> aligned, perm, report = align_models(a, b, example_input=torch.randn(1, 4))
        >>> all(torch.equal(p, q) for p, q in zip(aligned.parameters(), a.parameters()))
        True
    """
    _check_options(method, rescale, restarts, init)
    check_same_architecture(model_a, model_b)
    if method == "activation":
        if loader is None:
            raise ValueError("method='activation' needs a loader")
        if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
            raise ValueError("method='activation' needs nn.Module models, not state dicts")
    spec, loader = _resolve_spec(model_a, spec, example_input, loader)
    spec.validate(state_dict_of(model_a))

    rescaled: List[str] = []
    if method == "weight":
        x = None if not rescale else example_input if example_input is not None else _first_input(loader)
        perm, info, before, after, rescaled = _weight_method(model_a, model_b, spec, seed, max_iter, x, restarts, init)
        metric = "cosine"
    else:
        perm, info = activation_matching(model_a, model_b, loader, spec, device=device,
                                         max_batches=max_batches)
        before = {k: info.correlation_before.get(k, float("nan")) for k in spec.groups}
        after = {k: info.correlation_after.get(k, float("nan")) for k in spec.groups}
        metric = "correlation"
    aligned_b = apply_permutation(model_b, spec, perm)
    groups = OrderedDict((k, GroupAlignment(g.size, before[k], after[k])) for k, g in spec.groups.items())
    report = AlignmentReport(method, metric, groups, list(spec.reasons), list(spec.fixed), info, rescaled)
    return aligned_b, perm, report
