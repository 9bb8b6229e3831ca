"""Causal self-attention of one layer, forward + backward, side by side: jalign's XLA path,
its blockwise path (query blocks, own backward) and torch's fused SDPA.

Each row runs in its own process, rows alternating round by round; a row's time is the
median of its rounds (each round: the median of --steps calls after --warmup). Shapes:
the CPU benchmark model's layer (batch 4 x 512 tokens, 8 heads of 64, fp32) by default.

    python benchmarks/attention_kernels.py [--rounds 5] [--seq 512] [--blocks 2,3,4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def run_jax(impl: str, args) -> list[float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jalign.models.attention import SelfMask, attention
    from jalign.models import blockwise
    if impl.startswith("blockwise"):
        blockwise.BLOCKS = int(impl.split(":")[1])  # this process's rows only
        impl = "blockwise"
    rng = np.random.default_rng(0)
    b, t, n, g, h = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, x, h)), jnp.float32) for x in (n, g, g))
    mask = SelfMask(jnp.ones((b, t), jnp.int32))
    f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, mask, impl=impl)),
                         argnums=(0, 1, 2)))
    for _ in range(args.warmup):
        jax.block_until_ready(f(q, k, v))
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(q, k, v))
        times.append(time.perf_counter() - t0)
    return times


def run_torch(args) -> list[float]:
    import torch
    torch.set_num_threads(args.threads)
    b, t, n, g, h = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    q = torch.randn(b, n, t, h, requires_grad=True)
    k = torch.randn(b, g, t, h, requires_grad=True)
    v = torch.randn(b, g, t, h, requires_grad=True)

    def step():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                               enable_gqa=g != n)
        out.sum().backward()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--blocks", default="2,4", help="blockwise rows: query blocks per row")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--row", default="", help=argparse.SUPPRESS)  # a worker process
    args = ap.parse_args()
    if args.row:
        times = run_torch(args) if args.row == "torch" else run_jax(args.row, args)
        print(json.dumps(times))
        return
    rows = ["xla"] + [f"blockwise:{n}" for n in args.blocks.split(",") if n] + ["torch"]
    results: dict[str, list[float]] = {r: [] for r in rows}
    for _ in range(args.rounds):
        for row in rows:
            out = subprocess.run([sys.executable, __file__, "--row", row,
                                  *[a for a in sys.argv[1:]]], capture_output=True, text=True,
                                 check=True)
            results[row].append(statistics.median(json.loads(out.stdout.splitlines()[-1])))
    base = statistics.median(results["xla"])
    print(f"attention fwd+bwd, {args.batch} x {args.seq} tokens, {args.heads} q / "
          f"{args.kv_heads} kv heads of {args.head_dim}, fp32, {args.rounds} rounds")
    print(f"{'row':<14} {'median ms':>10} {'min':>8} {'max':>8} {'xla / row':>10}")
    for row, ts in results.items():
        med = statistics.median(ts)
        print(f"{row:<14} {1e3 * med:>10.2f} {1e3 * min(ts):>8.2f} {1e3 * max(ts):>8.2f} "
              f"{base / med:>10.2f}")


if __name__ == "__main__":
    main()
