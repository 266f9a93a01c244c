"""Training loops: endpoints (``train_model``) and curves (``fit_curve``).

Both are the same loop (``_run``): SGD with momentum, a per-epoch learning
rate schedule, per-epoch history, and a resumable state handed to a callback
at the end of every epoch. Batch order and the curve's t samples depend only
on ``(seed, epoch)``, so a run resumed from the state of epoch k ends exactly
where an uninterrupted run does.

The curve loss is the expected loss over t ~ U(0, 1) (one t per mini-batch)
plus ``0.5 * wd * ||θ(t)||²`` at the sampled point (Garipov et al. 2018), not
weight decay on the bends.

Under torchrun (a process group of several ranks, see
:mod:`modeconn.distributed`) the model, or the curve's free bends, is wrapped
in ``DistributedDataParallel``; each rank iterates its shard of every global
batch (``TensorLoader(rank=, world_size=)``), the t of a step is the same on
every rank (drawn from the ``(seed, epoch)`` generator), DDP averages the
gradients over equal-size shards, and the epoch's loss and accuracy are summed
over ranks: the run takes the steps of a single process with the global batch.
Rank-specific randomness (dropout) is reseeded per ``(seed, epoch, rank)`` at
every epoch so a resumed run repeats it. ``amp`` runs the forward under bf16
autocast, ``compile`` through ``torch.compile``; both are off by default.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Iterable, List, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from modeconn.runtime import distributed as _dist
from modeconn.core.curve_model import CurveModel
from modeconn.data import epoch_generator

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SCHEDULES = ("reference", "cosine", "constant")


def reference_lr_factor(epoch: int, epochs: int) -> float:
    """Garipov et al.'s schedule: 1 for the first half, linear to 0.01 at 90%, then 0.01.

    ``epoch`` counts from 0; the factor applies to that whole epoch.
    """
    alpha = epoch / epochs
    if alpha <= 0.5:
        return 1.0
    if alpha <= 0.9:
        return 1.0 - (alpha - 0.5) / 0.4 * 0.99
    return 0.01


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int):
    """A per-epoch ``torch.optim.lr_scheduler`` for the named schedule."""
    if schedule == "reference":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: reference_lr_factor(e, epochs))
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")


def get_loss(loss: Union[str, LossFn]) -> LossFn:
    """'cross_entropy' (classification), 'mse' (regression) or a callable."""
    if callable(loss):
        return loss
    if loss == "cross_entropy":
        return F.cross_entropy
    if loss == "mse":
        return lambda out, y: F.mse_loss(out, y.reshape(out.shape).to(out.dtype))
    raise ValueError(f"unknown loss {loss!r}; use 'cross_entropy', 'mse' or a callable")


def _is_classification(out: torch.Tensor, y: torch.Tensor) -> bool:
    return out.dim() == 2 and not y.is_floating_point()


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on ``device`` when ``amp``; otherwise a no-op context."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def use_ddp(distributed: Optional[bool], loader=None) -> bool:
    """Whether to wrap in DDP: ``None`` = inside a process group of several ranks."""
    if distributed is None:
        distributed = _dist.active()
    elif distributed and not _dist.is_initialized():
        raise ValueError("distributed=True needs an initialised process group "
                         "(run under torchrun and call modeconn.distributed.init_from_env())")
    if distributed and loader is not None:
        _dist.check_sharded(loader)
    return bool(distributed)


class _CurveStep(nn.Module):
    """What DDP wraps for a curve: θ(t) from the free bends (the only parameter), then the net at θ(t).

    θ(t) stays in float32 (it is also the weight-decay penalty's input); with
    ``amp`` only the network's forward runs under bf16 autocast.
    """

    def __init__(self, curve: CurveModel, amp: bool = False, weight_decay: float = 0.0):
        super().__init__()
        self.curve, self.amp, self.weight_decay = curve, bool(amp), float(weight_decay)

    def forward(self, x, t):
        flat = self.curve.training_point(t, self.weight_decay)
        with autocast(flat.device, self.amp):
            out = self.curve.forward_flat(x, flat)
        return out.float() if self.amp else out, flat


def run_epoch(loader, epoch: int, seed: int, step_loss: Callable, optimizer: torch.optim.Optimizer,
              ddp: bool = False, progress=None, before_step: Optional[Callable[[], None]] = None,
              after_step: Optional[Callable[[], None]] = None, max_steps: Optional[int] = None) -> dict:
    """One epoch of SGD steps, shared by every training loop (endpoints, curves, FGE).

    ``step_loss(x, y, generator) -> (output, objective, logged_loss)``; the
    generator depends only on ``(seed, epoch)`` (the curve's t samples).
    ``before_step`` / ``after_step`` run around each step (FGE sets the rate
    and takes snapshots there); at most ``max_steps`` steps. Returns
    ``{"epoch", "loss", "acc"}`` averaged over the epoch's samples, summed
    over ranks under DDP (the history of one process with the global batch).
    """
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if ddp:  # dropout etc.: different on every rank, repeatable on resume
        torch.manual_seed(_dist.rank_seed(seed, epoch))
    gen = epoch_generator(seed, epoch, stream=1000)
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.long)
    count, steps, classify = 0, 0, True
    for x, y in loader:
        if max_steps is not None and steps >= max_steps:
            break
        if before_step is not None:
            before_step()
        out, objective, data_loss = step_loss(x, y, gen)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        with torch.no_grad():
            loss_sum = loss_sum + data_loss.detach().double().cpu() * len(y)
            classify = classify and _is_classification(out, y)
            if classify:
                correct = correct + (out.argmax(1) == y).sum().cpu()
        count += len(y)
        steps += 1
        if after_step is not None:
            after_step()
        if progress is not None:
            progress.update(1)
    if ddp:
        sums = _dist.all_reduce_sum(torch.stack([loss_sum, correct.double(),
                                                 torch.tensor(float(count), dtype=torch.float64)]))
        loss_sum, correct, count = sums[0], sums[1], int(sums[2])
    return {"epoch": epoch + 1, "loss": float(loss_sum) / max(count, 1),
            "acc": float(correct) / max(count, 1) if classify else float("nan")}


def check_finite(record: dict, advice: str) -> None:
    if not math.isfinite(record["loss"]):
        raise FloatingPointError(f"training loss became {record['loss']} in epoch {record['epoch']}; {advice}")


def _run(module: nn.Module, params: List[torch.Tensor], loader, epochs: int, lr: float,
         step_loss: Callable, optimizer_wd: float, momentum: float, schedule: str, seed: int,
         on_epoch_end: Optional[Callable], progress, resume: Optional[Mapping], ddp: bool = False,
         same_on_all_ranks: Optional[Callable[[], float]] = None) -> List[dict]:
    """The loop. With ``ddp`` the epoch's sums are all-reduced and ``same_on_all_ranks()`` (a
    number every rank must agree on, e.g. the sum of the epoch's t) is checked across ranks."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if lr <= 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a positive number, got {lr}")
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=optimizer_wd)
    scheduler = make_scheduler(optimizer, schedule, epochs)
    history: List[dict] = []
    first = 0
    if resume is not None:
        module.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["rng"])
        history = list(resume["history"])
        first = int(resume["epoch"]) + 1
        if progress is not None:
            progress.update(first * len(loader))
    for epoch in range(first, epochs):
        t0 = time.perf_counter()
        module.train()
        record = run_epoch(loader, epoch, seed, step_loss, optimizer, ddp, progress)
        if ddp and same_on_all_ranks is not None:
            _dist.check_same(same_on_all_ranks(), f"the t samples of epoch {epoch + 1}")
        record["lr"] = optimizer.param_groups[0]["lr"]
        check_finite(record, f"lower the learning rate (lr={lr})")
        scheduler.step()
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        if on_epoch_end is not None:
            state = {"epoch": epoch, "model": module.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                     "history": list(history)}
            on_epoch_end(record, state)
    return history


def train_model(model: nn.Module, train_loader: Iterable, epochs: int = 20, lr: float = 0.05,
                weight_decay: float = 5e-4, momentum: float = 0.9, schedule: str = "reference",
                loss: Union[str, LossFn] = "cross_entropy", seed: int = 0,
                on_epoch_end: Optional[Callable[[dict, dict], None]] = None, progress=None,
                resume: Optional[Mapping] = None, distributed: Optional[bool] = None, amp: bool = False,
                compile: bool = False) -> List[dict]:
    """Train an endpoint network with SGD; returns the per-epoch history.

    History records hold ``epoch, lr, loss, acc, seconds`` (loss without the
    weight-decay term; acc is NaN for non-classification outputs).
    ``on_epoch_end(record, state)`` receives each epoch's record and a state
    dict to pass back as ``resume=`` after an interruption. ``progress`` is a
    tqdm-like object updated once per step.

    ``distributed``: wrap the model in ``DistributedDataParallel`` (default
    ``None``: when a process group of several ranks is initialised; the loader
    must then be sharded for this rank). BatchNorm layers normalise with the
    statistics of each rank's share of the batch (plain DDP; running
    statistics are broadcast from rank 0). ``amp``: bf16 autocast for the
    forward. ``compile``: run the model through ``torch.compile``.
    """
    loss_fn = get_loss(loss)
    params = [p for p in model.parameters() if p.requires_grad]
    ddp = use_ddp(distributed, train_loader)
    device = params[0].device if params else torch.device("cpu")
    net = _dist.wrap_ddp(model) if ddp else model
    if compile:
        net = torch.compile(net)

    def step(x, y, gen):
        with autocast(device, amp):
            out = net(x)
        if amp:
            out = out.float()
        value = loss_fn(out, y)
        return out, value, value

    return _run(model, params, train_loader, epochs, lr, step, weight_decay, momentum, schedule, seed,
                on_epoch_end, progress, resume, ddp=ddp)


def fit_curve(curve: CurveModel, train_loader: Iterable, epochs: int = 20, lr: float = 0.03,
              weight_decay: float = 5e-4, momentum: float = 0.9, schedule: str = "reference",
              loss: Union[str, LossFn] = "cross_entropy", seed: int = 0,
              on_epoch_end: Optional[Callable[[dict, dict], None]] = None, progress=None,
              resume: Optional[Mapping] = None, distributed: Optional[bool] = None, amp: bool = False,
              compile: bool = False) -> List[dict]:
    """Train the free bends of ``curve`` to minimise E_{t~U(0,1)} L(θ(t)).

    One t per mini-batch; the penalty ``0.5 * weight_decay * ||θ(t)||²`` is
    applied at the sampled point. Same callbacks as :func:`train_model`.

    ``distributed`` (default: inside a process group of several ranks): DDP
    over the curve's one parameter, ``free_bends``; the fixed bends and the
    template's buffers are broadcast from rank 0 once and not synchronised
    afterwards (running BN statistics of the template play no part in curve
    training). Every rank draws the same t at every step (checked once per
    epoch). ``amp``: bf16 autocast for the network's forward (θ(t) stays
    float32). ``compile``: ``torch.compile`` of the step (θ(t) and forward).
    """
    if not curve.free_idx:
        raise ValueError("the curve has no free bends to train (every bend is fixed)")
    loss_fn = get_loss(loss)
    device = curve.fixed_bends.device
    ddp = use_ddp(distributed, train_loader)
    stepper: nn.Module = _CurveStep(curve, amp, weight_decay)
    if ddp:  # bends and buffers copied from rank 0 once, buffers not re-broadcast every step
        stepper = _dist.wrap_ddp(stepper, sync_buffers_every_step=False)
    if compile:
        stepper = torch.compile(stepper)
    drawn = {"t_sum": 0.0}

    def step(x, y, gen):
        t = torch.rand((), generator=gen)
        drawn["t_sum"] += float(t)  # a CPU number: no device synchronisation
        out, _ = stepper(x, t.to(device))  # the weight-decay gradient comes from training_point's backward
        value = loss_fn(out, y)
        return out, value, value

    def epoch_t_sum() -> float:
        value, drawn["t_sum"] = drawn["t_sum"], 0.0
        return value

    return _run(curve, [curve.free_bends], train_loader, epochs, lr, step, 0.0, momentum, schedule, seed,
                on_epoch_end, progress, resume, ddp=ddp, same_on_all_ranks=epoch_t_sum)
