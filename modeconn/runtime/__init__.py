"""How work runs, kept out of the science: where (device, processes), how fast (amp, compile), who listens.

Two small objects travel through the library instead of a row of keyword
arguments on every function:

* :class:`Runtime` — device, bf16 autocast, ``torch.compile`` and whether to
  run as one rank of a torchrun job (DDP). The defaults are one process, the
  model's own device, float32, eager.
* :class:`Hooks` — who is told about progress: ``progress(n)`` is called with
  the number of units (steps, points) just finished, and
  ``on_epoch_end(record, state)`` after every epoch with the epoch's history
  record and the resumable state.

Example:
    >>> from modeconn.runtime import Hooks, Runtime
    >>> done = []
    >>> hooks = Hooks(progress=done.append)
    >>> hooks.advance(3); hooks.advance(2); done
    [3, 2]
    >>> Runtime().autocast("cpu")  # doctest: +ELLIPSIS
    <contextlib.nullcontext object at ...>
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from modeconn.runtime import distributed as _dist

__all__ = ["Runtime", "Hooks"]


@dataclass(frozen=True)
class Runtime:
    """Device, precision, compilation and process group of a run.

    Args:
        device: where data and weights live; ``None`` keeps the model's device.
        amp: run forward passes under bf16 autocast (sums, BN statistics and
            the curve's θ(t) stay float32).
        compile: ``torch.compile`` the step or the metric pass (slow first steps).
        distributed: wrap in DistributedDataParallel; ``None`` means "when
            torchrun started several ranks and the process group is joined".

    Example:
        >>> rt = Runtime(device="cpu", amp=True)
        >>> with rt.autocast("cpu"):
        ...     out = torch.nn.Linear(4, 2)(torch.ones(3, 4))
        >>> out.dtype, rt.use_ddp()   # bf16 forward; one process, so no DDP
        (torch.bfloat16, False)
    """

    device: Optional[Union[str, torch.device]] = None
    amp: bool = False
    compile: bool = False
    distributed: Optional[bool] = None

    def autocast(self, device: Union[str, torch.device]):
        """bf16 autocast on ``device`` when ``amp``; otherwise a no-op context."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)

    def use_ddp(self, loader=None) -> bool:
        """Whether to wrap in DDP (checks that ``loader`` is sharded when it is)."""
        distributed = _dist.active() if self.distributed is None else self.distributed
        if distributed and not _dist.is_initialized():
            raise ValueError("distributed=True needs an initialised process group "
                             "(run under torchrun and call modeconn.runtime.distributed.init_from_env())")
        if distributed and loader is not None:
            _dist.check_sharded(loader)
        return bool(distributed)

    def sharded(self) -> bool:
        """Whether work split into parts (points, grid rows) is shared among ranks."""
        return _dist.active() if self.distributed is None else bool(self.distributed and _dist.active())


@dataclass(frozen=True)
class Hooks:
    """Callbacks of a long computation: progress and the end of each epoch.

    Args:
        progress: ``progress(n)`` with the number of units just finished
            (training steps, evaluated points, Hessian products); a tqdm bar's
            ``update`` fits.
        on_epoch_end: ``on_epoch_end(record, state)`` after every epoch: the
            history record and the state to pass back as ``resume=`` later.

    Example:
        >>> from torch import nn
        >>> from modeconn.data import TensorLoader
        >>> from modeconn.training.loop import train_model
        >>> _ = torch.manual_seed(0)
        >>> loader = TensorLoader(torch.randn(16, 4), torch.randint(0, 3, (16,)), batch_size=8)
        >>> steps, epochs = [], []
        >>> hooks = Hooks(progress=steps.append, on_epoch_end=lambda record, state: epochs.append(record["epoch"]))
        >>> _ = train_model(nn.Linear(4, 3), loader, epochs=2, lr=0.1, hooks=hooks)
        >>> sum(steps), epochs
        (4, [1, 2])
    """

    progress: Optional[Callable[[int], None]] = None
    on_epoch_end: Optional[Callable[[dict, dict], None]] = None

    def advance(self, n: int = 1) -> None:
        """Report ``n`` finished units."""
        if self.progress is not None and n:
            self.progress(n)

    def epoch_end(self, record: dict, state: dict) -> None:
        """Report a finished epoch."""
        if self.on_epoch_end is not None:
            self.on_epoch_end(record, state)
