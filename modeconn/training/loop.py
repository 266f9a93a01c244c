"""Training loops: endpoints (:func:`train_model`) and curves (:func:`fit_curve`).

Both, and FGE (:func:`~modeconn.training.fge.train_fge`), are one loop
(:func:`run_sgd` over epochs of :func:`run_epoch`): SGD with momentum, a
learning-rate scheduler stepped per epoch (or per iteration for FGE),
per-epoch history, and at the end of every epoch the resumable state of
:func:`~modeconn.training.state.capture_state` handed to
``hooks.on_epoch_end``. Batch order and the curve's t samples depend only on
``(seed, epoch)`` and the state carries the global RNG, so a run resumed from
the state of epoch k ends exactly where an uninterrupted run does.

The curve loss is the expected loss over t ~ U(0, 1) (one t per mini-batch)
plus ``0.5 * wd * ||θ(t)||²`` at the sampled point (Garipov et al. 2018), not
weight decay on the bends.

Under torchrun (a process group of several ranks, see
:mod:`modeconn.runtime.distributed`) the model, or the curve's free bends, is
wrapped in ``DistributedDataParallel``; each rank iterates its shard of every
global batch (``TensorLoader(rank=, world_size=)``), the t of a step is the
same on every rank (drawn from the ``(seed, epoch)`` generator), DDP averages
the gradients over equal-size shards, and the epoch's loss and accuracy are
summed over ranks: the run takes the steps of a single process with the global
batch. Rank-specific randomness (dropout) is reseeded per ``(seed, epoch,
rank)`` at every epoch so a resumed run repeats it. ``Runtime(amp=True)``
runs the forward under bf16 autocast, ``Runtime(compile=True)`` through
``torch.compile``; both are off by default.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from modeconn.core.curve_model import CurveModel
from modeconn.data import epoch_generator
from modeconn.evaluation.adversarial import adversarial_step_loss, curve_attack
from modeconn.evaluation.model import token_cross_entropy
from modeconn.runtime import Hooks, Runtime
from modeconn.runtime import distributed as _dist
from modeconn.training.sam import SAM, sam_step_loss
from modeconn.training.schedules import make_scheduler, warmup_scheduler
from modeconn.training.state import capture_state, restore_state

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepLoss = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple]

__all__ = ["train_model", "fit_curve", "curve_training", "run_epoch", "run_sgd", "get_loss", "model_step"]


def get_loss(loss: Union[str, LossFn]) -> LossFn:
    """'cross_entropy' (classification; per token for language models, see
    :func:`~modeconn.evaluation.model.token_cross_entropy`), 'mse' (regression) or a callable."""
    if callable(loss):
        return loss
    if loss == "cross_entropy":
        return token_cross_entropy
    if loss == "mse":
        return lambda out, y: F.mse_loss(out, y.reshape(out.shape).to(out.dtype))
    raise ValueError(f"unknown loss {loss!r}; use 'cross_entropy', 'mse' or a callable")


def _is_classification(out: torch.Tensor, y: torch.Tensor) -> bool:
    """Logits ``[B, K]`` with integer labels, or ``[B, T, V]`` with token labels ``[B, T]``: accuracy is defined."""
    return (out.dim() == 2 or out.dim() == y.dim() + 1 == 3) and not y.is_floating_point()


def model_step(net: nn.Module, loss: Union[str, LossFn], runtime: Runtime, device: torch.device) -> StepLoss:
    """The ``step_loss`` of a plain network for :func:`run_epoch`: batch to ``device``, forward, loss.

    The forward runs under ``runtime.autocast`` (its output cast back to
    float32 for the loss); the objective is the data loss itself (weight
    decay is the optimizer's).
    """
    loss_fn = get_loss(loss)

    def step(x, y, generator):
        """(output, objective, logged loss) of one batch."""
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with runtime.autocast(device):
            out = net(x)
        value = loss_fn(out.float() if runtime.amp else out, y)
        return out, value, value

    return step


class _EpochTally:
    """An epoch's sums (loss, correct predictions, samples) and its first step with a NaN/Inf loss."""

    def __init__(self) -> None:
        """Nothing seen yet."""
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.correct = torch.zeros((), dtype=torch.float64)
        self.bad = torch.zeros((), dtype=torch.long)  # first step (1-based) with a non-finite loss; 0: none
        self.count, self.classify, self.lrs = 0, True, []

    @torch.no_grad()
    def add(self, out: torch.Tensor, y: torch.Tensor, data_loss: torch.Tensor, lr: float) -> None:
        """One step's batch: its output, labels, mean loss, and the learning rate it was taken with."""
        step = data_loss.detach().double().cpu()
        self.loss_sum = self.loss_sum + step * len(y)
        self.lrs.append(lr)
        self.bad = torch.where((self.bad == 0) & ~torch.isfinite(step), torch.tensor(len(self.lrs)), self.bad)
        self.classify = self.classify and _is_classification(out, y)
        if self.classify:
            y = y.to(out.device)
            hits, valid = (out.argmax(-1) == y).double().reshape(len(y), -1), (y >= 0).double().reshape(len(y), -1)
            # a sequence counts the fraction of its tokens predicted (those with a target: masked-LM
            # positions without one carry -100)
            self.correct = self.correct + (hits.sum(1) / valid.sum(1).clamp_min(1)).sum().cpu()
        self.count += len(y)

    def record(self, epoch: int, lr: float, ddp: bool) -> dict:
        """The epoch's record (sums over ranks with ``ddp``; ``lr``: the last step's, else the given one);
        see :func:`run_epoch`."""
        loss_sum, correct, count = self.loss_sum, self.correct, self.count
        lr = self.lrs[-1] if self.lrs else lr
        if ddp:
            sums = _dist.all_reduce_sum(torch.stack([loss_sum, correct.double(),
                                                     torch.tensor(float(count), dtype=torch.float64)]))
            loss_sum, correct, count = sums[0], sums[1], int(sums[2])
        record = {"epoch": epoch + 1, "loss": float(loss_sum) / max(count, 1),
                  "acc": float(correct) / max(count, 1) if self.classify else float("nan"), "lr": float(lr)}
        if int(self.bad):
            record.update(bad_step=int(self.bad), bad_lr=self.lrs[int(self.bad) - 1])
        return record


def run_epoch(loader: Iterable, epoch: int, seed: int, step_loss: StepLoss, optimizer: torch.optim.Optimizer,
              ddp: bool = False, hooks: Optional[Hooks] = None, after_step: Optional[Callable[[], Any]] = None,
              max_steps: Optional[int] = None) -> dict:
    """One epoch of SGD steps, shared by every training loop (endpoints, curves, FGE).

    Args:
        loader: batches ``(x, y)``; its ``set_epoch(epoch)`` is called first when it has one.
        epoch: 0-based epoch index (batch order and the generator depend on it).
        seed: the run's seed.
        step_loss: ``f(x, y, generator) -> (output, objective, logged_loss)``;
            the generator depends only on ``(seed, epoch)`` (the curve's t samples).
        optimizer: zeroed, back-propagated and stepped once per batch.
        ddp: sum the epoch's loss and accuracy over ranks, reseed the global
            RNG per ``(seed, epoch, rank)`` first.
        hooks: ``hooks.advance(1)`` after every step.
        after_step: called after every ``optimizer.step()`` (an iteration
            scheduler's ``step``, FGE's snapshots).
        max_steps: stop after this many steps.

    Returns:
        ``{"epoch": epoch + 1, "loss", "acc", "lr"}``: loss and accuracy averaged
        over the epoch's samples (acc NaN for non-classification outputs), lr
        of the last step; when a step's loss was NaN/Inf also ``bad_step``
        (the first such step, 1-based) and ``bad_lr`` (its learning rate).
    """
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if ddp:  # dropout etc.: different on every rank, repeatable on resume
        torch.manual_seed(_dist.rank_seed(seed, epoch))
    gen = epoch_generator(seed, epoch, stream=1000)
    tally, steps = _EpochTally(), 0
    for x, y in loader:
        if max_steps is not None and steps >= max_steps:
            break
        out, objective, data_loss = step_loss(x, y, gen)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        tally.add(out, y, data_loss, lr)
        steps += 1
        if after_step is not None:
            after_step()
        if hooks is not None:
            hooks.advance(1)
    return tally.record(epoch, optimizer.param_groups[0]["lr"], ddp)


def _divergence(record: Mapping[str, Any], advice: str) -> str:
    """One sentence saying where the loss stopped being finite, at which learning rate, and what to try."""
    where = (f"at step {record['bad_step']} of epoch {record['epoch']} (learning rate {record['bad_lr']:.3g})"
             if "bad_step" in record else f"in epoch {record['epoch']}")
    return f"training diverged: the loss became {record['loss']} {where}; {advice}"


def run_sgd(module: nn.Module, loader, epochs: int, step_loss: StepLoss, optimizer: torch.optim.Optimizer,
            scheduler, *, seed: int, settings: Mapping[str, Any], hooks: Hooks, resume: Optional[Mapping],
            ddp: bool = False, per_step: bool = False, total_steps: Optional[int] = None,
            extra_parts: Optional[Dict[str, Any]] = None, after_step: Optional[Callable[[], Any]] = None,
            epoch_fields: Optional[Callable[[], dict]] = None, advice: str = "lower the learning rate",
            same_on_all_ranks: Optional[Callable[[], float]] = None) -> List[dict]:
    """The loop every trainer runs: epochs of :func:`run_epoch`, history, resumable state.

    ``scheduler.step()`` runs after every epoch, or after every iteration with
    ``per_step`` (then ``total_steps`` may end the last epoch early).
    ``module``, ``optimizer``, ``scheduler`` and ``extra_parts`` form the state
    (:func:`~modeconn.training.state.capture_state`, with ``settings``)
    handed to ``hooks.on_epoch_end`` and restored from ``resume``.
    ``after_step`` runs after every SGD step (before a per-step scheduler),
    ``epoch_fields()`` adds entries to each epoch's record. With ``ddp``,
    ``same_on_all_ranks()`` (a number every rank must agree on, e.g. the sum
    of the epoch's t) is checked across ranks once per epoch.

    Returns:
        The history: one record per epoch (``epoch, loss, acc, lr, seconds``, ...).

    Raises:
        FloatingPointError: the epoch's loss is NaN or infinite (``advice`` says what to try).
        ValueError: ``resume`` does not fit this run.
    """
    parts = {"model": module, "optimizer": optimizer, "scheduler": scheduler, **(extra_parts or {})}
    per_epoch = len(loader)
    history: List[dict] = []
    first = 0
    if resume is not None:
        first, history = restore_state(resume, settings, **parts)
        done = first * per_epoch
        hooks.advance(done if total_steps is None else min(done, total_steps))

    def step_done():
        """After every SGD step: the caller's hook, then a per-iteration scheduler."""
        if after_step is not None:
            after_step()
        if per_step:
            scheduler.step()

    for epoch in range(first, epochs):
        t0 = time.perf_counter()
        module.train()
        limit = None if total_steps is None else total_steps - epoch * per_epoch
        record = run_epoch(loader, epoch, seed, step_loss, optimizer, ddp, hooks, step_done, limit)
        if ddp and same_on_all_ranks is not None:
            _dist.check_same(same_on_all_ranks(), f"the t samples of epoch {epoch + 1}")
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(_divergence(record, advice))
        if not per_step:
            scheduler.step()
        record.update(epoch_fields() if epoch_fields is not None else {})
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        if hooks.on_epoch_end is not None:  # the copies cost time and memory: only when someone listens
            hooks.epoch_end(record, capture_state(epoch, history, settings, **parts))
    return history


def _sgd(params: List[torch.Tensor], epochs: int, lr: float, momentum: float, weight_decay: float,
         schedule: str, sam: Optional[float] = None, sam_adaptive: bool = False, warmup_steps: int = 0,
         steps_per_epoch: int = 1, ssam: Optional[dict] = None):
    """Checked SGD optimizer (wrapped in :class:`~modeconn.training.sam.SAM` when ``sam`` is a radius, SSAM
    with ``ssam`` = SAM's sparsity/mask keywords) and scheduler of :func:`train_model` / :func:`fit_curve`:
    per epoch, or per step with a warm-up."""
    if isinstance(epochs, bool) or int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs}")
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive number, got {lr}")
    if sam is None:
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        optimizer = SAM(params, torch.optim.SGD, rho=sam, adaptive=sam_adaptive, lr=lr, momentum=momentum,
                        weight_decay=weight_decay, **(ssam or {}))
    if warmup_steps:
        return optimizer, warmup_scheduler(optimizer, schedule, int(epochs), steps_per_epoch, warmup_steps)
    return optimizer, make_scheduler(optimizer, schedule, int(epochs))


def _settings(loop: str, epochs, lr, weight_decay, momentum, schedule, seed, sam=None, sam_adaptive=False,
              warmup_steps: int = 0, ssam: Optional[dict] = None, adversarial=None) -> dict:
    """What a resume state of :func:`train_model` / :func:`fit_curve` must agree on (SAM's and the warm-up's
    keys only when used, so states of earlier runs still resume)."""
    out = {"loop": loop, "epochs": int(epochs), "lr": float(lr), "weight_decay": float(weight_decay),
           "momentum": float(momentum), "schedule": schedule, "seed": int(seed)}
    if sam is not None:
        out.update(sam=float(sam), sam_adaptive=bool(sam_adaptive))
    if sam is not None and ssam:
        out.update(sam_sparsity=ssam["sparsity"], sam_mask=ssam["mask"])
    if warmup_steps:
        out.update(warmup_steps=int(warmup_steps))
    if adversarial is not None:
        out.update(adversarial=adversarial.as_dict())
    return out


def _with_attack(step: StepLoss, adversarial, module: nn.Module) -> StepLoss:
    """``step`` on PGD examples of ``module`` (:func:`~modeconn.evaluation.adversarial.adversarial_step_loss`)
    when ``adversarial`` is a PGD attack, else ``step`` itself. The attack runs on ``module`` unwrapped (no
    DDP hooks in its passes)."""
    return step if adversarial is None else adversarial_step_loss(step, adversarial, module)


def _with_sam(step: StepLoss, optimizer: torch.optim.Optimizer, module: nn.Module) -> StepLoss:
    """``step`` made a SAM step (:func:`~modeconn.training.sam.sam_step_loss`) when ``optimizer`` is SAM."""
    return sam_step_loss(step, optimizer, module) if isinstance(optimizer, SAM) else step


def _ssam(sam: Optional[float], sparsity: float, mask: Optional[str], loader: Iterable, seed: int
          ) -> Optional[dict]:
    """SAM's SSAM keywords (mask renewed once per epoch, random masks seeded by the run's seed), None without a
    mask; ValueError when a mask or sparsity is asked for without ``sam``."""
    if mask is None and not sparsity:
        return None
    if sam is None:
        raise ValueError(f"sam_sparsity={sparsity} / sam_mask={mask!r} need sam (the SAM radius)")
    return {"sparsity": float(sparsity), "mask": mask, "mask_interval": max(1, len(loader)),
            "mask_seed": int(seed)}


def _warmup_steps(warmup_epochs: float, loader: Iterable) -> int:
    """``warmup_epochs`` of ``loader``'s steps, rounded (at least 1 when asked for); ValueError when negative."""
    if not math.isfinite(warmup_epochs) or warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be a number >= 0, got {warmup_epochs!r}")
    return max(1, round(warmup_epochs * len(loader))) if warmup_epochs > 0 else 0


def train_model(model: nn.Module, train_loader: Iterable, epochs: int = 20, lr: float = 0.05,
                weight_decay: float = 5e-4, momentum: float = 0.9, schedule: str = "reference",
                loss: Union[str, LossFn] = "cross_entropy", seed: int = 0, resume: Optional[Mapping] = None,
                runtime: Optional[Runtime] = None, hooks: Optional[Hooks] = None, sam: Optional[float] = None,
                sam_adaptive: bool = False, warmup_epochs: float = 0.0, sam_sparsity: float = 0.0,
                sam_mask: Optional[str] = None, epoch_fields: Optional[Callable[[], dict]] = None,
                adversarial=None) -> List[dict]:
    """Train an endpoint network in place with SGD (momentum, weight decay); returns the per-epoch history.

    Args:
        model: the network (trained in place; moved to ``runtime.device`` when given).
        train_loader: batches ``(x, y)``, reshuffled per epoch by ``set_epoch`` when it has it.
        epochs, lr, weight_decay, momentum: of the SGD run.
        schedule: per-epoch rate: ``"reference"`` (Garipov et al.'s), ``"cosine"`` or ``"constant"``.
        loss: ``"cross_entropy"``, ``"mse"`` or ``f(output, y) -> scalar``.
        seed: batch order (with the loader's seed), DDP's per-rank dropout seeds (else: the global RNG).
        resume: a ``state`` of ``hooks.on_epoch_end`` (same settings); the run continues after its epoch.
        runtime: device, amp, compile, distributed. Under DDP the loader must be sharded for this rank;
            BatchNorm normalises each rank's share (running statistics broadcast from rank 0).
        hooks: ``progress(n)`` per finished step, ``on_epoch_end(record, state)``.
        sam, sam_adaptive, sam_sparsity, sam_mask: SAM radius ρ (Foret et al. 2021; ASAM with ``sam_adaptive``;
            SSAM, Mi et al. 2022, perturbing a ``"fisher"``/``"random"`` mask of ``1 − sam_sparsity`` of the
            parameters renewed every epoch: :class:`~modeconn.training.sam.SAM`): two passes per step.
        warmup_epochs: linear warm-up over this many epochs' steps (``warmup_scheduler``); 0: none.
        epoch_fields: ``f() -> dict`` joins each epoch's record (an ``NTKTracker``: also its resume state).
        adversarial: a :class:`~modeconn.evaluation.adversarial.PGD`: train on PGD examples (Madry et al. 2018).

    Returns:
        History records ``epoch, loss, acc, lr, seconds`` (loss without weight decay; acc NaN if not classifying).

    Example:
        >>> from modeconn.data import TensorLoader
        >>> from modeconn.runtime import Hooks
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> loader = TensorLoader(torch.randn(32, 4), torch.randint(0, 3, (32,)), batch_size=8, shuffle=True)
        >>> steps = []
        >>> history = train_model(net, loader, epochs=2, lr=0.1, hooks=Hooks(progress=steps.append))
        >>> [r["epoch"] for r in history], sum(steps)
        ([1, 2], 8)
    """
    runtime, hooks = runtime or Runtime(), hooks or Hooks()
    if runtime.device is not None:
        model.to(runtime.device)
    params = [p for p in model.parameters() if p.requires_grad]
    warmup = _warmup_steps(warmup_epochs, train_loader)
    ssam = _ssam(sam, sam_sparsity, sam_mask, train_loader, seed)
    optimizer, scheduler = _sgd(params, epochs, lr, momentum, weight_decay, schedule, sam, sam_adaptive, warmup,
                                len(train_loader), ssam)
    ddp = runtime.use_ddp(train_loader)
    net = _dist.wrap_ddp(model) if ddp else model
    net = torch.compile(net) if runtime.compile else net
    step = _with_sam(_with_attack(model_step(net, loss, runtime, params[0].device), adversarial, model), optimizer,
                     model)
    settings = _settings("train_model", epochs, lr, weight_decay, momentum, schedule, seed, sam, sam_adaptive,
                         warmup, ssam, adversarial)
    return run_sgd(model, train_loader, int(epochs), step, optimizer, scheduler, seed=seed, settings=settings,
                   hooks=hooks, resume=resume, ddp=ddp, per_step=bool(warmup), epoch_fields=epoch_fields,
                   extra_parts={"epoch_fields": epoch_fields} if hasattr(epoch_fields, "state_dict") else None,
                   advice=f"lower the learning rate (lr={lr}) or warm it up longer")


class _CurveStep(nn.Module):
    """What DDP wraps for a curve: θ(t) from the free bends (the only parameter), then the net at θ(t).

    θ(t) stays in float32 (it is also the weight-decay penalty's input); with
    ``runtime.amp`` only the network's forward runs under bf16 autocast.
    """

    def __init__(self, curve: CurveModel, runtime: Runtime, weight_decay: float = 0.0):
        """Wrap ``curve``; ``weight_decay`` is the penalty's coefficient at θ(t)."""
        super().__init__()
        self.curve, self.runtime, self.weight_decay = curve, runtime, float(weight_decay)

    def forward(self, x, t):
        """Network output at θ(t) (float32) and θ(t) (name -> tensor, ``training_weights``)."""
        weights = self.curve.training_weights(t, self.weight_decay)
        with self.runtime.autocast(self.curve.fixed_bends.device):
            out = self.curve.forward_weights(x, weights)
        return out.float() if self.runtime.amp else out, weights


def curve_training(model, train_loader, epochs: int, lr: float, momentum: float, schedule: str,
                   weight_decay: float, runtime: Runtime, sam: Optional[float] = None, sam_adaptive: bool = False,
                   ssam: Optional[dict] = None):
    """What :func:`fit_curve` (and ``fit_simplex``) set up: (optimizer, scheduler, step module, ddp).

    The model moves to ``runtime.device``; SGD runs on its ``free_bends``
    only (weight decay is applied at the sampled point, not here), through SAM with ``sam``. The step
    module's ``stepper(x, t)`` runs ``model.training_weights(t, weight_decay)``
    and the net there; wrapped in DDP under torchrun, compiled with ``runtime.compile``.
    """
    if runtime.device is not None:
        model.to(runtime.device)
    optimizer, scheduler = _sgd([model.free_bends], epochs, lr, momentum, 0.0, schedule, sam, sam_adaptive,
                                ssam=ssam)
    ddp = runtime.use_ddp(train_loader)
    stepper: nn.Module = _CurveStep(model, runtime, weight_decay)
    if ddp:  # bends and buffers copied from rank 0 once, buffers not re-broadcast every step
        stepper = _dist.wrap_ddp(stepper, sync_buffers_every_step=False)
    if runtime.compile:
        stepper = torch.compile(stepper)
    return optimizer, scheduler, stepper, ddp


def fit_curve(curve: CurveModel, train_loader: Iterable, epochs: int = 20, lr: float = 0.03,
              weight_decay: float = 5e-4, momentum: float = 0.9, schedule: str = "reference",
              loss: Union[str, LossFn] = "cross_entropy", seed: int = 0, resume: Optional[Mapping] = None,
              runtime: Optional[Runtime] = None, hooks: Optional[Hooks] = None, sam: Optional[float] = None,
              sam_adaptive: bool = False, sam_sparsity: float = 0.0, sam_mask: Optional[str] = None,
              adversarial=None) -> List[dict]:
    """Train the free bends of ``curve`` to minimise E_{t~U(0,1)} L(θ(t)) (Garipov et al. 2018, Eq. 2).

    One t per mini-batch, drawn from the ``(seed, epoch)`` generator; the
    penalty ``0.5 * weight_decay * ||θ(t)||²`` applies at the sampled point,
    not to the bends. Arguments, resume, hooks, SAM and SSAM (on the free bends, one t for both
    passes) as :func:`train_model`. Under DDP only ``free_bends`` is data parallel, every rank draws
    the same t; with ``runtime.amp`` θ(t) stays float32. ``adversarial`` (a ``PGD``): each batch
    replaced by its PGD examples at θ(t) (``curve_attack``). ValueError when every bend is fixed.

    Example:
        >>> from modeconn import Bezier, CurveModel
        >>> from modeconn.data import TensorLoader
        >>> _ = torch.manual_seed(0)
        >>> a, b = nn.Linear(4, 3), nn.Linear(4, 3)
        >>> curve = CurveModel(a, a, b, Bezier(3))
        >>> loader = TensorLoader(torch.randn(32, 4), torch.randint(0, 3, (32,)), batch_size=8)
        >>> before = curve.bends.clone()
        >>> history = fit_curve(curve, loader, epochs=2, lr=0.05)
        >>> len(history), torch.equal(curve.bends[0], before[0]), torch.equal(curve.bends[1], before[1])
        (2, True, False)
    """
    if not curve.free_idx:
        raise ValueError("the curve has no free bends to train (every bend is fixed)")
    runtime, hooks = runtime or Runtime(), hooks or Hooks()
    ssam = _ssam(sam, sam_sparsity, sam_mask, train_loader, seed)
    optimizer, scheduler, stepper, ddp = curve_training(curve, train_loader, epochs, lr, momentum, schedule,
                                                        weight_decay, runtime, sam, sam_adaptive, ssam)
    loss_fn = get_loss(loss)
    device = curve.fixed_bends.device
    drawn = {"t_sum": 0.0}

    def step(x, y, gen):
        """One t from the epoch's generator, the network at θ(t) on the batch."""
        t = torch.rand((), generator=gen)
        drawn["t_sum"] += float(t)  # a CPU number: no device synchronisation (SAM adds each t twice)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if adversarial is not None:
            x = curve_attack(curve, x, y, t.to(device), adversarial, gen)
        out, _ = stepper(x, t.to(device))  # the weight-decay gradient comes from training_weights' backward
        value = loss_fn(out, y)
        return out, value, value

    def epoch_t_sum() -> float:
        """Sum of the epoch's t (reset for the next), for the ranks' agreement check."""
        value, drawn["t_sum"] = drawn["t_sum"], 0.0
        return value

    settings = _settings("fit_curve", epochs, lr, weight_decay, momentum, schedule, seed, sam, sam_adaptive,
                         ssam=ssam, adversarial=adversarial)
    return run_sgd(curve, train_loader, int(epochs), _with_sam(step, optimizer, curve), optimizer, scheduler,
                   seed=seed, settings=settings,
                   hooks=hooks, resume=resume, ddp=ddp, advice=f"lower the learning rate (lr={lr})",
                   same_on_all_ranks=epoch_t_sum)
