"""Are fine-tunes of one tiny GPT-2 connected, and two trained from scratch? (Hugging Face directories.)

Neyshabur et al. (2020) found fine-tunes of one pretrained model in one basin;
Verma & Elbayad (2024) found that text transformers trained from different
initialisations need their residual stream, heads and FFN units permuted
before they connect. This script measures both on a CPU in minutes, with
modeconn's commands on Hugging Face model directories:

* texts (read at run time from the standard library, nothing downloaded):
  the ``json`` package's sources (parent text) and the ``collections``
  package's sources (child text), byte-level, blocks of 64 bytes;
* a GPT-2 (2 layers, 4 heads, width 64, vocabulary 256, no dropout) trained
  from scratch on the parent text (``--parent-epochs``), fine-tuned twice on
  the child text with data-order seeds 1 and 2 (children,
  ``--child-epochs``), and two more trained from scratch on the child text
  with seeds 3 and 4 (``--scratch-epochs``); all are written with
  ``save_pretrained`` (safetensors) and read back by the commands;
* on the child text: the straight line between the children, between the
  from-scratch pair, and between the from-scratch pair after weight matching
  (``align``); a 3-bend Bezier curve (``train_curve``, ``--curve-epochs``)
  for each of the three pairs; ``eval_curve`` reports the test loss barrier
  (max_t L(t) − [(1−t) L(0) + t L(1)]) and the same barrier of the per-token
  perplexity exp(L).

Results go to ``OUT/results.json`` (and are printed); the README's
"Language models" section quotes one run:

    .venv/bin/python -m pip install -e '.[hf]'
    OMP_NUM_THREADS=1 .venv/bin/python experiments/lm_connectivity.py --out runs/lm
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import modeconn
from modeconn import align, eval_curve, train_curve
from modeconn.hf.models import LMLogits, architecture, load_model_dir, save_model_dir
from modeconn.hf.text import text_dataset
from modeconn.training.loop import train_model

BLOCK = 64


def _stdlib_dir(module) -> str:
    """The directory of a standard-library package (its sources are the texts)."""
    return os.path.dirname(module.__file__)


def new_gpt2(seed: int) -> LMLogits:
    """A fresh tiny GPT-2 (2 layers, 4 heads, width 64, bytes), dropout off so runs differ only by seed."""
    import transformers

    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=256, n_positions=BLOCK,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)
    torch.manual_seed(seed)
    return LMLogits(transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager"))


def fit(net: LMLogits, text: str, epochs: int, lr: float, seed: int) -> float:
    """Train ``net`` on ``text`` (SGD, cosine, 1 warm-up epoch); returns the last epoch's training loss."""
    ds = text_dataset(text, block_size=BLOCK)
    torch.manual_seed(seed)
    history = train_model(net, ds.train_loader(32, seed=seed), epochs=epochs, lr=lr, weight_decay=0.0,
                          schedule="cosine", seed=seed, warmup_epochs=1)
    return history[-1]["loss"]


def save(net: LMLogits, out: Path, text: str, seed: int, loss: float) -> str:
    """Write ``net`` as a model directory that names the child text as its dataset."""
    meta = {"arch_kwargs": {"config": architecture(net.model.config)}, "hf_dtype": "float32"}
    save_model_dir(net, meta, out, info={"dataset": f"text:{Path(text).resolve()}",
                                         "dataset_kwargs": {"block_size": BLOCK}, "seed": seed,
                                         "metrics": {"train_loss": loss}})
    return str(out)


def make_models(out: Path, args, parent_text: str, child_text: str) -> dict:
    """Parent, two children, two from scratch: trained and written as model directories."""
    paths = {}
    parent = new_gpt2(0)
    loss = fit(parent, parent_text, args.parent_epochs, args.lr, seed=0)
    paths["parent"] = save(parent, out / "parent", child_text, 0, loss)
    for seed in (1, 2):
        child, _ = load_model_dir(paths["parent"])
        loss = fit(child.train(), child_text, args.child_epochs, args.lr / 3, seed=seed)
        paths[f"child{seed}"] = save(child, out / f"child{seed}", child_text, seed, loss)
    for seed in (3, 4):
        net = new_gpt2(seed)
        loss = fit(net, child_text, args.scratch_epochs, args.lr, seed=seed)
        paths[f"scratch{seed}"] = save(net, out / f"scratch{seed}", child_text, seed, loss)
    return paths


def _path_numbers(eval_dir: Path) -> dict:
    """Test loss / perplexity at the ends and their barriers, from an ``eval_curve`` output."""
    data = json.loads((eval_dir / "path.json").read_text())
    loss = next(r for r in data["barrier_table"]
                if r["metric"] == "test_loss" and r["reference"] == "interp" and not r["path"].startswith("linear_"))
    ppl = data["test_perplexity"]
    return {"test_loss_ends": [data["test_loss"][0], data["test_loss"][-1]], "test_loss_barrier": loss["barrier"],
            "test_perplexity_ends": [ppl[0], ppl[-1]], "test_perplexity_barrier": data["test_perplexity_barrier"]}


def measure(out: Path, args, paths: dict) -> dict:
    """Straight lines and 3-bend Bezier curves of the three pairs, through the commands."""
    common = ["--no-progress", "--block-size", str(BLOCK)]
    align.main(["--a", paths["scratch3"], "--b", paths["scratch4"], "--out", str(out / "scratch4_aligned"),
                "--num-points", "0", *common])
    pairs = {"children": (paths["child1"], paths["child2"]),
             "scratch": (paths["scratch3"], paths["scratch4"]),
             "scratch_aligned": (paths["scratch3"], str(out / "scratch4_aligned"))}
    results = {}
    for name, (a, b) in pairs.items():
        line, curve = out / f"line_{name}", out / f"curve_{name}"
        eval_curve.main(["--a", a, "--b", b, "--num-points", str(args.points), "--out", str(line), *common])
        train_curve.main(["--a", a, "--b", b, "--num-bends", "3", "--epochs", str(args.curve_epochs),
                          "--lr", str(args.lr / 3), "--wd", "0", "--schedule", "cosine", "--batch-size", "32",
                          "--seed", "0", "--out", str(curve), "--force", *common])
        eval_curve.main(["--ckpt", str(curve / "curve.pt"), "--num-points", str(args.points),
                         "--out", str(curve / "eval"), *common])
        results[name] = {"line": _path_numbers(line), "bezier3": _path_numbers(curve / "eval")}
    return results


def main() -> None:
    """Train the five models, measure the three pairs, write and print the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/lm_connectivity")
    p.add_argument("--parent-epochs", type=int, default=12)
    p.add_argument("--child-epochs", type=int, default=4)
    p.add_argument("--scratch-epochs", type=int, default=16)
    p.add_argument("--curve-epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--points", type=int, default=11)
    args = p.parse_args()
    import collections
    import json as json_pkg

    out = Path(args.out)
    t0 = time.time()
    parent_text, child_text = _stdlib_dir(json_pkg), _stdlib_dir(collections)
    paths = make_models(out, args, parent_text, child_text)
    results = measure(out, args, paths)
    summary = {"settings": vars(args), "texts": {"parent": parent_text, "child": child_text},
               "models": {k: json.loads((Path(v) / "modeconn.json").read_text())["metrics"]
                          for k, v in paths.items()},
               "results": results, "seconds": time.time() - t0, "torch_threads": torch.get_num_threads(),
               "modeconn_version": modeconn.__version__}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'pair':16s} {'path':8s} {'loss ends':>15s} {'loss barrier':>12s} {'ppl ends':>15s} {'ppl barrier':>11s}")
    for name, r in results.items():
        for kind, v in r.items():
            le, pe = v["test_loss_ends"], v["test_perplexity_ends"]
            print(f"{name:16s} {kind:8s} {le[0]:7.3f}/{le[1]:7.3f} {v['test_loss_barrier']:12.4f} "
                  f"{pe[0]:7.3f}/{pe[1]:7.3f} {v['test_perplexity_barrier']:11.4f}")
    print(f"wrote {out / 'results.json'} ({summary['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
