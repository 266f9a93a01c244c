"""Does neuron alignment close the barrier, and more so for wider networks? Line and curve, by width.

Question: two networks trained from different seeds sit in different basins of the loss; permuting
the hidden units of B to line up with A (no change to B's function) may put them in one basin. How
much of the barrier does alignment remove, on the straight line and on a fitted curve, and how does
that change with the width of the network? Is the fitted curve between aligned endpoints nearly a
straight line?

Papers and claims:
* Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin: Merging Models modulo Permutation Symmetries"
  (ICLR): after weight matching, the straight-line loss barrier between independently trained models
  shrinks as the models get wider and approaches zero for wide enough ones: MLPs on MNIST reach
  (nearly) zero barrier, and on CIFAR-10 the barrier of VGG-16 and ResNet-20 after matching falls
  with the width multiplier (Fig. 4/5; ResNet-20 needs a ~32x width multiplier for zero barrier).
* Tatro, Chen, Das, Melnyk, Sattigeri & Lai 2020, "Optimizing Mode Connectivity via Neuron
  Alignment" (NeurIPS): aligning the neurons by activation correlation (Hungarian per layer) before
  fitting lowers the loss along the learned curve (and along the line); "optimizing the weight
  permutation is critical for efficiently learning a simple, planar, low-loss curve", i.e. the
  aligned curve needs less training and stays close to the straight line (TinyTen, ResNet32,
  GoogLeNet on CIFAR-10/100, ImageNet).

Protocol (per model family, per width, per pair of seeds (2s-1, 2s) for s in --seeds): train A and
B (``mc.train_model``: SGD, momentum 0.9, the reference schedule); B' = B itself ("none"), B after
weight matching (``mc.align_models(method="weight")``) and after activation matching
(``method="activation"``, correlations over the training set). For each B': the straight line A->B'
(``mc.linear_path``) and a Bezier curve with 3 bends (``mc.make_curve("bezier", 3)``, middle bend
started on the midpoint, ``mc.fit_curve`` with the same seed, epochs and rate for every B'), both
evaluated at evenly spaced t (``mc.evaluate_path``; no BatchNorm in these models). Reported: the
test-loss and test-error barriers (``interp``: max_t L(t) - [(1-t) L(0) + t L(1)]) of line and
curve; the middle bend's offset from the line, ||θ_mid - (θ_A + θ_B')/2|| / ||θ_A - θ_B'|| (the
curve's point at t = 1/2 is off the midpoint by half of it); ||θ_A - θ_B'|| itself; the curve's
mean training loss in its first and last epoch (how much training the curve needed).

Models: ``mlp`` (2 hidden layers of w units) and ``convnet`` (no BN; w, 2w, 2w channels) on
``digits`` at five widths spanning 16x, and the transformer ``gpt`` (a causal decoder, hidden size
w, 2 heads, FFN 2w) on the ``majority`` token task at two widths.

Presets:
* ``--quick``: one pair, mlp at widths 4 and 64 (2 epochs), gpt at width 8 on a small draw of
  ``majority`` (1 epoch), 5 points; what the tests run (< 30 s).
* ``--preset cpu`` (default): 3 pairs; mlp widths 8..128 (20 epochs), convnet widths 2..32
  (10 epochs), gpt widths 16, 32 (10 epochs); curves trained as long as the endpoints; 11 points.
* ``--preset paper``: CIFAR-10 from ``--data-dir``, VGG-16 (no dropout) at width multipliers
  1, 2, 4, 8, 16 as in Ainsworth et al., WideResNet-22 (3 blocks per stage like ResNet-20, with
  BatchNorm, recomputed at every point) at widen factors 1..16, and a ViT (hidden 128, patch 4);
  100 epochs, curves 100 epochs. For a GPU; NOT run here.

Commands:
    python experiments/alignment.py                     # the CPU run (537 s measured on the loaded 2-core machine)
    python experiments/alignment.py --quick --out /tmp/alignment
    python experiments/alignment.py --preset paper --data-dir DIR
``--keep-models`` also writes every endpoint, aligned B and curve into OUT/models/.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from matplotlib.figure import Figure

import modeconn as mc
from experiments.common import Clock, mean_std, parse, summarize, table, write_results

NAME = "alignment"
METHODS = ("none", "weight", "activation")
_DIGITS_MLP = {"name": "mlp", "dataset": "digits", "fixed": {"depth": 2}, "width_key": "width",
               "batch_size": 64, "lr": 0.05, "wd": 5e-4, "curve_lr": 0.03}
_DIGITS_CNN = {"name": "convnet", "dataset": "digits", "fixed": {"bn": False}, "width_key": "width",
               "batch_size": 64, "lr": 0.05, "wd": 5e-4, "curve_lr": 0.03}
_GPT = {"name": "gpt", "dataset": "majority", "fixed": {"heads": 2, "depth": 2}, "width_key": "dim",
        "scaled": {"mlp": 2}, "batch_size": 64, "lr": 0.05, "wd": 5e-4, "curve_lr": 0.03}
PRESETS = {
    "quick": {"seeds": [1], "points": 5, "families": [
        dict(_DIGITS_MLP, widths=[4, 64], epochs=2, curve_epochs=2),
        dict(_GPT, widths=[8], epochs=3, curve_epochs=1, data_kwargs={"n_train": 1024, "n_test": 256})]},
    "cpu": {"seeds": [1, 2, 3], "points": 11, "families": [
        dict(_DIGITS_MLP, widths=[8, 16, 32, 64, 128], epochs=20, curve_epochs=20),
        dict(_DIGITS_CNN, widths=[2, 4, 8, 16, 32], epochs=10, curve_epochs=10),
        dict(_GPT, widths=[16, 32], epochs=10, curve_epochs=10)]},
    "paper": {"seeds": [1, 2, 3], "points": 21, "families": [
        {"name": "vgg16", "dataset": "cifar10", "fixed": {"dropout": 0.0}, "width_key": "width_multiplier",
         "widths": [1, 2, 4, 8, 16], "batch_size": 128, "lr": 0.05, "wd": 5e-4, "epochs": 100,
         "curve_lr": 0.015, "curve_epochs": 100},
        {"name": "wide_resnet", "dataset": "cifar10", "fixed": {"depth": 22}, "width_key": "widen_factor",
         "widths": [1, 2, 4, 8, 16], "batch_size": 128, "lr": 0.1, "wd": 5e-4, "epochs": 100,
         "curve_lr": 0.03, "curve_epochs": 100},
        {"name": "vit", "dataset": "cifar10", "fixed": {"patch": 4, "depth": 6, "heads": 4}, "width_key": "hidden",
         "scaled": {"mlp": 2}, "widths": [128], "batch_size": 128, "lr": 0.05, "wd": 5e-4, "epochs": 100,
         "curve_lr": 0.03, "curve_epochs": 100}]},
}


def model_kwargs(fam: dict, width: int) -> dict:
    """The zoo keyword arguments of family ``fam`` at ``width`` (fixed ones, the width, scaled ones)."""
    kw = dict(fam.get("fixed", {}), **{fam["width_key"]: width})
    kw.update({k: int(v * width) for k, v in fam.get("scaled", {}).items()})
    return kw


def load_data(fam: dict, data_dir):
    """The family's dataset; CIFAR from ``data_dir`` (a clear error naming it when missing)."""
    kw = fam.get("data_kwargs", {})
    try:
        return mc.get_dataset(fam["dataset"], data_dir=data_dir or "data", **kw)
    except (FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"experiments/{NAME}.py: dataset {fam['dataset']!r} not found under --data-dir "
                         f"{data_dir or 'data'!r} ({e}); the paper preset reads CIFAR-10 from there") from None


def build(fam: dict, ds, width: int) -> torch.nn.Module:
    """A fresh model of the family at ``width`` for ``ds`` (token models get the vocabulary)."""
    kw = model_kwargs(fam, width)
    if ds.vocab_size is not None:
        kw["vocab"] = ds.vocab_size
    return mc.create_model(fam["name"], ds.input_shape, ds.num_classes, **kw)


def train(fam: dict, ds, width: int, seed: int) -> torch.nn.Module:
    """One endpoint: init from ``seed``, batch order from ``seed``, SGD with the family's recipe."""
    torch.manual_seed(seed)
    model = build(fam, ds, width)
    mc.train_model(model, ds.train_loader(fam["batch_size"], seed=seed), fam["epochs"], fam["lr"], fam["wd"],
                   seed=seed)
    return model.eval()


def bend_offset(curve) -> tuple:
    """(||θ_mid - (θ_A + θ_B')/2|| / ||θ_A - θ_B'||, ||θ_A - θ_B'||) of a 3-bend curve, in float64."""
    bends = curve.bends.detach().double()
    first, mid, last = bends[0], bends[1], bends[-1]
    span = float((first - last).norm())
    return float((mid - 0.5 * (first + last)).norm()) / span, span


def path_record(res) -> dict:
    """What the tables and tests read from a path: barriers and the test loss at every t."""
    return {"ts": res.ts.tolist(), "test_loss": res.test_loss.tolist(), "test_error": res.test_error.tolist(),
            "barrier": res.barrier("test_loss"), "error_barrier": res.barrier("test_error")}


def aligned_ends(fam: dict, ds, a, b, seed: int) -> dict:
    """B as trained, B after weight matching and after activation matching (same function as B)."""
    example = ds.x_test[:1]
    wm, _, _ = mc.align_models(a, b, method="weight", example_input=example, seed=seed)
    am, _, _ = mc.align_models(a, b, method="activation", loader=ds.eval_loader("train", 512),
                               example_input=example)
    return {"none": b, "weight": wm, "activation": am}


def one_method(fam: dict, ds, width: int, seed: int, a, end, cfg: dict, keep) -> dict:
    """Line and fitted Bezier(3) curve from A to one B'; their records, the bend offset, curve training."""
    tr, te = ds.eval_loader("train", 512), ds.eval_loader("test", 512)
    line = mc.evaluate_path(mc.linear_path(a, end), tr, te, cfg["points"], name="line")
    curve = mc.CurveModel(build(fam, ds, width), a, end, mc.make_curve("bezier", 3))
    hist = mc.fit_curve(curve, ds.train_loader(fam["batch_size"], seed=seed), epochs=fam["curve_epochs"],
                        lr=fam["curve_lr"], weight_decay=fam["wd"], seed=seed)
    res = mc.evaluate_path(curve, tr, te, cfg["points"], name="curve")
    offset, span = bend_offset(curve)
    if keep is not None:
        keep(curve)
    return {"line": path_record(line), "curve": path_record(res), "bend_offset": offset,
            "bend_offset_abs": offset * span, "ends_distance": span,
            "curve_loss_first_epoch": hist[0]["loss"], "curve_loss_last_epoch": hist[-1]["loss"]}


def run_pair(fam: dict, ds, width: int, s: int, cfg: dict, models_dir) -> list:
    """Rows (one per method) for the pair of seeds (2s-1, 2s) of family ``fam`` at ``width``."""
    clock = Clock()
    sa, sb = 2 * s - 1, 2 * s
    a, b = train(fam, ds, width, sa), train(fam, ds, width, sb)
    ends = aligned_ends(fam, ds, a, b, s)
    meta = {"arch": fam["name"], "arch_kwargs": dict(model_kwargs(fam, width), **(
        {"vocab": ds.vocab_size} if ds.vocab_size is not None else {})),
        "input_shape": list(ds.input_shape), "num_classes": ds.num_classes}
    where = None if models_dir is None else Path(models_dir) / f"{fam['name']}_w{width}_s{s}"
    if where is not None:
        for label, model in (("a", a), ("b", b), ("b_weight", ends["weight"]), ("b_activation", ends["activation"])):
            mc.save_model(where / f"{label}.pt", model, **meta, dataset=fam["dataset"])
    rows = []
    for method, end in ends.items():
        keep = None if where is None else (lambda c, m=method: mc.save_curve(where / f"curve_{m}.pt", c, meta))
        r = one_method(fam, ds, width, s, a, end, cfg, keep)
        rows.append({"model": fam["name"], "dataset": fam["dataset"], "width": width, "pair": s,
                     "seeds": [sa, sb], "method": method, **r,
                     "line_barrier": r["line"]["barrier"], "curve_barrier": r["curve"]["barrier"],
                     "line_error_barrier": r["line"]["error_barrier"],
                     "curve_error_barrier": r["curve"]["error_barrier"],
                     "a_test_error": r["line"]["test_error"][0], "b_test_error": r["line"]["test_error"][-1]})
    for r in rows:
        r["seconds"] = clock.seconds / len(rows)
    return rows


KEYS = ("line_barrier", "curve_barrier", "line_error_barrier", "curve_error_barrier", "bend_offset",
        "bend_offset_abs", "ends_distance", "curve_loss_first_epoch", "curve_loss_last_epoch", "a_test_error", "b_test_error")


def cells(summary: list, model: str, width: int, key: str, digits_scale: float = 1.0) -> list:
    """The (mean, std) of ``key`` for none / weight / activation at (model, width), scaled."""
    by = {r["method"]: r[key] for r in summary if r["model"] == model and r["width"] == width}
    return [(by[m][0] * digits_scale, by[m][1] * digits_scale) for m in METHODS]


def markdown(summary: list, cfg: dict) -> str:
    """The three tables: loss barriers, error barriers, bend offsets and curve training."""
    groups = list(dict.fromkeys((r["model"], r["width"], r["n"]) for r in summary))
    m3 = ["none", "weight m.", "activation m."]
    t1 = table(["model", "width", "pairs", "test error A (%)", *(f"line: {m}" for m in m3),
                *(f"curve: {m}" for m in m3)],
               [[m, w, n, cells(summary, m, w, "a_test_error", 100)[0], *cells(summary, m, w, "line_barrier"),
                 *cells(summary, m, w, "curve_barrier")] for m, w, n in groups], digits=3)
    t2 = table(["model", "width", *(f"line: {m}" for m in m3), *(f"curve: {m}" for m in m3)],
               [[m, w, *cells(summary, m, w, "line_error_barrier", 100), *cells(summary, m, w, "curve_error_barrier", 100)]
                for m, w, _ in groups], digits=2)
    t3 = table(["model", "width", *(f"rel. offset: {m}" for m in m3), *(f"offset: {m}" for m in m3),
                *(f"‖θA−θB'‖: {m}" for m in m3)],
               [[m, w, *cells(summary, m, w, "bend_offset"), *cells(summary, m, w, "bend_offset_abs"),
                 *cells(summary, m, w, "ends_distance")] for m, w, _ in groups], digits=3)
    t4 = table(["model", "width", *(f"epoch 1: {m}" for m in m3), *(f"last epoch: {m}" for m in m3)],
               [[m, w, *cells(summary, m, w, "curve_loss_first_epoch"), *cells(summary, m, w, "curve_loss_last_epoch")]
                for m, w, _ in groups], digits=3)
    return (f"# {NAME} (preset {cfg['preset']}; pairs of seeds (2s-1, 2s) for s in {cfg['seeds']}; "
            f"mean ± std over pairs; {cfg['points']} points per path)\n\n"
            "Test-loss barrier (max_t L(t) − [(1−t)L(0) + tL(1)]) of the straight line and of the fitted "
            "Bezier(3) curve, B as trained (none), after weight matching and after activation matching:\n\n"
            f"{t1}\n\nTest-error barrier (percentage points), same paths:\n\n{t2}\n\n"
            "Middle bend's offset from the line's midpoint, relative ||θ_mid − (θ_A+θ_B')/2|| / ||θ_A − θ_B'|| "
            "and absolute ||θ_mid − (θ_A+θ_B')/2||, and the endpoints' distance ||θ_A − θ_B'||:\n\n"
            f"{t3}\n\nThe curve's mean training loss (cross-entropy at the sampled t) in its first and last "
            f"epoch:\n\n{t4}\n")


def figure(summary: list, datasets: dict) -> Figure:
    """Top row: test-loss barrier vs width per family (line solid, curve dashed); bottom: bend offset.

    ``datasets`` maps a model family to its dataset's name (for the titles)."""
    models = list(dict.fromkeys(r["model"] for r in summary))
    fig = Figure(figsize=(4.2 * len(models), 6.4), layout="constrained")
    axes = fig.subplots(2, len(models), squeeze=False)
    colors = {"none": "tab:gray", "weight": "tab:blue", "activation": "tab:orange"}
    for j, model in enumerate(models):
        for method in METHODS:
            rows = sorted((r for r in summary if r["model"] == model and r["method"] == method),
                          key=lambda r: r["width"])
            w = [r["width"] for r in rows]
            for ax, key, style, label in ((axes[0, j], "line_barrier", "-o", "line"),
                                          (axes[0, j], "curve_barrier", "--s", "curve"),
                                          (axes[1, j], "bend_offset", "-o", None)):
                m, s = np.array([r[key] for r in rows]).T
                ax.errorbar(w, m, yerr=s, fmt=style, color=colors[method], capsize=3, ms=4,
                            label=f"{label}, {method}" if label else method)
        for ax in axes[:, j]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("width")
            ax.grid(alpha=0.3)
        axes[0, j].set_title(f"{model} on {datasets[model]}: test-loss barrier")
        axes[1, j].set_title(f"{model} on {datasets[model]}: bend offset from the line")
        axes[0, j].axhline(0, color="k", lw=0.5)
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    axes[1, 0].set_ylabel("||θ_mid − midpoint|| / ||θ_A − θ_B'||")
    axes[0, 0].set_ylabel("barrier (test loss)")
    return fig


def main(argv=None) -> dict:
    """Run the preset, write results.json / results.md / alignment.png; return the result dict."""
    extra = lambda p: p.add_argument("--keep-models", action="store_true",
                                     help="also write every endpoint, aligned B and curve into OUT/models/")
    args, cfg = parse(NAME, __doc__, PRESETS, argv, extra)
    clock = Clock()
    models_dir = Path(args.out) / "models" if args.keep_models else None
    rows = []
    for fam in cfg["families"]:
        ds = load_data(fam, args.data_dir)
        for width in fam["widths"]:
            for s in cfg["seeds"]:
                rows += run_pair(fam, ds, width, s, cfg, models_dir)
                r = {x["method"]: x for x in rows[-3:]}
                print(f"{fam['name']} w={width} pair {s}: line barrier " +
                      " / ".join(f"{m} {r[m]['line_barrier']:.3f}" for m in METHODS) + "; curve " +
                      " / ".join(f"{m} {r[m]['curve_barrier']:.3f}" for m in METHODS) + f"  ({clock})",
                      flush=True)
    summary = summarize(rows, ("model", "width", "method"), KEYS)
    md = markdown(summary, cfg) + f"\nRun time: {clock.seconds:.0f} s.\n"
    result = {"config": cfg, "runs": rows, "summary": summary, "seconds": clock.seconds}
    out = write_results(args, NAME, result, md, {NAME: figure(summary, {f["name"]: f["dataset"] for f in cfg["families"]})})
    print(md)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / (NAME + '.png')}")
    return result


if __name__ == "__main__":
    main()
