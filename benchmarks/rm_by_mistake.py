"""A reward model's held-out pairwise accuracy on the bundled addition pairs, by the kind
of mistake in the rejected answer (a measurement, not a speed benchmark; used for the
reward-model tables in docs/preference.md).

    .venv/bin/python benchmarks/rm_by_mistake.py RUN_DIR [--step N] [--n 512] [--seed 0]

``--seed 0 --n 512`` are the pairs the training runs evaluate on; another seed draws other
held-out problems (still the eval split), to check a checkpoint picked on the first.
"""

from __future__ import annotations

import argparse
import collections

import jax
import numpy as np

from jalign.sources import load_checkpoint as load_model  # LoRA runs too
from jalign.data import tasks
from jalign.data.pipeline import DataConfig, build_iterator


def mistake_kind(correct: str, wrong: str) -> str:
    if len(correct) != len(wrong):
        return "length differs"
    if sorted(correct) == sorted(wrong):
        return "digits swapped"
    diff = [i for i, (a, b) in enumerate(zip(correct, wrong)) if a != b]
    if len(diff) == 1:
        return "one digit wrong, the last" if diff[0] == len(correct) - 1 else \
            "one digit wrong, not the last"
    return "several digits"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--step", type=int)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--length", type=int, default=48)
    args = ap.parse_args()
    _, model = load_model(args.run, step=args.step, head="scalar")
    # The training pipeline's own batches (one batch of all pairs, in record order), so
    # the rows are exactly what an RM run's eval scores.
    data = DataConfig(path="bundled:add", format="preference", split="eval",
                      bundled_size=args.n, seed=args.seed, shuffle=False, batch_size=args.n,
                      max_length=args.length, max_prompt_length=args.length // 2,
                      prefetch=0)
    batch = next(build_iterator(data))
    if data.bundled_size != len(batch["chosen_input_ids"]):
        raise RuntimeError("pairs were dropped while tokenizing; raise --length")
    records = tasks.preference_records("add", args.n, args.seed, split="eval")
    score = jax.jit(model.sequence_scores)
    chosen = np.asarray(score(batch["chosen_input_ids"], batch["chosen_segment_ids"]))
    rejected = np.asarray(score(batch["rejected_input_ids"], batch["rejected_segment_ids"]))
    total, right = collections.Counter(), collections.Counter()
    for r, c, w in zip(records, chosen, rejected):
        kind = mistake_kind(r["chosen"][0]["content"], r["rejected"][0]["content"])
        total[kind] += 1
        right[kind] += bool(c > w)
    print("| mistake in the rejected answer | pairs | pairwise accuracy |\n|---|---:|---:|")
    for kind in sorted(total, key=lambda k: -total[k]):
        print(f"| {kind} | {total[kind]} | {right[kind] / total[kind]:.1%} |")
    print(f"| all | {sum(total.values())} | {sum(right.values()) / sum(total.values()):.1%} |")


if __name__ == "__main__":
    main()
