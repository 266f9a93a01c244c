"""Parent–child spawning: when is the basin decided? (Frankle et al. 2020; Fort et al. 2020)

A parent network is trained with SGD for ``epochs`` epochs; at each spawn
epoch k its training state (weights, momentum, learning-rate schedule, RNG)
is kept. From every kept state ``children`` copies are trained on to epoch
``epochs`` exactly as the parent would have been — same optimizer state, same
schedule, same settings — except for the order (and augmentation) of the
training data, which comes from each child's own data seed. Between every two
children of the same k the straight line is evaluated with BatchNorm
statistics recomputed at every point; its barrier says whether the children
ended in one linearly connected basin. Frankle et al. ("Linear Mode
Connectivity and the Lottery Ticket Hypothesis", 2020) call the error barrier
the *instability* of the network at k; it falls to about zero after an early
chaotic phase (Fort et al. 2020, "Deep learning versus kernel learning").

How a child continues its parent: :func:`~modeconn.training.loop.train_model`
resumes from the parent's state of epoch k (for k = 0, the initial weights and
the global RNG at the start of the parent's training), with a loader built by
``make_loader(child_seed)``. The loader's seed decides the batch order of
every epoch (``epoch_generator(seed, epoch)``) and the augmentation; the
``seed`` of ``train_model`` (part of the state's settings) stays the
parent's, so dropout continues the parent's random stream. A child whose data
seed is the parent's reproduces the parent bit for bit.

Every training state goes into ``store``, a mutable mapping from names
(:data:`PARENT`, :func:`spawn_key`, :func:`child_key`) to states of
:func:`~modeconn.training.state.capture_state`. Given a store that outlives the
process (the ``spawn`` command keeps one file per name), a second call
continues where the first stopped: a finished child is not trained again, an
unfinished one resumes from its last epoch.

With ``ntk_inputs`` every run also tracks its empirical NTK on those inputs
(Fort et al. 2020; :class:`~modeconn.geometry.ntk.NTKTracker`): the parent's
and each child's history records hold the kernel distance from the parent's
initial kernel and the velocity per epoch (a child spawned at k continues the
parent's series), each child its kernel distance from the spawn point's
kernel, and each pair the kernel distance between its two children.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, MutableMapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from modeconn.core.curve_model import linear_path
from modeconn.core.layout import FlatLayout
from modeconn.evaluation.barriers import BARRIER_REFERENCES
from modeconn.evaluation.bn import recompute_bn
from modeconn.evaluation.model import evaluate
from modeconn.evaluation.path import PathResult, evaluate_path
from modeconn.geometry.ntk import NTKTracker, empirical_ntk, kernel_distance
from modeconn.runtime import Hooks, Runtime
from modeconn.training.loop import train_model
from modeconn.training.state import rng_state, set_rng_state

__all__ = ["SpawnChild", "SpawnPair", "SpawnPoint", "SpawnResult", "spawn_children", "check_spawn_arguments",
           "check_spawn_epochs",
           "default_child_seeds", "spawn_steps", "PARENT", "spawn_key", "child_key"]

PARENT = "parent"
BARRIER_METRICS = ("test_loss", "test_error", "train_loss", "train_error")


def spawn_key(epoch: int) -> str:
    """The store's name of the parent's state at spawn epoch ``epoch``."""
    return f"spawn_{int(epoch)}"


def child_key(epoch: int, index: int) -> str:
    """The store's name of the latest state of child ``index`` spawned at ``epoch``."""
    return f"child_{int(epoch)}_{int(index)}"


def check_spawn_epochs(spawn_at: Sequence[int], epochs: int) -> List[int]:
    """The spawn epochs sorted; ``ValueError`` unless they are distinct integers with 0 <= k < ``epochs``.

    A child needs at least one epoch of its own, so k = ``epochs`` is refused too.

    Example:
        >>> check_spawn_epochs([4, 0, 2], epochs=10)
        [0, 2, 4]
    """
    ks = list(spawn_at)
    if not ks:
        raise ValueError("spawn_at is empty: give at least one spawn epoch")
    bad = [k for k in ks if isinstance(k, bool) or int(k) != k]
    if bad:
        raise ValueError(f"spawn_at must hold integers (epochs), got {bad}")
    outside = [int(k) for k in ks if not 0 <= int(k) < int(epochs)]
    if outside:
        raise ValueError(f"spawn_at {outside} outside 0..{int(epochs) - 1}: a child spawned at epoch k is trained "
                         f"from k to epochs={int(epochs)}, so every k must be below epochs")
    if len(set(int(k) for k in ks)) != len(ks):
        raise ValueError(f"spawn_at {ks} repeats an epoch")
    return sorted(int(k) for k in ks)


def default_child_seeds(seed: int, children: int) -> List[int]:
    """Data seeds of the children of a parent with ``seed``: ``1000 * (seed + 1) + i``.

    Apart from the parent's seed and from those of the parents with seeds
    ``seed ± 1`` (a second run for the spread), for up to 1000 children.
    """
    return [1000 * (int(seed) + 1) + i for i in range(int(children))]


def spawn_steps(epochs: int, spawn_at: Sequence[int], children: int, steps_per_epoch: int) -> int:
    """The training steps :func:`spawn_children` reports to ``hooks.progress``: ``epochs`` per run.

    A child counts all ``epochs`` epochs, the k it inherits from the parent
    included (``train_model`` reports a resumed run's finished steps at its
    start), so a resumed spawn run fills a progress bar like a fresh one.
    """
    return int(steps_per_epoch) * int(epochs) * (1 + int(children) * len(spawn_at))


# ------------------------------------------------------------------ results
@dataclass
class SpawnChild:
    """One child at the end of training: its metrics (BN recomputed) and its L2 distance from the spawn point."""

    spawn_epoch: int
    index: int
    seed: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    distance_from_spawn: float
    ntk_distance_from_spawn: Optional[float] = None
    ntk_history: List[dict] = field(default_factory=list)  # per epoch: epoch, ntk_distance, ntk_velocity, ...


@dataclass
class SpawnPair:
    """The straight line between two children of one spawn epoch (``path``: t=0 is ``children[0]``)."""

    spawn_epoch: int
    children: Tuple[int, int]
    distance: float
    path: PathResult
    ntk_distance: Optional[float] = None

    def barrier(self, metric: str = "test_loss", reference: str = "interp") -> float:
        """The line's barrier of a loss or error (:meth:`~modeconn.evaluation.path.PathResult.barrier`)."""
        return self.path.barrier(metric, reference)

    def to_dict(self) -> dict:
        """Plain data: children, distance, barriers (every metric and reference) and the metrics along t."""
        return {"children": list(self.children), "distance": self.distance, "ntk_distance": self.ntk_distance,
                "barriers": {m: {r: self.barrier(m, r) for r in BARRIER_REFERENCES} for m in BARRIER_METRICS},
                "ts": self.path.ts.tolist(), **{m: self.path.values(m).tolist() for m in BARRIER_METRICS}}


@dataclass
class SpawnPoint:
    """Everything measured for one spawn epoch: its children and every pair of them."""

    epoch: int
    children: List[SpawnChild]
    pairs: List[SpawnPair]

    def barriers(self, metric: str = "test_loss", reference: str = "interp") -> np.ndarray:
        """The barrier of every pair (in the order of ``pairs``)."""
        return np.array([p.barrier(metric, reference) for p in self.pairs])

    def to_dict(self, reference: str = "interp") -> dict:
        """Plain data; ``mean`` holds the means over pairs and children (barriers with ``reference``)."""
        mean = {f"barrier_{m}": float(self.barriers(m, reference).mean()) for m in BARRIER_METRICS}
        mean["distance"] = float(np.mean([p.distance for p in self.pairs]))
        for name in ("test_acc", "test_loss", "distance_from_spawn"):
            mean[name] = float(np.mean([getattr(c, name) for c in self.children]))
        if self.pairs[0].ntk_distance is not None:
            mean["ntk_distance"] = float(np.mean([p.ntk_distance for p in self.pairs]))
            mean["ntk_distance_from_spawn"] = float(np.mean([c.ntk_distance_from_spawn for c in self.children]))
        return {"epoch": self.epoch, "children": [vars(c).copy() for c in self.children],
                "pairs": [p.to_dict() for p in self.pairs], "mean": mean}


@dataclass
class SpawnResult:
    """The result of :func:`spawn_children`: one :class:`SpawnPoint` per spawn epoch, and the parent.

    ``parent`` holds the fully trained parent's train/test loss and accuracy
    (BN recomputed), ``parent_history`` its per-epoch records; the weights of
    every run are the ``"model"`` entries of ``store`` (names
    :data:`PARENT`, :func:`spawn_key`, :func:`child_key`).
    """

    epochs: int
    seed: int
    child_seeds: List[int]
    points: List[SpawnPoint]
    parent: Dict[str, float]
    parent_history: List[dict]
    reference: str = "interp"
    store: MutableMapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def spawn_at(self) -> List[int]:
        """The spawn epochs, ascending."""
        return [p.epoch for p in self.points]

    def barriers(self, metric: str = "test_loss", reference: Optional[str] = None) -> np.ndarray:
        """``[spawn epochs, pairs]`` barriers of ``metric`` (``reference`` defaults to the result's)."""
        return np.stack([p.barriers(metric, reference or self.reference) for p in self.points])

    def to_dict(self) -> dict:
        """Plain data (for JSON): settings, the parent, and every spawn point."""
        return {"epochs": self.epochs, "seed": self.seed, "child_seeds": list(self.child_seeds),
                "spawn_at": self.spawn_at, "barrier_reference": self.reference, "parent": dict(self.parent),
                "parent_history": [dict(r) for r in self.parent_history],
                "spawn": [p.to_dict(self.reference) for p in self.points]}


# ----------------------------------------------------------------- training
def _relay(hooks: Hooks, store: MutableMapping[str, Any], key: str, also: Sequence[Tuple[int, str]] = ()):
    """``on_epoch_end`` of one run: keep its state under ``key`` (and under ``name`` after epoch e for
    every ``(e, name)`` of ``also``), then tell the caller's hook, the record marked with the run."""

    def on_epoch_end(record: dict, state: dict) -> None:
        store[key] = state
        for epoch, name in also:
            if record["epoch"] == epoch:
                store[name] = state
        hooks.epoch_end({**record, "run": key}, state)

    return on_epoch_end


def _tracker(net: nn.Module, ntk: Optional[tuple]) -> Optional[NTKTracker]:
    """An NTK tracker of ``net`` on ``ntk = (inputs, labels, kind)``, None without."""
    return None if ntk is None else NTKTracker(net, ntk[0].to(next(net.parameters()).device), ntk[1], ntk[2])


def _train_parent(parent: nn.Module, make_loader: Callable[[int], Iterable], train: dict,
                  spawn_at: List[int], store: MutableMapping[str, Any], hooks: Hooks,
                  ntk: Optional[tuple] = None) -> None:
    """Train (or resume, or skip when finished) the parent, keeping its state at every spawn epoch."""
    if 0 in spawn_at and spawn_key(0) not in store:  # before the first step: weights and global RNG
        store[spawn_key(0)] = {"epoch": -1, "model": copy.deepcopy(parent.state_dict()), "rng": rng_state()}
    also = [(k, spawn_key(k)) for k in spawn_at if k > 0]
    train_model(parent, make_loader(train["seed"]), resume=store.get(PARENT), epoch_fields=_tracker(parent, ntk),
                hooks=Hooks(progress=hooks.progress, on_epoch_end=_relay(hooks, store, PARENT, also)), **train)


def _train_child(template: nn.Module, make_loader: Callable[[int], Iterable], data_seed: int, k: int, i: int,
                 train: dict, store: MutableMapping[str, Any], hooks: Hooks, ntk: Optional[tuple] = None) -> None:
    """Train child ``i`` of spawn epoch ``k`` to the end: from the parent's state of epoch k, or from its own
    last state; a finished child only reports its steps as done."""
    key = child_key(k, i)
    net = copy.deepcopy(template)
    resume = store.get(key)
    if resume is None:
        spawn = store.get(spawn_key(k))
        if spawn is None:
            raise ValueError(f"the store holds no parent state of epoch {k}: it comes from a run with other "
                             "spawn epochs")
        if k == 0:  # the parent's start: its initial weights and global RNG, a fresh optimizer and schedule
            net.load_state_dict(spawn["model"])
            set_rng_state(spawn["rng"])
        else:
            resume = spawn
    train_model(net, make_loader(data_seed), resume=resume, epoch_fields=_tracker(net, ntk),
                hooks=Hooks(progress=hooks.progress, on_epoch_end=_relay(hooks, store, key)), **train)


# -------------------------------------------------------------- measurement
def _net(template: nn.Module, state_dict: Dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``template`` holding ``state_dict``."""
    net = copy.deepcopy(template)
    net.load_state_dict(state_dict)
    return net


def _ntk_records(history: List[dict]) -> List[dict]:
    """The NTK entries (and the epoch) of a run's history records that have them."""
    return [{key: v for key, v in r.items() if key == "epoch" or key.startswith("ntk_")}
            for r in history if "ntk_distance" in r]


def _endpoint(pairs: List[SpawnPair], child: int) -> Tuple[PathResult, int]:
    """A path with ``child`` at one end, and that end's index (0 or -1)."""
    for p in pairs:
        if child in p.children:
            return p.path, 0 if p.children[0] == child else -1
    raise ValueError(f"child {child} is in no pair")


def _measure(template: nn.Module, k: int, seeds: Sequence[int], store: MutableMapping[str, Any],
             loaders: Tuple[Iterable, Iterable], num_points: int, points_per_pass: int, runtime: Runtime,
             hooks: Hooks, ntk: Optional[tuple] = None) -> SpawnPoint:
    """The straight line between every two children of spawn epoch ``k`` (BN recomputed per point),
    their distances, and each child's metrics (the lines' ends) and distance from the spawn point
    (and NTK distances with ``ntk``)."""
    layout = FlatLayout.of(template)
    nets = [_net(template, store[child_key(k, i)]["model"]) for i in range(len(seeds))]
    flats = [layout.flatten(n, dtype=torch.float64) for n in nets]
    start = layout.flatten(store[spawn_key(k)]["model"], dtype=torch.float64, device=flats[0].device)
    kernels = None  # the children's NTKs, then the spawn point's
    if ntk is not None:
        at_spawn = _net(template, store[spawn_key(k)]["model"])
        kernels = [empirical_ntk(n, ntk[0].to(flats[0].device), ntk[2]) for n in [*nets, at_spawn]]
    pairs = []
    for i, j in itertools.combinations(range(len(nets)), 2):
        path = evaluate_path(linear_path(nets[i], nets[j]), *loaders, num_points=num_points,
                             points_per_pass=points_per_pass, name=f"k={k} children {i}-{j}", runtime=runtime,
                             hooks=hooks)
        pairs.append(SpawnPair(k, (i, j), float((flats[i] - flats[j]).norm()), path,
                               None if kernels is None else kernel_distance(kernels[i], kernels[j])))
    children = []
    for i, s in enumerate(seeds):
        path, end = _endpoint(pairs, i)
        children.append(SpawnChild(k, i, int(s), float(path.train_loss[end]), float(path.train_acc[end]),
                                   float(path.test_loss[end]), float(path.test_acc[end]),
                                   float((flats[i] - start).norm()),
                                   None if kernels is None else kernel_distance(kernels[i], kernels[-1]),
                                   _ntk_records(store[child_key(k, i)]["history"])))
    return SpawnPoint(k, children, pairs)


def _parent_metrics(template: nn.Module, store: MutableMapping[str, Any], train_eval: Iterable,
                    test_eval: Iterable) -> Dict[str, float]:
    """The trained parent's train/test loss and accuracy, BN statistics recomputed as at every path point."""
    net = recompute_bn(_net(template, store[PARENT]["model"]), train_eval)
    train, test = evaluate(net, train_eval), evaluate(net, test_eval)
    return {"train_loss": train["loss"], "train_acc": train["acc"], "test_loss": test["loss"],
            "test_acc": test["acc"]}


# ---------------------------------------------------------------------- API
def check_spawn_arguments(spawn_at: Sequence[int], epochs: int, children: int, seed: int,
                          child_seeds: Optional[Sequence[int]] = None, reference: str = "interp"
                          ) -> Tuple[List[int], List[int]]:
    """(sorted spawn epochs, child seeds) of :func:`spawn_children`, or a ``ValueError`` whose message
    starts with the name of the argument at fault.

    Example:
        >>> check_spawn_arguments([2, 0], epochs=5, children=2, seed=0)
        ([0, 2], [1000, 1001])
    """
    spawn_at = check_spawn_epochs(spawn_at, epochs)
    if isinstance(children, bool) or int(children) != children or children < 2:
        raise ValueError(f"children must be an integer >= 2 (a barrier needs two children), got {children}")
    seeds = [int(s) for s in (default_child_seeds(seed, children) if child_seeds is None else child_seeds)]
    if len(seeds) != children or len(set(seeds)) != len(seeds):
        raise ValueError(f"child_seeds must be {children} distinct seeds, got {seeds}")
    if reference not in BARRIER_REFERENCES:
        raise ValueError(f"reference {reference!r} is not a barrier definition; choose one of {BARRIER_REFERENCES}")
    return spawn_at, seeds


def spawn_children(model: nn.Module, make_loader: Callable[[int], Iterable], train_eval: Iterable,
                   test_eval: Iterable, *, epochs: int, spawn_at: Sequence[int], children: int = 2, seed: int = 0,
                   child_seeds: Optional[Sequence[int]] = None, lr: float = 0.05, weight_decay: float = 5e-4,
                   momentum: float = 0.9, schedule: str = "reference", num_points: int = 21,
                   points_per_pass: int = 8, reference: str = "interp",
                   store: Optional[MutableMapping[str, Any]] = None, runtime: Optional[Runtime] = None,
                   hooks: Optional[Hooks] = None, ntk_inputs: Optional[torch.Tensor] = None,
                   ntk_labels: Optional[torch.Tensor] = None, ntk_kind: str = "trace") -> SpawnResult:
    """Train a parent, spawn children at each epoch of ``spawn_at``, measure the barrier between them.

    Protocol of the module docstring. The parent (a deep copy of ``model``;
    ``model`` is left alone) trains with ``make_loader(seed)``, the children of
    each spawn epoch k (0 <= k < ``epochs``) from its state at k with
    ``make_loader(child_seeds[i])`` (default :func:`default_child_seeds`; the
    same for every k). Per k, the line between every two children is evaluated
    at ``num_points`` points (BN recomputed over ``train_eval``) and the L2
    distances of the parameters child–child and child–spawn point measured.

    Args:
        model: the parent at initialisation (classification, cross-entropy).
        make_loader: data seed -> training loader (under DDP sharded for this rank).
        train_eval, test_eval: evaluation data in fixed order, no augmentation.
        epochs, lr, weight_decay, momentum, schedule, seed: SGD of parent and children
            (:func:`~modeconn.training.loop.train_model`); ``seed`` is also the parent's data seed.
        children: per spawn epoch (>= 2); every pair is measured. num_points, points_per_pass: of
            :func:`~modeconn.evaluation.path.evaluate_path`. reference: barrier definition of the summaries
            (pairs keep all three). store: mapping for the training states (module docstring; a dict by default).
        runtime: device, amp, compile, DDP; a line's points are shared among ranks.
        hooks: ``progress(n)`` per SGD step and point; ``on_epoch_end(record, state)``, ``record["run"]`` its run.
        ntk_inputs, ntk_labels, ntk_kind: track the NTK on these inputs (module docstring).

    Example:
        >>> from modeconn.data import TensorLoader
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> data = TensorLoader(x, y, batch_size=64)
        >>> res = spawn_children(nn.Linear(4, 3), lambda s: TensorLoader(x, y, 16, shuffle=True, seed=s),
        ...                      data, data, epochs=3, spawn_at=[0, 2], num_points=5)
        >>> res.spawn_at, res.barriers("test_error").shape, len(res.points[1].children)
        ([0, 2], (2, 1), 2)
    """
    spawn_at, seeds = check_spawn_arguments(spawn_at, epochs, children, seed, child_seeds, reference)
    store = {} if store is None else store
    runtime, hooks = runtime or Runtime(), hooks or Hooks()
    train = {"epochs": int(epochs), "lr": lr, "weight_decay": weight_decay, "momentum": momentum,
             "schedule": schedule, "seed": int(seed), "runtime": runtime}
    parent = copy.deepcopy(model)
    if runtime.device is not None:
        parent.to(runtime.device)
    ntk = None if ntk_inputs is None else (ntk_inputs, ntk_labels, ntk_kind)
    _train_parent(parent, make_loader, train, spawn_at, store, hooks, ntk)
    points = []
    for k in spawn_at:
        for i, s in enumerate(seeds):
            _train_child(parent, make_loader, int(s), k, i, train, store, hooks, ntk)
        points.append(_measure(parent, k, seeds, store, (train_eval, test_eval), num_points, points_per_pass,
                               runtime, hooks, ntk))
    return SpawnResult(int(epochs), int(seed), seeds, points,
                       _parent_metrics(parent, store, train_eval, test_eval), list(store[PARENT]["history"]),
                       reference, store)
