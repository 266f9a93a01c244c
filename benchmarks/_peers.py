"""Shared parts of the side-by-side comparisons with the peers' own code (``benchmarks/peers.py``).

A front (``benchmarks/_peer_<front>.py``) exposes ``rows(reps, quick) -> List[Row]``.
Timings are taken with :func:`interleaved`: the contestants run A B A B ... in one
process on the same inputs, after warm-up, and each row reports the medians. A
peer that is not importable gives a row that says so (never a silent gap).
"""
from __future__ import annotations

import importlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

INSTALL_HINT = "pip install -r benchmarks/requirements-peers.txt"


@dataclass
class Row:
    """One line of the table: modeconn's figure, the peer's, and who the peer is.

    ``higher_is_better`` (e.g. a matching objective) flips the ratio, so a ratio
    <= 1 is always a win for modeconn. ``ours``/``peer`` are None when a side could
    not run; ``note`` says why or adds context (accuracy, number of products).
    ``peer_invalid`` names why the peer's figure answers another question (e.g. a
    "permuted" network that no longer computes the original's function): the
    figure is shown, no ratio is computed from it.
    """
    front: str
    work: str
    ours: Optional[float]
    peer: Optional[float]
    peer_name: str
    unit: str = "s"
    higher_is_better: bool = False
    note: str = ""
    peer_invalid: str = ""

    @property
    def ratio(self) -> Optional[float]:
        """ours/peer (peer/ours when higher is better); None when a side is missing or the peer's result
        is not a valid answer to the same question (``peer_invalid`` says why)."""
        if self.ours is None or self.peer is None or self.peer_invalid:
            return None
        if self.higher_is_better:
            return self.peer / self.ours if self.ours else float("inf")
        return self.ours / self.peer if self.peer else float("inf")

    @property
    def wins(self) -> Optional[bool]:
        r = self.ratio
        return None if r is None else r <= 1.0


def peer_module(name: str):
    """The peer package ``name`` if importable, else None."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def missing(front: str, work: str, peer_name: str) -> Row:
    """The row shown when a peer package is not installed."""
    return Row(front, work, None, None, peer_name, note=f"{peer_name} not importable: {INSTALL_HINT}")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(fns: Dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> Dict[str, float]:
    """Median wall time of each callable, run in turn A B A B ... ``reps`` times after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def fmt(x: Optional[float], unit: str) -> str:
    if x is None:
        return "-"
    if unit == "s":
        return f"{x:.3f} s" if x >= 0.1 else f"{1e3 * x:.2f} ms"
    return f"{x:.4g}{(' ' + unit) if unit else ''}"


def table(rows: List[Row], machine: str) -> str:
    """A markdown table: work, modeconn, peer, ratio (<= 1 is a win), note; the machine below."""
    out = ["| work | modeconn | peer | ratio (<= 1: modeconn ahead) | note |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = ("not comparable: " + r.peer_invalid if r.peer_invalid
                 else "-" if r.ratio is None else f"{r.ratio:.2f}")
        out.append(f"| {r.work} | {fmt(r.ours, r.unit)} | {r.peer_name} {fmt(r.peer, r.unit)} | {ratio} | {r.note} |")
    out.append("")
    out.append(f"Machine: {machine}")
    return "\n".join(out)
