"""Inferring a :class:`PermutationSpec` from a model with torch.fx.

The model is traced with ``torch.fx.symbolic_trace`` and run once on an
example input with ``ShapeProp`` (in eval mode, without gradients, module
modes restored afterwards).  Every value in the graph gets a *layout*: which
tensor dimension carries permuted units, and how that dimension is split into
segments, each belonging to a channel group (or unpermuted).  A Linear or Conv
output opens a group; per-channel ops pass it through; residual adds and
elementwise products merge groups (union-find); ``torch.cat`` along the
channel dimension concatenates segments; reshapes such as ``flatten`` turn a
channel into a block of spatial positions.  Whatever cannot be proven to
commute with the permutation drops the groups flowing into it, and a reason is
recorded.  The network input and output are never permuted.
"""
from __future__ import annotations

import math
import operator
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from modeconn.alignment.spec import AxisRef, ObservePoint, PermutationGroup, PermutationSpec, NEVER_PERMUTED_SUFFIXES

__all__ = ["infer_permutation_spec", "trace_model"]


# --------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class _Seg:
    gid: Optional[int]  # raw group id, None = unpermuted channels
    count: int          # units in the segment
    inner: int          # contiguous entries per unit


@dataclass(frozen=True)
class _Layout:
    dim: int            # permuted dimension (non-negative)
    ndim: int
    segs: Tuple[_Seg, ...]
    post_act: bool = False

    def gids(self) -> List[int]:
        return [s.gid for s in self.segs if s.gid is not None]

    def offsets(self):
        off = 0
        for s in self.segs:
            yield off, s
            off += s.count * s.inner

    def with_(self, **kw) -> "_Layout":
        d = dict(dim=self.dim, ndim=self.ndim, segs=self.segs, post_act=self.post_act)
        d.update(kw)
        return _mk(**d)


def _mk(dim, ndim, segs, post_act=False) -> Optional[_Layout]:
    segs = tuple(segs)
    if not any(s.gid is not None for s in segs):
        return None
    return _Layout(dim, ndim, segs, post_act)


# ------------------------------------------------------------- op vocabulary
_ACT_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.SiLU, nn.Mish, nn.Softplus, nn.Hardswish, nn.Hardtanh, nn.Hardsigmoid, nn.LogSigmoid,
    nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold,
)
_IDENTITY_MODULES = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)
_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
    nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
    nn.LPPool1d: 1, nn.LPPool2d: 2,
    nn.ZeroPad1d: 1, nn.ZeroPad2d: 2, nn.ZeroPad3d: 3,
    nn.ConstantPad1d: 1, nn.ConstantPad2d: 2, nn.ConstantPad3d: 3,
    nn.ReflectionPad1d: 1, nn.ReflectionPad2d: 2, nn.ReflectionPad3d: 3,
    nn.ReplicationPad1d: 1, nn.ReplicationPad2d: 2, nn.ReplicationPad3d: 3,
}
_CONV = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONVT = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
_INSTNORM = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}

_ACT_FUNCS = {
    torch.relu, F.relu, F.relu6, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.gelu,
    F.leaky_relu, F.elu, F.selu, torch.selu, F.celu, F.silu, F.mish, F.softplus, F.hardswish,
    F.hardtanh, F.hardsigmoid, F.logsigmoid, F.softsign, F.tanhshrink, F.threshold,
}
_ACT_METHODS = {"relu", "sigmoid", "tanh"}
_UNARY_FUNCS = {
    torch.abs, torch.neg, operator.neg, operator.pos, torch.exp, torch.log, torch.sqrt,
    torch.rsqrt, torch.square, torch.sin, torch.cos, torch.erf, torch.clamp, torch.clip,
}
_UNARY_METHODS = {
    "abs", "neg", "exp", "log", "sqrt", "rsqrt", "square", "clamp", "clip", "erf",
}
_CAST_METHODS = {"float", "double", "half", "bfloat16", "to", "type_as"}
_IDENTITY_FUNCS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
}
_COPY_METHODS = {"contiguous", "clone", "detach"}
_SOFTMAX_FUNCS = {F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}
_POOL_FUNCS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
    F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
    F.lp_pool1d: 1, F.lp_pool2d: 2,
    torch.max_pool1d: 1, torch.max_pool2d: 2, torch.max_pool3d: 3,
    torch.avg_pool1d: 1, torch.adaptive_avg_pool1d: 1,
}
_BINARY_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.pow,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.maximum, torch.minimum, torch.pow,
}
_BINARY_METHODS = {"add", "sub", "mul", "div", "true_divide", "pow", "maximum", "minimum"}
_RESHAPE_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_TRANSPOSE_FUNCS = {torch.transpose, torch.swapaxes, torch.swapdims, torch.permute, torch.t}
_TRANSPOSE_METHODS = {"transpose", "swapaxes", "swapdims", "permute", "t"}
_CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}
_REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_SIZE_METHODS = {"size", "dim", "numel", "nelement", "ndimension"}
_SAFE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", repr(t))


def _describe(node: fx.Node, mod: Optional[nn.Module] = None) -> str:
    if node.op == "call_module":
        return f"node '{node.name}' ({type(mod).__name__} '{node.target}')"
    if node.op == "call_method":
        return f"node '{node.name}' (method .{node.target}())"
    if node.op == "call_function":
        return f"node '{node.name}' (function {_target_name(node)})"
    return f"node '{node.name}' ({node.op})"


def _shape(node: Any) -> Optional[Tuple[int, ...]]:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata):
        return tuple(int(s) for s in meta.shape)
    return None


def _reshape_map(a: Sequence[int], b: Sequence[int], c: int) -> Optional[Tuple[int, int, int]]:
    """Where dimension ``c`` of shape ``a`` lands after a row-major reshape to ``b``.

    Returns ``(new_dim, mult, div)``: every entry ``e`` of ``c`` becomes the
    slice ``[e*mult/div, (e+1)*mult/div)`` of ``new_dim`` (mult/div integral),
    or None when the channel is split or not the major part of a merge.
    """
    if math.prod(a) != math.prod(b):
        return None
    blocks = []
    i = j = 0
    while i < len(a) and j < len(b):
        ia, jb = [i], [j]
        pa, pb = a[i], b[j]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb:
                if i >= len(a):
                    return None
                pa *= a[i]
                ia.append(i)
                i += 1
            else:
                if j >= len(b):
                    return None
                pb *= b[j]
                jb.append(j)
                j += 1
        blocks.append((ia, jb))
    rest_a, rest_b = list(range(i, len(a))), list(range(j, len(b)))
    if any(a[k] != 1 for k in rest_a) or any(b[k] != 1 for k in rest_b):
        return None
    if blocks:
        blocks[-1] = (blocks[-1][0] + rest_a, blocks[-1][1] + rest_b)
    else:
        blocks = [(rest_a, rest_b)]
    for ia, jb in blocks:
        if c not in ia:
            continue
        outer = math.prod(a[k] for k in ia if k < c)
        inner = math.prod(a[k] for k in ia if k > c)
        if outer != 1:
            return None
        non1 = [k for k in jb if b[k] != 1]
        if not non1:
            jstar = jb[0]
            return (jstar, 1, 1) if a[c] == 1 else None
        jstar = non1[0]
        post = math.prod(b[k] for k in jb if k > jstar)
        if a[c] * inner != b[jstar] * post or inner % post != 0:
            return None
        return (jstar, inner, post)
    return None


# ---------------------------------------------------------------- the engine
class _RawGroup:
    def __init__(self, name: str, size: int, order: int):
        self.name = name
        self.size = size
        self.order = order
        self.axes: List[AxisRef] = []
        self.reasons: List[str] = []


class _Inference:
    def __init__(self, model: nn.Module, gm: fx.GraphModule):
        self.model = model
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.groups: List[_RawGroup] = []
        self.parent: List[int] = []
        self.layout: Dict[fx.Node, Optional[_Layout]] = {}
        self.kind: Dict[fx.Node, str] = {}  # "pass" (per-channel op), "move" (data movement), "other"
        self.notes: List[str] = []
        self.names_used: Dict[str, int] = {}

    # union-find --------------------------------------------------------
    def new_group(self, base: str, size: int) -> int:
        k = self.names_used.get(base, 0)
        self.names_used[base] = k + 1
        name = base if k == 0 else f"{base}@{k}"
        self.groups.append(_RawGroup(name, int(size), len(self.groups)))
        self.parent.append(len(self.parent))
        return len(self.groups) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if self.groups[ra].order > self.groups[rb].order:
                ra, rb = rb, ra
            self.parent[rb] = ra

    def drop(self, gids, reason: str) -> None:
        for g in gids:
            if g is not None:
                self.groups[g].reasons.append(reason)

    def drop_layouts(self, layouts, reason: str) -> None:
        for L in layouts:
            if L is not None:
                self.drop(L.gids(), reason)

    def add_entries(self, L: Optional[_Layout], pname: str, axis: int) -> None:
        if L is None:
            return
        for off, s in L.offsets():
            if s.gid is not None:
                self.groups[s.gid].axes.append(AxisRef(pname, axis, off, s.inner))

    # helpers -----------------------------------------------------------
    def lay(self, x: Any) -> Optional[_Layout]:
        return self.layout.get(x) if isinstance(x, fx.Node) else None

    def permuted_inputs(self, node: fx.Node, exclude=()) -> List[_Layout]:
        return [self.layout[n] for n in node.all_input_nodes
                if n not in exclude and self.layout.get(n) is not None]

    def unsupported(self, node: fx.Node, why: str, exclude=()) -> None:
        ins = self.permuted_inputs(node, exclude)
        if ins:
            self.drop_layouts(ins, f"{why} at {self.describe(node)}")
        self.layout[node] = None

    def describe(self, node: fx.Node) -> str:
        mod = self.modules.get(node.target) if node.op == "call_module" else None
        return _describe(node, mod)

    def others_permuted(self, node: fx.Node, main: fx.Node) -> bool:
        """Drop groups reaching ``node`` through arguments other than ``main``."""
        extra = [self.layout[n] for n in node.all_input_nodes if n is not main and self.layout.get(n) is not None]
        if extra:
            self.drop_layouts(extra, f"permuted tensor used as a secondary argument of {self.describe(node)}")
        return bool(extra)

    def arg(self, node: fx.Node, pos: int, kw: str, default=None):
        if len(node.args) > pos:
            return node.args[pos]
        return node.kwargs.get(kw, default)

    # main loop -----------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.kind[node] = "other"
            try:
                self.visit(node)
            except _Unsupported as e:
                self.unsupported(node, str(e))
            if node.op not in ("output",) and node not in self.layout:
                self.layout[node] = None
            out_shape = _shape(node)
            L = self.layout.get(node)
            if L is not None and (out_shape is None or len(out_shape) != L.ndim
                                  or out_shape[L.dim] != sum(s.count * s.inner for s in L.segs)):
                # internal consistency: the layout must match the traced shape
                self.drop(L.gids(), f"could not follow the channel layout through {self.describe(node)}")
                self.layout[node] = None

    def visit(self, node: fx.Node) -> None:
        op = node.op
        if op in ("placeholder", "get_attr"):
            self.layout[node] = None
        elif op == "output":
            outs = self.permuted_inputs(node)
            self.drop_layouts(outs, "its units reach the model output (never permuted)")
        elif op == "call_module":
            self.visit_module(node, self.modules[node.target])
        elif op in ("call_function", "call_method"):
            self.visit_function(node)
        else:  # pragma: no cover - fx has no other ops
            self.unsupported(node, "unknown fx op")

    # modules -------------------------------------------------------------
    def open_group(self, node: fx.Node, base: str, size: int, dim_from_end: int, entries) -> None:
        shape = _shape(node)
        if shape is None:
            raise _Unsupported("output is not a tensor")
        g = self.new_group(base, size)
        for pname, axis in entries:
            self.groups[g].axes.append(AxisRef(pname, axis, 0, 1))
        nd = len(shape)
        self.layout[node] = _Layout(nd - dim_from_end, nd, (_Seg(g, size, 1),), False)

    def visit_module(self, node: fx.Node, mod: nn.Module) -> None:
        tgt = node.target
        x = node.args[0] if node.args else None
        L = self.lay(x)
        xs = _shape(x)
        p = lambda n: f"{tgt}.{n}"  # noqa: E731
        if len(node.all_input_nodes) > 1:
            self.others_permuted(node, x)
        if isinstance(mod, nn.Linear):
            self.kind[node] = "other"
            if L is not None and L.dim != L.ndim - 1:
                self.drop(L.gids(), f"Linear applied over a dimension other than the permuted one at {self.describe(node)}")
                L = None
            self.add_entries(L, p("weight"), 1)
            ent = [(p("weight"), 0)] + ([(p("bias"), 0)] if mod.bias is not None else [])
            self.open_group(node, tgt, mod.out_features, 1, ent)
            return
        for table, transposed in ((_CONV, False), (_CONVT, True)):
            for cls, k in table.items():
                if isinstance(mod, cls):
                    self.conv(node, tgt, mod, L, xs, k, transposed, mod.groups, mod.out_channels,
                              p("weight"), p("bias") if mod.bias is not None else None)
                    return
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            self.norm(node, L, 1, [p("weight"), p("bias")] if mod.affine else [],
                      [p("running_mean"), p("running_var")] if mod.running_mean is not None else [])
            return
        for cls, k in _INSTNORM.items():
            if isinstance(mod, cls):
                nd = xs and len(xs)
                self.norm(node, L, (nd or 0) - k - 1,
                          [p("weight"), p("bias")] if mod.affine else [],
                          [p("running_mean"), p("running_var")] if mod.running_mean is not None else [])
                return
        if isinstance(mod, nn.GroupNorm):
            if L is not None and mod.num_groups not in (1, mod.num_channels):
                raise _Unsupported(f"GroupNorm with {mod.num_groups} groups (statistics mix a subset of channels)")
            self.norm(node, L, 1, [p("weight"), p("bias")] if mod.affine else [], [])
            return
        if isinstance(mod, nn.LayerNorm):
            self.layer_norm(node, L, tuple(mod.normalized_shape),
                            [p("weight")] * (mod.weight is not None) + [p("bias")] * (getattr(mod, "bias", None) is not None))
            return
        if isinstance(mod, nn.PReLU):
            if mod.num_parameters == 1:
                self.passthrough(node, L, act=True)
            else:
                self.norm(node, L, 1, [p("weight")], [])
                if self.layout.get(node) is not None:
                    self.layout[node] = self.layout[node].with_(post_act=True)
            return
        if isinstance(mod, _ACT_MODULES):
            self.passthrough(node, L, act=True)
            return
        if isinstance(mod, _IDENTITY_MODULES):
            self.passthrough(node, L, act=None)
            return
        if isinstance(mod, _SOFTMAX_MODULES):
            self.passthrough(node, L, act=False)
            return
        for cls, k in _POOL_MODULES.items():
            if isinstance(mod, cls):
                self.pool(node, L, xs, k)
                return
        if isinstance(mod, (nn.Upsample,)):
            self.pool(node, L, xs, (len(xs) - 2) if xs else 0)
            return
        if isinstance(mod, (nn.Flatten, nn.Unflatten)):
            self.reshape(node, x)
            return
        self.unsupported(node, f"unsupported module {type(mod).__name__}")

    def conv(self, node, base, mod_or_none, L, xs, k, transposed, groups, out_channels, wname, bname):
        desc = self.describe(node)
        if groups != 1:
            self.kind[node] = "other"
            if L is not None:
                self.drop(L.gids(), f"grouped/depthwise convolution (groups={groups}) at {desc}")
            self.notes.append(
                f"{desc}: grouped/depthwise convolution (groups={groups}); its output channels "
                f"are left unpermuted")
            self.layout[node] = None
            return
        if L is not None and xs is not None and L.dim != len(xs) - k - 1:
            self.drop(L.gids(), f"convolution over a permuted spatial dimension at {desc}")
            L = None
        self.add_entries(L, wname, 0 if transposed else 1)
        ent = [(wname, 1 if transposed else 0)] + ([(bname, 0)] if bname else [])
        self.open_group(node, base, out_channels, k + 1, ent)

    def norm(self, node, L, cdim, params, buffers):
        self.kind[node] = "pass"
        if L is None:
            self.layout[node] = None
            return
        if L.dim != cdim:
            raise _Unsupported("normalisation over a dimension other than the permuted one")
        for name in list(params) + list(buffers):
            self.add_entries(L, name, 0)
        self.layout[node] = L.with_(post_act=False)

    def layer_norm(self, node, L, normalized_shape, params):
        self.kind[node] = "pass"
        if L is None:
            self.layout[node] = None
            return
        first = L.ndim - len(normalized_shape)
        if L.dim >= first:
            for name in params:
                self.add_entries(L, name, L.dim - first)
        self.layout[node] = L.with_(post_act=False)

    def passthrough(self, node, L, act):
        """Per-channel elementwise op. act: True sets post_act, False clears it, None keeps it."""
        self.kind[node] = "pass"
        if L is None:
            self.layout[node] = None
            return
        self.layout[node] = L if act is None else L.with_(post_act=act)

    def pool(self, node, L, xs, k):
        self.kind[node] = "pass"
        if L is None:
            self.layout[node] = None
            return
        if xs is None or L.dim >= len(xs) - k:
            raise _Unsupported("pooling/padding over the permuted dimension")
        self.layout[node] = L

    # functions and methods ---------------------------------------------------
    def visit_function(self, node: fx.Node) -> None:
        t = node.target
        is_m = node.op == "call_method"
        x = node.args[0] if node.args else None
        L = self.lay(x)
        xs = _shape(x)
        if is_m and t in _SIZE_METHODS or (not is_m and t is torch.numel):
            self.layout[node] = None
            return
        if not is_m and t is getattr:
            if node.args[1] in _SAFE_ATTRS:
                self.layout[node] = None
                return
            raise _Unsupported(f"attribute .{node.args[1]}")
        if not is_m and t is operator.getitem:
            self.kind[node] = "move"
            self.getitem(node, x, L, xs)
            return
        if not is_m and t is F.linear:
            self.kind[node] = "other"
            self.f_linear(node, x, L)
            return
        if not is_m and t in (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d):
            self.f_conv(node, x, L, xs, {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
                                         torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}[t])
            return
        if (not is_m and t in _ACT_FUNCS) or (is_m and t in _ACT_METHODS):
            self.elementwise(node, act=True)
            return
        if is_m and t in _CAST_METHODS:
            self.elementwise(node, act=None)
            return
        if (not is_m and t in _UNARY_FUNCS) or (is_m and t in _UNARY_METHODS):
            self.elementwise(node, act=False)
            return
        if (not is_m and t in _IDENTITY_FUNCS) or (is_m and t in _COPY_METHODS):
            self.others_permuted(node, x)
            self.passthrough(node, L, act=None)
            if is_m:
                self.kind[node] = "move"
            return
        if (not is_m and t in _SOFTMAX_FUNCS) or (is_m and t in _SOFTMAX_METHODS):
            self.others_permuted(node, x)
            self.passthrough(node, L, act=False)
            return
        if not is_m and t in _POOL_FUNCS:
            self.others_permuted(node, x)
            if _shape(node) is None and L is not None:
                raise _Unsupported("pooling that returns indices")
            self.pool(node, L, xs, _POOL_FUNCS[t])
            return
        if not is_m and t is F.interpolate:
            self.others_permuted(node, x)
            self.pool(node, L, xs, (len(xs) - 2) if xs else 0)
            return
        if not is_m and t is F.pad:
            self.others_permuted(node, x)
            pad = self.arg(node, 1, "pad")
            if not isinstance(pad, (list, tuple)):
                raise _Unsupported("F.pad with non-constant padding")
            self.pool(node, L, xs, len(pad) // 2)
            return
        if (not is_m and t in _BINARY_FUNCS) or (is_m and t in _BINARY_METHODS):
            self.elementwise(node, act=False)
            return
        if (not is_m and t in _RESHAPE_FUNCS) or (is_m and t in _RESHAPE_METHODS):
            self.kind[node] = "move"
            if is_m and t in ("view_as", "reshape_as"):
                self.others_permuted(node, x)
            self.reshape(node, x)
            return
        if (not is_m and t in _TRANSPOSE_FUNCS) or (is_m and t in _TRANSPOSE_METHODS):
            self.kind[node] = "move"
            self.transpose(node, x, L, xs)
            return
        if not is_m and t in _CAT_FUNCS:
            self.kind[node] = "move"
            self.cat(node)
            return
        if (not is_m and t in _REDUCE_FUNCS) or (is_m and t in _REDUCE_METHODS):
            self.reduce(node, x, L, xs)
            return
        self.unsupported(node, "unsupported operation")

    def f_linear(self, node, x, L):
        w = self.arg(node, 1, "weight")
        b = self.arg(node, 2, "bias")
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or (
                b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr")):
            raise _Unsupported("F.linear with weights that are not module attributes")
        self.others_permuted(node, x)
        if L is not None and L.dim != L.ndim - 1:
            self.drop(L.gids(), f"Linear applied over a dimension other than the permuted one at {self.describe(node)}")
            L = None
        ws = _shape(w)
        self.add_entries(L, w.target, 1)
        base = w.target[:-len(".weight")] if w.target.endswith(".weight") else w.target
        ent = [(w.target, 0)] + ([(b.target, 0)] if b is not None else [])
        self.open_group(node, base, ws[0], 1, ent)

    def f_conv(self, node, x, L, xs, k):
        w = self.arg(node, 1, "weight")
        b = self.arg(node, 2, "bias")
        groups = self.arg(node, 6, "groups", 1)
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or (
                b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr")) or not isinstance(groups, int):
            raise _Unsupported("functional convolution with weights that are not module attributes")
        self.others_permuted(node, x)
        base = w.target[:-len(".weight")] if w.target.endswith(".weight") else w.target
        self.conv(node, base, None, L, xs, k, False, groups, _shape(w)[0], w.target,
                  b.target if b is not None else None)

    def elementwise(self, node: fx.Node, act: bool) -> None:
        """Elementwise op over broadcast tensors: permuted inputs must share the layout."""
        self.kind[node] = "pass" if len(node.all_input_nodes) == 1 else "other"
        out = _shape(node)
        ins = [n for n in node.all_input_nodes if _shape(n) is not None]
        perm_in = [(n, self.layout[n]) for n in ins if self.layout.get(n) is not None]
        if not perm_in:
            self.layout[node] = None
            return
        desc = self.describe(node)
        if out is None:
            raise _Unsupported("elementwise op without a tensor output")
        nd = len(out)
        ref_n, ref = perm_in[0]
        cdim = ref.dim + nd - ref.ndim
        ok = True
        for n, L in perm_in[1:]:
            if L.dim + nd - L.ndim != cdim or [(s.count, s.inner) for s in L.segs] != [(s.count, s.inner) for s in ref.segs]:
                ok = False
        if not ok:
            raise _Unsupported("elementwise op combining tensors with different channel layouts")
        for n in ins:
            if self.layout.get(n) is None:
                s = _shape(n)
                pos = cdim - (nd - len(s))
                if pos >= 0 and s[pos] != 1:
                    raise _Unsupported(
                        f"elementwise op with the unpermuted tensor '{n.name}' (shape {tuple(s)}) "
                        f"varying along the permuted dimension")
        segs = []
        for i, s in enumerate(ref.segs):
            gs = [L.segs[i].gid for _, L in perm_in]
            if all(g is not None for g in gs):
                for g in gs[1:]:
                    self.union(gs[0], g)
                segs.append(_Seg(gs[0], s.count, s.inner))
            else:
                self.drop(gs, f"added/multiplied with unpermuted channels at {desc}")
                segs.append(_Seg(None, s.count, s.inner))
        if act is None and len(ins) == 1:
            post = ref.post_act  # value-preserving (dtype casts)
        else:
            post = bool(act)
        self.layout[node] = _mk(cdim, nd, segs, post)

    def reshape(self, node, x) -> None:
        L = self.lay(x)
        self.kind[node] = "move"
        if L is None:
            self.layout[node] = None
            return
        a, b = _shape(x), _shape(node)
        m = _reshape_map(a, b, L.dim) if (a is not None and b is not None) else None
        if m is None:
            raise _Unsupported(f"reshape from {a} to {b} that splits or interleaves the permuted dimension")
        new_dim, mult, div = m
        segs = []
        for s in L.segs:
            tot = s.inner * mult
            if tot % div:
                raise _Unsupported(f"reshape from {a} to {b} that splits a unit's block")
            segs.append(_Seg(s.gid, s.count, tot // div))
        self.layout[node] = _mk(new_dim, len(b), segs, L.post_act)

    def transpose(self, node, x, L, xs) -> None:
        if L is None:
            self.layout[node] = None
            return
        nd = L.ndim
        t = node.target
        args = list(node.args[1:])
        if t in ("t",) or t is torch.t:
            order = list(range(nd))[::-1] if nd == 2 else list(range(nd))
        elif t in ("permute",) or t is torch.permute:
            dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            if not dims and "dims" in node.kwargs:
                dims = node.kwargs["dims"]
            if not all(isinstance(d, int) for d in dims) or len(dims) != nd:
                raise _Unsupported("permute with non-constant dims")
            order = [d % nd for d in dims]
        else:
            d0 = args[0] if len(args) > 0 else node.kwargs.get("dim0")
            d1 = args[1] if len(args) > 1 else node.kwargs.get("dim1")
            if not isinstance(d0, int) or not isinstance(d1, int):
                raise _Unsupported("transpose with non-constant dims")
            order = list(range(nd))
            order[d0 % nd], order[d1 % nd] = order[d1 % nd], order[d0 % nd]
        self.layout[node] = L.with_(dim=order.index(L.dim))

    def cat(self, node) -> None:
        tensors = self.arg(node, 0, "tensors")
        dim = self.arg(node, 1, "dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            raise _Unsupported("cat with non-constant arguments")
        lays = [self.lay(t) for t in tensors]
        if all(L is None for L in lays):
            self.layout[node] = None
            return
        out = _shape(node)
        if out is None:
            raise _Unsupported("cat without a tensor output")
        nd = len(out)
        d = dim % nd
        if any(L is not None and L.ndim != nd for L in lays):
            raise _Unsupported("cat of tensors of different rank")
        if all(L is None or L.dim == d for L in lays):
            segs = []
            for t, L in zip(tensors, lays):
                if L is None:
                    s = _shape(t)
                    if s is None:
                        raise _Unsupported("cat of a non-tensor")
                    segs.append(_Seg(None, s[d], 1))
                else:
                    segs.extend(L.segs)
            post = all(L is not None and L.post_act for L in lays)
            self.layout[node] = _mk(d, nd, segs, post)
            return
        # concatenation along another dim: all parts must carry the same layout
        if any(L is None for L in lays):
            raise _Unsupported("cat along a non-permuted dimension with unpermuted tensors")
        ref = lays[0]
        for L in lays[1:]:
            if L.dim != ref.dim or [(s.count, s.inner) for s in L.segs] != [(s.count, s.inner) for s in ref.segs]:
                raise _Unsupported("cat along a non-permuted dimension of tensors with different channel layouts")
        segs = []
        for i, s in enumerate(ref.segs):
            gs = [L.segs[i].gid for L in lays]
            if all(g is not None for g in gs):
                for g in gs[1:]:
                    self.union(gs[0], g)
                segs.append(_Seg(gs[0], s.count, s.inner))
            else:
                self.drop(gs, f"concatenated with unpermuted channels at {self.describe(node)}")
                segs.append(_Seg(None, s.count, s.inner))
        self.layout[node] = _mk(ref.dim, nd, segs, all(L.post_act for L in lays))

    def reduce(self, node, x, L, xs) -> None:
        self.kind[node] = "other"
        self.others_permuted(node, x)
        if L is None:
            self.layout[node] = None
            return
        dim = self.arg(node, 1, "dim", None)
        keep = self.arg(node, 2, "keepdim", False)
        if dim is None:
            self.layout[node] = None  # full reduction: invariant
            return
        dims = dim if isinstance(dim, (list, tuple)) else [dim]
        if not all(isinstance(d, int) for d in dims) or not isinstance(keep, bool):
            raise _Unsupported("reduction with non-constant arguments")
        dims = {d % L.ndim for d in dims}
        if L.dim in dims:
            self.layout[node] = None  # reduced over the units: invariant
            return
        if keep:
            self.layout[node] = L.with_(post_act=False)
        else:
            new = L.dim - sum(1 for d in dims if d < L.dim)
            self.layout[node] = L.with_(dim=new, ndim=L.ndim - len(dims), post_act=False)

    def getitem(self, node, x, L, xs) -> None:
        if L is None:
            self.layout[node] = None
            return
        idx = node.args[1]
        if not isinstance(idx, tuple):
            idx = (idx,)
        if any(isinstance(i, fx.Node) for i in idx) or not all(
                i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in idx):
            raise _Unsupported("indexing with tensors")
        for i in idx:
            if isinstance(i, slice) and any(isinstance(v, fx.Node) for v in (i.start, i.stop, i.step)):
                raise _Unsupported("slicing with dynamic bounds")
        consuming = sum(1 for i in idx if i is not None and i is not Ellipsis)
        exp: List[Any] = []
        for i in idx:
            if i is Ellipsis:
                exp.extend([slice(None)] * (L.ndim - consuming))
            else:
                exp.append(i)
        in_d = out_d = 0
        new_dim = None
        for i in exp:
            if i is None:
                out_d += 1
                continue
            if in_d == L.dim:
                if not (isinstance(i, slice) and i == slice(None)):
                    raise _Unsupported("indexing into the permuted dimension")
                new_dim = out_d
            if isinstance(i, slice):
                out_d += 1
            in_d += 1
        if new_dim is None:
            new_dim = out_d + (L.dim - in_d)
        out = _shape(node)
        if out is None:
            raise _Unsupported("indexing without a tensor output")
        self.layout[node] = L.with_(dim=new_dim, ndim=len(out))


class _Unsupported(Exception):
    pass


# ------------------------------------------------------------------ public
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


class _EvalMode:
    """Temporarily put every submodule in eval mode, restoring the flags after."""

    def __init__(self, *models: nn.Module):
        self.models = [m for m in models if isinstance(m, nn.Module)]
        self.flags: List[Tuple[nn.Module, bool]] = []

    def __enter__(self):
        for model in self.models:
            for m in model.modules():
                self.flags.append((m, m.training))
            model.eval()
        return self

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag
        return False


def _as_args(example_input) -> tuple:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and example_input:
        return tuple(example_input)
    raise ValueError(
        f"example_input must be a tensor (or a tuple of the forward's tensors), got {type(example_input).__name__}")


def infer_permutation_spec(model: nn.Module, example_input) -> PermutationSpec:
    """Infer which hidden units of ``model`` can be permuted together.

    ``example_input``: a batch (one sample is enough) accepted by
    ``model.forward``, or a tuple of positional inputs.  The model is run once
    in eval mode without gradients (its train/eval flags are restored).

    Returns a :class:`PermutationSpec` whose groups are named after the layer
    that opens them (the first one, for groups merged by residual additions);
    ``fixed`` lists the state-dict entries left unpermuted and ``reasons`` says
    why.  Raises ValueError if the model cannot be traced by torch.fx.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    args = _as_args(example_input)
    with _EvalMode(model), torch.no_grad():
        gm = trace_model(model)  # traced in eval mode: the function that alignment preserves
        try:
            ShapeProp(gm).propagate(*args)
        except Exception as e:
            raise ValueError(
                f"running {type(model).__name__} on example_input failed ({type(e).__name__}: {e})") from e

    inf = _Inference(model, gm)
    inf.run()
    return _build_spec(inf, model)


def _build_spec(inf: _Inference, model: nn.Module) -> PermutationSpec:
    sd = model.state_dict()
    G = inf.groups
    # a parameter axis slice shared by two openers (tied / reused layers) forces one permutation
    by_key: Dict[Tuple[str, int, int, int], int] = {}
    for gid, g in enumerate(G):
        for a in g.axes:
            if a in by_key:
                other = by_key[a]
                if G[other].size != g.size:
                    inf.drop([gid, other], f"'{a.name}' axis {a.axis} is shared by groups of different sizes")
                else:
                    inf.union(other, gid)
            else:
                by_key[a] = gid
    # classes
    members: Dict[int, List[int]] = OrderedDict()
    for gid in range(len(G)):
        members.setdefault(inf.find(gid), []).append(gid)
    dropped = {r for r, ms in members.items() if any(G[m].reasons for m in ms)}

    def class_axes(r):
        seen = OrderedDict()
        for m in members[r]:
            for a in G[m].axes:
                if a.name.endswith(NEVER_PERMUTED_SUFFIXES):
                    continue
                seen[a] = None
        return list(seen)

    # overlapping slices of one axis claimed by different classes cannot both move
    extra_reasons: Dict[int, List[str]] = {}
    changed = True
    while changed:
        changed = False
        spans: Dict[Tuple[str, int], List[Tuple[int, int, int]]] = {}
        for r in members:
            if r in dropped:
                continue
            for a in class_axes(r):
                spans.setdefault((a.name, a.axis), []).append((a.offset, a.offset + G[r].size * a.inner, r))
        for (name, axis), lst in spans.items():
            lst.sort()
            for i, (s0, e0, r0) in enumerate(lst):
                for s1, e1, r1 in lst[i + 1:]:
                    if s1 < e0 and (r1 != r0 or (s1, e1) != (s0, e0)):
                        for r in {r0, r1}:
                            if r not in dropped:
                                dropped.add(r)
                                extra_reasons.setdefault(r, []).append(
                                    f"conflicting permutations of '{name}' axis {axis}")
                                changed = True
            if changed:
                break

    # observation points
    obs: Dict[int, List[Tuple[bool, ObservePoint]]] = {}
    for node, L in inf.layout.items():
        if L is None or inf.kind.get(node) == "move" or node.op == "output":
            continue
        users = list(node.users)
        if users and all(inf.kind.get(u) == "pass" for u in users):
            continue
        for off, s in L.offsets():
            if s.gid is None:
                continue
            r = inf.find(s.gid)
            if r in dropped:
                continue
            obs.setdefault(r, []).append((L.post_act, ObservePoint(node.name, L.dim, off, s.inner)))

    groups = OrderedDict()
    reasons: List[str] = []
    for r, ms in sorted(members.items(), key=lambda kv: G[kv[0]].order):
        name = G[r].name
        if r in dropped:
            why = []
            for m in ms:
                why.extend(G[m].reasons)
            why.extend(extra_reasons.get(r, []))
            why = list(OrderedDict.fromkeys(why))
            openers = ", ".join(G[m].name for m in ms)
            reasons.append(f"group '{name}' ({G[r].size} units, opened by {openers}) left unpermuted: "
                           + "; ".join(why))
            continue
        pts = obs.get(r, [])
        best = [p for act, p in pts if act] or [p for _, p in pts]
        best = list(OrderedDict.fromkeys(best))
        groups[name] = PermutationGroup(G[r].size, class_axes(r), best)
    reasons.extend(inf.notes)
    spec = PermutationSpec(groups, reasons=reasons)
    # entries never reached by the trace
    used_modules = {n.target for n in inf.gm.graph.nodes if n.op == "call_module"}
    used_attrs = {n.target for n in inf.gm.graph.nodes if n.op == "get_attr"}
    spec.fixed = spec.uncovered(sd)
    for k in spec.fixed:
        if k.endswith(NEVER_PERMUTED_SUFFIXES):
            continue
        parts = k.split(".")[:-1]
        ancestors = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        if k not in used_attrs and not ancestors & used_modules:
            spec.reasons.append(f"'{k}' is not used by the traced forward pass; left unpermuted")
    spec.validate(sd)
    return spec
