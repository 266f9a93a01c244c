"""Fast Geometric Ensembling (FGE, Garipov et al. 2018), in the style of ``torch.optim.swa_utils``.

FGE starts from one trained network and keeps training it with SGD under a
piecewise-linear *cyclical* learning rate; at each minimum of the rate it
takes a snapshot. The snapshots lie along a low-loss path around the start and
their averaged predictions form an ensemble that costs a few extra epochs
instead of several independent trainings.

Two pieces plug into any loop — the shared
:func:`~modeconn.training.loop.run_epoch` or a plain PyTorch one:

* :class:`~modeconn.training.schedules.FGELR` — the cyclical rate as a
  ``torch.optim.lr_scheduler`` (``step()`` after every SGD step);
* :class:`FGESnapshots` — ``update(model)`` after every SGD step; takes a
  snapshot at each rate minimum (BatchNorm statistics recomputed, kept in
  memory or written to disk).

:func:`train_fge` is the short convenience built on them (resumable at every
epoch) and returns an :class:`FGEResult`; evaluate the snapshots with
:func:`modeconn.evaluation.ensembles.evaluate_ensemble`.

Snapshots' BatchNorm statistics are recomputed over training data when they
are taken (exact average, :func:`modeconn.evaluation.bn.recompute_bn`); the
running statistics SGD leaves behind belong to the weights of many steps ago.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Union

import torch
from torch import nn

from modeconn.data import TensorLoader
from modeconn.evaluation.bn import has_batchnorm, recompute_bn
from modeconn.evaluation.ensembles import frozen, load_members
from modeconn.runtime import Hooks, Runtime
from modeconn.runtime import distributed as _dist
from modeconn.runtime.checkpoints import save_checkpoint, save_model
from modeconn.training.loop import LossFn, model_step, run_sgd
from modeconn.training.schedules import (FGELR, check_cycle_iters, check_cycles, check_schedule, cycle_length,
                                         cyclic_lr, snapshot_iterations)
from modeconn.training.state import seeded_rng

__all__ = ["FGELR", "FGESnapshots", "FGEResult", "train_fge", "cyclic_lr", "snapshot_iterations", "cycle_length"]

Snapshot = Union[nn.Module, Path]


class FGESnapshots:
    """Snapshots of a network at the minima of FGE's cyclical rate; call ``update(model)`` after every SGD step.

    Step ``k`` (0-based, counted by ``update`` calls) ends with a snapshot
    when ``k mod C == C // 2`` (:func:`~modeconn.training.schedules.snapshot_iterations`):
    the first step of each cycle at the lowest rate of
    :class:`~modeconn.training.schedules.FGELR` with the same ``C``. A snapshot
    is a copy of the network with its BatchNorm statistics recomputed over
    ``bn_loader`` (:func:`~modeconn.evaluation.bn.recompute_bn`; the global
    RNG is left as it was), in eval mode with gradients off.

    Args:
        model: the start network (its parameters now are the origin of
            ``distances``; a copy of it rebuilds in-memory snapshots on resume).
        cycle_iters: iterations per cycle, C (>= 2).
        bn_loader: data for the BatchNorm statistics (the un-augmented
            training set); required when the network has BatchNorm.
        directory: keep snapshots on disk as ``directory/snap_XX.pt`` (XX from
            00; written by rank 0 only under torchrun) instead of in memory.
        meta: with ``directory``: ``arch, arch_kwargs, input_shape,
            num_classes`` (and e.g. ``dataset, seed``) make the files full
            model checkpoints for :func:`~modeconn.runtime.checkpoints.load_model`;
            without, ``'model'`` checkpoints holding the state dict (load them
            with a template, :func:`~modeconn.evaluation.ensembles.load_members`).

    Attributes:
        snapshots: modules, or paths with ``directory``, in order.
        iterations: the 0-based step after which each was taken.
        distances: L2 norm of (snapshot parameters - start parameters), flat
            over all parameters (buffers excluded).

    Example:
        In the shared epoch loop::

        >>> import torch
        >>> from torch import nn
        >>> from modeconn.data import TensorLoader
        >>> from modeconn.training.fge import FGESnapshots
        >>> from modeconn.training.loop import run_epoch
        >>> from modeconn.training.schedules import FGELR
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9)
        >>> sched = FGELR(opt, cycle_iters=4, lr_max=0.1, lr_min=0.01)
        >>> snaps = FGESnapshots(net, cycle_iters=4)
        >>> loader = TensorLoader(torch.randn(32, 4), torch.randint(0, 3, (32,)), batch_size=8)
        >>> def step_loss(x, y, generator):
        ...     out = net(x)
        ...     loss = nn.functional.cross_entropy(out, y)
        ...     return out, loss, loss
        >>> def after_step():
        ...     snaps.update(net)
        ...     sched.step()
        >>> _ = run_epoch(loader, 0, 0, step_loss, opt, after_step=after_step)
        >>> snaps.iterations
        [2]

        In a plain PyTorch loop::

        >>> for x, y in loader:
        ...     opt.zero_grad()
        ...     nn.functional.cross_entropy(net(x), y).backward()
        ...     opt.step()
        ...     taken = snaps.update(net)             # the snapshot, or None
        ...     sched.step()
        >>> snaps.iterations, len(snaps), snaps.snapshots[1].training
        ([2, 6], 2, False)
    """

    def __init__(self, model: nn.Module, cycle_iters: int, bn_loader: Optional[Iterable] = None,
                 directory: Optional[Union[str, os.PathLike]] = None, meta: Optional[Mapping[str, Any]] = None):
        """Remember the start parameters; no snapshot yet (see the class docstring)."""
        check_cycle_iters(cycle_iters)
        if bn_loader is None and has_batchnorm(model):
            raise ValueError("the network has BatchNorm: pass bn_loader (training data) so each snapshot's "
                             "statistics can be recomputed")
        self.cycle_iters, self.bn_loader, self.meta = int(cycle_iters), bn_loader, meta
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._template = model
        self._start = [p.detach().clone() for p in model.parameters()]
        self.iteration = 0
        self.snapshots: List[Snapshot] = []
        self.iterations: List[int] = []
        self.distances: List[float] = []

    def __len__(self) -> int:
        """Number of snapshots taken."""
        return len(self.snapshots)

    def update(self, model: nn.Module) -> Optional[Snapshot]:
        """Count one finished SGD step of ``model``; at a rate minimum take and return a snapshot, else None.

        ``model`` is the plain network (not its DistributedDataParallel or compiled wrapper).
        """
        k, self.iteration = self.iteration, self.iteration + 1
        if k % self.cycle_iters != self.cycle_iters // 2:
            return None
        with torch.no_grad():
            sq = sum((p.detach() - s).pow(2).sum(dtype=torch.float64) for p, s in zip(model.parameters(), self._start))
        distance = float(torch.as_tensor(sq).sqrt())
        snap = self._take(model, {"index": len(self.snapshots), "iteration": k, "distance": distance})
        self.snapshots.append(snap)
        self.iterations.append(k)
        self.distances.append(distance)
        return snap

    @torch.no_grad()
    def _take(self, model: nn.Module, info: dict) -> Snapshot:
        """Copy ``model``, recompute its BN statistics, keep it or write it (rank 0) to the directory."""
        snap = copy.deepcopy(model)
        for p in snap.parameters():
            p.grad = None
        with seeded_rng(0):  # the BN pass must not shift the training run's random stream
            recompute_bn(snap, self.bn_loader)
        frozen(snap)
        if self.directory is None:
            return snap
        path = self.directory / f"snap_{info['index']:02d}.pt"
        if not _dist.is_main():  # the same snapshot on every rank: rank 0 writes it
            return path
        if self.meta is not None and "arch" in self.meta:
            m = dict(self.meta)
            save_model(path, snap, m.pop("arch"), m.pop("arch_kwargs", {}), m.pop("input_shape"),
                       m.pop("num_classes"), **m, fge=info)
        else:
            save_checkpoint(path, "model", state_dict={k: v.detach().cpu() for k, v in snap.state_dict().items()},
                            **dict(self.meta or {}), fge=info)
        return path

    def models(self, template: Optional[nn.Module] = None) -> List[nn.Module]:
        """The snapshots as modules (paths loaded by :func:`~modeconn.evaluation.ensembles.load_members`)."""
        return load_members(self.snapshots, template)

    def state_dict(self) -> dict:
        """Steps counted and snapshots so far (state dicts, or path strings with a directory)."""
        return {"iteration": self.iteration, "iterations": list(self.iterations),
                "distances": list(self.distances),
                "snapshots": [str(s) if isinstance(s, Path) else s.state_dict() for s in self.snapshots]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` (in-memory snapshots are rebuilt on a copy of the start network)."""
        kept = list(state["snapshots"])
        if any(isinstance(s, str) != (self.directory is not None) for s in kept):
            raise ValueError("the state's snapshots and this collector differ in where snapshots are kept "
                             f"(this one: {'on disk' if self.directory is not None else 'in memory'})")
        self.snapshots = []
        for s in kept:
            if isinstance(s, str):
                self.snapshots.append(Path(s))
            else:
                net = copy.deepcopy(self._template)
                net.load_state_dict(s)
                self.snapshots.append(frozen(net))
        self.iteration = int(state["iteration"])
        self.iterations = [int(v) for v in state["iterations"]]
        self.distances = [float(v) for v in state["distances"]]


@dataclass
class FGEResult:
    """What :func:`train_fge` returns.

    Attributes:
        snapshots: one per cycle, in order: ``nn.Module`` (eval mode, BN
            statistics recomputed, ``requires_grad=False``) or, with
            ``keep_on_disk``, the ``Path`` of its checkpoint.
        lr_trace: the learning rate of every SGD step (``len = cycles * cycle_iters``).
        snapshot_iterations: 0-based step after which each snapshot was taken.
        distances: L2 norm of (snapshot parameters - start parameters), flat
            over all parameters (buffers excluded).
        history: one record per epoch: ``epoch, loss, acc, lr, iterations,
            snapshots, seconds`` (loss without the weight-decay term).
        cycle_iters, iters_per_epoch: the cycle length and the loader length.
        model: the network as training left it (after the last step).
    """

    snapshots: List[Snapshot]
    lr_trace: List[float]
    snapshot_iterations: List[int]
    distances: List[float]
    history: List[dict]
    cycle_iters: int
    iters_per_epoch: int
    model: Optional[nn.Module] = None

    @property
    def epochs(self) -> float:
        """Training budget of the run in epochs (iterations / iterations per epoch)."""
        return len(self.lr_trace) / self.iters_per_epoch

    def models(self, template: Optional[nn.Module] = None) -> List[nn.Module]:
        """The snapshots as modules (paths are loaded; see :func:`~modeconn.evaluation.ensembles.load_members`)."""
        return load_members(self.snapshots, template)


def _default_bn_loader(train_loader: Iterable) -> Iterable:
    """Fixed-order, large-batch view of all of a TensorLoader's data (same transform, every rank
    the whole set, so snapshots are identical on all ranks); else the loader."""
    if hasattr(train_loader, "full_pass"):  # TensorLoader, StreamLoader
        return train_loader.full_pass(max(train_loader.batch_size, 1024))
    return train_loader


def train_fge(model: nn.Module, train_loader: Iterable, cycles: int, cycle_epochs: Optional[int] = None,
              lr_max: float = 0.05, lr_min: float = 0.0005, momentum: float = 0.9, weight_decay: float = 5e-4,
              seed: int = 0, bn_loader: Optional[Iterable] = None,
              keep_on_disk: Optional[Union[str, os.PathLike]] = None, snapshot_meta: Optional[Mapping[str, Any]] = None,
              cycle_iters: Optional[int] = None, loss: Union[str, LossFn] = "cross_entropy",
              resume: Optional[Mapping] = None, runtime: Optional[Runtime] = None,
              hooks: Optional[Hooks] = None) -> FGEResult:
    """Fast Geometric Ensembling (Garipov et al. 2018): cyclical-rate SGD from ``model``, a snapshot per cycle.

    Runs ``cycles * C`` SGD steps on a copy of ``model`` (C = ``cycle_iters``,
    or ``cycle_epochs`` epochs of ``train_loader``), step k at
    ``cyclic_lr(k, C, lr_max, lr_min)`` (:class:`FGELR`), and takes a snapshot
    with BN statistics recomputed over ``bn_loader`` after steps
    ``c * C + C // 2`` (:class:`FGESnapshots`, which also takes
    ``keep_on_disk`` and ``snapshot_meta``). ``seed`` fixes batch order and
    dropout; ``resume`` is a ``state`` from ``hooks.on_epoch_end``. Raises
    ValueError for bad settings, FloatingPointError when the loss diverges.

    Example:
        >>> from modeconn.evaluation.ensembles import evaluate_ensemble
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> loader = TensorLoader(torch.randn(32, 4), torch.randint(0, 3, (32,)), batch_size=8)
        >>> res = train_fge(net, loader, cycles=2, cycle_epochs=1, lr_max=0.05, lr_min=0.005)
        >>> len(res.snapshots), res.snapshot_iterations, len(res.lr_trace)   # 4 steps per cycle
        (2, [2, 6], 8)
    """
    check_cycles(cycles)
    per_epoch = len(train_loader)
    if per_epoch < 1:
        raise ValueError("the training loader yields no batches")
    C = cycle_length(per_epoch, cycle_epochs, cycle_iters)
    check_schedule(C, lr_max, lr_min)
    if momentum < 0 or weight_decay < 0:
        raise ValueError(f"momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}")
    runtime, hooks, total = runtime or Runtime(), hooks or Hooks(), int(cycles) * C
    settings = {"loop": "train_fge", "cycles": int(cycles), "cycle_iters": C, "iters_per_epoch": per_epoch,
                "lr_max": float(lr_max), "lr_min": float(lr_min), "momentum": float(momentum),
                "weight_decay": float(weight_decay), "seed": int(seed), "keep_on_disk": keep_on_disk is not None}
    net = copy.deepcopy(model).to(runtime.device) if runtime.device is not None else copy.deepcopy(model)
    # a frozen start (e.g. an earlier snapshot): train all its parameters
    params = [p for p in net.parameters() if p.requires_grad] or [p.requires_grad_(True) for p in net.parameters()]
    ddp = runtime.use_ddp(train_loader)
    forward = _dist.wrap_ddp(net) if ddp else net
    optimizer = torch.optim.SGD(params, lr=lr_max, momentum=momentum, weight_decay=weight_decay)
    scheduler = FGELR(optimizer, C, lr_max, lr_min)
    snaps = FGESnapshots(net, C, bn_loader if bn_loader is not None else _default_bn_loader(train_loader),
                         keep_on_disk, snapshot_meta)
    step = model_step(torch.compile(forward) if runtime.compile else forward, loss, runtime, params[0].device)
    with seeded_rng(seed):
        history = run_sgd(net, train_loader, -(-total // per_epoch), step, optimizer, scheduler, seed=seed,
                          settings=settings, hooks=hooks, resume=resume, ddp=ddp, per_step=True,
                          total_steps=total, extra_parts={"snapshots": snaps}, after_step=lambda: snaps.update(net),
                          epoch_fields=lambda: {"iterations": snaps.iteration, "snapshots": len(snaps)},
                          advice=f"lower lr_max (lr_max={lr_max})")
    for p in net.parameters():
        p.grad = None
    lr_trace = [cyclic_lr(k, C, lr_max, lr_min) for k in range(total)]
    return FGEResult(list(snaps.snapshots), lr_trace, list(snaps.iterations), list(snaps.distances), history,
                     C, per_epoch, net.eval())
