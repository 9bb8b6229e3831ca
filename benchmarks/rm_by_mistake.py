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

from jalign.checkpoint import load_model
from jalign.data import tasks
from jalign.data.pipeline import DataConfig
from jalign.data.tokenize import ChatTokenizer, load_tokenizer


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


def rows(chat, records, side, length):
    ids = np.zeros((len(records), length), np.int32)
    seg = np.zeros_like(ids)
    for i, r in enumerate(records):
        x = np.concatenate([chat.encode_prompt(r["prompt"]),
                            chat.encode_response(r["prompt"], r[side])])
        if len(x) > length:
            raise ValueError(f"pair {i} has {len(x)} tokens > --length {length}")
        ids[i, :len(x)], seg[i, :len(x)] = x, 1
    return ids, seg


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--step", type=int)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--length", type=int, default=48)
    args = ap.parse_args()
    _, model = load_model(args.run, step=args.step, model_kind="scalar_head")
    chat = ChatTokenizer(load_tokenizer(None), DataConfig().chat_template)
    records = tasks.preference_records("add", args.n, args.seed, split="eval")
    score = jax.jit(model.sequence_scores)
    chosen = np.asarray(score(*rows(chat, records, "chosen", args.length)))
    rejected = np.asarray(score(*rows(chat, records, "rejected", args.length)))
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
