"""Points on a plane share the work of the layers that read the raw input.

A grid point is ``θ = origin + a·d1 + b·d2``: a combination of R = 3 fixed
vectors. A layer that is linear in its weights and reads the data itself
(``nn.Linear``, ``nn.Conv1d/2d/3d``: ``f(x; W, bias)`` is linear in
``(W, bias)`` jointly) then gives, at every point,

    f(x; θ_k) = Σ_r c[k, r] · f(x; v_r),

so its R outputs ``f(x; v_r)`` are computed once per batch (and kept for the
next passes over the same batch) and every point's output is a sum of R
scaled copies: an elementwise pass instead of a matrix product per point
(one add per point where points share all but the second coefficient, as
the points of a grid row do).
The values are those of the direct product up to float rounding (a
different order of the same sums).

Which layers: modules of exactly those classes (no subclass, hooks or
buffers) whose own parameters are a weight and maybe a bias, all in the
flat layout, and whose outputs each sum at least :data:`MIN_FAN_IN`
products per elementwise pass a point's combination takes (one where the
points differ only in their second coefficient, as along a grid row; R
otherwise, as along a curve); and which
calls: those whose input lies in the memory of the batch given to the
network (the batch itself or a view of it, e.g. ``torch.flatten(x, 1)``),
unmodified since the batch came: such an input does not depend on the
point. Any other call (a later layer, an input computed from the batch)
runs the layer's own forward with the point's weights.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["Span", "InputLayers", "SPAN_CACHE_BYTES", "MIN_FAN_IN"]

# outputs f(x; v_r) kept between passes over the data (a grid's chunks), per batch, up to this many
# bytes in all; batches past the budget are recomputed each pass (still once for the K points)
SPAN_CACHE_BYTES = 1 << 28

# entries per parameter at which the span is checked against the points it stands in for (a check of
# every entry costs as much as the products it saves on a small network)
CHECKED_ENTRIES = 512

# a layer whose output entries each sum fewer products than this, per elementwise pass a point's
# combination takes (1 in a grid row, R along a path), runs faster than its output can be combined
# (measured on 2 CPU threads: the digits CNN's 1->16 3x3 convolution, fan-in 9, made a 21x21 grid 5 %
# slower and the digits MLP's 64->128 layer a few % faster; along a Bezier(3) path, 3 passes per
# point, that layer made path evaluation 12 % slower, an MNIST-sized 784->256 layer 41 % faster)
MIN_FAN_IN = 32

_LINEAR_IN_WEIGHTS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

Basis = List[Dict[str, torch.Tensor]]


@dataclass
class Span:
    """K points given as combinations of R vectors: ``flats[k] = Σ_r coefficients[k, r] · vectors[r]``.

    ``coefficients [K, R]``; ``vectors``: R flat vectors ``[P]`` (any float
    dtype), e.g. a plane's ``(1, a, b)`` and ``(origin, d1, d2)``.
    """

    coefficients: torch.Tensor
    vectors: Sequence[torch.Tensor]

    def check(self, flats: torch.Tensor, entries: Sequence[slice], kept: Dict) -> None:
        """Raise unless ``coefficients @ vectors`` equals ``flats`` at the flat indices ``entries``.

        Equal up to the rounding of the sums: ``8·eps·(|c| @ |v|)`` in ``flats``' dtype. Computed in
        numpy float64 on the selected entries; ``kept``: a dict where the vectors' entries are kept
        for the next check with the same, unmodified vectors (a grid checks every pass; ``{}``: none).
        """
        c, v = self.coefficients, list(self.vectors)
        if c.dim() != 2 or c.shape[0] != flats.shape[0] or c.shape[1] != len(v) \
                or any(t.shape != flats.shape[1:] for t in v):
            raise ValueError(f"span: coefficients {tuple(c.shape)} and vectors {[tuple(t.shape) for t in v]} do "
                             f"not give the {tuple(flats.shape)} points")
        c64 = c.detach().cpu().double().numpy()
        tol = 8 * torch.finfo(flats.dtype).eps
        for sl in entries:
            got = flats[:, sl].detach().to(torch.float64).cpu().numpy()
            v64 = _entries(v, sl, kept)
            terms = c64[:, :, None] * v64[None]          # [K, R, n]: R is a few, no BLAS call (and its threads)
            want = terms.sum(1)
            bad = np.abs(want - got) > tol * np.abs(terms).sum(1) + torch.finfo(flats.dtype).tiny
            if bad.any():
                k, i = (int(j) for j in np.argwhere(bad)[0])
                raise ValueError(f"span: point {k} is not the combination of the vectors it claims (entry "
                                 f"{sl.start + i * sl.step}: {got[k, i]} vs {want[k, i]})")


def _entries(vectors: List[torch.Tensor], sl: slice, kept: Dict) -> np.ndarray:
    """``[R, n]`` float64 array of the vectors' entries ``sl``, kept in ``kept`` while they are unmodified."""
    key = ("vector entries", sl.start, sl.stop, sl.step)
    old = kept.get(key)
    if old is not None and _all_same(old[0], old[1], vectors):
        return old[2]
    arr = np.stack([t[sl].detach().to(torch.float64).cpu().numpy() for t in vectors])
    kept[key] = tuple(vectors), tuple(t._version for t in vectors), arr
    return arr


def _same(kept: torch.Tensor, version: int, t: torch.Tensor) -> bool:
    """Whether ``t`` holds the values ``kept`` held when its version was ``version``.

    The same tensor, or a view of the same memory (a loader's slice of its
    data, made anew every pass) with the same offset, shape and strides,
    unmodified since: views share their base's version counter, and ``kept``
    holds the memory, so no other tensor can be placed at its address.
    """
    if t._version != version:
        return False
    if t is kept:
        return True
    return (t.numel() > 0 and t.device == kept.device and t.dtype == kept.dtype and _geometry(t) == _geometry(kept)
            and t.untyped_storage().data_ptr() == kept.untyped_storage().data_ptr())


def _all_same(kept: Sequence[torch.Tensor], versions: Sequence[int], now: Sequence[torch.Tensor]) -> bool:
    """:func:`_same` for each of several tensors (the span's vectors), and as many of them."""
    return len(kept) == len(now) and all(_same(a, v, b) for a, v, b in zip(kept, versions, now))


def _geometry(t: torch.Tensor) -> Tuple:
    """Where ``t`` sits in its memory: offset, shape, strides, dtype."""
    return t.storage_offset(), tuple(t.shape), t.stride(), t.dtype


def _fan_in(m: nn.Module) -> int:
    """Products summed into each output entry of a Linear or Conv layer."""
    if isinstance(m, nn.Linear):
        return m.in_features
    return m.in_channels // m.groups * math.prod(m.kernel_size)


class InputLayers:
    """The layers of ``net`` that may answer from a span, for one call of the point engine.

    ``names`` and ``numels``: the flat layout (names in order, entries per
    name); ``flats``: the K points, checked against ``span`` on the entries
    of those layers (the only ones the span stands in for; at up to
    :data:`CHECKED_ENTRIES` evenly spaced entries of each parameter); ``cache``: a dict
    kept between calls for the same vectors (a grid's), where each layer's R
    outputs per batch are kept (up to :data:`SPAN_CACHE_BYTES`).
    """

    def __init__(self, net: nn.Module, names: Sequence[str], numels: Sequence[int], span: Span,
                 flats: torch.Tensor, cache: Dict):
        self.span, self.cache = span, cache.setdefault("products", {})
        self.coefficients = span.coefficients.double().tolist()
        owned: Dict[str, List[str]] = {}
        start: Dict[str, Tuple[int, int]] = {}
        at = 0
        for full, n in zip(names, numels):
            owner, _, attr = full.rpartition(".")
            owned.setdefault(owner, []).append(attr)
            start[full], at = (at, at + n), at + n
        c = span.coefficients
        others = torch.cat([c[:, :1], c[:, 2:]], 1)
        passes = 1 if len(c) < 2 or bool((others == others[:1]).all()) else c.shape[1]   # per point
        self.layers: List[Tuple[str, nn.Module, List[str]]] = []
        for name, m in net.named_modules():
            attrs = owned.get(name, [])
            # a parametrized weight (torch.nn.utils.parametrize, weight_norm, prune) is not a parameter
            # of the layer itself: "weight" is then missing from attrs
            if type(m) in _LINEAR_IN_WEIGHTS and not (m._forward_hooks or m._forward_pre_hooks or m._buffers
                                                      or "forward" in vars(m)) \
                    and "weight" in attrs and set(attrs) <= {"weight", "bias"} and _fan_in(m) >= MIN_FAN_IN * passes:
                self.layers.append((name, m, attrs))
        prefix = [f"{n}." if n else "" for n, _, _ in self.layers]
        ranges = [start[p + a] for p, (_, _, attrs) in zip(prefix, self.layers) for a in attrs]
        if ranges:   # every parameter of those layers, at up to CHECKED_ENTRIES evenly spaced entries each
            span.check(flats, [slice(lo, hi, max(1, (hi - lo) // CHECKED_ENTRIES)) for lo, hi in ranges],
                       cache.setdefault("checked", {}))
        self.basis: Basis = [{p + a: t[slice(*start[p + a])] for p, (_, _, attrs) in zip(prefix, self.layers)
                              for a in attrs} for t in span.vectors]

    def __bool__(self) -> bool:
        return bool(self.layers)

    @contextlib.contextmanager
    def on(self, x: torch.Tensor, batch: int, key: Optional[torch.Tensor] = None) -> Iterator[Callable[[int], None]]:
        """Within the block, the layers answer calls that read ``x``'s memory with a combination.

        The block gives ``at(k)``, to be called before point k's forward.
        ``batch``: the batch's number in the pass; ``key``: the tensor ``x``
        was made from (default ``x``), by which the kept outputs of this batch
        number are recognised in the next pass.
        """
        key = x if key is None else key
        memory, version = x.untyped_storage().data_ptr(), x._version
        point, patched, this_pass = [0], [], {}   # this_pass: the products of this batch by (layer, input view)

        def reads_batch(inp) -> bool:
            return isinstance(inp, torch.Tensor) and inp.numel() > 0 and inp.device == x.device \
                and x._version == version and inp.untyped_storage().data_ptr() == memory

        def layer(name: str, m: nn.Module, attrs: List[str], own: Callable) -> Callable:
            def forward(inp, *args, **kwargs):
                if args or kwargs or not reads_batch(inp):
                    return own(inp, *args, **kwargs)
                geometry = _geometry(inp)
                if (name, geometry) not in this_pass:
                    this_pass[name, geometry] = self._outputs(name, m, attrs, own, inp, batch, key), {}
                outs, rest = this_pass[name, geometry]
                c = self.coefficients[point[0]]
                if len(outs) == 1:
                    return torch.mul(outs[0], c[0])
                # Σ_{r != 1} c_r f(x; v_r) is shared by the points that differ only in c_1 (a grid row:
                # origin + y·d2 for every x), made once per pass; then one add per point
                others = tuple(c[:1] + c[2:])
                if others not in rest:
                    base = outs[0] if c[0] == 1.0 else torch.mul(outs[0], c[0])
                    for r in range(2, len(outs)):
                        base = torch.add(base, outs[r], alpha=c[r])
                    rest[others] = base
                return torch.add(rest[others], outs[1], alpha=c[1])
            return forward

        def at(k: int) -> None:
            point[0] = k

        try:
            for name, m, attrs in self.layers:
                m.forward = layer(name, m, attrs, m.forward)
                patched.append(m)
            yield at
        finally:
            for m in patched:
                del m.forward

    def _outputs(self, name: str, m: nn.Module, attrs: List[str], own: Callable, inp: torch.Tensor, batch: int,
                 key: torch.Tensor) -> List[torch.Tensor]:
        """The R outputs ``f(inp; v_r)`` of layer ``name`` (kept ones when they are for the same values)."""
        # by layer, batch number, input view and the batch's memory (a train and a test batch each keep theirs)
        slot = (name, batch, _geometry(inp), key.untyped_storage().data_ptr())
        vectors = tuple(self.span.vectors)
        kept = self.cache.get(slot)
        if kept is not None and _same(kept[0], kept[1], key) and _all_same(kept[2], kept[3], vectors):
            return kept[4]
        prefix = f"{name}." if name else ""
        point_k = {a: m._parameters[a] for a in attrs}   # point k's views: the dtype of the points
        outs = []
        try:
            for b in self.basis:
                for a in attrs:
                    m._parameters[a] = b[prefix + a].to(point_k[a].dtype).view(point_k[a].shape)
                outs.append(own(inp))
        finally:
            m._parameters.update(point_k)
        size = sum(o.numel() * o.element_size() for o in outs)
        used = sum(sum(o.numel() * o.element_size() for o in e[4]) for s, e in self.cache.items() if s != slot)
        if used + size <= SPAN_CACHE_BYTES:
            self.cache[slot] = (key, key._version, vectors, tuple(v._version for v in vectors), outs)
        else:
            self.cache.pop(slot, None)
        return outs
