"""Inferring a :class:`PermutationSpec` from a model with torch.fx.

The model is traced with ``torch.fx.symbolic_trace`` and run once on an
example input with ``ShapeProp`` (in eval mode, without gradients, module
modes restored afterwards), so every node knows its output shape.  The walk
(:mod:`~modeconn.alignment.graph_walk`) then follows, node by node, where
each layer's output units travel: a Linear or Conv output opens a group,
per-channel ops pass it through, residual adds merge groups, ``torch.cat``
and ``flatten`` move them (:mod:`~modeconn.alignment.channel_layout`).
Whatever cannot be proven to commute with a permutation leaves the groups
flowing into it fixed, with a reason.  Attention (PyTorch's modules, or
hand-written and found by pattern) adds head groups; a pattern-matched site is
kept only if permuting its heads leaves the output on the example input
unchanged.  The network input and output are never
permuted.  Finally :mod:`~modeconn.alignment.spec_builder` turns the groups
into a validated spec. Hugging Face ``transformers`` models are not traced:
their spec is written from their module structure (:mod:`~modeconn.alignment.hf_rules`).
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from modeconn.alignment.attention_sites import verify_sites
from modeconn.alignment.graph_walk import walk_graph
from modeconn.alignment.hf_rules import hf_permutation_spec
from modeconn.alignment.spec import PermutationSpec
from modeconn.alignment.spec_builder import build_spec
from modeconn.evaluation.model import eval_mode

__all__ = ["infer_permutation_spec", "trace_model"]


def trace_model(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with a clear ValueError when tracing fails."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # fx raises many kinds of errors
        raise ValueError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}: {e}); "
            f"write its PermutationSpec by hand") from e


def _as_args(example_input) -> tuple:
    """The forward's positional arguments: a tensor, or a non-empty tuple/list of them."""
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and example_input:
        return tuple(example_input)
    raise ValueError(
        f"example_input must be a tensor (or a tuple of the forward's tensors), got {type(example_input).__name__}")


def infer_permutation_spec(model: nn.Module, example_input) -> PermutationSpec:
    """Infer which hidden units of ``model`` can be permuted together.

    Args:
        model: the network; it must be traceable by ``torch.fx.symbolic_trace``.
        example_input: a batch (one sample is enough) accepted by
            ``model.forward``, or a tuple of positional inputs.  The model is
            run once in eval mode without gradients (its train/eval flags are
            restored).

    Returns:
        A :class:`PermutationSpec` whose groups are named after the layer that
        opens them (the first one, for groups merged by residual additions);
        ``fixed`` lists the state-dict entries left unpermuted and ``reasons``
        says why.

    Raises:
        ValueError: the model cannot be traced by torch.fx, or fails on ``example_input``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> spec = infer_permutation_spec(net, torch.randn(1, 4))
        >>> list(spec.groups)
        ['0']
        >>> [(a.name, a.axis) for a in spec.groups["0"].axes]
        [('0.weight', 0), ('0.bias', 0), ('2.weight', 1)]
        >>> spec.fixed
        ['2.bias']
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    structural = hf_permutation_spec(model)  # transformers models: by module structure, not traced
    if structural is not None:
        return structural
    args = _as_args(example_input)
    with eval_mode(model), torch.no_grad():
        gm = trace_model(model)  # traced in eval mode: the function that alignment preserves
        try:
            ShapeProp(gm).propagate(*args)
        except Exception as e:
            raise ValueError(
                f"running {type(model).__name__} on example_input failed ({type(e).__name__}: {e})") from e
        walk = walk_graph(gm, model.state_dict().keys())
        verify_sites(model, args, walk)  # attention found by pattern is kept only if it checks out
    return build_spec(walk, model)
