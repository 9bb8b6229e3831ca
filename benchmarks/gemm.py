"""The SFT benchmark step's weight GEMMs alone: XLA:CPU (as jalign's step calls them) vs
PyTorch (as its autograd calls them), side by side.

Every matmul of one train step of the benchmark model (benchmarks/train_step.py's shape:
4 x 512 tokens, hidden 512, intermediate 1408, vocab 8192, 8 layers) in the layout each
framework keeps its weights in:

  jalign  weights [in, out]:  forward x @ W,  input grad dy @ W^T,  weight grad x^T @ dy
  torch   nn.Linear [out, in]: forward x @ W^T, input grad dy @ W,  weight grad dy^T @ x

Each side runs in its own process (XLA's and OpenMP's thread pools never share the cores),
the sides alternate round by round; a shape's time is the median over rounds of the median
of ``--reps`` calls. The last column sums count x time over the step: the floor the
weight GEMMs put under each framework's step on this machine, whatever else it does.

    python benchmarks/gemm.py [--rounds 4] [--reps 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step_impls"))
from common import SHAPE  # noqa: E402  (the benchmark model's shape)

M = SHAPE["batch"] * SHAPE["seq"]
HIDDEN, INTER = SHAPE["hidden"], SHAPE["intermediate"]
VOCAB, LAYERS = SHAPE["vocab"], SHAPE["layers"]
# (name, in, out, uses per step)
LINEARS = (("q/k/v/o", HIDDEN, HIDDEN, 4 * LAYERS), ("gate/up", HIDDEN, INTER, 2 * LAYERS),
           ("down", INTER, HIDDEN, LAYERS), ("lm head", HIDDEN, VOCAB, 1))
OPS = ("forward", "input grad", "weight grad")


def run_xla(reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    from jax import lax
    out = {}
    for name, i, o, _ in LINEARS:
        x = jnp.ones((M, i), jnp.float32) * 0.01
        w = jnp.ones((i, o), jnp.float32) * 0.01
        dy = jnp.ones((M, o), jnp.float32) * 0.01
        rows_by_rows = (((1,), (1,)), ((), ()))   # dy @ W^T: contract the out dims
        cols_by_cols = (((0,), (0,)), ((), ()))   # x^T @ dy: contract the tokens
        calls = {"forward": (lambda a, b: a @ b, x, w),
                 "input grad": (lambda a, b: lax.dot_general(a, b, rows_by_rows), dy, w),
                 "weight grad": (lambda a, b: lax.dot_general(a, b, cols_by_cols), x, dy)}
        for op, (f, a, b) in calls.items():
            f = jax.jit(f)
            jax.block_until_ready(f(a, b))
            out[f"{name}|{op}"] = _time(lambda: jax.block_until_ready(f(a, b)), reps)
    return out


def run_torch(reps: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    out = {}
    with torch.no_grad():
        for name, i, o, _ in LINEARS:
            x = torch.full((M, i), 0.01)
            w = torch.full((o, i), 0.01)
            dy = torch.full((M, o), 0.01)
            calls = {"forward": lambda: x.mm(w.t()), "input grad": lambda: dy.mm(w),
                     "weight grad": lambda: dy.t().mm(x)}
            for op, f in calls.items():
                f()
                out[f"{name}|{op}"] = _time(f, reps)
    return out


def _time(f, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--side", choices=("xla", "torch"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        res = run_xla(args.reps) if args.side == "xla" else run_torch(args.reps, args.threads)
        print(json.dumps(res))
        return
    times = {"xla": [], "torch": []}
    for r in range(args.rounds):
        for side in (("xla", "torch") if r % 2 == 0 else ("torch", "xla")):
            p = subprocess.run([sys.executable, __file__, "--side", side, "--reps", str(args.reps),
                                "--threads", str(args.threads)], capture_output=True, text=True)
            if p.returncode:
                sys.exit(f"{side} worker failed:\n{p.stderr[-3000:]}")
            times[side].append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    table(times, args)


def table(times: dict, args) -> None:
    med = {s: {k: statistics.median(t[k] for t in times[s]) for k in times[s][0]} for s in times}
    print(f"\nweight GEMMs of the SFT benchmark step (M = {M} tokens), fp32, median of "
          f"{args.rounds} rounds x {args.reps} calls; torch threads {args.threads}\n")
    print("| linear | op | per step | GFLOP/call | XLA ms | torch ms | XLA GFLOP/s | "
          "torch GFLOP/s | torch / XLA time |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    step = {"xla": 0.0, "torch": 0.0}
    for name, i, o, n in LINEARS:
        gf = 2 * M * i * o / 1e9
        for op in OPS:
            k = f"{name}|{op}"
            x, t = med["xla"][k], med["torch"][k]
            step["xla"] += n * x
            step["torch"] += n * t
            print(f"| {name} [{i}x{o}] | {op} | {n} | {gf:.2f} | {1e3 * x:.2f} | {1e3 * t:.2f} | "
                  f"{gf / x:.0f} | {gf / t:.0f} | {t / x:.2f} |")
    total = sum(2 * M * i * o * n * 3 for _, i, o, n in LINEARS) / 1e9
    print(f"\nall weight GEMMs of one step ({total:.1f} GFLOP): XLA {step['xla']:.3f} s "
          f"({total / step['xla']:.0f} GFLOP/s), torch {step['torch']:.3f} s "
          f"({total / step['torch']:.0f} GFLOP/s); "
          f"XLA / torch time {step['xla'] / step['torch']:.2f}")


if __name__ == "__main__":
    main()
