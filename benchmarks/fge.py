"""Cost of FGE relative to plain SGD, and what it buys on digits.

Times, side by side in one process (runs interleaved, best of ``--repeats``):

* plain SGD: ``train_model`` for ``cycles * cycle_epochs`` epochs from the start network;
* FGE: ``fge`` for the same number of epochs (cyclical rate, one snapshot per
  cycle, each snapshot copied and its BN statistics recomputed over the
  training set) **plus** ``evaluate_ensemble`` of the snapshots on the test set.

and prints the ratio (target <= 1.15) for each cycle length, a breakdown of the
overhead, and the test accuracy / NLL / ECE of the start network and of the FGE
ensemble. Model: digits ``convnet`` with BatchNorm (width 16). One torch thread
by default: the machine is shared, and two threads on two busy cores make
timings swing by 10x.

    .venv/bin/python benchmarks/fge.py
    .venv/bin/python benchmarks/fge.py --ckpt checkpoints/digits_cnn_a.pt --repeats 5
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from modeconn.evaluation.bn import recompute_bn
from modeconn.runtime.checkpoints import load_model
from modeconn.data import get_dataset
from modeconn.evaluation.ensembles import evaluate_ensemble
from modeconn.training.fge import train_fge
from modeconn.models import create_model
from modeconn.training.loop import train_model

DEFAULT_CKPT = Path(__file__).resolve().parent.parent / "checkpoints" / "digits_cnn_a.pt"


def start_network(ckpt, ds, epochs):
    if ckpt and Path(ckpt).exists():
        model, meta = load_model(ckpt)
        return model, f"{ckpt} ({meta['arch']} {meta.get('arch_kwargs')})"
    torch.manual_seed(0)
    model = create_model("convnet", ds.input_shape, ds.num_classes, bn=True, width=16)
    train_model(model, ds.train_loader(64, seed=0), epochs=epochs, lr=0.05)
    return model, f"convnet bn width 16 trained here for {epochs} epochs"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT), help="start network (default: shipped digits_cnn_a.pt; "
                                                             "trained here when missing)")
    p.add_argument("--cycles", type=int, default=8)
    p.add_argument("--cycle-epochs", type=int, nargs="+", default=[2, 4],
                   help="cycle lengths to measure; the budget is cycles * cycle_epochs epochs, the total "
                        "epoch budget is kept at cycles * cycle_epochs[0] (default: 2 4)")
    p.add_argument("--lr-max", type=float, default=0.05)
    p.add_argument("--lr-min", type=float, default=0.0005)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    ds = get_dataset("digits")
    start, desc = start_network(args.ckpt, ds, epochs=30)
    train_loader = ds.train_loader(64, seed=1)
    bn_loader, test_loader = ds.eval_loader("train"), ds.eval_loader("test")
    budget = args.cycles * args.cycle_epochs[0]
    print(f"start network: {desc}")
    print(f"digits: {ds.info['n_train']} train / {ds.info['n_test']} test, batch 64 -> "
          f"{len(train_loader)} iterations per epoch; {args.threads} thread(s); budget {budget} epochs")

    def run_sgd():
        m = copy.deepcopy(start)
        t0, c0 = time.perf_counter(), time.process_time()
        train_model(m, train_loader, epochs=budget, lr=args.lr_max, seed=1)
        return time.perf_counter() - t0, time.process_time() - c0

    def run_fge(cycle_epochs):
        cycles = budget // cycle_epochs
        t0, c0 = time.perf_counter(), time.process_time()
        res = train_fge(start, train_loader, cycles, cycle_epochs, args.lr_max, args.lr_min, seed=1, bn_loader=bn_loader)
        t1 = time.perf_counter()
        ens = evaluate_ensemble(res.snapshots, test_loader)
        t2, c2 = time.perf_counter(), time.process_time()
        return (t2 - t0, t2 - t1, c2 - c0), res, ens

    run_sgd()  # warm-up (allocator, kernels)
    sgd_times = []
    fge_times = {c: [] for c in args.cycle_epochs}
    results = {}
    for _ in range(args.repeats):
        sgd_times.append(run_sgd())
        for c in args.cycle_epochs:
            times, res, ens = run_fge(c)
            fge_times[c].append(times)
            results[c] = (res, ens)

    sgd, sgd_cpu = min(t[0] for t in sgd_times), min(t[1] for t in sgd_times)
    m = copy.deepcopy(start)
    c0 = time.process_time()
    for _ in range(3):
        recompute_bn(m, bn_loader)
    bn_pass = (time.process_time() - c0) / 3

    print(f"\nplain SGD, {budget} epochs: best wall {sgd:.2f} s, best CPU {sgd_cpu:.2f} s "
          f"(wall of each run: {', '.join(f'{t[0]:.2f}' for t in sgd_times)})")
    print(f"one BN pass over the training set: {bn_pass * 1000:.0f} ms CPU "
          f"(= {bn_pass / (sgd_cpu / budget):.2f} epochs of SGD)")
    print("ratio = FGE (training, snapshots, BN passes, ensemble evaluation) / plain SGD of the same epochs;")
    print("wall: median over interleaved pairs of runs; CPU: process time, best run of each (robust to a busy "
          "machine)")
    print(f"\n{'cycle':>6s} {'cycles':>6s} {'FGE+eval s':>10s} {'eval s':>7s} {'wall ratio':>10s} "
          f"{'CPU ratio':>9s} {'floor':>6s} {'target 1.15':>11s}")
    per_epoch = sgd_cpu / budget
    for c in args.cycle_epochs:
        best = min(t[0] for t in fge_times[c])
        ev = min(t[1] for t in fge_times[c])
        cpu_ratio = min(t[2] for t in fge_times[c]) / sgd_cpu
        med = statistics.median(f[0] / s[0] for f, s in zip(fge_times[c], sgd_times))
        floor = 1 + (budget // c) * bn_pass / (per_epoch * budget)  # BN passes alone
        ok = med <= 1.15 and cpu_ratio <= 1.15
        print(f"{c:4d} ep {budget // c:6d} {best:10.2f} {ev:7.2f} {med:10.3f} {cpu_ratio:9.3f} {floor:6.3f} "
              f"{'ok' if ok else 'MISSED':>11s}")
    print("floor = 1 + (snapshots x one BN pass) / SGD time: the exact BN recompute alone")

    s = evaluate_ensemble([start], test_loader)
    print(f"\n{'digits test':26s} {'acc':>7s} {'NLL':>7s} {'ECE':>7s}")
    print(f"{'start network':26s} {s.acc[0]:7.4f} {s.nll[0]:7.4f} {s.ece[0]:7.4f}")
    for c in args.cycle_epochs:
        res, ens = results[c]
        print(f"{f'FGE {len(res.snapshots)} x {c}-epoch cycles':26s} {ens.acc[-1]:7.4f} {ens.nll[-1]:7.4f} "
              f"{ens.ece[-1]:7.4f}   (members: NLL {ens.member_nll.min():.4f}-{ens.member_nll.max():.4f}, "
              f"distance from start {min(res.distances):.2f}-{max(res.distances):.2f})")


if __name__ == "__main__":
    main()
