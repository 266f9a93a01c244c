"""One training step of a 3-bend Bezier curve vs one step of the plain model.

Same batch, same optimiser (SGD, momentum 0.9), measured side by side in one
run (interleaved repetitions, median), for: a 3x1024 MLP on 784-d input
(batch 256), the small CNN at 32x32 (batch 128), VGG16 at 32x32 (batch 128),
and the zoo transformers at their defaults on the embedded data: ``vit`` on
8x8 digits (16 patches + class token) and ``gpt`` on ``majority`` sequences
(16 tokens), batch 64 (the ``train`` default).
Peak memory: each (model, mode) runs once more in a fresh subprocess and
reports the growth of its peak resident set size over the size after imports
(CPU; both endpoints are built in both modes) or max allocated (CUDA).

    python benchmarks/curve_step.py [--reps 7] [--device cpu] [--only mlp]
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import modeconn as mc

CONFIGS = {
    "mlp": ("mlp", dict(depth=3, width=1024), (1, 28, 28), 256),
    "cnn": ("convnet", dict(width=32), (3, 32, 32), 128),
    "vgg16": ("vgg16", dict(), (3, 32, 32), 128),
    "vit": ("vit", dict(), (1, 8, 8), 64),
    "gpt": ("gpt", dict(vocab=8), (16,), 64),
}


def setup(name, device):
    arch, kw, shape, batch = CONFIGS[name]
    torch.manual_seed(0)
    a = mc.create_model(arch, shape, 10, **kw).to(device)
    b = mc.create_model(arch, shape, 10, **kw).to(device)
    x = (torch.randint(0, kw["vocab"], (batch, *shape), device=device) if "vocab" in kw
         else torch.randn(batch, *shape, device=device))
    y = torch.randint(0, 10, (batch,), device=device)
    return a, b, x, y


def plain_step_fn(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def curve_step_fn(a, b, x, y):
    curve = mc.CurveModel(a, a, b, mc.Bezier(3)).to(x.device)
    opt = torch.optim.SGD([curve.free_bends], lr=0.01, momentum=0.9)
    curve.train()
    gen = torch.Generator().manual_seed(0)

    def step():  # exactly fit_curve's step
        t = torch.rand((), generator=gen).to(x.device)
        weights = curve.training_weights(t, weight_decay=5e-4)  # penalty gradient inside its backward
        loss = F.cross_entropy(curve.forward_weights(x, weights), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def timed(step, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def peak_memory(name, mode, device):
    """Run one config in a subprocess; return peak memory in MB."""
    code = (f"import sys; sys.argv=['x']; import benchmarks.curve_step as b; "
            f"b.child({name!r}, {mode!r}, {str(device)!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=__file__.rsplit("/benchmarks/", 1)[0])
    if out.returncode != 0:
        return float("nan")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(name, mode, device):
    device = torch.device(device)
    base = None
    if device.type == "cpu":
        try:  # reset the high-water mark after imports; measure what the step itself needs
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _status_kb("VmRSS")
        except OSError:
            base = None
    a, b, x, y = setup(name, device)
    step = plain_step_fn(a, x, y) if mode == "plain" else curve_step_fn(a, b, x, y)
    del b
    for _ in range(3):
        step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    elif base is not None:
        peak = (_status_kb("VmHWM") - base) / 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", nargs="*", default=list(CONFIGS))
    p.add_argument("--no-memory", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(f"{'model':6s} {'plain ms':>9s} {'curve ms':>9s} {'ratio':>6s} {'plain MB':>9s} {'curve MB':>9s}")
    for name in args.only:
        a, b, x, y = setup(name, device)
        plain = plain_step_fn(a, x, y)
        curve = curve_step_fn(mc.create_model(CONFIGS[name][0], CONFIGS[name][2], 10, **CONFIGS[name][1]).to(device),
                              b, x, y)
        for _ in range(2):
            plain(), curve()
        tp, tc = [], []
        for _ in range(args.reps):
            tp.append(timed(plain, device))
            tc.append(timed(curve, device))
        mp = mc_ = float("nan")
        if not args.no_memory:
            mp, mc_ = peak_memory(name, "plain", device), peak_memory(name, "curve", device)
        mp_, tc_ = statistics.median(tp), statistics.median(tc)
        print(f"{name:6s} {1e3 * mp_:9.1f} {1e3 * tc_:9.1f} {tc_ / mp_:6.3f} {mp:9.0f} {mc_:9.0f}", flush=True)


if __name__ == "__main__":
    main()
