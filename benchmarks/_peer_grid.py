"""Front ``grid``: a 21x21 loss-surface grid, modeconn against loss-landscapes' ``planar_interpolation``.

Equal work on both sides, per model (the shipped digits MLP and BN CNN):

* the same network in eval mode (BN keeps its stored statistics on both sides:
  ``recompute_bn=False`` for modeconn, loss-landscapes never recomputes them),
* the same plane: modeconn's filter-normalised random directions (seed 0) over
  ``[-1, 1]^2``; loss-landscapes gets them as its three models
  ``start = θ0 - d1 - d2`` and ``end_k = start + steps·Δ·d_k`` (it divides by
  ``steps`` and walks ``i·Δ·d1`` for ``i < steps``, so its x coordinates are ours),
* the same points count (``steps^2``), the same full digits training set per
  point with the same metrics: the loss-landscapes ``Metric`` below runs the
  whole training set as one tensor and returns the mean cross-entropy (log-softmax
  in float64, like modeconn's :class:`MetricSums`) and the accuracy.

What differs is the algorithm: modeconn evaluates the points of a grid row one
after another on the same batch and, the plane being affine in the weights,
computes the first layer's products once per vector (origin, d1, d2) for the
whole grid and each point's first-layer output as their combination
(:mod:`modeconn.evaluation.input_span`; the MLP's 64->128 layer qualifies, the
CNN's 1->16 3x3 convolution is too small to gain); loss-landscapes runs every
point's full forward.

loss-landscapes' flaws are measured, not assumed, on every run and put in the
row's note: the grid columns it builds going up (even x index) sit one y step
above ours — in-place ``add_`` before the metric — while those going down match,
and with its default ``deepcopy_model=False`` it leaves the caller's start model
moved to the last grid point. The timed call uses ``deepcopy_model=True``.
"""
from __future__ import annotations

import copy
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import vector_to_parameters

from benchmarks._peers import Row, interleaved, missing, peer_module
from modeconn import get_dataset, load_model, shipped_checkpoint
from modeconn.geometry import evaluate_grid, flatten_parameters, random_plane

PEER = "loss-landscapes"
FRONT = "grid"


def _metric_class(ll):
    """The loss-landscapes ``Metric``: mean NLL (float64 log-softmax) and accuracy over the full training set."""
    class TrainLossAcc(ll.metrics.Metric):
        def __init__(self, x, y):
            super().__init__()
            self.x, self.y = x, y

        def __call__(self, model_wrapper):
            model_wrapper.eval()   # eval mode, like modeconn (loss-landscapes leaves the mode alone)
            with torch.no_grad():
                logp = F.log_softmax(model_wrapper.forward(self.x).double(), dim=-1)
                loss = F.nll_loss(logp, self.y).item()
                acc = (logp.argmax(1) == self.y).double().mean().item()
            return loss, acc
    return TrainLossAcc


def _at(model, flat):
    """A copy of ``model`` with the flat parameter vector ``flat``."""
    m = copy.deepcopy(model)
    vector_to_parameters(flat.to(next(m.parameters())), m.parameters())
    return m


def _peer_models(model, plane, xs, ys):
    """(start, end_one, end_two) such that planar_interpolation walks our xs (and ys, where it is aligned)."""
    steps = len(xs)
    dx, dy = float(xs[1] - xs[0]), float(ys[1] - ys[0])
    start = plane.origin.double() + xs[0] * plane.d1.double() + ys[0] * plane.d2.double()
    return (_at(model, start), _at(model, start + steps * dx * plane.d1.double()),
            _at(model, start + steps * dy * plane.d2.double()))


def _flaws(ll, model, plane, xs, ys, metric, ours: np.ndarray) -> str:
    """Measured: alignment of loss-landscapes' columns with our grid, and whether it edits the caller's model."""
    start, e1, e2 = _peer_models(model, plane, xs, ys)
    before = flatten_parameters(start).clone()
    peer = np.asarray(ll.planar_interpolation(start, e1, e2, metric, steps=len(xs)))[..., 0]  # [i_x, j]
    moved = float((flatten_parameters(start) - before).abs().max())
    odd = max(float(np.abs(peer[i] - ours[:, i]).max()) for i in range(1, len(xs), 2))
    even_same = max(float(np.abs(peer[i] - ours[:, i]).max()) for i in range(0, len(xs), 2))
    even_up = max(float(np.abs(peer[i, :-1] - ours[1:, i]).max()) for i in range(0, len(xs), 2))
    return (f"{PEER} checked: its x-columns 2, 4, ... (1-based) match ours (max |Δloss| {odd:.1e}); columns "
            f"1, 3, ... sit one y-step up (max |Δloss| vs ours at y {even_same:.2g}, at y+Δy {even_up:.1e}; "
            f"their top point is off the range); with deepcopy_model=False (its default) the caller's "
            f"weights are moved by up to {moved:.3g}")


def _case(ll, name: str, ckpt: str, reps: int, quick: bool, warmup: int = 1) -> Row:
    model, meta = load_model(shipped_checkpoint(ckpt))
    model.eval()
    ds = get_dataset(meta.get("dataset", "digits"))
    steps = 5 if quick else 21
    xs = ys = np.linspace(-1.0, 1.0, steps)
    plane = random_plane(flatten_parameters(model), model, dims=2, norm="filter", seed=0)
    train = ds.eval_loader("train", len(ds.y_train))   # the whole training set as one batch, on both sides
    x, y = next(iter(train))
    metric = _metric_class(ll)(x, y)
    peer_models = _peer_models(model, plane, xs, ys)

    def ours():
        return evaluate_grid(model, plane, xs, ys, train_loader=train, recompute_bn=False)

    def peer():
        return ll.planar_interpolation(*peer_models, metric, steps=steps, deepcopy_model=True)

    t = interleaved({"ours": ours, "peer": peer}, reps=reps, warmup=warmup)
    n = steps * steps
    note = (f"{steps}x{steps} points, {len(y)} train samples per point, eval mode; "
            f"ours {1e3 * t['ours'] / n:.2f} ms/point, {PEER} {1e3 * t['peer'] / n:.2f} ms/point; "
            + _flaws(ll, model, plane, xs, ys, metric, ours().arrays["train_loss"]))
    return Row(FRONT, f"{steps}x{steps} grid, {name}, full train set per point", t["ours"], t["peer"], PEER,
               note=note)


def rows(reps: int, quick: bool) -> List[Row]:
    """The MLP and the BN CNN rows (``quick``: a 5x5 grid; the full CNN row: at most 3 repetitions)."""
    ll = peer_module("loss_landscapes")
    cases = (("digits MLP", "digits_mlp_a"), ("digits BN CNN", "digits_cnn_a"))
    if ll is None:
        return [missing(FRONT, f"grid, {name}", PEER) for name, _ in cases]
    import loss_landscapes.metrics  # noqa: F401  (the Metric base class)
    # the MLP grid takes ~0.6 s: 4x the repetitions for a settled median (single runs move by +-10 % on
    # this shared machine); the CNN grid takes about a minute per repetition on 2 cores: at most 3 (a
    # median still), no warm-up round
    return [_case(ll, cases[0][0], cases[0][1], reps if quick else 4 * reps, quick),
            _case(ll, cases[1][0], cases[1][1], reps if quick else min(reps, 3), quick, warmup=int(quick))]
