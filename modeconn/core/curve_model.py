"""CurveModel: a path of networks θ(t) = Σ_k c_k(t) θ_k over any ``nn.Module``.

One mechanism for every architecture. The template's parameters are removed
from its modules and held here instead, flattened and stacked by parameter
*name* into one matrix ``[num_bends, P]`` (fixed bends in a buffer, trainable
ones in a parameter). A point on the path is one small matrix product; the
template then runs with those weights through ``torch.func.functional_call``.
No per-layer curve classes, no model written twice, parameters matched by
name, never by order. Which slice of a flat vector is which parameter is the
curve's :class:`~modeconn.core.layout.FlatLayout` (``curve.layout``), the one
layout shared with directions, planes and Hessians. That machinery is
:class:`BendsModel` (θ = c @ bends for any coefficients c), shared with the
simplexes of :mod:`modeconn.core.simplex` (c = α on a simplex's vertices).

Buffers (BatchNorm running statistics) are not interpolated: statistics along
a curve are meaningless and are recomputed over training data before a point
is evaluated (see :mod:`modeconn.evaluation.bn`). The template's own buffers
are the "live" ones a forward pass uses; the endpoints' buffers are kept so
that ``point(0)`` / ``point(1)`` reproduce the endpoint models exactly.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Mapping, Optional, Union

import torch
from torch import nn
from torch.func import functional_call

from modeconn.core.curves import Bezier, Curve, PolyChain, TLike, _as_t, make_curve
from modeconn.core.decayed_point import DecayedWeights, Scratch
from modeconn.core.layout import FlatLayout
from modeconn.runtime.checkpoints import load_described, load_state_dict, save_described

Source = Union[nn.Module, Mapping[str, torch.Tensor], str]


class _BufferStore(nn.Module):
    """Holds a copy of a state's buffers (names with dots are allowed)."""

    def __init__(self, buffers: Mapping[str, torch.Tensor]):
        super().__init__()
        self._names = list(buffers)
        for name, value in buffers.items():
            self.register_buffer(name.replace(".", "__"), value.detach().clone())

    def as_dict(self) -> Dict[str, torch.Tensor]:
        """The stored buffers under their original (dotted) names."""
        return {n: getattr(self, n.replace(".", "__")) for n in self._names}


def _strip_parameters(module: nn.Module) -> None:
    """Remove every parameter of ``module``'s tree, so weights can only come from outside."""
    for sub in module.modules():
        for name, value in list(sub._parameters.items()):
            if value is not None:  # a None entry (conv without bias) must stay: forward reads it
                del sub._parameters[name]


def _check_compatible(layout: FlatLayout, state: Mapping[str, torch.Tensor], which: str) -> None:
    """Raise, naming the parameter and both shapes, when ``state`` does not fit ``layout``."""
    for name, shape in zip(layout.names, layout.shapes):
        if name not in state:
            raise ValueError(f"{which} has no parameter {name!r} (expected shape {tuple(shape)}); "
                             "the networks and the template must share one architecture")
        got = tuple(state[name].shape)
        if got != tuple(shape):
            raise ValueError(f"architectures differ at parameter {name!r}: template has shape "
                             f"{tuple(shape)}, {which} has shape {got}")


def _fresh_init(template: nn.Module, layout: FlatLayout, seed: int) -> torch.Tensor:
    """θ of a copy of ``template`` whose layers ran ``reset_parameters()`` under ``seed``."""
    fresh = copy.deepcopy(template)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in fresh.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return layout.flatten(fresh)


class BendsModel(nn.Module):
    """Networks whose weights are combinations of K stacked bends: θ = c @ bends, c ∈ R^K.

    The one mechanism behind curves (:class:`CurveModel`, c = c(t)) and
    simplexes (:class:`~modeconn.core.simplex.SimplexModel`, c = α placed on a
    simplex's vertices). The template's parameters are removed from its modules
    and held here, flattened by name into one matrix ``[K, P]``: the fixed rows
    in the buffer ``fixed_bends``, the trainable ones in the parameter
    ``free_bends``. A point is one matrix product, run through the template with
    ``torch.func.functional_call``. Subclasses call ``super().__init__(template)``
    (the layout and the parameter-free ``net``), then :meth:`_hold_bends`.
    """

    def __init__(self, template: nn.Module):
        super().__init__()
        dtypes = {p.dtype for p in template.parameters()}
        if len(dtypes) > 1 or not all(d.is_floating_point for d in dtypes):
            raise ValueError(f"all parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
        self.layout = FlatLayout.of(template)  # raises for a template without parameters
        first_param = next(template.parameters())  # where the bends are built (only during construction)
        self._dtype, self._device = first_param.dtype, first_param.device
        net = copy.deepcopy(template)
        _strip_parameters(net)
        self.net = net
        self._scratch = Scratch()  # θ and the bends' gradient of a training step, reused from step to step

    def _flat_state(self, state: Mapping[str, torch.Tensor], which: str) -> torch.Tensor:
        """θ ``[P]`` of a state dict in the template's dtype and device (the error names ``which``)."""
        _check_compatible(self.layout, state, which)
        return self.layout.flatten(state, dtype=self._dtype, device=self._device)

    def _hold_bends(self, bends: torch.Tensor, fixed: List[int]) -> None:
        """Store ``bends [K, P]``: rows ``fixed`` as the buffer, the others as the trainable parameter."""
        free = [k for k in range(len(bends)) if k not in fixed]
        self.fixed_idx, self.free_idx = list(fixed), free
        self.free_bends = nn.Parameter(bends[free].clone(), requires_grad=bool(free))
        self.register_buffer("fixed_bends", bends[fixed].clone())
        self.register_buffer("_free_sel", torch.tensor(free, dtype=torch.long), persistent=False)
        self.register_buffer("_fixed_sel", torch.tensor(self.fixed_idx, dtype=torch.long), persistent=False)

    @property
    def num_bends(self) -> int:
        """K, the number of bends (endpoints or vertices included)."""
        return len(self.fixed_idx) + len(self.free_idx)

    @property
    def num_parameters(self) -> int:
        """Number of parameters of one point (P)."""
        return self.layout.num_parameters

    @property
    def bends(self) -> torch.Tensor:
        """All bends as one new ``[num_bends, P]`` tensor (a copy of the stored fixed and free bends, detached)."""
        out = self.fixed_bends.new_empty((self.num_bends, self.num_parameters))
        out[self._fixed_sel] = self.fixed_bends
        out[self._free_sel] = self.free_bends.detach()
        return out

    def bends_by_name(self) -> Dict[str, torch.Tensor]:
        """Each parameter's bends stacked: name -> ``[num_bends, *shape]``."""
        return self.layout.unflatten(self.bends)

    def load_bends(self, bends: Mapping[str, torch.Tensor]) -> None:
        """Set every bend from a name -> ``[num_bends, *shape]`` mapping."""
        rows = []
        for n, s in zip(self.layout.names, self.layout.shapes):
            if n not in bends:
                raise ValueError(f"bends have no entry for parameter {n!r}")
            if tuple(bends[n].shape) != (self.num_bends, *s):
                raise ValueError(f"bends of {n!r} have shape {tuple(bends[n].shape)}, "
                                 f"expected {(self.num_bends, *s)}")
            rows.append(bends[n].reshape(self.num_bends, -1))
        full = torch.cat(rows, dim=1).to(self.fixed_bends)
        with torch.no_grad():
            self.fixed_bends.copy_(full[self._fixed_sel])
            self.free_bends.copy_(full[self._free_sel])

    def flat_combination(self, c: torch.Tensor) -> torch.Tensor:
        """θ = c @ bends flattened: ``[P]`` for c ``[K]``, ``[n, P]`` for c ``[n, K]`` (differentiable)."""
        return c.index_select(-1, self._free_sel) @ self.free_bends + \
            c.index_select(-1, self._fixed_sel) @ self.fixed_bends

    def training_parameters(self, c: torch.Tensor, weight_decay: float = 0.0) -> Dict[str, torch.Tensor]:
        """θ = c @ bends (c ``[K]``) as name -> tensor for a training step, weight decay at θ in its backward.

        The gradient of ``0.5 * weight_decay * ||θ||²`` (= ``weight_decay * θ``)
        is added to θ's gradient inside one custom backward, so the penalty
        costs no extra pass over the P parameters. θ is built parameter by
        parameter and the gradient of the free bends written slice by slice
        (:class:`~modeconn.core.decayed_point.DecayedWeights`): no flat θ or
        flat dθ is made, only the bends' gradient. Once differentiable.
        """
        outs = DecayedWeights.apply(self.free_bends, self.fixed_bends, c.index_select(-1, self._free_sel),
                                    c.index_select(-1, self._fixed_sel), self.layout.shapes, float(weight_decay),
                                    self._scratch)
        return dict(zip(self.layout.names, outs))

    def unflatten(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Split a flat ``[..., P]`` vector into name -> ``[..., *shape]`` tensors (``layout.unflatten``)."""
        return self.layout.unflatten(flat)

    def forward_flat(self, x, flat: torch.Tensor, buffers: Optional[Mapping[str, torch.Tensor]] = None):
        """Run the template with flat weights ``flat`` (and optionally other buffers)."""
        return self.forward_weights(x, self.unflatten(flat), buffers)

    def forward_weights(self, x, weights: Mapping[str, torch.Tensor],
                        buffers: Optional[Mapping[str, torch.Tensor]] = None):
        """Run the template with the parameters ``weights`` (name -> tensor, e.g. :meth:`training_parameters`)."""
        params = dict(weights)
        if buffers is not None:
            params.update(buffers)
        return functional_call(self.net, params, (x,))

    def has_batchnorm(self) -> bool:
        """True when the template has BatchNorm layers tracking running statistics."""
        from modeconn.evaluation.bn import has_batchnorm

        return has_batchnorm(self.net)


class CurveModel(BendsModel):
    """A curve of networks between two endpoints.

    Args:
        template: an instance of the architecture (its weights are only used
            with ``init="random"``).
        start, end: the endpoints, as modules, state dicts or checkpoint paths.
        curve: the curve family (default ``Bezier(3)``).
        fix_start, fix_end: keep the endpoints fixed during training.
        init: ``"linear"`` puts the middle bends on the straight segment,
            ``"random"`` gives each a fresh initialisation of the template
            (seeded by ``seed``).
        middle: explicit middle bends (modules, state dicts or paths) instead
            of ``init``; ``fix_middle=True`` keeps them fixed (a chain through
            several checkpoints).

    Attributes: ``layout`` (the :class:`~modeconn.core.layout.FlatLayout` of
    one point), ``net`` (the template without parameters, holding the live
    buffers), ``free_bends`` (parameter ``[len(free_idx), P]``),
    ``fixed_bends`` (buffer ``[len(fixed_idx), P]``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modeconn.core.curves import Bezier
        >>> _ = torch.manual_seed(0)
        >>> a, b = nn.Linear(3, 2), nn.Linear(3, 2)
        >>> curve = CurveModel(a, a, b, Bezier(3))   # the middle bend starts at (a + b) / 2
        >>> curve.num_parameters, curve.free_idx
        (8, [1])
        >>> x = torch.randn(4, 3)
        >>> torch.equal(curve(x, 0.0), a(x)), torch.allclose(curve(x, 0.5), (a(x) + b(x)) / 2)
        (True, True)
        >>> curve.point(0.5)                          # a standalone network at θ(0.5)
        Linear(in_features=3, out_features=2, bias=True)
    """

    def __init__(self, template: nn.Module, start: Source, end: Source, curve: Optional[Curve] = None,
                 fix_start: bool = True, fix_end: bool = True, init: str = "linear", seed: int = 0,
                 middle: Optional[List[Source]] = None, fix_middle: bool = False):
        curve = Bezier(3) if curve is None else curve
        if not isinstance(curve, Curve):
            raise TypeError(f"curve must be a modeconn Curve (Bezier, PolyChain), got {type(curve).__name__}")
        if init not in ("linear", "random"):
            raise ValueError(f"init must be 'linear' or 'random', got {init!r}")
        super().__init__(template)
        self.curve = curve
        self.fix_start, self.fix_end, self.fix_middle = bool(fix_start), bool(fix_end), bool(fix_middle)
        s_state, e_state = load_state_dict(start), load_state_dict(end)
        bends = self._initial_bends(template, s_state, e_state, init, seed, middle)
        K = curve.num_bends
        self._hold_bends(bends, [k for k in range(K) if (k == 0 and fix_start) or (k == K - 1 and fix_end)
                                 or (0 < k < K - 1 and fix_middle)])
        net = self.net
        buffer_names = [n for n, _ in net.named_buffers()]
        for n in buffer_names:  # live buffers start as the start endpoint's
            if n in s_state:
                net.get_buffer(n).copy_(s_state[n])
        self.start_buffers = _BufferStore({n: s_state.get(n, net.get_buffer(n)) for n in buffer_names})
        self.end_buffers = _BufferStore({n: e_state.get(n, net.get_buffer(n)) for n in buffer_names})

    def _initial_bends(self, template: nn.Module, s_state: Mapping[str, torch.Tensor],
                       e_state: Mapping[str, torch.Tensor], init: str, seed: int,
                       middle: Optional[List[Source]]) -> torch.Tensor:
        """All bends ``[num_bends, P]`` in the template's dtype and device: ends, then middle as asked."""
        flat = self._flat_state
        first, last = flat(s_state, "start endpoint"), flat(e_state, "end endpoint")
        K = self.curve.num_bends
        if middle is not None:
            if len(middle) != K - 2:
                raise ValueError(f"middle has {len(middle)} bends, curve {self.curve!r} needs {K - 2}")
            inner = [flat(load_state_dict(m), f"bend {k}") for k, m in enumerate(middle, 1)]
        elif init == "linear":
            inner = [(1 - k / (K - 1)) * first + (k / (K - 1)) * last for k in range(1, K - 1)]
        else:
            inner = [_fresh_init(template, self.layout, seed + k).to(self._device, self._dtype)
                     for k in range(1, K - 1)]
        return torch.stack([first, *inner, last])

    @classmethod
    def constant(cls, net: nn.Module) -> "CurveModel":
        """The constant path at ``net``: θ(t) = θ_net for every t, buffers ``net``'s.

        This is how a single network enters code written for arbitrary flat
        points of an architecture (the grids of :mod:`modeconn.geometry`, the
        engine :func:`modeconn.evaluation.path.evaluate_points`): that code
        reads only the curve's parameter-free template ``net`` (with ``net``'s
        buffers) and its ``layout``, never its bends. A curve needs two bends,
        so this is ``PolyChain(2)`` with both (equal) ends fixed: ``2·P``
        numbers, nothing trainable. It lives on ``net``'s device.

        Example:
            >>> from torch import nn
            >>> net = nn.Linear(3, 2)
            >>> path = CurveModel.constant(net)
            >>> torch.allclose(path.flat_weights_at(0.7), path.layout.flatten(net))
            True
        """
        path = cls(net, net, net, PolyChain(2), fix_start=True, fix_end=True)
        return path.to(path.fixed_bends.device)  # the index buffers are made on the CPU

    # ----------------------------------------------------------- the point θ(t)
    def coefficients(self, t: TLike, check: bool = True) -> torch.Tensor:
        """c(t), ``[..., num_bends]``, in the bends' dtype and device (``check``: t in [0, 1])."""
        return self.curve.coefficients(t, check=check).to(self.fixed_bends)

    def flat_weights_at(self, t: TLike, check: bool = True) -> torch.Tensor:
        """θ(t) flattened: ``[P]`` for a scalar t, ``[len(t), P]`` for a 1-D t."""
        return self.flat_combination(self.coefficients(t, check))

    def training_weights(self, t: torch.Tensor, weight_decay: float = 0.0) -> Dict[str, torch.Tensor]:
        """θ(t) (scalar t, unchecked) for ``fit_curve``'s step, with the curve's weight decay in its backward
        (:meth:`BendsModel.training_parameters` at c(t))."""
        return self.training_parameters(self.coefficients(t, check=False), weight_decay)

    def weights_at(self, t: TLike) -> Dict[str, torch.Tensor]:
        """Parameters at t: name -> tensor (differentiable w.r.t. the free bends)."""
        return self.unflatten(self.flat_weights_at(t))

    def forward(self, x, t: Optional[TLike] = None):
        """Output of the network at t; ``t=None`` draws t ~ U(0, 1)."""
        if t is None:
            t = torch.rand(())
            return self.forward_flat(x, self.flat_weights_at(t, check=False))
        return self.forward_flat(x, self.flat_weights_at(t))

    # --------------------------------------------------------------- buffers
    def endpoint_buffers(self, which: int) -> Dict[str, torch.Tensor]:
        """Buffers of the start (0) or end (1) endpoint as they were given."""
        return (self.start_buffers if which == 0 else self.end_buffers).as_dict()

    def point(self, t: TLike) -> nn.Module:
        """A standalone copy of the template holding θ(t) (``layout.module_at``), in the curve's mode.

        Buffers: at t = 0 (t = 1) with a fixed start (end) the endpoint's own
        buffers, so the endpoint model is reproduced exactly; elsewhere the
        template's current buffers. BatchNorm statistics of an inner point must
        be recomputed (:func:`modeconn.evaluation.bn.recompute_bn`) before it is
        evaluated.
        """
        tt = _as_t(t)
        if tt.dim() != 0:
            raise ValueError("point(t) takes a single t")
        tv = float(tt)
        buffers = None
        if tv == 0.0 and self.fix_start:
            buffers = self.endpoint_buffers(0)
        elif tv == 1.0 and self.fix_end:
            buffers = self.endpoint_buffers(1)
        with torch.no_grad():
            model = self.layout.module_at(self.net, self.flat_weights_at(tt), buffers)
        return model.train(self.training)

    # ----------------------------------------------------------- checkpoints
    def describe(self) -> dict:
        """Plain-data description of the curve (for checkpoints)."""
        return {
            "curve": self.curve.name,
            "num_bends": self.num_bends,
            "fix_start": self.fix_start,
            "fix_end": self.fix_end,
            "fix_middle": self.fix_middle,
            "bends": {n: v.detach().cpu().clone() for n, v in self.bends_by_name().items()},
            "buffers": {n: v.detach().cpu().clone() for n, v in self.net.named_buffers()},
            "start_buffers": {n: v.cpu().clone() for n, v in self.endpoint_buffers(0).items()},
            "end_buffers": {n: v.cpu().clone() for n, v in self.endpoint_buffers(1).items()},
        }

    @classmethod
    def from_description(cls, template: nn.Module, desc: Mapping) -> "CurveModel":
        """Rebuild a curve from ``describe()`` output and a template instance."""
        bends = desc["bends"]
        start = {n: v[0] for n, v in bends.items()}
        end = {n: v[-1] for n, v in bends.items()}
        start.update(desc.get("start_buffers", {}))
        end.update(desc.get("end_buffers", {}))
        curve = cls(template, start, end, make_curve(desc["curve"], desc["num_bends"]),
                    fix_start=desc["fix_start"], fix_end=desc["fix_end"],
                    fix_middle=desc.get("fix_middle", False))
        curve.load_bends(bends)
        with torch.no_grad():
            for n, v in desc.get("buffers", {}).items():
                curve.net.get_buffer(n).copy_(v)
        return curve

    def __repr__(self) -> str:  # the stripped template cannot print itself (its modules lack weights)
        return (f"CurveModel({self.curve!r}, template={type(self.net).__name__}, "
                f"parameters_per_point={self.num_parameters}, fixed_bends={self.fixed_idx}, "
                f"free_bends={self.free_idx})")


def linear_path(a: Source, b: Source, template: Optional[nn.Module] = None) -> CurveModel:
    """The straight line θ(t) = (1 − t)·θ_a + t·θ_b between two networks: ``PolyChain(2)``, both ends fixed.

    ``a`` and ``b`` are modules, state dicts or checkpoint paths; ``template``
    (default ``a``, which must then be a module) gives the architecture.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
        >>> line = linear_path(a, b)
        >>> mid = line.weights_at(0.25)["weight"]
        >>> torch.allclose(mid, 0.75 * a.weight + 0.25 * b.weight)
        True
    """
    if template is None:
        if not isinstance(a, nn.Module):
            raise ValueError("linear_path needs a template module when the endpoints are not modules")
        template = a
    return CurveModel(template, a, b, PolyChain(2), fix_start=True, fix_end=True)


def chain_path(points: List[Source], template: nn.Module) -> CurveModel:
    """A polygonal chain through several networks (in order), every bend fixed.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> a, b, c = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(3, 2)
        >>> path = chain_path([a, b, c], template=a)
        >>> path.num_bends, path.free_idx
        (3, [])
        >>> torch.equal(path.weights_at(0.5)["weight"], b.weight)   # t = 1/2 is the middle network
        True
    """
    if len(points) < 2:
        raise ValueError("chain_path needs at least two networks")
    return CurveModel(template, points[0], points[-1], PolyChain(len(points)),
                      middle=list(points[1:-1]), fix_middle=True)


def save_curve(path, curve: CurveModel, meta: Mapping, **extra):
    """Write a self-describing 'curve' checkpoint.

    ``meta`` carries the architecture (``arch``, ``arch_kwargs``,
    ``input_shape``, ``num_classes``) and usually ``dataset`` and ``seed``.

    Example:
        >>> import pathlib, tempfile
        >>> from modeconn.models import create_model
        >>> a, b = create_model("mlp", (2,), 3, width=4), create_model("mlp", (2,), 3, width=4)
        >>> meta = {"arch": "mlp", "arch_kwargs": {"width": 4}, "input_shape": [2], "num_classes": 3, "seed": 0}
        >>> path = save_curve(pathlib.Path(tempfile.mkdtemp()) / "curve.pt", CurveModel(a, a, b), meta)
        >>> from modeconn.runtime.checkpoints import load_checkpoint
        >>> ckpt = load_checkpoint(path, kind="curve")   # self-describing: architecture, seed, bends
        >>> ckpt["arch"], ckpt["seed"], ckpt["curve_state"]["num_bends"]
        ('mlp', 0, 3)
    """
    return save_described(path, "curve", curve, meta, **extra)


def load_curve(path, map_location="cpu"):
    """Rebuild the CurveModel stored in a 'curve' checkpoint; returns (curve, metadata).

    Example:
        >>> import pathlib, tempfile
        >>> from modeconn.models import create_model
        >>> a, b = create_model("mlp", (2,), 3, width=4), create_model("mlp", (2,), 3, width=4)
        >>> meta = {"arch": "mlp", "arch_kwargs": {"width": 4}, "input_shape": [2], "num_classes": 3, "seed": 0}
        >>> curve = CurveModel(a, a, b)
        >>> path = save_curve(pathlib.Path(tempfile.mkdtemp()) / "curve.pt", curve, meta)
        >>> loaded, info = load_curve(path)
        >>> torch.equal(loaded.bends, curve.bends), loaded.curve, info["kind"], info["seed"]
        (True, Bezier(3), 'curve', 0)
    """
    return load_described(path, "curve", CurveModel, map_location)

