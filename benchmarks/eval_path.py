"""61-point path evaluation: modeconn.evaluate_path vs the reference loop.

The reference loop re-creates Garipov et al.'s ``eval_curve.py``: a
``DataLoader`` with batch 128; for each t load the point's weights into a model
copy, ``update_bn`` over the train loader when the model has BN, evaluate on
train, evaluate on test, accumulating with ``.item()`` per batch. Both run on
the same 3-bend Bezier curve on digits, side by side in one run, and must give
the same numbers.

    python benchmarks/eval_path.py [--points 61] [--only mlp cnn cnn_bn]
"""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

import modeconn as mc
from modeconn.evaluation.path import evaluate_path

CONFIGS = {"mlp": ("mlp", {}), "cnn": ("convnet", {"width": 16}), "cnn_bn": ("convnet", {"width": 16, "bn": True})}


def reference_loop(curve, template, ts, train_ds, test_ds):
    train = DataLoader(train_ds, batch_size=128, shuffle=False)
    test = DataLoader(test_ds, batch_size=128, shuffle=False)
    has_bn = mc.has_batchnorm(template)
    rows = []
    for t in ts:
        weights = curve.weights_at(float(t))
        model = template
        model.load_state_dict({k: v.detach() for k, v in weights.items()}, strict=False)
        if has_bn:
            update_bn(train, model)
        row = []
        for loader in (train, test):
            model.eval()
            loss_sum, correct, n = 0.0, 0.0, 0
            with torch.no_grad():
                for x, y in loader:
                    out = model(x)
                    loss_sum += F.cross_entropy(out, y, reduction="sum").item()
                    correct += (out.argmax(1) == y).sum().item()
                    n += len(y)
            row += [loss_sum / n, correct / n]
        rows.append(row)
    return np.array(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=61)
    p.add_argument("--points-per-pass", type=int, default=8)
    p.add_argument("--eval-batch", type=int, default=1024)
    p.add_argument("--only", nargs="*", default=list(CONFIGS))
    args = p.parse_args()
    ds = mc.get_dataset("digits")
    train_ds, test_ds = TensorDataset(ds.x_train, ds.y_train), TensorDataset(ds.x_test, ds.y_test)
    ts = np.linspace(0, 1, args.points)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.points} points, digits "
          f"({len(ds.x_train)} train / {len(ds.x_test)} test)")
    print(f"{'model':7s} {'reference s':>11s} {'modeconn s':>10s} {'speed-up':>8s} {'max |diff|':>10s}")
    for name in args.only:
        arch, kw = CONFIGS[name]
        torch.manual_seed(0)
        a, b = (mc.create_model(arch, ds.input_shape, 10, **kw) for _ in range(2))
        curve = mc.CurveModel(a, a, b, mc.Bezier(3))
        with torch.no_grad():
            curve.free_bends.add_(0.05 * torch.randn_like(curve.free_bends))
        template = mc.create_model(arch, ds.input_shape, 10, **kw)
        t0 = time.perf_counter()
        ref = reference_loop(curve, template, ts, train_ds, test_ds)
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        # BN statistics are an average over batches, so they use the reference's batches of 128
        res = evaluate_path(curve, ds.eval_loader("train", args.eval_batch), ds.eval_loader("test", args.eval_batch), ts=ts,
                            bn_loader=ds.eval_loader("train", 128), points_per_pass=args.points_per_pass)
        t_ours = time.perf_counter() - t0
        ours = np.stack([res.train_loss, res.train_acc, res.test_loss, res.test_acc], 1)
        print(f"{name:7s} {t_ref:11.2f} {t_ours:10.2f} {t_ref / t_ours:7.1f}x {np.abs(ours - ref).max():10.2e}",
              flush=True)


if __name__ == "__main__":
    main()
