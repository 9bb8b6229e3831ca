"""The LM head's weight gradient on XLA:CPU: ``x^T dy`` as autodiff emits it against
``x^T`` materialised first, alone and inside the GRPO benchmark's loss and gradient.

Part 1, the GEMMs alone (``--tokens`` rows, float32, median of 7 calls): the weight
gradient ``x^T dy`` of each benchmark linear ([512x512], [512x1408], [1408x512] and the
head [512x8192]) as ``dot_general`` contracting both operands' rows, against
``optimization_barrier(x.T) @ dy`` (the transpose made once, then a plain GEMM).

Part 2, in context: fresh_pages.py's GRPO loss and gradient compiled twice in one process,
the head's logits by autodiff and by a custom VJP whose weight gradient is
``optimization_barrier(h.T) @ g``; the two called alternately for ``--rounds`` rounds;
their losses and the gradients' largest difference printed.

    python benchmarks/head_weight_grad.py [--rounds 5] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

import fresh_pages  # benchmarks/ (the GRPO loss and gradient)

ROWS_BY_ROWS = (((0,), (0,)), ((), ()))  # contract the tokens of both operands


def _median_s(f, *args, reps: int = 7) -> float:
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def gemms(tokens: int) -> None:
    print(f"\nweight gradients alone, {tokens} tokens, fp32\n")
    print("| weight | x^T dy ms | GFLOP/s | barrier(x^T) @ dy ms | GFLOP/s |\n"
          "|---|---:|---:|---:|---:|")
    plain = jax.jit(lambda x, dy: lax.dot_general(x, dy, ROWS_BY_ROWS))
    barrier = jax.jit(lambda x, dy: lax.optimization_barrier(x.T) @ dy)
    for d, o in ((512, 512), (512, 1408), (1408, 512), (512, 8192)):
        x = jnp.full((tokens, d), 0.01, jnp.float32)
        dy = jnp.full((tokens, o), 0.01, jnp.float32)
        gf = 2 * tokens * d * o / 1e9
        a, b = _median_s(plain, x, dy), _median_s(barrier, x, dy)
        print(f"| [{d}x{o}] | {1e3 * a:.1f} | {gf / a:.0f} | {1e3 * b:.1f} | {gf / b:.0f} |")


@jax.custom_vjp
def _head(h, w):
    return jnp.dot(h, w, preferred_element_type=jnp.float32)


def _head_fwd(h, w):
    return _head(h, w), (h, w)


def _head_bwd(res, g):
    h, w = res
    return jnp.dot(g, w.T), jnp.dot(lax.optimization_barrier(h.T), g)


_head.defvjp(_head_fwd, _head_bwd)


def in_context(rounds: int) -> None:
    import jalign.losses.sft as sft
    autodiff = sft._logits
    runs = {}
    for name, head in (("autodiff", autodiff), ("custom VJP, barrier(h^T) @ g", _head)):
        sft._logits = head  # read while tracing
        f, state = fresh_pages.loss_and_grad()
        runs[name] = (f, jax.block_until_ready(f(state)))
    sft._logits = autodiff
    (_, (l0, g0)), (_, (l1, g1)) = runs.values()
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g0),
                                                               jax.tree.leaves(g1)))
    times = {n: [] for n in runs}
    for _ in range(rounds):
        for n, (f, _) in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(state))
            times[n].append(time.perf_counter() - t0)
    print(f"\nGRPO loss + gradient, {rounds} rounds alternating; losses {float(l0)!r} / "
          f"{float(l1)!r}, gradients max |difference| {diff:.3g}\n")
    print("| head weight gradient | median s | min s | calls |\n|---|---:|---:|---|")
    for n, ts in times.items():
        print(f"| {n} | {statistics.median(ts):.3f} | {min(ts):.3f} | "
              f"{' '.join(f'{t:.2f}' for t in ts)} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    gemms(args.tokens)
    in_context(args.rounds)


if __name__ == "__main__":
    main()
