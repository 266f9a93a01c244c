"""Ensembles: Fast Geometric Ensembling (FGE) and ensemble evaluation.

FGE (Garipov et al. 2018) starts from one trained network and keeps training
it with SGD under a piecewise-linear *cyclical* learning rate; at each minimum
of the rate it takes a snapshot. The snapshots lie along a low-loss path
around the start and their averaged predictions form an ensemble that costs a
few extra epochs instead of several independent trainings.

Pieces, each usable alone:

* :func:`cyclic_lr` — the rate of one iteration (a pure function);
* :func:`snapshot_iterations` — which iterations end with a snapshot;
* :func:`fge` — the training loop (resumable at every epoch) -> :class:`FGEResult`;
* :func:`evaluate_ensemble` — accuracy, NLL and calibration of an ensemble
  as members are added, in one pass over the data -> :class:`EnsembleResult`;
* :func:`curve_ensemble` — the point networks of a fitted curve, BN
  statistics recomputed per point, ready for :func:`evaluate_ensemble`.

Snapshots' BatchNorm statistics are recomputed over training data when they
are taken (exact average, :func:`modeconn.bn.recompute_bn`); the running
statistics SGD leaves behind belong to the weights of many steps ago.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import TensorLoader
from ..evaluation.bn import has_batchnorm, recompute_bn
from ..evaluation.ensembles import ECE_BINS, Member, frozen, load_members
from ..runtime import distributed as _dist
from ..runtime.checkpoints import load_model, load_state_dict, save_checkpoint, save_model
from .loop import LossFn, autocast, check_finite, get_loss, run_epoch, use_ddp

__all__ = ["cyclic_lr", "snapshot_iterations", "cycle_length", "fge", "FGEResult"]


# ------------------------------------------------------------------ schedule
def _check_schedule(cycle_iters: int, lr_max: float, lr_min: float) -> None:
    if isinstance(cycle_iters, bool) or int(cycle_iters) != cycle_iters or cycle_iters < 2:
        raise ValueError(f"a cycle needs an integer number of iterations >= 2, got {cycle_iters}")
    for name, v in (("lr_max", lr_max), ("lr_min", lr_min)):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    if lr_max <= 0:
        raise ValueError(f"lr_max must be > 0, got {lr_max}")
    if lr_min > lr_max:
        raise ValueError(f"lr_min ({lr_min}) must not exceed lr_max ({lr_max})")


def cyclic_lr(iteration: int, cycle_iters: int, lr_max: float, lr_min: float) -> float:
    """Learning rate of SGD step ``iteration`` (0-based) under FGE's cyclical schedule.

    With ``C = cycle_iters`` and the position in the cycle ``s = (iteration mod C) / C``
    (``s`` in ``[0, 1)``), the rate is piecewise linear in ``s``::

        s <= 1/2:  lr = (1 - 2s) * lr_max + 2s * lr_min        (lr_max -> lr_min)
        s >  1/2:  lr = (2 - 2s) * lr_min + (2s - 1) * lr_max  (lr_min -> lr_max)

    so every cycle starts at ``lr_max``, reaches ``lr_min`` at its middle
    (``s = 1/2``, exactly hit when C is even) and climbs back towards
    ``lr_max``, which the first step of the next cycle uses.

    This is the reference ``utils.cyclic_learning_rate`` of
    ``dnn-mode-connectivity``: there the rate of batch ``i`` of ``n`` in epoch
    ``e`` is ``schedule(i / n)`` with ``t = ((e mod cycle) + i/n) / cycle`` —
    the same ``s`` counted in iterations, ``C = cycle * n`` (its ``t < 0.5``
    branch agrees with ours at ``s = 1/2``, where both give ``lr_min``).
    Unlike the reference, ``C`` may be any integer >= 2 (odd cycle lengths in
    epochs included). For odd C no step has ``s = 1/2``; the two middle steps
    ``(C-1)/2`` and ``(C+1)/2`` share the lowest rate ``lr_min + (lr_max - lr_min)/C``.
    """
    _check_schedule(cycle_iters, lr_max, lr_min)
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
    """
    _check_cycles(cycles)
    if isinstance(cycle_iters, bool) or int(cycle_iters) != cycle_iters or cycle_iters < 2:
        raise ValueError(f"a cycle needs an integer number of iterations >= 2, got {cycle_iters}")
    C = int(cycle_iters)
    return [c * C + C // 2 for c in range(int(cycles))]


def _check_cycles(cycles: int) -> None:
    if isinstance(cycles, bool) or int(cycles) != cycles or cycles < 1:
        raise ValueError(f"cycles must be an integer >= 1, got {cycles}")


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


# ---------------------------------------------------------------------- FGE
@dataclass
class FGEResult:
    """What :func:`fge` returns.

    Attributes:
        snapshots: one per cycle, in order: ``nn.Module`` (eval mode, BN
            statistics recomputed, ``requires_grad=False``) or, with
            ``keep_on_disk``, the ``Path`` of its checkpoint.
        lr_trace: the learning rate of every SGD step (``len = cycles * cycle_iters``).
        snapshot_iterations: 0-based step after which each snapshot was taken.
        distances: L2 norm of (snapshot parameters - start parameters), flat
            over all parameters (buffers excluded).
        history: one record per epoch: ``epoch, iterations, lr, loss, acc,
            snapshots, seconds`` (loss without the weight-decay term).
        cycle_iters, iters_per_epoch: the cycle length and the loader length.
        model: the network as training left it (after the last step).
    """

    snapshots: List[Union[nn.Module, Path]]
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
        """The snapshots as modules (paths are loaded; see :func:`load_members`)."""
        return load_members(self.snapshots, template)


def _param_distance(a: nn.Module, start: Sequence[torch.Tensor]) -> float:
    with torch.no_grad():
        sq = sum((p.detach() - s).pow(2).sum(dtype=torch.float64) for p, s in zip(a.parameters(), start))
    return float(torch.as_tensor(sq).sqrt())


def _default_bn_loader(train_loader: Iterable) -> Iterable:
    """Fixed-order, large-batch view of all of a TensorLoader's data (same transform, every rank
    the whole set, so snapshots are identical on all ranks); else the loader."""
    if isinstance(train_loader, TensorLoader):
        return TensorLoader(train_loader.x, train_loader.y, batch_size=max(train_loader.batch_size, 1024),
                            shuffle=False, seed=train_loader.seed, transform=train_loader.transform)
    return train_loader


def _rng_devices(model: nn.Module) -> List[int]:
    p = next(model.parameters(), None)
    return [p.device.index or 0] if p is not None and p.device.type == "cuda" else []


def train_fge(model: nn.Module, train_loader: Iterable, cycles: int, cycle_epochs: Optional[int] = None,
        lr_max: float = 0.05, lr_min: float = 0.0005, momentum: float = 0.9, weight_decay: float = 5e-4,
        seed: int = 0, bn_loader: Optional[Iterable] = None,
        keep_on_disk: Optional[Union[str, os.PathLike]] = None,
        on_snapshot: Optional[Callable[[int, Any, dict], None]] = None,
        on_epoch_end: Optional[Callable[[dict, dict], None]] = None, progress=None,
        resume: Optional[Mapping] = None, cycle_iters: Optional[int] = None,
        loss: Union[str, LossFn] = "cross_entropy",
        snapshot_meta: Optional[Mapping[str, Any]] = None, distributed: Optional[bool] = None,
        amp: bool = False, compile: bool = False) -> FGEResult:
    """Fast Geometric Ensembling: cyclical-rate SGD from a trained network, one snapshot per cycle.

    Args:
        model: the pre-trained start network. It is **not modified**: training
            runs on a copy (returned as ``result.model``).
        train_loader: training batches ``(x, y)``; ``len(train_loader)`` is the
            number of iterations per epoch. If it has ``set_epoch`` it is
            called with 0, 1, 2, ... before each epoch (the batch order of a
            :class:`~modeconn.data.TensorLoader` depends only on its seed and the epoch).
        cycles: number of cycles = number of snapshots (>= 1).
        cycle_epochs: cycle length in epochs (any integer >= 1, odd included),
            or give ``cycle_iters`` (any integer >= 2) instead. The run lasts
            ``cycles * C`` SGD steps (C = iterations per cycle); with
            ``cycle_iters`` the last epoch may be partial.
        lr_max, lr_min: rate at the cycle boundaries and at the cycle middle;
            the rate of step k is ``cyclic_lr(k, C, lr_max, lr_min)``, set per iteration.
        momentum, weight_decay: of ``torch.optim.SGD`` (a fresh optimizer:
            momentum buffers start at zero).
        seed: seeds the global torch RNG inside the run (dropout etc.); the
            caller's RNG state is restored afterwards.
        bn_loader: data for the snapshots' BatchNorm statistics (exact
            average over it). Default: the training loader's samples in fixed
            order, batches of >= 1024, same transform — pass the un-augmented
            training set (``Dataset.eval_loader("train")``) when the training
            loader augments. Unused for networks without BatchNorm.
        keep_on_disk: a directory; snapshots are written there as
            ``snap_XX.pt`` (XX from 00) and kept as paths instead of modules.
            With ``snapshot_meta`` (``arch, arch_kwargs, input_shape,
            num_classes`` and optionally ``dataset, seed``) they are full
            model checkpoints for :func:`~modeconn.checkpoint.load_model`;
            without, ``'model'`` checkpoints holding the state dict (load
            them with a template, :func:`load_members`).
        on_snapshot: ``f(index, snapshot, info)`` after each snapshot;
            ``info`` holds ``iteration, epoch, lr, distance`` and ``model`` (the
            live training network; do not modify it).
        on_epoch_end: ``f(record, state)`` after every epoch; ``state`` is a
            dict of copies (network, optimizer, RNG, iterations, learning
            rates, snapshots so far as state dicts or path strings, history)
            to pass back as ``resume=`` after an interruption. A resumed run
            takes the same steps and snapshots as an uninterrupted one (same
            loader, seed, settings).
        progress: tqdm-like object, ``update(1)`` per step.
        resume: a ``state`` from ``on_epoch_end``; pass ``model`` = the same
            start network (distances are measured from it).
        loss: ``"cross_entropy"``, ``"mse"`` or ``f(output, y) -> scalar``.
        distributed: wrap the training network in ``DistributedDataParallel``
            (default ``None``: inside a process group of several ranks; the
            training loader must be sharded for this rank, the BN loader
            should hold all the data). Epoch loss/accuracy are summed over
            ranks; snapshots are taken on every rank (the same weights, the
            same BN statistics) and only rank 0 writes ``keep_on_disk`` files.
        amp, compile: bf16 autocast for the forward; ``torch.compile`` of the network.

    Returns:
        :class:`FGEResult`.

    Raises:
        ValueError: cycles < 1, a cycle shorter than 2 iterations, lr_min >
            lr_max, bad rates, an empty loader, or a ``resume`` state from
            different settings.
        FloatingPointError: the training loss became NaN/inf.
    """
    _check_cycles(cycles)
    iters_per_epoch = len(train_loader)
    if iters_per_epoch < 1:
        raise ValueError("the training loader yields no batches")
    C = cycle_length(iters_per_epoch, cycle_epochs, cycle_iters)
    _check_schedule(C, lr_max, lr_min)
    if momentum < 0 or weight_decay < 0:
        raise ValueError(f"momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}")
    loss_fn = get_loss(loss)
    total = int(cycles) * C
    n_epochs = -(-total // iters_per_epoch)
    snap_at = set(snapshot_iterations(cycles, C))
    settings = {"cycles": int(cycles), "cycle_iters": C, "iters_per_epoch": iters_per_epoch,
                "lr_max": float(lr_max), "lr_min": float(lr_min), "momentum": float(momentum),
                "weight_decay": float(weight_decay), "seed": int(seed), "keep_on_disk": keep_on_disk is not None}
    disk = Path(keep_on_disk) if keep_on_disk is not None else None
    if disk is not None:
        disk.mkdir(parents=True, exist_ok=True)
    if bn_loader is None:
        bn_loader = _default_bn_loader(train_loader)

    start_params = [p.detach().clone() for p in model.parameters()]
    net = copy.deepcopy(model)
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:  # e.g. a frozen snapshot as the start: train everything
        params = list(net.parameters())
        for p in params:
            p.requires_grad_(True)
    ddp = use_ddp(distributed, train_loader)
    forward = _dist.wrap_ddp(net) if ddp else net
    if compile:
        forward = torch.compile(forward)
    device = params[0].device
    optimizer = torch.optim.SGD(params, lr=lr_max, momentum=momentum, weight_decay=weight_decay)

    snapshots: List[Union[nn.Module, Path]] = []
    snap_states: List[Any] = []  # what the resume state carries: state dicts or path strings
    lr_trace: List[float] = []
    snap_iters: List[int] = []
    distances: List[float] = []
    history: List[dict] = []
    first_epoch, it = 0, 0

    with torch.random.fork_rng(devices=_rng_devices(model)):
        torch.manual_seed(seed)
        if resume is not None:
            old = dict(resume.get("fge", {}))
            diff = [k for k in settings if k in old and old[k] != settings[k]]
            if diff or not old:
                raise ValueError("resume state comes from a run with different settings: " + ", ".join(
                    f"{k}={settings[k]!r} (was {old.get(k)!r})" for k in diff) if diff else
                    "resume state has no FGE settings (not from train_fge())")
            net.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            torch.set_rng_state(resume["rng"])
            lr_trace = [float(v) for v in resume["lr_trace"]]
            snap_iters = [int(v) for v in resume["snapshot_iterations"]]
            distances = [float(v) for v in resume["distances"]]
            history = [dict(r) for r in resume["history"]]
            it = int(resume["iteration"])
            first_epoch = int(resume["epoch"]) + 1
            for s in resume["snapshots"]:
                if disk is not None:
                    snapshots.append(Path(s))
                    snap_states.append(str(s))
                else:
                    m = copy.deepcopy(model)
                    m.load_state_dict(s)
                    snapshots.append(frozen(m))
                    snap_states.append(m.state_dict())
            if len(lr_trace) != it or it != min(first_epoch * iters_per_epoch, total):
                raise ValueError(f"inconsistent resume state: {it} iterations after epoch {first_epoch}")
            if progress is not None:
                progress.update(it)

        def step_loss(x, y, gen):
            with autocast(device, amp):
                out = forward(x)
            value = loss_fn(out.float() if amp else out, y)
            return out, value, value

        def set_rate():
            lr = cyclic_lr(it, C, lr_max, lr_min)
            for g in optimizer.param_groups:
                g["lr"] = lr
            lr_trace.append(lr)

        def after_step():
            nonlocal it
            if it in snap_at:
                info = {"iteration": it, "epoch": epoch, "lr": lr_trace[-1]}
                snap = _take_snapshot(net, bn_loader, len(snapshots), disk, snapshot_meta, info,
                                      write=_dist.is_main() or not ddp)
                distances.append(_param_distance(net, start_params))  # snapshot weights = net's now
                snap_iters.append(it)
                snapshots.append(snap)
                snap_states.append(snap.state_dict() if isinstance(snap, nn.Module) else str(snap))
                if on_snapshot is not None:
                    on_snapshot(len(snapshots) - 1, snap, {**info, "distance": distances[-1], "model": net})
            it += 1

        for epoch in range(first_epoch, n_epochs):
            t0 = time.perf_counter()
            net.train()
            record = run_epoch(train_loader, epoch, seed, step_loss, optimizer, ddp, progress,
                               before_step=set_rate, after_step=after_step, max_steps=total - it)
            record.update({"iterations": it, "lr": lr_trace[-1] if lr_trace else lr_max,
                           "snapshots": len(snapshots)})
            check_finite(record, f"lower lr_max (lr_max={lr_max})")
            record["seconds"] = time.perf_counter() - t0
            history.append(record)
            if on_epoch_end is not None:
                state = {"epoch": epoch, "iteration": it, "fge": dict(settings),
                         "model": {k: v.detach().clone() for k, v in net.state_dict().items()},
                         "optimizer": copy.deepcopy(optimizer.state_dict()),
                         "rng": torch.get_rng_state(), "lr_trace": list(lr_trace),
                         "snapshot_iterations": list(snap_iters), "distances": list(distances),
                         "snapshots": list(snap_states), "history": [dict(r) for r in history]}
                on_epoch_end(record, state)

    for p in net.parameters():
        p.grad = None
    net.eval()
    return FGEResult(snapshots, lr_trace, snap_iters, distances, history, C, iters_per_epoch, net)


@torch.no_grad()
def _take_snapshot(net: nn.Module, bn_loader: Iterable, index: int, disk: Optional[Path],
                   meta: Optional[Mapping[str, Any]], info: dict, write: bool = True) -> Union[nn.Module, Path]:
    """Copy the training network, recompute its BN statistics; keep it or write it to ``disk``
    (``write=False``: only return the path another rank writes)."""
    snap = copy.deepcopy(net)
    for p in snap.parameters():
        p.grad = None
    with torch.random.fork_rng(devices=_rng_devices(net)):  # the BN pass must not shift training's RNG
        recompute_bn(snap, bn_loader)
    frozen(snap)
    if disk is None:
        return snap
    path = disk / f"snap_{index:02d}.pt"
    if not write:
        return path
    fields = {"fge": {"index": index, **info}}
    if meta is not None and "arch" in meta:
        m = dict(meta)
        save_model(path, snap, m.pop("arch"), m.pop("arch_kwargs", {}), m.pop("input_shape"),
                   m.pop("num_classes"), **m, **fields)
    else:
        save_checkpoint(path, "model", state_dict={k: v.detach().cpu() for k, v in snap.state_dict().items()},
                        **dict(meta or {}), **fields)
    return path


