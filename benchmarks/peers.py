"""modeconn against the peers' own code, side by side in one process.

Fronts: ``curve`` (a Bezier curve step against a per-layer curve baseline in the
style of Garipov et al., written here, for VGG16 and PreResNet-20), ``hessian``
(pyhessian), ``grid`` (loss-landscapes), ``matching`` (rebasin). The peers are
never dependencies of modeconn: install them with

    pip install -r benchmarks/requirements-peers.txt

A peer that is not importable gives a row saying so. Every timing is a median
over interleaved repetitions (A B A B ...); the ratio is modeconn / peer for
times and peer / modeconn for objectives, so <= 1 means modeconn is ahead.
The table is printed and written to ``benchmarks/results/peers.md``.

    python benchmarks/peers.py [--only curve hessian] [--reps 5] [--threads 2] [--quick]
"""
import argparse
import importlib
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._peers import table  # noqa: E402

FRONTS = ("curve", "hessian", "grid", "matching")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, python {platform.python_version()}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=FRONTS, default=list(FRONTS), help="fronts to run (default: all)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions per timing (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--quick", action="store_true", help="smaller problems, for a smoke test")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "peers.md",
                   help="markdown table written here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for front in args.only:
        mod = importlib.import_module(f"benchmarks._peer_{front}")
        for row in mod.rows(reps=args.reps, quick=args.quick):
            rows.append(row)
            ratio = "-" if row.ratio is None else f"{row.ratio:.2f}"
            if row.peer_invalid:
                ratio = f"not comparable ({row.peer_invalid})"
            print(f"[{front}] {row.work}: ours {row.ours} peer {row.peer} ratio {ratio} {row.note}", flush=True)
    text = table(rows, machine())
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# modeconn vs peers\n\n`python benchmarks/peers.py`\n\n" + text + "\n")
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
