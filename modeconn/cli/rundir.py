"""One run directory: never overwritten by surprise, resumed only with the same arguments, saved atomically.

A command that works in units (training epochs, grid rows) saves a resumable
state after every finished unit. The same rules hold for all of them:

* an earlier run in ``--out`` needs ``--resume`` (continue it; the arguments
  must match those recorded in the state) or ``--force`` (start over, the old
  state is removed);
* the state is written atomically, so an interruption at any moment leaves the
  state of the last finished unit;
* an interruption (Ctrl-C, SIGTERM) or a divergence inside :meth:`RunDir.resumable`
  ends with one line saying what is kept and how to continue.

:class:`TrainingRun` keeps a torch file (``resume.pt``, plus ``history.json``)
for the epoch loops of ``train``, ``train_curve`` and ``fge``;
:class:`GridRun` keeps the partial grid (``*.partial.npz``) of ``plane`` and
``landscape``; :class:`StoreRun` keeps one training state per named run
(``states/<name>.pt``) for commands that train many networks (``spawn``).
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, MutableMapping, Optional, Set, Tuple

import numpy as np

from modeconn.cli.errors import CommandError, Diverged, Interrupted, signals_held
from modeconn.cli.outputs import write_json, write_npz
from modeconn.geometry.grid import GridResult
from modeconn.runtime.checkpoints import FORMAT, FORMAT_VERSION, atomic_save, load_checkpoint, make_directory
from modeconn.runtime.plain import to_plain


class RunDir:
    """An output directory holding one run of a command (see the module docstring).

    Args:
        out: the directory (``--out``).
        config: the arguments that must match on ``--resume`` (plain data).
        final: name of the file a finished run leaves in ``out``.
        state_name: name of the resumable state file in ``out``.
        is_main: whether this process writes (rank 0); other ranks only keep count.
    """

    unit = "unit"

    def __init__(self, out: Path, config: Mapping[str, Any], final: str, state_name: str, is_main: bool = True):
        """See the class docstring; nothing is touched on disk before :meth:`start`."""
        self.out, self.config, self.final = Path(out), dict(config), final
        self.state_path = self.out / state_name
        self.is_main = is_main
        self.done = 0  # finished units whose state is on disk

    # -- subclasses: the state file
    def read_state(self) -> Tuple[Mapping[str, Any], Any]:
        """(recorded config, state) of the state file."""
        raise NotImplementedError

    def save_state(self, state: Any) -> None:
        """Write the state of the finished units (atomic; rank 0 only) and count them."""
        raise NotImplementedError

    def units_in(self, state: Any) -> int:
        """How many units a state holds."""
        raise NotImplementedError

    def kept(self) -> str:
        """What an interrupted run leaves behind and how to continue it."""
        raise NotImplementedError

    # -- shared
    def start(self, resume: bool, force: bool) -> Optional[Any]:
        """Check the directory; return the state to continue from (``--resume``), or None to start afresh.

        Raises:
            CommandError: ``--resume`` without a state file or with different
                arguments; an earlier run present without ``--resume`` or ``--force``.
        """
        if resume:
            return self._resume()
        if not force and (self.state_path.exists() or (self.out / self.final).exists()):
            raise CommandError(f"{self.out} already holds a run; pass --resume to continue it or --force to "
                               "start over")
        if self.is_main:
            make_directory(self.out)
            if self.state_path.exists():  # --force: never resume a state of the replaced run
                self.state_path.unlink()
        return None

    def _resume(self) -> Any:
        """The state to continue from, once the file exists and the arguments match."""
        if not self.state_path.exists():
            hint = f" ({self.out / self.final} is there: that run finished)" if (self.out / self.final).exists() else ""
            raise CommandError(f"--resume: {self.state_path} does not exist; nothing to resume{hint}")
        old, state = self.read_state()
        new, old = to_plain(self.config), to_plain(old)
        diff = [k for k in new if k in old and old[k] != new[k]]
        if diff:
            raise CommandError("--resume: arguments differ from the interrupted run: " + ", ".join(
                f"{k}={new[k]!r} (was {old[k]!r})" for k in diff))
        self.done = self.units_in(state)
        return state

    @contextlib.contextmanager
    def resumable(self) -> Iterator[None]:
        """Inside the block an interruption or a divergence ends with one line saying what is kept.

        ``KeyboardInterrupt`` / SIGTERM become :class:`Interrupted` and
        ``FloatingPointError`` (training diverged) :class:`Diverged`, both
        carrying :meth:`kept`.
        """
        try:
            yield
        except KeyboardInterrupt as e:
            raise Interrupted(getattr(e, "signum", signal.SIGINT), self.kept()) from None
        except FloatingPointError as e:
            raise Diverged(f"{e}; {self.saved()}") from None

    def saved(self) -> str:
        """What a diverged run leaves behind."""
        return (f"the state after {self.unit} {self.done} is kept in {self.state_path}, pass --force to start over"
                if self.done else "nothing was saved")


class TrainingRun(RunDir):
    """The run directory of an epoch loop: ``resume.pt`` (training state) and ``history.json``."""

    unit = "epoch"

    def __init__(self, out: Path, config: Mapping[str, Any], final: str, is_main: bool = True):
        """``final``: the file a finished run leaves (model.pt, curve.pt, fge.json)."""
        super().__init__(out, config, final, "resume.pt", is_main)

    def read_state(self) -> Tuple[Mapping[str, Any], dict]:
        """The training state of ``resume.pt`` (refused when unreadable or holding NaN/Inf)."""
        state = load_checkpoint(self.state_path, kind="training_state")
        return state.get("config", {}), state

    def units_in(self, state: Mapping) -> int:
        """Finished epochs (``state["epoch"]`` counts from 0)."""
        return int(state["epoch"]) + 1

    def save_state(self, state: Mapping) -> None:
        """Write ``resume.pt`` (the state of the finished epoch), then ``history.json``."""
        with signals_held():  # the file and the epoch count reported on interruption change together
            if self.is_main:
                atomic_save({"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "training_state",
                             "config": self.config, **state}, self.state_path)
            self.done = self.units_in(state)  # before the history: resume.pt alone decides what --resume continues
        if self.is_main:
            write_json(self.out / "history.json", state["history"])

    def epoch_saver(self, bar=None) -> Callable[[dict, dict], None]:
        """``on_epoch_end(record, state)``: save the state and the history; show the epoch on ``bar``."""

        def save(record: dict, state: dict) -> None:
            """Save the finished epoch's state and history; show its numbers on the bar."""
            self.save_state(state)
            if bar is not None and self.is_main:
                bar.set_postfix(epoch=record["epoch"], loss=f"{record['loss']:.4f}",
                                acc=f"{record['acc']:.3f}", lr=f"{record['lr']:.2g}")

        return save

    def kept(self) -> str:
        """Which epoch ``resume.pt`` holds and that ``--resume`` continues from it."""
        if not self.done:
            return "no epoch had finished, nothing to resume"
        return f"the state after epoch {self.done} is in {self.state_path}; rerun with --resume to continue"


class GridRun(RunDir):
    """The run directory of a grid evaluated row by row: the partial grid ``<name>.partial.npz``."""

    unit = "row"

    def __init__(self, out: Path, config: Mapping[str, Any], final: str, state_name: str, is_main: bool = True):
        """``final``: the finished grid's file; ``state_name``: the partial grid's file."""
        super().__init__(out, config, final, state_name, is_main)
        self.rows: Optional[int] = None

    def read_state(self) -> Tuple[Mapping[str, Any], GridResult]:
        """The partial grid and the arguments it was computed with."""
        try:
            with np.load(self.state_path, allow_pickle=False) as z:
                return json.loads(str(z["config_json"])), GridResult.from_arrays(dict(z))
        except (OSError, ValueError, KeyError) as e:
            raise CommandError(f"--resume: {self.state_path} is not a readable partial grid: {e}") from None

    def units_in(self, grid: GridResult) -> int:
        """Finished rows (and, for the messages, how many the grid has)."""
        self.rows = grid.num_rows
        return int(grid.rows_done)

    def save_state(self, grid: GridResult) -> None:
        """Write the partial grid with the arguments it belongs to."""
        with signals_held():  # the file and the row count reported on interruption change together
            if self.is_main:
                arrays = grid.to_arrays()
                arrays["config_json"] = np.array(json.dumps(to_plain(self.config), sort_keys=True))
                write_npz(self.state_path, arrays)
            self.done = self.units_in(grid)

    def row_saver(self) -> Callable[[int, GridResult], None]:
        """``on_row(row, grid)``: save the partial grid after every finished row."""
        return lambda row, grid: self.save_state(grid)

    def finish(self) -> None:
        """The final files are written: the partial grid is no longer needed."""
        if self.is_main and self.state_path.exists():
            self.state_path.unlink()

    def kept(self) -> str:
        """How many rows the partial grid holds and that ``--resume`` continues from them."""
        if not self.done:
            return "no grid row had finished, nothing to resume"
        return (f"{self.done} of {self.rows} grid rows are in {self.state_path}; rerun with --resume to "
                "continue")


class StateStore(MutableMapping):
    """Named training states as files ``<directory>/<name>.pt``: the ``store`` a multi-run command hands the
    library (e.g. :func:`~modeconn.training.spawn.spawn_children`).

    Rank 0 writes every state atomically (kind ``training_state``, with the
    run's config); the other ranks keep what they are given in memory, so no
    rank reads a file another is writing. Files left by an earlier run are
    read only when ``resume`` is set (``--force`` removes them first).
    """

    _NAME = re.compile(r"^[A-Za-z0-9_]+$")

    def __init__(self, directory: Path, config: Mapping[str, Any], is_main: bool, resume: bool):
        """See the class docstring."""
        self.directory, self.config, self.is_main, self.resume = Path(directory), dict(config), is_main, resume
        self._memory: Dict[str, Any] = {}
        self._written: Set[str] = set()

    def _path(self, name: str) -> Path:
        """The file of ``name`` (letters, digits, underscores only)."""
        if not self._NAME.match(name):
            raise ValueError(f"state name {name!r}: use letters, digits and underscores only")
        return self.directory / f"{name}.pt"

    def _on_disk(self, name: str) -> bool:
        """Whether this process reads ``name`` from its file."""
        return (self.resume or name in self._written) and self._path(name).exists()

    def __getitem__(self, name: str) -> Any:
        if name in self._memory:
            return self._memory[name]
        if self._on_disk(name):
            return load_checkpoint(self._path(name), kind="training_state")
        raise KeyError(name)

    def __setitem__(self, name: str, state: Any) -> None:
        if self.is_main:
            atomic_save({"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "training_state",
                         "config": self.config, **state}, self._path(name))
            self._written.add(name)
        else:
            self._memory[name] = state

    def __delitem__(self, name: str) -> None:
        self._memory.pop(name, None)
        if self.is_main and self._path(name).exists():
            self._path(name).unlink()
        self._written.discard(name)

    def __iter__(self) -> Iterator[str]:
        names = set(self._memory) | {p.stem for p in self.directory.glob("*.pt") if self._on_disk(p.stem)}
        return iter(sorted(names))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class StoreRun(RunDir):
    """The run directory of a command that trains many networks: a :class:`StateStore` in ``OUT/states``."""

    unit = "epoch"

    def __init__(self, out: Path, config: Mapping[str, Any], final: str, is_main: bool = True):
        """``final``: the file a finished run leaves (spawn.json)."""
        super().__init__(out, config, final, "states", is_main)

    def read_state(self) -> Tuple[Mapping[str, Any], None]:
        """The arguments recorded in ``states/config.json`` (the states themselves are read on demand)."""
        try:
            return json.loads((self.state_path / "config.json").read_text()), None
        except (OSError, ValueError) as e:
            raise CommandError(f"--resume: {self.state_path / 'config.json'} is not readable: {e}") from None

    def units_in(self, state: None) -> int:
        """Training states kept so far."""
        return len(list(self.state_path.glob("*.pt")))

    def start(self, resume: bool, force: bool) -> StateStore:
        """As :meth:`RunDir.start` (``--force`` removes ``OUT/states``); returns the store to train with."""
        if force and not resume and self.is_main and self.state_path.is_dir():
            shutil.rmtree(self.state_path)
        super().start(resume, force)
        if not resume and self.is_main:
            make_directory(self.state_path)
            write_json(self.state_path / "config.json", to_plain(self.config))
        return StateStore(self.state_path, self.config, self.is_main, resume)

    def saved(self) -> str:
        """What a diverged run leaves behind."""
        return f"the states of the finished epochs are kept in {self.state_path}, pass --force to start over"

    def kept(self) -> str:
        """Where the states are and that ``--resume`` continues from them."""
        if not any(self.state_path.glob("*.pt")):
            return "no epoch had finished, nothing to resume"
        return (f"the states of the finished epochs are in {self.state_path}; rerun with --resume to continue "
                "(finished runs are not trained again)")
