"""SAM vs sparse SAM (SSAM, 50%): accuracy, sharpness and step time (Mi et al. 2022).

Mi et al. ("Make Sharpness-Aware Minimization Stronger: A Sparsified
Perturbation Approach", 2022) perturb only a masked half of the parameters
(mask from Fisher information, SSAM-F, or from dynamic sparse training) and
report SAM's accuracy kept or improved at 50% sparsity.

Protocol (digits, no download): the same network and seed trained with plain
SGD, SAM (ρ = ``--rho``), SSAM with a Fisher mask and SSAM with a random mask
(both ``--sparsity`` 0.5; the mask renewed every epoch; ``train_model``).
Reported per run: test accuracy and loss, the Hessian's largest eigenvalue
λmax of the training loss (Lanczos over the first ``--hessian-samples``
training samples) and its trace (Hutchinson), and the mean seconds per SGD
step (epochs after the first). Means over seeds in the summary table. Writes ``OUT/sam_ssam.json``,
``.md`` and ``.png``.

Step time: modeconn's SSAM computes dense gradients and masks the ascent, so
it costs what SAM costs (two forward/backward passes); the paper's savings
need sparse kernels, which PyTorch does not give a dense network.

    .venv/bin/python experiments/sam_ssam.py           # CPU preset, about 5 minutes
    .venv/bin/python experiments/sam_ssam.py --quick   # < 1 minute (the test runs it)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from modeconn import get_dataset
from modeconn.evaluation.model import evaluate
from modeconn.geometry.hessian import hessian_eigenvalues, hessian_trace
from modeconn.models import create_model
from modeconn.training.loop import train_model

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = {
    "cpu": dict(model="convnet", model_kwargs={"width": 16}, epochs=12, seeds=[0, 1, 2], lr=0.05, batch_size=64,
                hessian_samples=512, trace_samples=20),
    "quick": dict(model="convnet", model_kwargs={"width": 8}, epochs=3, seeds=[0], lr=0.05, batch_size=64,
                  hessian_samples=128, trace_samples=4),
}


def methods(rho: float, sparsity: float) -> dict:
    """Name -> the SAM keywords of ``train_model``."""
    return {"sgd": {}, "sam": {"sam": rho},
            "ssam_fisher": {"sam": rho, "sam_sparsity": sparsity, "sam_mask": "fisher"},
            "ssam_random": {"sam": rho, "sam_sparsity": sparsity, "sam_mask": "random"}}


def run(ds, cfg: dict, seed: int, name: str, sam_kwargs: dict) -> dict:
    """Train one network; its accuracy, sharpness and step time."""
    torch.manual_seed(seed)
    model = create_model(cfg["model"], ds.input_shape, ds.num_classes, **cfg["model_kwargs"])
    loader = ds.train_loader(cfg["batch_size"], seed=seed)
    history = train_model(model, loader, epochs=cfg["epochs"], lr=cfg["lr"], seed=seed, **sam_kwargs)
    timed = history[1:] or history  # the first epoch pays one-off costs (allocation, first mask)
    hdata = ds.eval_loader("train", batch_size=cfg["hessian_samples"], samples=cfg["hessian_samples"])
    lam = float(hessian_eigenvalues(model, None, hdata, k=1, tol=1e-3, seed=seed).eigenvalues[0])
    trace, _ = hessian_trace(model, None, hdata, num_samples=cfg["trace_samples"], seed=seed)
    test, train = evaluate(model, ds.eval_loader("test")), evaluate(model, ds.eval_loader("train"))
    return {"method": name, "seed": seed, "test_acc": test["acc"], "test_loss": test["loss"],
            "train_loss": train["loss"], "lambda_max": lam, "hessian_trace": float(trace),
            "seconds_per_step": sum(h["seconds"] for h in timed) / (len(timed) * len(loader)),
            "final_epoch_loss": history[-1]["loss"]}


def summary(rows: list) -> dict:
    """Per method: mean and std over seeds of every number."""
    out = {}
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        out[name] = {k: (float(np.mean([r[k] for r in mine])), float(np.std([r[k] for r in mine])))
                     for k in ("test_acc", "test_loss", "lambda_max", "hessian_trace", "seconds_per_step")}
    return out


def markdown(cfg: dict, rows: list, table: dict, seconds: float) -> str:
    """The result file's text."""
    lines = ["# SAM vs SSAM (50%) on digits", "",
             f"Model `{cfg['model']}` {cfg['model_kwargs']}, {cfg['epochs']} epochs, lr {cfg['lr']}, batch "
             f"{cfg['batch_size']}, ρ = {cfg['rho']}, sparsity {cfg['sparsity']}, seeds {cfg['seeds']}; λmax and "
             f"trace of the Hessian on the first {cfg['hessian_samples']} training samples. {seconds:.0f} s.", "",
             "| method | test acc | test loss | λmax | Hessian trace | s / step |", "|---|---|---|---|---|---|"]
    for name, m in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k][0]:.4f} ± {m[k][1]:.4f}" for k in
                                                 ("test_acc", "test_loss", "lambda_max", "hessian_trace")) +
                     f" | {m['seconds_per_step'][0] * 1e3:.1f} ms |")
    lines += ["", "Per run:", "", "| method | seed | test acc | test loss | λmax | trace | s / step |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seed']} | {r['test_acc']:.4f} | {r['test_loss']:.4f} | "
                     f"{r['lambda_max']:.3f} | {r['hessian_trace']:.2f} | {r['seconds_per_step'] * 1e3:.1f} ms |")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    """Bars of test accuracy, λmax and step time per method."""
    fig = Figure(figsize=(10, 3.2))
    names = list(table)
    for ax, (key, label) in zip(fig.subplots(1, 3), [("test_acc", "test accuracy"), ("lambda_max", "Hessian λmax"),
                                                       ("seconds_per_step", "seconds per step")]):
        ax.bar(names, [table[n][key][0] for n in names], yerr=[table[n][key][1] for n in names], color="C0")
        ax.set_title(label)
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny preset (< 1 minute)")
    p.add_argument("--out", default=str(RESULTS), help="output directory (default: experiments/results)")
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--sparsity", type=float, default=0.5)
    args = p.parse_args(argv)
    cfg = dict(PRESETS["quick" if args.quick else "cpu"], rho=args.rho, sparsity=args.sparsity)
    ds = get_dataset("digits")
    t0 = time.perf_counter()
    rows = [run(ds, cfg, seed, name, kw) for seed in cfg["seeds"]
            for name, kw in methods(args.rho, args.sparsity).items()]  # interleaved: load changes hit all alike
    seconds = time.perf_counter() - t0
    table = summary(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "sam_ssam_quick" if args.quick else "sam_ssam"
    result = {"config": cfg, "seconds": seconds, "runs": rows, "summary": table}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(markdown(cfg, rows, table, seconds))
    plot(table, out / f"{name}.png")
    print(markdown(cfg, rows, table, seconds))
    return result


if __name__ == "__main__":
    main()
