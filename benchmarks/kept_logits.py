"""The GRPO benchmark's loss and gradient with the vocabulary head recomputed in the
backward (token chunks, remat) and kept (one chunk: jalign.losses.sft.KEEP_LOGITS_BYTES),
both compiled in one process and called alternately.

The shape is benchmarks/grpo_iteration.py's: the benchmark Llama (vocab 8192, hidden 512,
8 layers, float32), 4 prompts x G 8 rows of 64 prompt + 128 completion tokens, the prompt
run once per group (``response_log_probs(..., group_size=8)``), log-probs of the 4096
completion tokens weighted by random numbers and summed.

    python benchmarks/kept_logits.py [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step_impls"))
from common import GRPO_COMPLETION, GRPO_GROUP, GRPO_PROMPT, GRPO_PROMPTS  # noqa: E402

import fresh_pages  # noqa: E402  (benchmarks/: the GRPO loss and gradient)
import jalign.losses.sft as sft  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    rows = GRPO_PROMPTS * GRPO_GROUP

    def compiled(keep_bytes: int):
        sft.KEEP_LOGITS_BYTES = keep_bytes  # read while tracing
        f, state = fresh_pages.loss_and_grad()
        return f, jax.block_until_ready(f(state)), state

    default = sft.KEEP_LOGITS_BYTES
    runs = {"head recomputed (chunks of 2048, remat)": compiled(0),
            "head kept (one chunk)": compiled(default)}
    sft.KEEP_LOGITS_BYTES = default
    (_, (l0, g0), state), (_, (l1, g1), _) = runs.values()
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g0),
                                                               jax.tree.leaves(g1)))
    times = {n: [] for n in runs}
    for _ in range(args.rounds):
        for n, (f, _, _) in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(state))
            times[n].append(time.perf_counter() - t0)
    print(f"\nGRPO loss + gradient, {rows} x {GRPO_PROMPT + GRPO_COMPLETION} tokens, "
          f"{rows * GRPO_COMPLETION} projected; "
          f"losses {float(l0)!r} / {float(l1)!r}, gradients max |difference| {diff:.3g}\n")
    print("| head | median s | min s |\n|---|---:|---:|")
    for n, ts in times.items():
        print(f"| {n} | {statistics.median(ts):.3f} | {min(ts):.3f} |")


if __name__ == "__main__":
    main()
