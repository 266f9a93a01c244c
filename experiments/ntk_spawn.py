"""Does the NTK move fastest in the same early epochs in which the spawning barrier falls? (Fort et al. 2020)

Fort et al. ("Deep learning versus kernel learning", 2020) track the empirical
NTK during training beside the loss barrier between children spawned from one
parent, and find both change fastest early: the kernel velocity is high
while the barrier between children spawned at epoch k is still falling.

Protocol (digits, no download): a parent network is trained for ``--epochs``
epochs with SGD (``spawn_children``); at every epoch k of ``--spawn-at`` two
children continue from the parent's state with other data orders; the straight
line between them is evaluated (BN recomputed) and its test-loss / test-error
barrier (``interp``) recorded. All runs track the NTK (trace over outputs) on
the first ``--ntk-samples`` training samples: the parent's kernel distance from
its initial kernel and its velocity per epoch, the kernel distance between
the two children at the end, and that of each child from the spawn point.

Reported per parent seed and spawn epoch k: the barrier, the parent's kernel
velocity in epoch k+1 (the epoch right after the spawn point) and its kernel
distance from init at k; then the Spearman rank correlation between barrier(k)
and velocity(k+1) over the k's. Writes ``OUT/ntk_spawn.json``, ``.md``, ``.png``.

    .venv/bin/python experiments/ntk_spawn.py            # CPU preset, about 5 minutes
    .venv/bin/python experiments/ntk_spawn.py --quick    # < 1 minute (the test runs it)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from modeconn import get_dataset
from modeconn.models import create_model
from modeconn.plots.ntk import plot_ntk
from modeconn.training.spawn import spawn_children

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = {
    "cpu": dict(model="convnet", model_kwargs={"width": 16}, epochs=10, spawn_at=[0, 1, 2, 3, 5, 7],
                seeds=[0, 1, 2], ntk_samples=50, num_points=11, lr=0.05, batch_size=32),
    "quick": dict(model="convnet", model_kwargs={"width": 8}, epochs=3, spawn_at=[0, 1], seeds=[0],
                  ntk_samples=16, num_points=5, lr=0.05, batch_size=64),
}


def run_seed(ds, cfg: dict, seed: int) -> dict:
    """One parent, its children and the NTK series; plain data."""
    torch.manual_seed(seed)
    model = create_model(cfg["model"], ds.input_shape, ds.num_classes, **cfg["model_kwargs"])
    x, y = next(iter(ds.eval_loader("train", batch_size=cfg["ntk_samples"], samples=cfg["ntk_samples"])))
    res = spawn_children(model, lambda s: ds.train_loader(cfg["batch_size"], seed=s), ds.eval_loader("train"),
                         ds.eval_loader("test"), epochs=cfg["epochs"], spawn_at=cfg["spawn_at"], seed=seed,
                         lr=cfg["lr"], num_points=cfg["num_points"], ntk_inputs=x, ntk_labels=y)
    hist = res.parent_history
    rows = []
    for point in res.points:
        k = point.epoch
        mean = point.to_dict()["mean"]
        rows.append({"k": k, "barrier_test_loss": mean["barrier_test_loss"],
                     "barrier_test_error": mean["barrier_test_error"],
                     "velocity_after_k": hist[k]["ntk_velocity"],  # record k is epoch k+1
                     "distance_from_init_at_k": hist[k - 1]["ntk_distance"] if k > 0 else 0.0,
                     "children_kernel_distance": mean["ntk_distance"],
                     "children_kernel_distance_from_spawn": mean["ntk_distance_from_spawn"],
                     "children_test_acc": mean["test_acc"]})
    barriers, velocities = [r["barrier_test_loss"] for r in rows], [r["velocity_after_k"] for r in rows]
    rho = spearmanr(barriers, velocities)[0] if len(set(barriers)) > 1 else float("nan")  # undefined if constant
    return {"seed": seed, "parent": res.parent, "parent_history": hist, "spawn": rows,
            "spearman_barrier_vs_velocity": float(rho)}


def markdown(cfg: dict, runs: list, seconds: float) -> str:
    """The tables of the result file."""
    lines = ["# NTK motion vs spawning barrier (digits)", "",
             f"Model `{cfg['model']}` {cfg['model_kwargs']}, {cfg['epochs']} epochs, lr {cfg['lr']}, batch "
             f"{cfg['batch_size']}, NTK (trace over outputs) on the first {cfg['ntk_samples']} training samples, "
             f"2 children per spawn epoch, barrier `interp` on {cfg['num_points']} points. {seconds:.0f} s.", ""]
    for run in runs:
        lines += [f"## parent seed {run['seed']} (final test acc {run['parent']['test_acc']:.4f})", "",
                  "| k | barrier test loss | barrier test err | NTK velocity epoch k+1 | NTK dist. from init at k "
                  "| kernel dist. child-child | kernel dist. child-spawn |", "|---|---|---|---|---|---|---|"]
        for r in run["spawn"]:
            lines.append(f"| {r['k']} | {r['barrier_test_loss']:.4f} | {r['barrier_test_error']:.4f} | "
                         f"{r['velocity_after_k']:.4f} | {r['distance_from_init_at_k']:.4f} | "
                         f"{r['children_kernel_distance']:.4f} | {r['children_kernel_distance_from_spawn']:.4f} |")
        lines += ["", "Parent per epoch: " + ", ".join(
            f"e{h['epoch']}: v={h['ntk_velocity']:.4f} d={h['ntk_distance']:.3f}" for h in run["parent_history"]),
            "", f"Spearman(barrier test loss at k, velocity in epoch k+1) = {run['spearman_barrier_vs_velocity']:.3f}",
            ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny preset (< 1 minute)")
    p.add_argument("--out", default=str(RESULTS), help="output directory (default: experiments/results)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="parent seeds (default: the preset's)")
    args = p.parse_args(argv)
    cfg = dict(PRESETS["quick" if args.quick else "cpu"])
    if args.seeds:
        cfg["seeds"] = args.seeds
    ds = get_dataset("digits")
    t0 = time.perf_counter()
    runs = [run_seed(ds, cfg, s) for s in cfg["seeds"]]
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "ntk_spawn_quick" if args.quick else "ntk_spawn"
    result = {"config": cfg, "seconds": seconds, "runs": runs}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(markdown(cfg, runs, seconds))
    first = runs[0]
    plot_ntk(first["parent_history"], out / f"{name}.png",
             f"NTK of the parent (seed {first['seed']}) and the children's barrier",
             barrier=([r["k"] for r in first["spawn"]], [r["barrier_test_loss"] for r in first["spawn"]]))
    print(markdown(cfg, runs, seconds))
    return result


if __name__ == "__main__":
    main()
