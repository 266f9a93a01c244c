"""Training a simplex or a mode-connecting complex of networks (Benton et al. 2021).

The loss is the expected loss over the complex: per mini-batch one simplex
drawn uniformly and one α ~ Dirichlet(1) on it (uniform on that simplex),
``L(θ(α)) + 0.5 * wd * ||θ(α)||²`` at the sampled point as for curves, and
optionally Benton et al.'s volume regulariser ``− λ · log V`` of the sampled
simplex, which keeps the simplex from collapsing onto a low-loss line. It
runs in the one epoch loop of :mod:`modeconn.training.loop` with the curve's
step module (the point is ``c @ vertices`` either way), so resuming,
progress, amp/compile and the per-epoch history are those of ``fit_curve``.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Mapping, Optional, Union

import torch

from modeconn.core.simplex import SimplexModel
from modeconn.runtime import Hooks, Runtime
from modeconn.training.loop import LossFn, _settings, curve_training, get_loss, run_sgd

__all__ = ["fit_simplex"]


def _check_volume(model: SimplexModel, volume_reg: float) -> float:
    """``volume_reg`` as a float, refused when negative or when a simplex has no volume to regularise."""
    volume_reg = float(volume_reg)
    if not math.isfinite(volume_reg) or volume_reg < 0:
        raise ValueError(f"volume_reg must be a number >= 0, got {volume_reg}")
    if volume_reg > 0:
        with torch.no_grad():
            flat = [i for i in range(model.num_simplexes) if not torch.isfinite(model.log_volume(i))]
        if flat:
            raise ValueError(f"volume_reg needs simplexes of positive volume, but simplex {flat[0]} "
                             f"{model.simplexes[flat[0]]} is degenerate (e.g. several free vertices at the "
                             "same start: use init='random' or a single free vertex)")
    return volume_reg


@torch.no_grad()
def _mean_log_volume(model: SimplexModel) -> float:
    """The mean log volume of the simplexes (each epoch's record)."""
    return sum(float(model.log_volume(i)) for i in range(model.num_simplexes)) / model.num_simplexes


def fit_simplex(model: SimplexModel, train_loader: Iterable, epochs: int = 20, lr: float = 0.03,
                weight_decay: float = 5e-4, momentum: float = 0.9, schedule: str = "reference",
                volume_reg: float = 0.0, loss: Union[str, LossFn] = "cross_entropy", seed: int = 0,
                resume: Optional[Mapping] = None, runtime: Optional[Runtime] = None,
                hooks: Optional[Hooks] = None) -> List[dict]:
    """Train the free vertices of ``model`` to minimise E_{i ~ U, α ~ Dir(1)} L(θ_i(α)) − λ log V_i.

    One simplex i (uniform) and one α (Dirichlet(1), :func:`~modeconn.core.simplex.uniform_simplex`)
    per mini-batch, both from the ``(seed, epoch)`` generator, so a run
    depends only on its seed and resumes exactly. ``weight_decay`` is the
    penalty ``0.5 * wd * ||θ(α)||²`` at the sampled point; ``volume_reg`` = λ
    of Benton et al.'s ``− λ log V`` of the sampled simplex (0: off).
    Arguments, ``resume`` and ``hooks`` as :func:`~modeconn.training.loop.fit_curve`;
    records also hold ``log_volume`` (the simplexes' mean). ValueError: every
    vertex fixed, or ``volume_reg > 0`` with a degenerate simplex.

    Example:
        >>> from torch import nn
        >>> from modeconn.data import TensorLoader
        >>> _ = torch.manual_seed(0)
        >>> modes = [nn.Linear(4, 3) for _ in range(3)]
        >>> complex_ = SimplexModel.connecting(modes[0], modes, free_vertices=1)
        >>> loader = TensorLoader(torch.randn(32, 4), torch.randint(0, 3, (32,)), batch_size=8)
        >>> history = fit_simplex(complex_, loader, epochs=2, lr=0.05, volume_reg=0.01)
        >>> len(history), torch.equal(complex_.bends[:3], complex_.fixed_bends)
        (2, True)
    """
    if not model.free_idx:
        raise ValueError("the simplex has no free vertices to train (every vertex is fixed)")
    volume_reg = _check_volume(model, volume_reg)
    runtime, hooks = runtime or Runtime(), hooks or Hooks()
    # θ = c @ vertices: the curve's optimizer and step module, with c in place of c(t)
    optimizer, scheduler, stepper, ddp = curve_training(model, train_loader, epochs, lr, momentum, schedule,
                                                        weight_decay, runtime)
    loss_fn = get_loss(loss)
    device = model.fixed_bends.device
    drawn = {"sum": 0.0}

    def step(x, y, gen):
        """One simplex and one α from the epoch's generator, the network there on the batch."""
        i, c = model.sample(gen)
        drawn["sum"] += i + float(c.sum())
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out, _ = stepper(x, c.to(device))
        value = loss_fn(out, y)
        objective = value - volume_reg * model.log_volume(i).to(value.dtype) if volume_reg else value
        return out, objective, value

    def epoch_draws() -> float:
        """Sum of the epoch's draws (reset for the next), for the ranks' agreement check."""
        value, drawn["sum"] = drawn["sum"], 0.0
        return value

    settings = _settings("fit_simplex", epochs, lr, weight_decay, momentum, schedule, seed)
    settings["volume_reg"] = volume_reg
    return run_sgd(model, train_loader, int(epochs), step, optimizer, scheduler, seed=seed, settings=settings,
                   hooks=hooks, resume=resume, ddp=ddp, advice=f"lower the learning rate (lr={lr})",
                   epoch_fields=lambda: {"log_volume": _mean_log_volume(model)},
                   same_on_all_ranks=epoch_draws)
