"""Neuron alignment: permute model B's hidden units to line up with model A.

Two trained networks that differ only by a permutation of hidden units compute
the same function, yet the straight line between their weights crosses a high
loss barrier.  Aligning B to A first (Tatro et al. 2020; Ainsworth et al. 2023
"Git Re-Basin"; Jordan et al. 2022 "REPAIR") lowers that barrier, which makes
the curves fitted by modeconn shorter and easier to find.

* :func:`infer_permutation_spec` derives, with torch.fx, which parameter axes
  move together (Linear/Conv outputs, BatchNorm/LayerNorm/GroupNorm as modules
  or functions, depthwise and grouped convolutions, gating, residual stages,
  channel concatenations and slices, flatten, embeddings, attention heads and the dims
  inside them, the residual stream of transformers); what it cannot prove
  safe stays fixed, with a reason.  A :class:`PermutationSpec` can also be
  written by hand.
* :func:`apply_permutation` permutes a module or state dict (a copy).
* :func:`weight_matching` (Git Re-Basin) and :func:`activation_matching`
  (correlation of activations) find the permutation; :func:`align_models` does it all.

Spec inference is split by concern: ``op_tables`` (what each torch op does to
channels), ``channel_layout`` (where units sit in a tensor, through reshapes and
concatenations), ``walk_state``/``layout_rules``/``module_rules``/``function_rules``/``graph_walk``
(the walk over the fx graph, one rule per node from dispatch tables), and
``spec_builder`` (groups and reasons into a :class:`PermutationSpec`);
``attention_rules`` (PyTorch's attention modules) and ``attention_sites``
(hand-written attention found by pattern and checked numerically).

BN reset after interpolation (REPAIR's simple form: recompute BN statistics at the interpolated point) is what modeconn's path evaluation already does
(``evaluate_path`` recomputes BN statistics at every point, see
:func:`modeconn.evaluation.bn.recompute_bn`), so it is not repeated here.
"""
from modeconn.alignment.align import AlignmentReport, GroupAlignment, align_models
from modeconn.alignment.infer import infer_permutation_spec
from modeconn.alignment.matching import (ActivationMatchingInfo, WeightMatchingInfo, activation_matching,
                       weight_matching, weight_similarity)
from modeconn.alignment.permute import apply_permutation
from modeconn.alignment.spec import (AxisRef, ObservePoint, PermutationGroup, PermutationSpec,
                   check_same_architecture)

__all__ = [
    "AxisRef",
    "ObservePoint",
    "PermutationGroup",
    "PermutationSpec",
    "infer_permutation_spec",
    "apply_permutation",
    "weight_matching",
    "activation_matching",
    "weight_similarity",
    "align_models",
    "AlignmentReport",
    "GroupAlignment",
    "WeightMatchingInfo",
    "ActivationMatchingInfo",
    "check_same_architecture",
]
