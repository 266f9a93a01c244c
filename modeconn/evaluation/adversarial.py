"""Projected gradient descent (PGD) attacks, robust loss/accuracy of a network and along a path.

PGD (Madry et al. 2018, Eq. 2 and §2.1) maximises the loss in a ball
``{x' : ‖x' − x‖ ≤ ε}`` around each input by K steps of

* L∞: ``x' ← Π_ε(x' + α · sign(∇ₓ L))`` (Π clips every coordinate to ``[x − ε, x + ε]``);
* L2: ``x' ← Π_ε(x' + α · g / ‖g‖₂)`` per sample (Π rescales ``x' − x`` onto the ball when outside it);

from a uniformly random start in the ball (``random_start``), optionally
clamped to the data range. The step size defaults to ``2.5 ε / K`` (Madry
et al.'s choice ``α = 2.5 ε / steps`` lets K steps reach the ball's boundary
from any start).

Robust barriers (Tatro et al. 2020, §4.3): the adversarial loss along a path
is evaluated at every point with BatchNorm statistics recomputed on *clean*
training data (as in the paper), the attack then made on that point's network
in eval mode. :func:`robust_path` returns arrays keyed ``robust_test_loss``,
``robust_test_error``, ``robust_test_acc`` that go into
:attr:`~modeconn.evaluation.path.PathResult.extra`, so
``result.barrier("robust_test_loss")`` is the robust loss barrier beside the
clean one.

Our own implementation rather than ``torchattacks``: the attack must run
inside the training loop's step (one generator per ``(seed, epoch)`` so
resumed runs repeat it, BatchNorm statistics untouched by the attack's
forward passes), which that library does not offer.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modeconn.evaluation.bn import has_batchnorm, recompute_bn
from modeconn.evaluation.model import MetricSums, eval_mode
from modeconn.training.sam import frozen_bn_statistics

__all__ = ["PGD", "pgd_step", "pgd_attack", "robust_evaluate", "robust_path", "adversarial_step_loss",
           "curve_attack", "ROBUST_METRICS"]

NORMS = ("linf", "l2")
ROBUST_METRICS = ("robust_test_loss", "robust_test_error", "robust_test_acc")


@dataclass(frozen=True)
class PGD:
    """Settings of a PGD attack.

    Args:
        eps: radius ε > 0 of the ball (in the units of the model's inputs, i.e. after normalisation).
        steps: number K >= 1 of ascent steps.
        norm: ``"linf"`` or ``"l2"``.
        step_size: α per step; default ``2.5 * eps / steps``.
        random_start: start from a uniform point of the ball (else from x itself).
        clamp: ``(low, high)`` bounds of valid inputs, or None.
    """

    eps: float
    steps: int = 10
    norm: str = "linf"
    step_size: Optional[float] = None
    random_start: bool = True
    clamp: Optional[Tuple[float, float]] = None

    def __post_init__(self):
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps (the PGD radius) must be a finite number > 0, got {self.eps!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps (PGD iterations) must be an integer >= 1, got {self.steps!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"step_size must be a finite number > 0, got {self.step_size!r}")
        if self.clamp is not None and not (len(self.clamp) == 2 and self.clamp[0] < self.clamp[1]):
            raise ValueError(f"clamp must be (low, high) with low < high, got {self.clamp!r}")

    @property
    def alpha(self) -> float:
        """The step size α (``step_size`` or ``2.5 * eps / steps``)."""
        return float(self.step_size) if self.step_size is not None else 2.5 * self.eps / self.steps

    def as_dict(self) -> dict:
        """Plain data (for run configs and JSON)."""
        d = asdict(self)
        d["clamp"] = list(self.clamp) if self.clamp is not None else None
        return d


def _per_sample_norm(v: torch.Tensor) -> torch.Tensor:
    """‖v_i‖₂ of every sample, shaped to broadcast against ``v`` ([B, 1, 1, ...])."""
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def _project(x_new: torch.Tensor, x: torch.Tensor, attack: PGD) -> torch.Tensor:
    """``x_new`` projected onto the ε-ball around ``x`` (and into ``attack.clamp``)."""
    delta = x_new - x
    if attack.norm == "linf":
        delta = delta.clamp(-attack.eps, attack.eps)
    else:
        delta = delta * (attack.eps / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    out = x + delta
    return out.clamp(*attack.clamp) if attack.clamp is not None else out


def pgd_step(model: Callable, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, attack: PGD,
             loss_fn: Callable = F.cross_entropy) -> torch.Tensor:
    """One PGD step from ``x_adv``: ascend the summed loss, project onto the ball around ``x``.

    L∞: ``Π(x_adv + α sign(g))``; L2: ``Π(x_adv + α g / ‖g‖)`` per sample
    (a zero gradient leaves the sample in place). Only ``x_adv`` is
    differentiated (``torch.autograd.grad``): the model's parameter gradients are untouched.
    """
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
    if attack.norm == "linf":
        move = grad.sign()
    else:
        move = grad / _per_sample_norm(grad).clamp_min(1e-12)
    return _project(x_adv.detach() + attack.alpha * move, x, attack).detach()


def _random_start(x: torch.Tensor, attack: PGD, generator: Optional[torch.Generator]) -> torch.Tensor:
    """A uniform point of the ε-ball around ``x`` (L∞: uniform per coordinate; L2: uniform in the ball),
    drawn on the CPU from ``generator`` so runs repeat on every device."""
    shape = x.shape
    if attack.norm == "linf":
        noise = (torch.rand(shape, generator=generator) * 2 - 1) * attack.eps
    else:
        direction = torch.randn(shape, generator=generator)
        direction = direction / _per_sample_norm(direction).clamp_min(1e-12)
        d = x[0].numel()
        radius = torch.rand(shape[0], generator=generator).pow(1.0 / d).view(-1, *([1] * (x.dim() - 1)))
        noise = direction * radius * attack.eps
    return _project(x + noise.to(x.device, x.dtype), x, attack)


def pgd_attack(model: Callable, x: torch.Tensor, y: torch.Tensor, attack: PGD,
               generator: Optional[torch.Generator] = None, loss_fn: Callable = F.cross_entropy) -> torch.Tensor:
    """Adversarial inputs: ``attack.steps`` of :func:`pgd_step` from ``x`` (or a random start in the ball).

    The model is used in its current mode; its BatchNorm running statistics
    are left as they were (:func:`~modeconn.training.sam.frozen_bn_statistics`)
    and its parameter gradients are not touched. ``loss_fn(out, y, reduction=)``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Linear(4, 3)
        >>> x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
        >>> adv = pgd_attack(net, x, y, PGD(eps=0.1, steps=3))
        >>> bool((adv - x).abs().max() <= 0.1 + 1e-7)
        True
        >>> bool(F.cross_entropy(net(adv), y) > F.cross_entropy(net(x), y))
        True
    """
    x = x.detach()
    x_adv = _random_start(x, attack, generator) if attack.random_start else x.clone()
    frozen = frozen_bn_statistics(model) if isinstance(model, nn.Module) else contextlib.nullcontext()
    with frozen:
        for _ in range(attack.steps):
            x_adv = pgd_step(model, x_adv, x, y, attack, loss_fn)
    return x_adv


def robust_evaluate(model: nn.Module, loader: Iterable, attack: PGD, seed: int = 0) -> Dict[str, float]:
    """Loss (NLL), accuracy and error of ``model`` on PGD examples of every batch of ``loader``.

    The model runs in eval mode (attack and evaluation alike); the random
    starts come from one generator seeded by ``seed``, so two models see the
    same starts (common random numbers along a path). Returns ``{"loss",
    "nll", "acc", "error", "n"}`` as :func:`~modeconn.evaluation.model.evaluate`.
    """
    sums = MetricSums()
    gen = torch.Generator().manual_seed(int(seed))
    with eval_mode(model):
        for x, y in loader:
            adv = pgd_attack(model, x, y, attack, generator=gen)
            with torch.no_grad():
                sums.add_logits(model(adv).unsqueeze(0), y)
    m = sums.means()
    loss, acc = float(m["loss"][0]), float(m["acc"][0])
    return {"loss": loss, "nll": loss, "acc": acc, "error": 1.0 - acc, "n": sums.n}


def robust_path(path, loader: Iterable, attack: PGD, ts: Sequence[float], bn_loader: Optional[Iterable] = None,
                seed: int = 0, progress: Optional[Callable[[int], object]] = None) -> Dict[str, np.ndarray]:
    """Robust test loss/error/accuracy at every t of ``ts`` along ``path`` (a CurveModel).

    At each t the network ``path.point(t)`` gets BatchNorm statistics
    recomputed over ``bn_loader`` on clean data (Tatro et al. 2020) when it has
    BatchNorm and ``bn_loader`` is given, then :func:`robust_evaluate` runs on
    ``loader``. Returns :data:`ROBUST_METRICS` arrays indexed like ``ts``
    (for :attr:`PathResult.extra`); ``progress(1)`` after each point.
    """
    ts = np.asarray(ts, dtype=float)
    out = {k: np.zeros(len(ts)) for k in ROBUST_METRICS}
    for i, t in enumerate(ts):
        net = path.point(float(t))
        if bn_loader is not None and has_batchnorm(net):
            recompute_bn(net, bn_loader)
        r = robust_evaluate(net, loader, attack, seed)
        out["robust_test_loss"][i], out["robust_test_error"][i], out["robust_test_acc"][i] = \
            r["loss"], r["error"], r["acc"]
        if progress is not None:
            progress(1)
    return out


def adversarial_step_loss(step_loss: Callable, attack: PGD, module: nn.Module) -> Callable:
    """A step function for :func:`~modeconn.training.loop.run_epoch` that trains on PGD examples (Madry et al.).

    ``step_loss(x, y, generator)`` is called with ``x`` replaced by
    :func:`pgd_attack` of ``module`` (in its training mode, BatchNorm
    statistics frozen during the attack) on the device of ``module``'s
    parameters; the random start draws from the step's generator, so a
    resumed run repeats its attacks.
    """
    device = next(module.parameters()).device

    def step(x, y, generator):
        """Attack the batch, then the wrapped step on the adversarial batch."""
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return step_loss(pgd_attack(module, x, y, attack, generator=generator), y, generator)

    return step


def curve_attack(curve, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, attack: PGD,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """PGD examples of the network at θ(t) of ``curve`` (a CurveModel) for one curve-training step.

    The robust curve objective E_t max_δ L(θ(t), x + δ) (Tatro et al. 2020 train curves between robust
    endpoints on adversarial examples): the attack runs on θ(t) detached, in the curve's mode, with its
    BatchNorm statistics frozen.
    """
    with torch.no_grad():
        flat = curve.flat_weights_at(t, check=False)
    with frozen_bn_statistics(curve):
        return pgd_attack(lambda z: curve.forward_flat(z, flat), x, y, attack, generator=generator)
