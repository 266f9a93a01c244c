"""The one resume mechanism of every training loop: capture a state, restore it.

Every loop (:func:`~modeconn.training.loop.train_model`,
:func:`~modeconn.training.loop.fit_curve`,
:func:`~modeconn.training.fge.train_fge`) hands
``hooks.on_epoch_end(record, state)`` a state built by :func:`capture_state`
and accepts it back as ``resume=``, restored by :func:`restore_state`. A state
is plain data (dicts, lists, numbers, strings and CPU or device tensors) that
``torch.save`` / ``torch.load(weights_only=True)`` round-trip. It holds:

* ``epoch`` (0-based, the last finished one) and ``history`` (its records);
* ``settings``: the run's hyper-parameters; a resume with different ones is
  refused, since it would not continue the same run;
* one entry per stateful part (network, optimizer, scheduler, FGE snapshots):
  copies of their ``state_dict()``, so training on does not change a kept state;
* ``rng``: the global CPU random state and, when CUDA is in use, every CUDA
  device's: dropout after a resume draws exactly what it would have drawn.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from modeconn.training.state import capture_state, restore_state
    >>> net = nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> state = capture_state(0, [{"epoch": 1}], {"lr": 0.1}, model=net, optimizer=opt)
    >>> noise = torch.rand(3)                      # what the run would draw next
    >>> with torch.no_grad():
    ...     _ = net.weight.zero_()                 # training goes on; the state is a copy
    >>> first, history = restore_state(state, {"lr": 0.1}, model=net, optimizer=opt)
    >>> first, history, torch.equal(torch.rand(3), noise), bool(net.weight.abs().sum() > 0)
    (1, [{'epoch': 1}], True, True)
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, Iterator, List, Mapping, Tuple

import torch

__all__ = ["capture_state", "restore_state", "rng_state", "set_rng_state", "seeded_rng"]

_REQUIRED = ("epoch", "history", "settings", "rng")


def rng_state() -> Dict[str, Any]:
    """The global random state: CPU, plus every CUDA device's once CUDA is initialised."""
    state: Dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore a state from :func:`rng_state`.

    CUDA states are restored for the devices this process sees (on a machine
    without CUDA, none): a run moved to other hardware resumes, with the CPU
    stream exact and the CUDA streams wherever the devices match.
    """
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for index in range(min(len(cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda[index], device=index)


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block with the global RNG seeded by ``seed``; the caller's RNG state comes back after."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and \
        torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def capture_state(epoch: int, history: List[dict], settings: Mapping[str, Any], **parts: Any) -> dict:
    """The resumable state after finished epoch ``epoch`` (0-based).

    Args:
        epoch: the epoch just finished, counted from 0.
        history: the records of the epochs so far.
        settings: hyper-parameters the run depends on (numbers, strings, bools).
        **parts: stateful objects with ``state_dict()`` (network, optimizer,
            scheduler, ...); each is stored under its keyword as a copy.

    Returns:
        A dict to hand back as ``resume=`` (see the module docstring).
    """
    state = {"epoch": int(epoch), "history": [dict(r) for r in history], "settings": dict(settings),
             "rng": rng_state()}
    for name, part in parts.items():
        state[name] = copy.deepcopy(part.state_dict())
    return state


def restore_state(state: Mapping[str, Any], settings: Mapping[str, Any], **parts: Any) -> Tuple[int, List[dict]]:
    """Load a :func:`capture_state` state back into ``parts`` and the global RNG.

    Args:
        state: the state (possibly after a ``torch.save`` / ``torch.load`` round trip).
        settings: this run's settings; they must equal the state's.
        **parts: the same stateful objects (same keywords) as when captured;
            each gets ``load_state_dict`` of a copy of ``state[keyword]``, so
            ``state`` stays as it was and can be restored again.

    Returns:
        ``(first_epoch, history)``: the epoch to run next and the records so far.

    Raises:
        ValueError: the state lacks an entry, or comes from a run with other settings.
    """
    missing = [k for k in (*_REQUIRED, *parts) if k not in state]
    if missing:
        raise ValueError(f"the resume state lacks {', '.join(missing)}: it does not come from this "
                         "training loop (or from an older modeconn)")
    old = dict(state["settings"])
    diff = sorted(k for k in set(settings) | set(old) if old.get(k) != settings.get(k))
    if diff:
        raise ValueError("the resume state comes from a run with different settings: " + ", ".join(
            f"{k}={settings.get(k)!r} (was {old.get(k)!r})" for k in diff))
    for name, part in parts.items():  # a copy: Optimizer.load_state_dict keeps the tensors it is given
        part.load_state_dict(copy.deepcopy(state[name]))  # (momentum), and training would change ``state``
    set_rng_state(state["rng"])
    return int(state["epoch"]) + 1, [dict(r) for r in state["history"]]
