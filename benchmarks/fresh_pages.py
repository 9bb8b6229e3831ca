"""What fresh memory costs the GRPO benchmark's loss and gradient, per allocator setting.

The program is benchmarks/kept_logits.py's (the benchmark Llama, 4 prompts x G 8 rows of
64 prompt + 128 completion tokens, the prompt run once per group, the head kept), compiled
once per process. Each setting runs in its own process (glibc reads GLIBC_TUNABLES only at
start), the settings alternating for ``--rounds`` rounds; per process the median wall time
of ``--calls`` calls after the first, and per call the minor page faults and kernel time
(getrusage), and the process's peak RSS:

  stock              glibc as it comes (JALIGN_KEEP_MALLOC=1)
  huge pages         jalign.cli.HUGEPAGE_TUNING (the command's default under THP madvise)
  keep freed memory  jalign.cli.GLIBC_TUNING (JALIGN_TUNE_MALLOC=1)

    python benchmarks/fresh_pages.py [--rounds 2] [--calls 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "train_step_impls"))
from harness import ALLOCATOR_VARS  # noqa: E402  (benchmarks/)


def settings() -> dict:
    sys.path.insert(0, os.path.dirname(HERE))
    from jalign.cli import GLIBC_TUNING, HUGEPAGE_TUNING
    return {"stock": None, "huge pages": HUGEPAGE_TUNING, "keep freed memory": GLIBC_TUNING}


def loss_and_grad():
    """(jitted value_and_grad, its argument): the GRPO benchmark's loss and gradient."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from common import GRPO_COMPLETION, GRPO_GROUP, GRPO_PROMPT, GRPO_PROMPTS, SHAPE
    from jalign.losses.ppo import response_log_probs
    from jalign.models.build import create_model
    from jalign.models.config import LlamaConfig
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
    seg, pos = jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(t), ids.shape)
    weights = jnp.asarray(rng.normal(size=(rows, t - 1)), jnp.float32)
    graphdef, state = nnx.split(create_model(cfg, seed=0))

    def loss(state):
        lp, _ = response_log_probs(nnx.merge(graphdef, state), ids, seg, pos,
                                   temperature=1.0, chunk_tokens=2048,
                                   last=GRPO_COMPLETION, group_size=GRPO_GROUP)
        return jnp.sum(lp * weights)

    return jax.jit(jax.value_and_grad(loss)), state


def child(calls: int) -> None:
    import jax
    f, state = loss_and_grad()
    jax.block_until_ready(f(state))
    times, faults, kernel = [], [], []
    for _ in range(calls):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        jax.block_until_ready(f(state))
        times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(r1.ru_minflt - r0.ru_minflt)
        kernel.append(r1.ru_stime - r0.ru_stime)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(json.dumps({"times": times, "faults": faults, "kernel": kernel, "peak": peak}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.calls)
    got = {s: [] for s in settings()}
    for r in range(args.rounds):
        for name, tunables in settings().items():
            env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARS}
            if tunables:
                env["GLIBC_TUNABLES"] = tunables
            env["PYTHONPATH"] = os.path.dirname(HERE)
            p = subprocess.run([sys.executable, __file__, "--child", f"--calls={args.calls}"],
                               env=env, capture_output=True, text=True)
            if p.returncode:
                sys.exit(f"{name} failed:\n{p.stderr[-2000:]}")
            got[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {name} {statistics.median(got[name][-1]['times']):.3f} s",
                  file=sys.stderr, flush=True)
    print("\n| allocator | median s/call | per-process medians | minor faults/call | kernel "
          "s/call | peak RSS GiB |\n|---|---:|---|---:|---:|---:|")
    for name, runs in got.items():
        meds = [statistics.median(x["times"]) for x in runs]
        print(f"| {name} | {statistics.median(meds):.3f} | "
              f"{' / '.join(f'{m:.2f}' for m in meds)} | "
              f"{statistics.median(f for x in runs for f in x['faults']):,.0f} | "
              f"{statistics.median(k for x in runs for k in x['kernel']):.2f} | "
              f"{max(x['peak'] for x in runs):.2f} |")


if __name__ == "__main__":
    main()
