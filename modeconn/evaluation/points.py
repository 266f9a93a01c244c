"""The batched point engine: metrics of K arbitrary points of one architecture, in one pass per loader.

The shared engine of path, grid and plane evaluation. How it is fast:

* the data are held as tensors (``TensorLoader``), sums stay on the device
  (one :class:`~modeconn.evaluation.model.MetricSums`, no ``.item()`` per batch);
* the K points' weights are stacked ``[K, P]`` and share every batch: the
  template runs once for all of them (``torch.func.vmap``,
  :func:`~modeconn.evaluation.stacked.batched_forward`), or, on CPUs for
  convolutions and for dense work above
  :data:`~modeconn.evaluation.stacked.VMAP_MAX_WORK`, once per point on views
  of the stacked weights, the outputs reduced a block of points at a time;
* BatchNorm statistics of all K points are recomputed in the same single pass
  over the training data (:func:`~modeconn.evaluation.bn.bn_statistics`, the
  routine :func:`~modeconn.evaluation.bn.recompute_bn` also runs on one model).
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np
import torch

from modeconn.evaluation.bn import batchnorm_modules, bn_statistics
from modeconn.evaluation.input_span import InputLayers, Span
from modeconn.evaluation.model import MetricSums, eval_mode
from modeconn.evaluation.stacked import batched_forward, compiled_forward, each_point, vectorize_by_default
from modeconn.runtime import Runtime

__all__ = ["evaluate_points"]

KeptTensors = Dict[str, torch.Tensor]   # a caller's reusable blocks, by key


# Outputs of the point loop are reduced in blocks of points of at most this many entries: one
# metric reduction per block, not per point. On CPUs each reduction op wakes the intra-op threads
# (under OMP_WAIT_POLICY=PASSIVE ~40 us per op, more than the op itself for a small batch's logits);
# the cap keeps a language model's [B, T, V] logits to one point per block.
BLOCK_ENTRIES = 1 << 20


@torch.no_grad()
def _point_means(curve, flats: torch.Tensor, buffers: Dict[str, torch.Tensor], loader: Iterable,
                 runtime: Optional[Runtime] = None, scratch: Optional[KeptTensors] = None,
                 span_layers: Optional[Callable[[], Optional[InputLayers]]] = None) -> Dict[str, np.ndarray]:
    """Mean cross-entropy and accuracy (``[K]`` each) of K points ``flats [K, P]`` (buffers ``[K, ...]``) over ``loader``.

    The template runs in eval mode. All K points share each batch: one vmap,
    or, where :func:`vectorize_by_default` says so for the first batch's
    size, one point after another (:func:`_loop_means`). ``runtime.amp``:
    forwards under bf16 autocast (logits back to float32 before the sums);
    ``runtime.compile``: the vmapped forward through ``torch.compile``.
    ``scratch``: tensors kept for the next call (see :func:`evaluate_points`).
    ``span_layers()``: the layers answered from the points' span, if any (see :func:`evaluate_points`).
    """
    runtime, scratch = runtime or Runtime(), {} if scratch is None else scratch
    net, device = curve.net, flats.device
    params = curve.unflatten(flats)
    batches = iter(loader)
    first = next(batches, None)
    if first is None:
        raise ValueError("the loader yielded no samples")
    batches = itertools.chain([first], batches)
    with eval_mode(net):
        if not runtime.compile and not vectorize_by_default(net, device, flats.shape[1] * len(first[0])):
            layers = None if span_layers is None else span_layers()
            return _loop_means(net, params, buffers, batches, len(flats), runtime, scratch, layers)
        fwd = compiled_forward(net) if runtime.compile else batched_forward(net, True)
        sums = MetricSums(scratch=scratch)
        sums.reserve(len(flats), device)
        for x, y in batches:
            with runtime.autocast(device):
                out = fwd(params, buffers, x)                      # [K, B, C]
                sums.add_logits(out.float() if runtime.amp else out, y)
    return sums.means()


def _span_layers(curve, flats: torch.Tensor, span: Span, runtime: Runtime,
                 scratch: KeptTensors) -> Callable[[], Optional[InputLayers]]:
    """``() -> InputLayers or None``, made (and the span checked) at the first call only: both splits share it.

    None where the span cannot help: under amp, or with no more points than vectors.
    """
    made: List[Optional[InputLayers]] = []

    def layers() -> Optional[InputLayers]:
        if not made:
            useful = not runtime.amp and len(flats) > len(list(span.vectors))
            made.append(InputLayers(curve.net, curve.layout.names, curve.layout.numels, span, flats,
                                    scratch.setdefault("input span", {})) or None if useful else None)
        return made[0]
    return layers


def _loop_means(net, params, buffers, batches: Iterable, K: int, runtime: Runtime,
                scratch: KeptTensors, layers: Optional[InputLayers] = None) -> Dict[str, np.ndarray]:
    """:func:`_point_means` point by point: each output copied into a block of points, reduced per block.

    A block holds up to :data:`BLOCK_ENTRIES` entries (its size set by the
    first output). It and the metric's float64 work tensor are kept in
    ``scratch`` and reused by every batch and, when the caller keeps
    ``scratch``, every later call: large blocks made and freed pass after
    pass let the C allocator hand the top of its heap back to the OS, and
    the next forwards fault it in again (measured: up to 40k minor faults
    per 21x21 grid of the digits MLP).
    ``layers``: the layers reading the input answered from a span (None: every layer computes its own product).
    """
    sums, device = [], next(iter(params.values())).device
    for i, (x, y) in enumerate(batches):
        at_input = None if layers is None else (lambda x_in, i=i, x=x: layers.on(x_in, i, key=x))
        with runtime.autocast(device), contextlib.closing(each_point(net, params, buffers, x, at_input)) as outs:
            for k, out in enumerate(outs):
                if not sums:
                    g = max(1, min(K, BLOCK_ENTRIES // max(1, out.numel())))
                    sums = [MetricSums(scratch=scratch) for _ in range(0, K, g)]
                    for i, s in enumerate(sums):
                        s.reserve(min(g, K - i * g), device)
                block = _block(scratch, out, g)
                block[k % g].copy_(out)
                if k % g == g - 1 or k == K - 1:
                    done = block[:k % g + 1]
                    sums[k // g].add_logits(done.float() if runtime.amp else done, y)
    means = [s.means() for s in sums]
    return {k: np.concatenate([m[k] for m in means]) for k in ("loss", "acc")}


def _block(scratch: KeptTensors, out: torch.Tensor, g: int) -> torch.Tensor:
    """A ``[g, *out.shape]`` block, kept in ``scratch`` per shape; ``[B, C]`` logits laid out ``[g, C, B]``.

    With the classes outside the samples, every reduction of
    :meth:`MetricSums.add_logits` over the classes runs along contiguous samples.
    """
    key = f"block {tuple(out.shape)} {out.dtype} {out.device}"
    block = scratch.get(key)
    if block is None or len(block) < g:
        block = out.new_empty(g, out.shape[1], out.shape[0]).transpose(1, 2) if out.dim() == 2 \
            else out.new_empty(g, *out.shape)
        scratch[key] = block
    return block[:g]


@torch.no_grad()
def evaluate_points(curve, flats: torch.Tensor, train_loader: Optional[Iterable],
                    test_loader: Optional[Iterable], bn_loader: Optional[Iterable] = None,
                    recompute_bn: bool = True, runtime: Optional[Runtime] = None, *,
                    scratch: Optional[KeptTensors] = None, span: Optional[Span] = None) -> Dict[str, np.ndarray]:
    """Metrics of K arbitrary points ``flats [K, P]`` of ``curve``'s architecture, in one pass per loader.

    Args:
        curve: a :class:`~modeconn.core.curve_model.CurveModel` (only its
            template ``net`` and parameter layout are used).
        flats: the points, ``[K, P]``, on the template's device.
        train_loader, test_loader: data of the two splits; a split whose
            loader is None is left out.
        bn_loader: data for BN statistics (default: ``train_loader``).
        recompute_bn: recompute BN statistics per point
            (:func:`~modeconn.evaluation.bn.bn_statistics`) when the net has
            BatchNorm; with False the template's current buffers are used.
        runtime: ``amp`` (bf16 autocast) and ``compile`` (``torch.compile``
            of the metric passes); points stay on ``flats``' device.
        scratch: a dict the caller keeps between calls (e.g. a grid, for all
            its chunks): the logits blocks and float64 work tensors of the
            metric passes are kept there and reused, not made and freed per call.
        span: the same points as combinations of a few vectors
            (:class:`~modeconn.evaluation.input_span.Span`, checked against
            ``flats`` where it is used; e.g. a plane's origin and directions). When the points
            are evaluated one after another (CPU, no amp) and outnumber the
            vectors, the layers reading the raw input compute one product per
            vector and batch, kept in ``scratch`` for the next call, and each
            point's output is their combination
            (:mod:`~modeconn.evaluation.input_span`).

    Returns:
        ``{"train_loss", "train_acc", "test_loss", "test_acc"}``, arrays of
        length K; the loss is the mean cross-entropy (NLL).

    Example:
        >>> from modeconn.core.curve_model import linear_path
        >>> from modeconn.data import TensorLoader
        >>> line = linear_path(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3))
        >>> data = TensorLoader(torch.randn(16, 4), torch.randint(0, 3, (16,)), batch_size=8)
        >>> out = evaluate_points(line, line.flat_weights_at(torch.tensor([0.0, 0.5, 1.0])), data, None)
        >>> sorted(out), out["train_loss"].shape
        (['train_acc', 'train_loss'], (3,))
    """
    flats = flats.detach()
    bn_loader = train_loader if bn_loader is None else bn_loader
    if recompute_bn and batchnorm_modules(curve.net):
        if bn_loader is None:
            raise ValueError("BN statistics need a bn_loader or train_loader")
        buffers = bn_statistics(curve, flats, bn_loader, runtime=runtime)
    else:
        buffers = {n: b.unsqueeze(0).expand(len(flats), *b.shape) for n, b in curve.net.named_buffers()}
    runtime, scratch = runtime or Runtime(), {} if scratch is None else scratch
    span_layers = None if span is None else _span_layers(curve, flats, span, runtime, scratch)
    out = {}
    for split, loader in (("train", train_loader), ("test", test_loader)):
        if loader is not None:
            m = _point_means(curve, flats, buffers, loader, runtime, scratch, span_layers)
            out[f"{split}_loss"], out[f"{split}_acc"] = m["loss"], m["acc"]
    return out
