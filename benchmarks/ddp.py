"""Scale-out on the CPU: curve training and path evaluation with 1 process vs 2 gloo ranks.

The launcher runs the same worker once as a plain process (no process group:
the single-process path every command takes by default) and once under
``python -m torch.distributed.run --nproc_per_node 2`` (gloo, DDP over the
free bends, data sharded, the global batch unchanged), one thread per
process, and prints side by side:

* curve training throughput (samples/s over whole epochs, after one warm-up
  epoch) for the shipped digits MLP pair and for a bigger MLP on synthetic
  data, with the bytes DDP all-reduces per step (the free bends' gradient,
  numel x 4 bytes; the fixed bends are buffers and never travel);
* path evaluation time of the straight line between the shipped digits CNN
  endpoints (BatchNorm recomputed at every point), sharded one rank per point.

On a machine with 2 cores shared with other work the 2-rank numbers show
what gloo costs and what it gains when each rank has a core; on GPUs
(nccl) the same commands scale with the number of devices.

    python benchmarks/ddp.py [--epochs 3] [--big-batch 256 1024] [--points 16] [--only digits_mlp big_mlp eval]
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "checkpoints"
WORKLOADS = ("digits_mlp", "big_mlp", "eval")


# ------------------------------------------------------------------ worker
def _curve_throughput(curve, loader, epochs: int, seed: int = 0) -> dict:
    import modeconn as mc
    from modeconn.runtime import distributed as dist

    mc.fit_curve(curve, loader, epochs=1, lr=0.01, seed=seed)  # warm-up (allocations, DDP buckets)
    dist.barrier()
    t0 = time.perf_counter()
    history = mc.fit_curve(curve, loader, epochs=epochs, lr=0.01, seed=seed)
    dist.barrier()
    seconds = time.perf_counter() - t0
    samples = epochs * len(loader) * loader.batch_size * loader.world_size  # global samples
    samples = min(samples, epochs * len(loader.x))
    return {"samples_per_s": samples / seconds, "seconds": seconds, "steps": epochs * len(loader),
            "grad_bytes_per_step": curve.free_bends.numel() * curve.free_bends.element_size(),
            "free_bends": curve.free_bends.numel(), "loss": history[-1]["loss"]}


def worker(args) -> None:
    import torch

    import modeconn as mc
    from modeconn.runtime import distributed as dist

    torch.set_num_threads(1)
    info = dist.init_from_env("gloo", "cpu")
    rank, world = info.rank, info.world_size
    out = {"world_size": world}
    if "digits_mlp" in args.only:
        ds = mc.get_dataset("digits")
        a, _ = mc.load_model(CKPT / "digits_mlp_a.pt")
        b, _ = mc.load_model(CKPT / "digits_mlp_b.pt")
        curve = mc.CurveModel(a, a, b, mc.Bezier(3))
        loader = ds.train_loader(args.batch // world, seed=0, rank=rank, world_size=world)
        out["digits_mlp"] = _curve_throughput(curve, loader, args.epochs)
    if "big_mlp" in args.only:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.big_samples, 512, generator=g)
        teacher = torch.randn(512, 10, generator=g)
        y = (x @ teacher).argmax(1)
        torch.manual_seed(0)
        a = mc.create_model("mlp", (512,), 10, depth=3, width=1024)
        b = mc.create_model("mlp", (512,), 10, depth=3, width=1024)
        for batch in args.big_batch:
            curve = mc.CurveModel(a, a, b, mc.Bezier(3))
            loader = mc.TensorLoader(x, y, batch // world, shuffle=True, seed=0, rank=rank, world_size=world)
            out[f"big_mlp_{batch}"] = _curve_throughput(curve, loader, args.epochs)
    if "eval" in args.only:
        from modeconn.evaluation.path import evaluate_path
        from modeconn.runtime import Runtime

        ds = mc.get_dataset("digits")
        a, _ = mc.load_model(CKPT / "digits_cnn_a.pt")
        b, _ = mc.load_model(CKPT / "digits_cnn_b.pt")
        line = mc.linear_path(a, b)
        train, test = ds.eval_loader("train"), ds.eval_loader("test")
        evaluate_path(line, train, test, ts=[0.5], runtime=Runtime(distributed=False))  # warm-up
        dist.barrier()
        t0 = time.perf_counter()
        res = evaluate_path(line, train, test, num_points=args.points, points_per_pass=args.points_per_pass)
        dist.barrier()
        out["eval"] = {"seconds": time.perf_counter() - t0, "points": args.points,
                       "test_loss": [float(v) for v in res.test_loss]}
    if info.is_main:
        print("RESULT " + json.dumps(out), flush=True)
    dist.cleanup()


# ---------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    me = [str(Path(__file__).resolve()), "--worker", "--epochs", str(args.epochs), "--batch", str(args.batch),
          "--big-batch", *map(str, args.big_batch), "--big-samples", str(args.big_samples), "--points",
          str(args.points), "--points-per-pass", str(args.points_per_pass), "--only", *args.only]
    if world == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--master_port", str(_free_port()), *me]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per training workload (default: 3)")
    p.add_argument("--batch", type=int, default=64, help="global batch of the digits MLP curve (default: 64)")
    p.add_argument("--big-batch", type=int, nargs="+", default=[256, 1024],
                   help="global batches of the big MLP curve (default: 256 1024)")
    p.add_argument("--big-samples", type=int, default=8192, help="synthetic samples of the big MLP (default: 8192)")
    p.add_argument("--points", type=int, default=16, help="points of the evaluated path (default: 16)")
    p.add_argument("--points-per-pass", type=int, default=4, help="points per pass (default: 4)")
    p.add_argument("--only", nargs="*", default=list(WORKLOADS), choices=WORKLOADS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, gloo, 1 thread per process; "
          f"load average {os.getloadavg()[0]:.1f}")
    res = {w: run(w, args) for w in (1, 2)}
    rows = [("digits_mlp", "digits_mlp", f"digits MLP pair, Bezier(3), global batch {args.batch}")]
    rows += [("big_mlp", f"big_mlp_{b}", f"MLP 512-1024x3-10 (random endpoints), {args.big_samples} synthetic "
                                         f"samples, Bezier(3), global batch {b}") for b in args.big_batch]
    for workload, key, title in rows:
        if workload not in args.only:
            continue
        one, two = res[1][key], res[2][key]
        print(f"\ncurve training: {title}")
        print(f"  free bends {one['free_bends']:,} floats -> all-reduced per step: "
              f"{one['grad_bytes_per_step']:,} bytes ({one['grad_bytes_per_step'] / 2**20:.2f} MiB)")
        print(f"  {'processes':>9s} {'samples/s':>10s} {'s/step':>8s} {'speed-up':>8s} {'final loss':>10s}")
        for w, r in ((1, one), (2, two)):
            print(f"  {w:9d} {r['samples_per_s']:10.0f} {r['seconds'] / r['steps']:8.4f} "
                  f"{r['samples_per_s'] / one['samples_per_s']:8.2f} {r['loss']:10.6f}")
    if "eval" in args.only:
        one, two = res[1]["eval"], res[2]["eval"]
        diff = max(abs(u - v) for u, v in zip(one["test_loss"], two["test_loss"]))
        print(f"\npath evaluation: line between the digits CNN endpoints (BN recomputed per point), "
              f"{args.points} points, {args.points_per_pass} per pass")
        print(f"  {'processes':>9s} {'seconds':>8s} {'speed-up':>8s}")
        for w, r in ((1, one), (2, two)):
            print(f"  {w:9d} {r['seconds']:8.2f} {one['seconds'] / r['seconds']:8.2f}")
        print(f"  max |test loss difference| between 1 and 2 processes: {diff:.3g}")


if __name__ == "__main__":
    main()
