"""How much of each timm architecture spec inference permutes (issue 21's table).

For every model of :data:`MODELS` (random init, ``num_classes=10``, a small
input), :func:`modeconn.alignment.infer_permutation_spec` is run and the
table reports: parameters, groups kept, % of the weights permuted (entries
with a permuted axis, counted by number of elements, the classifier's output
axis excepted: it is never permuted), whether a random permutation of the
groups keeps the output (max relative difference, float64) and whether
weight matching recovers it exactly, from B as given (``init="identity"``,
the default) and from units matched by their sorted weights
(``init="sorted"``), and the dropped-group reasons summarised (most frequent
cause first).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/timm_coverage.py
    .venv/bin/python benchmarks/timm_coverage.py --models resnet10t densenet121 --out /tmp/t.md
"""
from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from modeconn.alignment import apply_permutation, infer_permutation_spec, weight_matching

# model -> input side (the smallest that the model accepts and that keeps a few spatial positions)
MODELS: Dict[str, int] = {
    "resnet10t": 32, "resnet18": 32, "resnet50": 32, "densenet121": 32, "efficientnet_b0": 32,
    "mobilenetv2_050": 32, "mobilenetv3_small_050": 32, "regnetx_002": 32, "convnext_atto": 32,
    "ghostnet_050": 32, "repvgg_a0": 32, "poolformer_s12": 32, "mixer_s16_224": 32,
    "vit_tiny_patch16_224": 32, "deit_tiny_patch16_224": 32,
}
ROOT = Path(__file__).resolve().parent


def build(name: str, side: int, seed: int = 0) -> Tuple[torch.nn.Module, torch.Tensor]:
    """timm model ``name`` (10 classes, float64, eval) with non-trivial BN statistics and head, and an input.

    The weights are timm's initialisation (constant norm weights and layer scales, small weights).
    """
    import timm
    torch.manual_seed(seed)
    kw = {"img_size": side} if name.startswith(("mixer", "vit", "deit")) else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw).double()
    for m in model.modules():  # running statistics other than 0/1, so a wrong permutation shows
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    head = model.get_classifier()
    if not head.weight.any():  # timm zero-initialises some heads: the output would show nothing
        torch.nn.init.normal_(head.weight, std=0.1)
    model.eval()
    return model, torch.randn(2, 3, side, side, dtype=torch.float64)


def channel_axes(model: torch.nn.Module) -> Dict[str, List[int]]:
    """Per parameter, its channel axes a spec could permute: 0 and 1 (0 for a vector), of length > 1.

    Not counted: the input-channel axis of a layer reading the image (length
    3) and the classifier's output axis, which no permutation may touch.
    """
    head = {id(p) for p in model.get_classifier().parameters()}
    axes = {}
    for n, p in model.named_parameters():
        cand = [a for a in range(min(p.dim(), 2)) if p.shape[a] > 1]
        if p.dim() > 1 and p.shape[1] == 3:
            cand = [a for a in cand if a != 1]
        if id(p) in head:
            cand = [a for a in cand if a != 0]
        axes[n] = cand
    return axes


def permuted_share(model: torch.nn.Module, spec) -> float:
    """Share of parameter elements in entries whose every channel axis is permuted by some group."""
    covered = {(a.name, a.axis) for g in spec.groups.values() for a in g.axes}
    params = dict(model.named_parameters())
    full = [n for n, axes in channel_axes(model).items() if all((n, a) in covered for a in axes)]
    return sum(params[n].numel() for n in full) / sum(p.numel() for p in params.values())


def summarise(reasons: List[str], top: int = 3) -> str:
    """The most frequent causes among ``reasons`` (node names and numbers stripped)."""
    causes = []
    for r in reasons:
        why = r.split("left unpermuted: ")[-1]
        for part in why.split("; "):
            causes.append(re.sub(r"'[^']*'|\([^)]*\)|\d+", "_", part.split(" at node")[0])[:90])
    count = collections.Counter(causes)
    return "; ".join(f"{n}x {c}" for c, n in count.most_common(top))


def check_permutation(model: torch.nn.Module, spec, x: torch.Tensor, seed: int = 1,
                      inits=("identity", "sorted")) -> Tuple[float, Dict[str, bool]]:
    """Max relative change of ``model(x)`` under a random permutation, and per weight-matching start
    whether matching undoes it exactly."""
    perm = spec.random_permutation(seed=seed)
    permuted = apply_permutation(model, spec, perm)
    with torch.no_grad():
        y, yp = model(x), permuted(x)
    exact = {}
    for init in inits:
        found, _ = weight_matching(permuted, model, spec, seed=0, init=init)
        back = apply_permutation(model, spec, found).state_dict()
        exact[init] = all(torch.equal(v, back[k]) for k, v in permuted.state_dict().items())
    return ((y - yp).abs().max() / y.abs().max()).item(), exact


def measure(name: str, side: int) -> Dict[str, object]:
    """One row of the table."""
    model, x = build(name, side)
    spec = infer_permutation_spec(model, x[:1])
    rel, exact = check_permutation(model, spec, x)
    return {"model": name, "input": side, "params": sum(p.numel() for p in model.parameters()),
            "groups": len(spec.groups), "permuted": 100 * permuted_share(model, spec), "rel": rel,
            "exact": exact, "reasons": summarise(spec.reasons)}


def table(rows: List[Dict[str, object]]) -> str:
    """Markdown table of the rows."""
    lines = ["| model | input | params | groups | % permuted | max rel. change | matching exact (identity start) "
             "| matching exact (sorted start) | fixed (main causes) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['input']} | {r['params']:,} | {r['groups']} | {r['permuted']:.1f} | "
                     f"{r['rel']:.1e} | {r['exact']['identity']} | {r['exact']['sorted']} | {r['reasons'] or '-'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Measure the models and write the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--out", type=Path, default=ROOT / "results" / "timm_coverage.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        rows.append(measure(name, MODELS.get(name, 32)))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    import timm
    header = (f"# Spec inference on timm {timm.__version__} (random init, 10 classes, float64)\n\n"
              f"Written by `benchmarks/timm_coverage.py`. % permuted: parameter elements in entries whose "
              f"channel axes (0 and 1, the image's channels and the classes excepted) are all permuted.\n\n")
    args.out.write_text(header + table(rows))


if __name__ == "__main__":
    main()
