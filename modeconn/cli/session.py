"""Where a command runs: its device, its place in a torchrun job, its progress bars."""
from __future__ import annotations

import argparse
import contextlib
from typing import Iterator

import torch

from modeconn.cli.errors import CommandError
from modeconn.runtime import distributed


def device_of(name: str) -> torch.device:
    """``--device``: 'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CommandError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: CUDA is not available on this machine")
    return dev


class Job:
    """What a command body needs to know about where it runs: its rank and device, and its progress bars.

    Bars made by :meth:`progress` are closed when the session ends, so an
    error line is never printed onto a half-drawn bar.
    """

    def __init__(self, info: distributed.DistInfo, no_progress: bool, bars: contextlib.ExitStack):
        """Made by :func:`session`: ``bars`` closes the progress bars when it ends."""
        self.info, self._no_progress, self._bars = info, no_progress, bars

    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that writes files and prints results."""
        return self.info.is_main

    @property
    def device(self) -> torch.device:
        """This process's device (``cuda:LOCAL_RANK`` under torchrun)."""
        return self.info.device

    def progress(self, total: int, desc: str):
        """A progress bar of ``total`` units (see :func:`progress_bar`), closed at the latest with the session."""
        return self._bars.enter_context(progress_bar(total, desc, self._no_progress))


@contextlib.contextmanager
def session(args: argparse.Namespace, join: bool = True) -> Iterator[Job]:
    """One process, or this rank of a torchrun job (``join``): yields the command's :class:`Job`.

    Joins the process group torchrun describes and leaves it at the end, but
    only a group joined here (a caller's group stays). ``--amp`` on the CPU is
    switched off (``args.amp = False``) with a one-line note on rank 0.
    Commands that always run as one process pass ``join=False``.
    """
    device = device_of(args.device)  # the single-process checks and messages
    joined_before = distributed.is_initialized()
    try:
        info = (distributed.init_from_env(getattr(args, "backend", "auto"), args.device) if join
                else distributed.DistInfo(device=device))
    except ValueError as e:
        raise CommandError(str(e)) from None
    started = distributed.is_initialized() and not joined_before
    finished = False
    try:
        if getattr(args, "amp", False) and info.device.type != "cuda":
            if info.is_main:
                print("note: --amp (bf16 autocast) applies to CUDA devices; running in float32 on the CPU")
            args.amp = False
        with contextlib.ExitStack() as bars:
            yield Job(info, getattr(args, "no_progress", False), bars)
        finished = True
    finally:
        if started:
            distributed.cleanup(wait_for_peers=finished)


def progress_bar(total: int, desc: str, disable: bool = False):
    """A tqdm bar on rank 0 (hidden elsewhere or with ``disable``); ``update(n)`` after n finished units."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=disable or not distributed.is_main(), dynamic_ncols=True,
                leave=False)
