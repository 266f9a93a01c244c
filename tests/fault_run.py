"""Run a modeconn command that dies abruptly after N units of progress, as a killed job would (tests only).

usage:
    python tests/fault_run.py N[:RANK] MODULE [ARGS...]
    torchrun --nproc_per_node 2 tests/fault_run.py N[:RANK] MODULE -- [ARGS...]

The command's progress bars count the units they are told about (training
steps, grid points); once a bar has counted N, the process exits at once with
status 17 through ``os._exit``: no exception, no ``finally``, no flushing, as
after SIGKILL. With ``:RANK`` only that rank of a torchrun job dies (its peers
then fail in their next collective). The command itself runs unchanged, as
``python -m MODULE ARGS`` would run it.
"""
import os
import runpy
import sys

EXIT_STATUS = 17


class _DyingBar:
    """Wraps a progress bar; ``update`` ends the process once ``steps`` units were counted."""

    def __init__(self, bar, steps: int, rank: int):
        self._bar, self._left, self._rank = bar, steps, rank

    def update(self, n: int = 1):
        """Count ``n`` units; exit abruptly when the budget is spent."""
        self._bar.update(n)
        self._left -= n
        if self._left <= 0:
            print(f"fault_run: rank {self._rank} exits now", file=sys.stderr, flush=True)
            os._exit(EXIT_STATUS)

    def __enter__(self):
        """The bar as a context manager (closed on exit), like tqdm."""
        self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        """Close the wrapped bar."""
        return self._bar.__exit__(*exc)

    def __getattr__(self, name):
        """Everything else (close, set_postfix...) is the wrapped bar's."""
        return getattr(self._bar, name)


def main() -> None:
    """Patch the commands' progress-bar factory, then run MODULE as ``__main__`` with ARGS."""
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    spec, module, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    steps, _, only_rank = spec.partition(":")
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun before the command joins its group

    from modeconn.cli import session

    real_bar = session.progress_bar

    def dying_bar(total, desc, disable=False):
        """The command's bar, wrapped on the rank that is to die."""
        bar = real_bar(total, desc, disable)
        return bar if only_rank and int(only_rank) != rank else _DyingBar(bar, int(steps), rank)

    session.progress_bar = dying_bar
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
