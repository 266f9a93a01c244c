"""Why is there a barrier? Alignment, REPAIR and layer-wise barriers on digits (CPU, a few minutes).

For the no-BN ``convnet`` (width 32, 20 epochs) and the ``mlp`` (2 x 128, 30
epochs), two seed pairs each (1/2 and 3/4), trained here as
``python -m modeconn.train --dataset digits --model M --seed S --epochs E --lr 0.05 --wd 5e-4 --batch-size 64``
would (same model seed, batch order, SGD recipe):

* the straight-line barrier A -> B (test loss and test error, ``"interp"``
  reference, 21 points) unaligned, after weight matching (Git Re-Basin), and
  after weight matching + REPAIR at every point (Jordan et al. 2023;
  statistics over the training set);
* the variance collapse REPAIR corrects: per hidden layer, the mean over
  channels of σ(θ(½)) / ((σ_A + σ_B)/2) at the aligned midpoint;
* the layer-wise barriers (Adilova et al. 2024, one module interpolated, the
  rest at A) and the cumulative ones (the first k modules), unaligned and aligned.

Writes ``experiments/results/why_barrier.json`` (every number), ``.md`` (the
tables) and ``.png`` (the layer-wise barriers of the first convnet pair).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/why_barrier.py
    OMP_NUM_THREADS=1 .venv/bin/python experiments/why_barrier.py --quick --out /tmp/why   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import modeconn as mc
from modeconn.plots.layers import plot_group_bars

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"convnet": ({"width": 32, "bn": False}, 20), "mlp": ({"depth": 2, "width": 128}, 30)}
PAIRS = ((1, 2), (3, 4))


def train(ds, name: str, seed: int, epochs: int) -> torch.nn.Module:
    """One endpoint, the recipe of ``modeconn.train`` (model seed, batch order, SGD 0.05, wd 5e-4, batch 64)."""
    kwargs, _ = MODELS[name]
    torch.manual_seed(seed)
    model = mc.create_model(name, ds.input_shape, ds.num_classes, **kwargs)
    mc.train_model(model, ds.train_loader(64, seed=seed), epochs, 0.05, 5e-4, seed=seed)
    return model.eval()


def pair_results(ds, a, b, points: int, layer_points: int) -> dict:
    """Barriers unaligned / aligned / aligned + REPAIR, the collapse at t=½, layer-wise barriers."""
    train, test = ds.eval_loader("train", 512), ds.eval_loader("test", 512)
    aligned, _, report = mc.align_models(a, b, method="weight", example_input=ds.x_test[:1])
    paths = {"unaligned": mc.evaluate_path(mc.linear_path(a, b), train, test, points),
             "aligned": mc.evaluate_path(mc.linear_path(a, aligned), train, test, points),
             "aligned+REPAIR": mc.evaluate_repaired_path(a, aligned, train, test, points)}
    _, rep = mc.repair(a, aligned, 0.5, train)
    out = {"endpoints": {"a_test_loss": float(paths["unaligned"].test_nll[0]),
                         "b_test_loss": float(paths["unaligned"].test_nll[-1]),
                         "a_test_error": float(paths["unaligned"].test_error[0]),
                         "b_test_error": float(paths["unaligned"].test_error[-1])},
           "alignment_cosine": [report.mean_before, report.mean_after],
           "barriers": {k: {m: p.barrier(m) for m in ("test_loss", "test_error")} for k, p in paths.items()},
           "midpoint_test_loss": {k: float(p.test_nll[len(p.ts) // 2]) for k, p in paths.items()},
           "std_ratio_at_half": {n: v["std_ratio"] for n, v in rep.layers.items()}, "layerwise": {}}
    for which, end in (("unaligned", b), ("aligned", aligned)):
        lw = mc.layerwise_barriers(a, end, None, test, "module", num_points=layer_points, bn_loader=train)
        out["layerwise"][which] = {"single": dict(lw.barriers("test_loss")),
                                   "cumulative": dict(lw.barriers("test_loss", cumulative=True)),
                                   "single_error": dict(lw.barriers("test_error")),
                                   "hybrid_test_loss": {g: float(v["test_loss"][-1]) for g, v in lw.single.items()}}
    return out


def markdown(results: dict) -> str:
    """The tables of the results (barrier table, collapse, layer-wise) as markdown."""
    lines = ["| model | seeds | test loss A / B | loss barrier unaligned | aligned | aligned+REPAIR | "
             "error barrier unaligned | aligned | aligned+REPAIR |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in results["runs"].items():
        b, e = r["barriers"], r["endpoints"]
        lines.append(f"| {r['model']} | {r['seeds'][0]}/{r['seeds'][1]} | {e['a_test_loss']:.3f} / "
                     f"{e['b_test_loss']:.3f} | " + " | ".join(f"{b[k]['test_loss']:.3f}" for k in b) + " | "
                     + " | ".join(f"{100 * b[k]['test_error']:.2f}%" for k in b) + " |")
    lines += ["", "Variance collapse at the aligned midpoint (mean over channels of σ(θ(½)) / target σ, "
              "per hidden layer):", "", "| model | seeds | per layer |", "|---|---|---|"]
    for r in results["runs"].values():
        cells = ", ".join(f"{n}: {v:.3f}" for n, v in r["std_ratio_at_half"].items())
        lines.append(f"| {r['model']} | {r['seeds'][0]}/{r['seeds'][1]} | {cells} |")
    lines += ["", "Layer-wise test-loss barriers, per module: barrier of that module alone (the others at A) / "
              "barrier of the first k modules together / test loss of the hybrid at t=1 (A with that module "
              "of B):", "", "| model | seeds | pair | per module: alone / first k / hybrid loss |",
              "|---|---|---|---|"]
    for r in results["runs"].values():
        for which, lw in r["layerwise"].items():
            cells = ", ".join(f"{g}: {v:.3f} / {lw['cumulative'][g]:.3f} / {lw['hybrid_test_loss'][g]:.2f}"
                              for g, v in lw["single"].items())
            lines.append(f"| {r['model']} | {r['seeds'][0]}/{r['seeds'][1]} | {which} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Train, measure, write JSON + markdown + PNG."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one pair per model, 2 epochs, 5 points (a smoke run)")
    p.add_argument("--out", default=str(RESULTS), help="output directory (default: experiments/results)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = mc.get_dataset("digits")
    points = layer_points = 5 if args.quick else 21  # one grid: the last cumulative path is the line
    results = {"settings": {"quick": args.quick, "points": points, "layer_points": layer_points,
                            "models": {k: {"kwargs": v[0], "epochs": 2 if args.quick else v[1]}
                                       for k, v in MODELS.items()}}, "runs": {}}
    t0 = time.time()
    for name, (_, epochs) in MODELS.items():
        epochs = 2 if args.quick else epochs
        for sa, sb in PAIRS[:1] if args.quick else PAIRS:
            a, b = train(ds, name, sa, epochs), train(ds, name, sb, epochs)
            r = pair_results(ds, a, b, points, layer_points)
            results["runs"][f"{name}_{sa}_{sb}"] = {"model": name, "seeds": [sa, sb], **r}
            print(f"{name} {sa}/{sb}: test-loss barrier " + " / ".join(
                f"{k} {v['test_loss']:.4f}" for k, v in r["barriers"].items()) + f"  ({time.time() - t0:.0f} s)")
    results["seconds"] = time.time() - t0
    (out / "why_barrier.json").write_text(json.dumps(results, indent=1))
    (out / "why_barrier.md").write_text(markdown(results))
    first = results["runs"][next(k for k in results["runs"] if k.startswith("convnet"))]
    lw = first["layerwise"]
    plot_group_bars({"unaligned, first k modules": lw["unaligned"]["cumulative"],
                     "aligned, first k modules": lw["aligned"]["cumulative"],
                     "aligned, module alone": lw["aligned"]["single"]}, out / "why_barrier.png",
                    "test-loss barrier", f"layer-wise barriers, digits convnet (no BN), seeds "
                    f"{first['seeds'][0]}/{first['seeds'][1]}, the others at A")
    print(markdown(results))
    print(f"wrote {out / 'why_barrier.json'}, {out / 'why_barrier.md'}, {out / 'why_barrier.png'}")


if __name__ == "__main__":
    main()
