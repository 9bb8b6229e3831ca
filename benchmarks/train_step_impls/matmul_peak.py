"""Worker: the fp32 matmul rate of this machine under JAX/XLA:CPU, the MFU reference.

One "step" is ``--reps`` calls of a jitted ``a @ b`` on ``n x n`` float32 matrices;
the driver reads the median call time and turns it into GFLOP/s (2 n^3 per call).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Channel  # noqa: E402


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    args, _ = ap.parse_known_args()
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda a, b: a @ b)
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (args.n, args.n), jnp.float32)
    b = jax.random.normal(k2, (args.n, args.n), jnp.float32)
    jax.block_until_ready(f(a, b))

    def calls(k):
        out = []
        for _ in range(k):
            s = time.perf_counter()
            jax.block_until_ready(f(a, b))
            out.append(time.perf_counter() - s)
        return out

    chan = Channel()
    calls(1)
    chan.send("ready", info=dict(name=f"fp32 matmul {args.n}x{args.n} (jax.jit)", n=args.n,
                                 flops_per_call=2 * args.n ** 3, jax=jax.__version__))
    while True:
        cmd, k = chan.recv()
        if cmd != "run":
            chan.exit()
        chan.send("times", times=[statistics.median(calls(args.reps)) for _ in range(k)])


if __name__ == "__main__":
    main()
