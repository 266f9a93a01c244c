"""How a command ends: one line on stderr and an exit status, never a traceback for a failure we expect.

Exit status of every command (also printed by ``--help``):

* 0 — done.
* 1 — the run failed while running: a file or directory could not be written
  (no space left on the device, permission denied, a file where a directory
  must be). Files written before stay whole (every write is atomic) and the
  state of the last finished epoch or grid row is kept.
* 2 — the command line or an input is unusable: a bad flag value, a missing,
  corrupt or NaN checkpoint, a missing dataset, an earlier run in ``--out``
  without ``--resume`` / ``--force``; or training diverged (a NaN/Inf loss:
  the line names the epoch, the step and the learning rate, and the state of
  the last finished epoch is kept).
* 130 — interrupted by Ctrl-C (SIGINT); 143 — stopped by SIGTERM (what SLURM
  sends before it kills a job). The line says what was kept and whether
  ``--resume`` continues.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator, Optional, Sequence

from modeconn.runtime import distributed
from modeconn.runtime.checkpoints import WriteError

EXIT_STATUS = """exit status:
  0    done
  1    the run failed: a file could not be written (what was finished is kept)
  2    bad arguments or input, or training diverged (the state of the last finished
       epoch is kept)
  130  interrupted by Ctrl-C, 143 by SIGTERM (the state of the last finished epoch
       or grid row is kept; --resume continues)"""

Main = Callable[[Optional[Sequence[str]]], Optional[int]]


class CommandError(Exception):
    """The command line or an input is unusable: printed as one line, exit status 2."""


class RunFailed(Exception):
    """A run that had started failed: printed as one line, exit status 1."""


class Diverged(CommandError):
    """Training diverged (a NaN/Inf loss): a setting to change, so exit status 2 like bad input."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a command: exit status 128 + the signal's number.

    A ``KeyboardInterrupt`` so that code which cleans up after Ctrl-C does so
    after SIGTERM too. ``kept`` says what was saved and how to continue.
    """

    def __init__(self, signum: int = signal.SIGINT, kept: str = ""):
        """``signum``: the signal that stopped the command; ``kept``: what was saved, how to continue."""
        super().__init__(signum, kept)
        self.signum, self.kept = int(signum), kept

    @property
    def status(self) -> int:
        """The shell's convention for a process ended by a signal."""
        return 128 + self.signum


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Interrupted` in the main thread, as Ctrl-C raises
    ``KeyboardInterrupt``; the previous handler is restored afterwards.

    The first SIGTERM raises; later ones are ignored while the command cleans
    up (SLURM follows with SIGKILL after its grace period anyway). Outside the
    main thread (where Python cannot install handlers) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        """Raise in the main thread, once."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM are held, and delivered again when it ends.

    A state file and the count of what it holds (which the interruption's
    message reports) then always change together: a signal arriving between
    the file's rename and the count's update would report the epoch before.
    Outside the main thread nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])  # to the handler in force again (Ctrl-C, or SIGTERM's Interrupted)


def one_line(text: str) -> str:
    r"""A message on one line: its lines joined with single spaces.

    Example:
        >>> one_line("dataset 'mnist' not found.\n  Copy the files, or pass --download.")
        "dataset 'mnist' not found. Copy the files, or pass --download."
    """
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def os_error_line(e: OSError) -> str:
    """``cannot write PATH: CAUSE`` for a failed write, ``PATH: CAUSE`` for any other file-system error.

    Example:
        >>> import errno
        >>> os_error_line(WriteError(errno.ENOSPC, "No space left on device", "runs/x/model.pt"))
        'cannot write runs/x/model.pt: No space left on device'
        >>> os_error_line(PermissionError(errno.EACCES, "Permission denied", "data/mnist"))
        'data/mnist: Permission denied'
    """
    if isinstance(e, WriteError) or not e.filename:
        return str(e)
    return f"{e.filename}: {e.strerror or e}"


def _say(text: str) -> None:
    """Print ``text`` as one line on stderr, prefixed with the rank in a torchrun job of several processes."""
    # torchrun's environment, not the process group: the command has left the group by now
    several = distributed.launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1
    rank = f"[rank {os.environ['RANK']}] " if several else ""
    print(rank + one_line(text), file=sys.stderr, flush=True)


def _stopped(e: KeyboardInterrupt) -> int:
    """Report an interruption (what was kept, if known); returns 128 + the signal's number."""
    stop = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
    name = signal.Signals(stop.signum).name
    _say(f"interrupted ({name})" + (f"; {stop.kept}" if stop.kept else ""))
    return stop.status


def run_command(main_fn: Main, argv: Optional[Sequence[str]] = None) -> int:
    """Run a command's body and return its exit status (see the module docstring).

    Expected failures become one line on stderr (prefixed ``[rank N]`` under
    torchrun); SIGTERM is handled like Ctrl-C while the body runs.
    """
    try:
        with sigterm_interrupts():
            return main_fn(argv) or 0
    except KeyboardInterrupt as e:
        return _stopped(e)
    except (RunFailed, WriteError) as e:
        _say(f"error: {e}")
        return 1
    except (CommandError, FloatingPointError, ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        _say(f"error: {os_error_line(e) if isinstance(e, OSError) else e}")
        return 2
    except OSError as e:
        _say(f"error: {os_error_line(e)}")
        return 1
