"""Learning-rate schedules: per epoch for training runs, per iteration for FGE.

* :func:`reference_lr_factor` / :func:`make_scheduler` — the per-epoch
  schedules of :func:`~modeconn.training.loop.train_model` and
  :func:`~modeconn.training.loop.fit_curve` (``"reference"``, ``"cosine"``,
  ``"constant"``);
* :func:`cyclic_lr` — FGE's cyclical rate of one iteration (a pure function),
  :func:`snapshot_iterations` — the iterations at its minima, and
  :func:`cycle_length`;
* :class:`FGELR` — that cyclical rate as a ``torch.optim.lr_scheduler``,
  stepped once per iteration.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["SCHEDULES", "reference_lr_factor", "make_scheduler", "epoch_factor", "warmup_scheduler", "cyclic_lr", "snapshot_iterations",
           "cycle_length", "FGELR"]

SCHEDULES = ("reference", "cosine", "constant")


# ----------------------------------------------------------------- per epoch
def reference_lr_factor(epoch: int, epochs: int) -> float:
    """Garipov et al.'s schedule: the factor on the base rate for epoch ``epoch`` (0-based) of ``epochs``.

    The reference training script (``dnn-mode-connectivity``, ``train.py``)
    counts epochs ``1..E`` and uses ``alpha = epoch / E``: factor 1 while
    ``alpha <= 0.5``, then linear ``1 - (alpha - 0.5) / 0.4 * 0.99`` down to
    0.01 at ``alpha = 0.9``, then 0.01. Here ``epoch`` counts from 0, so
    ``alpha = (epoch + 1) / epochs``. For E = 20: 10 epochs at the full rate,
    7 on the ramp, 3 at 0.01 (epoch 18 ends the ramp at 0.01).

    Example:
        >>> from modeconn.training.schedules import reference_lr_factor
        >>> [round(reference_lr_factor(e, 5), 4) for e in range(5)]
        [1.0, 1.0, 0.7525, 0.2575, 0.01]
    """
    alpha = (epoch + 1) / epochs
    if alpha <= 0.5:
        return 1.0
    if alpha <= 0.9:
        return 1.0 - (alpha - 0.5) / 0.4 * 0.99
    return 0.01


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int) -> LRScheduler:
    """A per-epoch ``torch.optim.lr_scheduler`` for the named schedule (one of :data:`SCHEDULES`)."""
    if schedule == "reference":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: reference_lr_factor(e, epochs))
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")


def epoch_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The factor on the base rate in epoch ``epoch`` (0-based) of the named schedule, in closed form."""
    if schedule == "reference":
        return reference_lr_factor(epoch, epochs)
    if schedule == "cosine":  # CosineAnnealingLR(T_max=epochs) with eta_min 0
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")


def warmup_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int, steps_per_epoch: int,
                     warmup_steps: int) -> LRScheduler:
    """A per-step scheduler: a linear warm-up from ``1/warmup_steps`` of the rate over the first
    ``warmup_steps`` steps (Goyal et al. 2017), times the named per-epoch schedule.

    Step ``i`` (0-based) runs at ``lr * min(1, (i + 1) / warmup_steps) * epoch_factor(i // steps_per_epoch)``.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = warmup_scheduler(opt, "constant", epochs=2, steps_per_epoch=3, warmup_steps=4)
        >>> rates = []
        >>> for _ in range(6):
        ...     rates.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
        >>> rates
        [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    """
    if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps or warmup_steps < 1:
        raise ValueError(f"warmup_steps must be an integer >= 1, got {warmup_steps!r}")
    per_epoch = max(int(steps_per_epoch), 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup_steps) * epoch_factor(schedule, i // per_epoch, epochs))


# ------------------------------------------------------------- FGE, per step
def check_cycle_iters(cycle_iters: int) -> None:
    """Raise ValueError unless ``cycle_iters`` is an integer >= 2."""
    if isinstance(cycle_iters, bool) or int(cycle_iters) != cycle_iters or cycle_iters < 2:
        raise ValueError(f"a cycle needs an integer number of iterations >= 2, got {cycle_iters}")


def check_schedule(cycle_iters: int, lr_max: float, lr_min: float) -> None:
    """Raise ValueError unless the cycle has >= 2 iterations and ``0 <= lr_min <= lr_max``, ``lr_max > 0``."""
    check_cycle_iters(cycle_iters)
    for name, v in (("lr_max", lr_max), ("lr_min", lr_min)):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    if lr_max <= 0:
        raise ValueError(f"lr_max must be > 0, got {lr_max}")
    if lr_min > lr_max:
        raise ValueError(f"lr_min ({lr_min}) must not exceed lr_max ({lr_max})")


def check_cycles(cycles: int) -> None:
    """Raise ValueError unless ``cycles`` is an integer >= 1."""
    if isinstance(cycles, bool) or int(cycles) != cycles or cycles < 1:
        raise ValueError(f"cycles must be an integer >= 1, got {cycles}")


def cyclic_lr(iteration: int, cycle_iters: int, lr_max: float, lr_min: float) -> float:
    """Learning rate of SGD step ``iteration`` (0-based) under FGE's cyclical schedule.

    With ``C = cycle_iters`` and the position in the cycle ``s = (iteration mod C) / C``
    (``s`` in ``[0, 1)``), the rate is piecewise linear in ``s``::

        s <= 1/2:  lr = (1 - 2s) * lr_max + 2s * lr_min        (lr_max -> lr_min)
        s >  1/2:  lr = (2 - 2s) * lr_min + (2s - 1) * lr_max  (lr_min -> lr_max)

    so every cycle starts at ``lr_max``, reaches ``lr_min`` at its middle
    (``s = 1/2``, exactly hit when C is even) and climbs back towards
    ``lr_max``, which the first step of the next cycle uses (Garipov et al.
    2018, Sec. 4).

    This is the reference ``utils.cyclic_learning_rate`` of
    ``dnn-mode-connectivity``: there the rate of batch ``i`` of ``n`` in epoch
    ``e`` is ``schedule(i / n)`` with ``t = ((e mod cycle) + i/n) / cycle`` —
    the same ``s`` counted in iterations, ``C = cycle * n`` (its ``t < 0.5``
    branch agrees with ours at ``s = 1/2``, where both give ``lr_min``).
    Unlike the reference, ``C`` may be any integer >= 2 (odd cycle lengths in
    epochs included). For odd C no step has ``s = 1/2``; the two middle steps
    ``(C-1)/2`` and ``(C+1)/2`` share the lowest rate ``lr_min + (lr_max - lr_min)/C``.

    Example:
        >>> from modeconn.training.schedules import cyclic_lr
        >>> [round(cyclic_lr(k, 4, 0.1, 0.01), 4) for k in range(5)]
        [0.1, 0.055, 0.01, 0.055, 0.1]
    """
    check_schedule(cycle_iters, lr_max, lr_min)
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    s = (int(iteration) % int(cycle_iters)) / int(cycle_iters)
    if s <= 0.5:
        return (1.0 - 2.0 * s) * lr_max + 2.0 * s * lr_min
    return (2.0 - 2.0 * s) * lr_min + (2.0 * s - 1.0) * lr_max


def snapshot_iterations(cycles: int, cycle_iters: int) -> List[int]:
    """0-based indices of the SGD steps after which FGE takes a snapshot.

    One per cycle, at the first step with the cycle's lowest rate:
    ``c * C + C // 2`` for ``c = 0 .. cycles-1`` (``C = cycle_iters``). For even
    C that step's rate is exactly ``lr_min``. (The reference took its snapshot
    at the end of epoch ``cycle/2 - 1``, one step before the minimum.)

    Example:
        >>> from modeconn.training.schedules import snapshot_iterations
        >>> snapshot_iterations(3, 4), snapshot_iterations(2, 5)
        ([2, 6, 10], [2, 7])
    """
    check_cycles(cycles)
    check_cycle_iters(cycle_iters)
    C = int(cycle_iters)
    return [c * C + C // 2 for c in range(int(cycles))]


def cycle_length(iters_per_epoch: int, cycle_epochs: Optional[int] = None,
                 cycle_iters: Optional[int] = None) -> int:
    """Iterations per cycle from exactly one of ``cycle_epochs`` or ``cycle_iters``."""
    if (cycle_epochs is None) == (cycle_iters is None):
        raise ValueError("give exactly one of cycle_epochs and cycle_iters")
    if cycle_iters is not None:
        C = cycle_iters
    else:
        if isinstance(cycle_epochs, bool) or int(cycle_epochs) != cycle_epochs or cycle_epochs < 1:
            raise ValueError(f"cycle_epochs must be an integer >= 1, got {cycle_epochs}")
        C = int(cycle_epochs) * int(iters_per_epoch)
    if isinstance(C, bool) or int(C) != C or C < 2:
        raise ValueError(f"a cycle needs an integer number of iterations >= 2, got {C} "
                         f"(iterations per epoch: {iters_per_epoch}); use more epochs per cycle "
                         "or a smaller batch size")
    return int(C)


class FGELR(LRScheduler):
    """FGE's cyclical learning rate as a ``torch.optim.lr_scheduler``: call ``step()`` after every SGD step.

    Step ``k`` (0-based; ``last_epoch`` counts steps here) runs at
    ``cyclic_lr(k, cycle_iters, lr_max, lr_min)``: ``lr_max`` at the cycle
    boundaries, ``lr_min`` at the cycle middles (Garipov et al. 2018). Every
    param group gets that rate; the optimizer's own ``lr`` is overwritten at
    construction. Pair it with :class:`~modeconn.training.fge.FGESnapshots`,
    which snapshots the network at the minima.

    Args:
        optimizer: the optimizer whose rates are set.
        cycle_iters: iterations per cycle (>= 2).
        lr_max, lr_min: rate at the cycle boundaries and at the cycle middle.
        last_epoch: steps already taken minus one (``-1``: a fresh run).

    Example:
        In the shared epoch loop (``after_step`` steps the schedule)::

        >>> import torch
        >>> from torch import nn
        >>> from modeconn.data import TensorLoader
        >>> from modeconn.training.loop import run_epoch
        >>> from modeconn.training.schedules import FGELR
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9)
        >>> sched = FGELR(opt, cycle_iters=4, lr_max=0.1, lr_min=0.01)
        >>> loader = TensorLoader(torch.randn(24, 4), torch.randint(0, 3, (24,)), batch_size=8)
        >>> def step_loss(x, y, generator):
        ...     out = net(x)
        ...     loss = nn.functional.cross_entropy(out, y)
        ...     return out, loss, loss
        >>> record = run_epoch(loader, 0, 0, step_loss, opt, after_step=sched.step)
        >>> sched.last_epoch, round(record["lr"], 4)   # 3 steps done; the last ran at the minimum
        (3, 0.01)

        In a plain PyTorch loop::

        >>> rates = []
        >>> for x, y in loader:
        ...     rates.append(opt.param_groups[0]["lr"])
        ...     opt.zero_grad()
        ...     nn.functional.cross_entropy(net(x), y).backward()
        ...     opt.step()
        ...     sched.step()
        >>> [round(r, 4) for r in rates]                # steps 3, 4, 5 of the schedule
        [0.055, 0.1, 0.055]
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cycle_iters: int, lr_max: float, lr_min: float,
                 last_epoch: int = -1):
        """Check the schedule and set step ``last_epoch + 1``'s rate on ``optimizer``."""
        check_schedule(cycle_iters, lr_max, lr_min)
        self.cycle_iters, self.lr_max, self.lr_min = int(cycle_iters), float(lr_max), float(lr_min)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        """The rate of step ``last_epoch`` for every param group."""
        lr = cyclic_lr(self.last_epoch, self.cycle_iters, self.lr_max, self.lr_min)
        return [lr for _ in self.optimizer.param_groups]
