"""Front ``curve``: a Bezier(3) curve step and a plain step, modeconn against Garipov et al.'s algorithm.

For VGG16 and PreResNet-20 (3x32x32, 10 classes, batch 128) each row's two
contestants run interleaved (A B A B, medians) in one process on one batch:

- our curve step, exactly ``fit_curve``'s (``benchmarks/curve_step.py::curve_step_fn``:
  random t, ``training_weights(t, weight_decay=5e-4)``, ``forward_weights``, CE, SGD
  momentum 0.9 on the free bend), against the per-layer curve networks of
  :mod:`benchmarks._garipov_curves` holding the same bends (CE + 0.5 * 5e-4 *
  ||θ(t)||², SGD momentum 0.9 on the free bend, ends fixed);
- the zoo's plain model against the reference model as the papers' code writes it
  (``plain_step_fn``: SGD momentum 0.9, weight decay 5e-4). Both have in-place
  ReLUs; the zoo's models convolve channels-last
  (:func:`modeconn.models.registry.channels_last`), the reference code's in
  PyTorch's default layout: that layout is the measured difference;
- our curve step against our own plain step: the issue's target is a curve step of
  at most 1.05 plain steps, so that row's peer is "our plain step x1.05" and its
  note gives the plain ratio itself.

The baseline is written here (Garipov et al.'s code is not a package); the test
``tests/test_bench_peer_curve.py`` pins that it computes the same outputs and
bend gradients as ``CurveModel`` for the same bends.
"""
from __future__ import annotations

import copy
from typing import List

import torch

import modeconn as mc
from benchmarks._garipov_curves import (CurvePreResNet, CurveVGG16, RefPreResNet, RefVGG16, garipov_step_fn,
                                        load_bends)
from benchmarks._peers import Row, interleaved
from benchmarks.curve_step import curve_step_fn, plain_step_fn

FRONT = "curve"
PLAIN_TARGET = 1.05


def _setup(arch: str, quick: bool):
    """Endpoints a, b (zoo), the same nets as per-layer curve and reference plain, and one batch."""
    batch = 16 if quick else 128
    torch.manual_seed(0)
    if arch == "vgg16":
        kw = {"width_multiplier": 0.125} if quick else {}
        a, b = (mc.create_model("vgg16", (3, 32, 32), 10, **kw) for _ in range(2))
        peer_curve, ref = CurveVGG16(**kw), RefVGG16(**kw)
    else:
        depth = 8 if quick else 20
        a, b = (mc.create_model("preresnet", (3, 32, 32), 10, depth=depth) for _ in range(2))
        peer_curve, ref = CurvePreResNet(depth=depth), RefPreResNet(depth=depth)
    load_bends(peer_curve, mc.CurveModel(a, a, b, mc.Bezier(3)).bends_by_name())
    ref.load_state_dict(a.state_dict())
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    return a, b, peer_curve, ref, x, y


def _arch_rows(arch: str, label: str, reps: int, quick: bool) -> List[Row]:
    a, b, peer_curve, ref, x, y = _setup(arch, quick)
    size = " (quick: tiny)" if quick else ""
    curve, plain = curve_step_fn(copy.deepcopy(a), b, x, y), plain_step_fn(a, x, y)
    # one A B A B run per row: each contestant always next to the one it is compared with
    t = interleaved({"curve": curve, "garipov": garipov_step_fn(peer_curve, x, y)}, reps=reps, warmup=1)
    t.update(interleaved({"plain": plain, "ref": plain_step_fn(ref, x, y)}, reps=reps, warmup=1))
    own = interleaved({"curve": curve, "plain": plain}, reps=reps, warmup=0)
    plain_ratio = own["curve"] / own["plain"]
    return [
        Row(FRONT, f"{label} Bezier(3) curve step, batch {len(x)}{size}", t["curve"], t["garipov"],
            "per-layer curve layers (Garipov et al.)", note="same bends, same step; baseline in benchmarks/_garipov_curves.py"),
        Row(FRONT, f"{label} plain step, batch {len(x)}{size}", t["plain"], t["ref"], "reference model",
            note="same layers, in-place ReLUs on both sides; the zoo convolves channels-last, the reference in the default layout"),
        Row(FRONT, f"{label} curve step vs our plain step{size}", own["curve"], PLAIN_TARGET * own["plain"],
            f"our plain step x{PLAIN_TARGET}", note=f"curve/plain = {plain_ratio:.3f} (target <= {PLAIN_TARGET})"),
    ]


def rows(reps: int, quick: bool) -> List[Row]:
    """The six rows of the curve front (VGG16 and PreResNet-20; tiny widths/depth with ``quick``)."""
    # a PreResNet-20 step is ~4x shorter than VGG16's: 4x the repetitions for a median as settled
    return (_arch_rows("vgg16", "VGG16", reps, quick)
            + _arch_rows("preresnet", "PreResNet-8" if quick else "PreResNet-20", 4 * reps, quick))
