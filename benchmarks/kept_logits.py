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
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step_impls"))
from common import GRPO_COMPLETION, GRPO_GROUP, GRPO_PROMPT, GRPO_PROMPTS, SHAPE  # noqa: E402

import jalign.losses.sft as sft  # noqa: E402
from jalign.losses.ppo import response_log_probs  # noqa: E402
from jalign.models.build import create_model  # noqa: E402
from jalign.models.config import LlamaConfig  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    cfg = LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"],
                      intermediate_size=SHAPE["intermediate"], num_layers=SHAPE["layers"],
                      num_heads=SHAPE["heads"], num_kv_heads=SHAPE["kv_heads"],
                      max_position_embeddings=1024, scan_layers=False,
                      tie_word_embeddings=False)
    rows, t = GRPO_PROMPTS * GRPO_GROUP, GRPO_PROMPT + GRPO_COMPLETION
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (rows, t)).astype(np.int32)
    ids[:, :GRPO_PROMPT] = np.repeat(ids[::GRPO_GROUP, :GRPO_PROMPT], GRPO_GROUP, 0)
    ids = jnp.asarray(ids)
    seg = jnp.ones_like(ids)
    pos = jnp.broadcast_to(jnp.arange(t), ids.shape)
    weights = jnp.asarray(rng.normal(size=(rows, t - 1)), jnp.float32)
    graphdef, state = nnx.split(create_model(cfg, seed=0))

    def compiled(keep_bytes: int):
        sft.KEEP_LOGITS_BYTES = keep_bytes  # read while tracing

        def loss(state):
            lp, _ = response_log_probs(nnx.merge(graphdef, state), ids, seg, pos,
                                       temperature=1.0, chunk_tokens=2048,
                                       last=GRPO_COMPLETION, group_size=GRPO_GROUP)
            return jnp.sum(lp * weights)

        f = jax.jit(jax.value_and_grad(loss))
        return f, jax.block_until_ready(f(state))

    default = sft.KEEP_LOGITS_BYTES
    runs = {"head recomputed (chunks of 2048, remat)": compiled(0),
            "head kept (one chunk)": compiled(default)}
    sft.KEEP_LOGITS_BYTES = default
    (_, (l0, g0)), (_, (l1, g1)) = runs.values()
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g0),
                                                               jax.tree.leaves(g1)))
    times = {n: [] for n in runs}
    for _ in range(args.rounds):
        for n, (f, _) in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(state))
            times[n].append(time.perf_counter() - t0)
    print(f"\nGRPO loss + gradient, {rows} x {t} tokens, {rows * GRPO_COMPLETION} projected; "
          f"losses {float(l0)!r} / {float(l1)!r}, gradients max |difference| {diff:.3g}\n")
    print("| head | median s | min s |\n|---|---:|---:|")
    for n, ts in times.items():
        print(f"| {n} | {statistics.median(ts):.3f} | {min(ts):.3f} |")


if __name__ == "__main__":
    main()
