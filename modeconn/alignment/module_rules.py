"""Rules for ``call_module`` nodes: a dispatch table from module class to rule.

A module is matched by the first class of its MRO found in
:data:`MODULE_RULES`, so subclasses (``SyncBatchNorm``, ``LazyLinear``,
``ReLU6``...) follow their base's rule.  Every rule receives the module and
the layout of its main input and hands the work to
:mod:`~modeconn.alignment.layout_rules`, naming the state-dict entries the
module owns.  A module in no table is unsupported: the groups reaching it stay
fixed.  PyTorch's attention modules have their own rules
(:mod:`~modeconn.alignment.attention_rules`).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Iterable, List, Optional

from torch import fx, nn

from modeconn.alignment import layout_rules as rules
from modeconn.alignment.attention_rules import ATTENTION_MODULE_RULES
from modeconn.alignment.channel_layout import ChannelLayout, Unsupported
from modeconn.alignment.op_tables import (ACTIVATION_MODULES, CONV_MODULES, CONV_TRANSPOSE_MODULES,
                                          IDENTITY_MODULES, INSTANCE_NORM_MODULES, SOFTMAX_MODULES,
                                          SPATIAL_MODULES)
from modeconn.alignment.walk_state import WalkState, main_input, tensor_shape

ModuleRule = Callable[[WalkState, fx.Node, nn.Module, Optional[ChannelLayout]], None]


def _entry(node: fx.Node, name: str) -> str:
    """State-dict name of the module's entry ``name`` (``layer.weight``)."""
    return f"{node.target}.{name}"


def _affine_and_stats(node: fx.Node, mod: nn.Module) -> List[str]:
    """The per-channel entries of a batch/instance norm: affine parameters, then running statistics."""
    params = [_entry(node, "weight"), _entry(node, "bias")] if mod.affine else []
    stats = [_entry(node, "running_mean"), _entry(node, "running_var")] if mod.running_mean is not None else []
    return params + stats


def _linear(walk: WalkState, node: fx.Node, mod: nn.Linear, layout: Optional[ChannelLayout]) -> None:
    """``nn.Linear``: consumes the input's groups, opens one named after the module."""
    bias = _entry(node, "bias") if mod.bias is not None else None
    rules.linear(walk, node, layout, node.target, _entry(node, "weight"), bias, mod.out_features)


def _conv(walk: WalkState, node: fx.Node, mod: nn.Module, layout: Optional[ChannelLayout], spatial: int,
          transposed: bool) -> None:
    """``nn.ConvNd`` / ``nn.ConvTransposeNd`` with ``spatial`` kernel dims."""
    bias = _entry(node, "bias") if mod.bias is not None else None
    rules.conv(walk, node, layout, node.target, spatial, transposed, mod.groups, mod.out_channels,
               _entry(node, "weight"), bias)


def _batch_norm(walk: WalkState, node: fx.Node, mod: nn.Module, layout: Optional[ChannelLayout]) -> None:
    """BatchNorm: per-channel statistics and affine over dimension 1."""
    rules.norm(walk, node, layout, 1, _affine_and_stats(node, mod))


def _instance_norm(walk: WalkState, node: fx.Node, mod: nn.Module, layout: Optional[ChannelLayout],
                   spatial: int) -> None:
    """InstanceNorm: per-channel over the dimension before the ``spatial`` trailing ones."""
    xs = tensor_shape(main_input(node))
    nd = len(xs) if xs else 0
    rules.norm(walk, node, layout, nd - spatial - 1, _affine_and_stats(node, mod))


def _group_norm(walk: WalkState, node: fx.Node, mod: nn.GroupNorm, layout: Optional[ChannelLayout]) -> None:
    """GroupNorm: per-channel only with one group (layer-wise stats) or one channel per group."""
    if layout is not None and mod.num_groups not in (1, mod.num_channels):
        raise Unsupported(f"GroupNorm with {mod.num_groups} groups (statistics mix a subset of channels)")
    params = [_entry(node, "weight"), _entry(node, "bias")] if mod.affine else []
    rules.norm(walk, node, layout, 1, params)


def _layer_norm(walk: WalkState, node: fx.Node, mod: nn.LayerNorm, layout: Optional[ChannelLayout]) -> None:
    """LayerNorm over its ``normalized_shape``."""
    params = [_entry(node, "weight")] * (mod.weight is not None) + \
        [_entry(node, "bias")] * (getattr(mod, "bias", None) is not None)
    rules.layer_norm(walk, node, layout, tuple(mod.normalized_shape), params)


def _embedding(walk: WalkState, node: fx.Node, mod: nn.Embedding, layout: Optional[ChannelLayout]) -> None:
    """``nn.Embedding``: looks up rows of ``weight``; its columns open a group (the residual stream)."""
    if layout is not None:
        walk.groups.drop(layout.groups(), f"permuted values used as embedding indices at {walk.describe(node)}")
    walk.open_group(node, node.target, mod.embedding_dim, 1, [(_entry(node, "weight"), 1)])


def _prelu(walk: WalkState, node: fx.Node, mod: nn.PReLU, layout: Optional[ChannelLayout]) -> None:
    """PReLU: an activation; with one slope per channel, the slopes move with the channels."""
    if mod.num_parameters == 1:
        rules.passthrough(walk, node, layout, act=True)
        return
    rules.norm(walk, node, layout, 1, [_entry(node, "weight")])
    if walk.layout.get(node) is not None:
        walk.layout[node] = walk.layout[node].replace(post_act=True)


def _elementwise(walk: WalkState, node: fx.Node, mod: nn.Module, layout: Optional[ChannelLayout],
                 act: Optional[bool]) -> None:
    """An activation (``act`` True), identity/dropout (None) or softmax (False) module."""
    rules.passthrough(walk, node, layout, act)


def _spatial(walk: WalkState, node: fx.Node, mod: nn.Module, layout: Optional[ChannelLayout],
             spatial: int) -> None:
    """A pooling or padding module over the last ``spatial`` dims."""
    rules.spatial(walk, node, layout, spatial)


def _upsample(walk: WalkState, node: fx.Node, mod: nn.Upsample, layout: Optional[ChannelLayout]) -> None:
    """``nn.Upsample``: resamples every dimension after batch and channels."""
    xs = tensor_shape(main_input(node))
    rules.spatial(walk, node, layout, (len(xs) - 2) if xs else 0)


def _flatten(walk: WalkState, node: fx.Node, mod: nn.Module, layout: Optional[ChannelLayout]) -> None:
    """``nn.Flatten`` / ``nn.Unflatten``: a reshape."""
    rules.reshape(walk, node, main_input(node))


def _each(classes: Iterable[type], rule: ModuleRule) -> Dict[type, ModuleRule]:
    """The same rule for every class in ``classes``."""
    return {cls: rule for cls in classes}


MODULE_RULES: Dict[type, ModuleRule] = {
    nn.Linear: _linear,
    **{cls: partial(_conv, spatial=k, transposed=False) for cls, k in CONV_MODULES.items()},
    **{cls: partial(_conv, spatial=k, transposed=True) for cls, k in CONV_TRANSPOSE_MODULES.items()},
    nn.modules.batchnorm._BatchNorm: _batch_norm,
    **{cls: partial(_instance_norm, spatial=k) for cls, k in INSTANCE_NORM_MODULES.items()},
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm,
    nn.RMSNorm: _layer_norm,
    nn.Embedding: _embedding,
    **ATTENTION_MODULE_RULES,
    nn.PReLU: _prelu,
    **_each(ACTIVATION_MODULES, partial(_elementwise, act=True)),
    **_each(IDENTITY_MODULES, partial(_elementwise, act=None)),
    **_each(SOFTMAX_MODULES, partial(_elementwise, act=False)),
    **{cls: partial(_spatial, spatial=k) for cls, k in SPATIAL_MODULES.items()},
    nn.Upsample: _upsample,
    nn.Flatten: _flatten,
    nn.Unflatten: _flatten,
}


def module_rule(mod: nn.Module) -> Optional[ModuleRule]:
    """The rule of the nearest class in ``type(mod).__mro__`` that has one, or None."""
    for cls in type(mod).__mro__:
        rule = MODULE_RULES.get(cls)
        if rule is not None:
            return rule
    return None


def visit_module(walk: WalkState, node: fx.Node) -> None:
    """Apply the rule of the called module; groups reaching it through extra arguments are dropped."""
    mod = walk.modules[node.target]
    x = main_input(node)
    rule = module_rule(mod)
    if len(node.all_input_nodes) > 1 and not getattr(rule, "all_inputs", False):
        walk.drop_secondary(node, x)  # attention rules read query, key and value themselves
    if rule is None:
        walk.unsupported(node, f"unsupported module {type(mod).__name__}")
        return
    rule(walk, node, mod, walk.layout_of(x))
