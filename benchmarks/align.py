"""How long neuron alignment takes, and what it buys on the shipped digits pairs.

Times (best of ``--repeats``, wall clock and process CPU time):

* weight matching (Git Re-Basin) of two randomly initialised VGG16 (3x32x32,
  10 classes, seeds 0 and 1): ``weight_matching`` alone (target: under 10 s
  on 2 cores) and the whole ``align`` call (spec inference with torch.fx,
  matching, before/after similarity, permuted copy);
* the same for two preresnet20 (3x32x32);
* activation matching of the shipped digits CNN pair (``align`` with
  ``method="activation"`` over the digits training set, eval loader).

Then, for the shipped MLP and CNN pairs, the straight-line test-loss (and
test-error) barrier between A and B before alignment and after weight and
after activation matching (``evaluate_path`` on ``linear_path``, 21 points,
BatchNorm statistics recomputed at every point; barrier = max_t L(t) -
[(1-t) L(0) + t L(1)]).

Threads: ``torch.set_num_threads(--threads)`` (default 2) and, unless already
set, ``OMP_WAIT_POLICY=PASSIVE``: on a shared machine, idle OpenMP threads
that spin between parallel regions otherwise steal the cores they wait for
(measured here: VGG16 matching 48 s wall with spinning threads vs 9 s
passive, at load average 5 on 2 cores). The load average is printed with
the timings because they are noisy on a shared machine.

    .venv/bin/python benchmarks/align.py
    .venv/bin/python benchmarks/align.py --threads 1 --repeats 3
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from modeconn.alignment import align_models, infer_permutation_spec, weight_matching  # noqa: E402
from modeconn.runtime.checkpoints import load_model  # noqa: E402
from modeconn.core.curve_model import linear_path  # noqa: E402
from modeconn.data import get_dataset  # noqa: E402
from modeconn.models import create_model  # noqa: E402
from modeconn.evaluation.path import evaluate_path  # noqa: E402

CKPT = Path(__file__).resolve().parent.parent / "checkpoints"


def timed(fn, repeats):
    """(result of the last call, best wall seconds, CPU seconds of that call)."""
    best, best_cpu, out = float("inf"), float("nan"), None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        if wall < best:
            best, best_cpu = wall, cpu
    return out, best, best_cpu


def load() -> str:
    return "load average %.1f %.1f %.1f" % os.getloadavg()


def bench_weight(label, arch, kwargs, repeats):
    torch.manual_seed(0)
    a = create_model(arch, (3, 32, 32), 10, **kwargs)
    torch.manual_seed(1)
    b = create_model(arch, (3, 32, 32), 10, **kwargs)
    x = torch.randn(1, 3, 32, 32)
    n = sum(p.numel() for p in a.parameters())
    spec, t_spec, _ = timed(lambda: infer_permutation_spec(a, x), 1)
    (perm, info), t_wm, c_wm = timed(lambda: weight_matching(a, b, spec, seed=0), repeats)
    (_, _, report), t_align, c_align = timed(lambda: align_models(a, b, example_input=x, seed=0), repeats)
    print(f"{label:12s} {n / 1e6:6.2f}M params, {len(spec.groups):2d} groups | weight_matching "
          f"{t_wm:6.2f} s (cpu {c_wm:6.2f} s, {info.sweeps} sweeps, converged={info.converged}) | "
          f"align_models() {t_align:6.2f} s (cpu {c_align:6.2f} s; spec inference {t_spec:.2f} s) | "
          f"mean cosine {report.mean_before:.3f} -> {report.mean_after:.3f} | {load()}")
    return t_wm


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs, best reported (default: %(default)s)")
    p.add_argument("--num-points", type=int, default=21, help="points per straight line (default: %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torch.set_num_threads({args.threads}), "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, {os.cpu_count()} CPUs visible, {load()}")

    print("\n== timings")
    t_vgg = bench_weight("vgg16", "vgg16", {}, args.repeats)
    bench_weight("preresnet20", "preresnet", {"depth": 20}, args.repeats)

    ds = get_dataset("digits")
    train, test = ds.eval_loader("train"), ds.eval_loader("test")
    pairs = {}
    for name in ("mlp", "cnn"):
        a, _ = load_model(CKPT / f"digits_{name}_a.pt")
        b, _ = load_model(CKPT / f"digits_{name}_b.pt")
        pairs[name] = (a, b)
    a, b = pairs["cnn"]
    (_, _, rep), t_act, c_act = timed(lambda: align_models(a, b, method="activation", loader=train), args.repeats)
    print(f"{'digits cnn':12s} activation matching, align_models() {t_act:6.2f} s (cpu {c_act:6.2f} s) over "
          f"{len(ds.x_train)} training images | mean correlation {rep.mean_before:.3f} -> "
          f"{rep.mean_after:.3f} | {load()}")
    print(f"VGG16 weight matching target < 10 s: {'met' if t_vgg < 10 else 'NOT met'} ({t_vgg:.2f} s)")

    print(f"\n== straight-line barriers A -> B on digits ({args.num_points} points, BN recomputed; "
          "interp reference)")
    print(f"{'pair':6s} {'alignment':11s} {'test loss barrier':>18s} {'test error barrier':>19s} "
          f"{'align s':>8s}")
    for name, (a, b) in pairs.items():
        for method in (None, "weight", "activation"):
            t = 0.0
            end = b
            if method is not None:
                t0 = time.perf_counter()
                end, _, _ = align_models(a, b, method=method, loader=train, seed=0)
                t = time.perf_counter() - t0
            res = evaluate_path(linear_path(a, end), train, test, args.num_points)
            print(f"{name:6s} {method or 'none':11s} {res.barrier('test_loss'):18.4f} "
                  f"{100 * res.barrier('test_error'):18.2f}% {t:8.2f}")


if __name__ == "__main__":
    main()
