"""Held-out NLL by position in the answer, for runs of benchmarks/ift_effect.py.

For each run directory given, the mean NLL of the k-th target token of each held-out
answer, counted from the start (k = 1: the first answer token) and from the end (the
last target of an answer is its end-of-turn token), on the same held-out split as the runs' evaluation (bundled addition, eval split,
512 problems, rows of 32 tokens). Prints a markdown table, one row per run.

    python benchmarks/ift_positions.py runs/experiments/ift_effect/{sft,ift}400_s0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def per_position(run_dir: str, max_length: int = 32, n: int = 512):
    import jax.numpy as jnp

    from jalign.sources import load_checkpoint as load_model
    from jalign.data.pipeline import DataConfig, build_iterator
    from jalign.data.tokenize import ChatTokenizer, load_tokenizer
    from jalign.losses.sft import target_log_probs

    chat = ChatTokenizer(load_tokenizer())
    dc = DataConfig(path="bundled:add", format="messages", split="eval", bundled_size=n,
                    max_length=max_length, batch_size=64, packing=False, shuffle=False,
                    num_epochs=1)
    _, model = load_model(run_dir)
    sums, counts = np.zeros((2, max_length)), np.zeros((2, max_length))
    for batch in build_iterator(dc, chat=chat):
        b = {k: jnp.asarray(v) for k, v in batch.items()}
        logp, mask = target_log_probs(model, b["input_ids"], b["loss_mask"],
                                      b["segment_ids"], b["positions"])
        logp, mask = np.asarray(logp, np.float64), np.asarray(mask)
        k = (np.cumsum(mask, 1) - 1).astype(int)  # index of each target within its answer
        k_end = mask.sum(1, keepdims=True).astype(int) - 1 - k  # 0: the answer's last target
        on = mask > 0
        for i, index in enumerate((k, k_end)):
            np.add.at(sums[i], index[on], -logp[on])
            np.add.at(counts[i], index[on], 1)
    used = counts[0] > 0
    return sums[:, used] / counts[:, used], counts[:, used].astype(int)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args(argv)
    rows = [(Path(r).name, *per_position(r)) for r in args.runs]
    width = max(m.shape[1] for _, m, _ in rows)
    for i, (title, head) in enumerate((("from the start", "target {}"),
                                       ("from the end (1: the end-of-turn token)", "last-{}"))):
        print(f"\nheld-out NLL by target position, counted {title}\n")
        print("| run | " + " | ".join(head.format(k + 1) if i == 0 else
                                     ("last" if k == 0 else f"last-{k}")
                                     for k in range(width)) + " |")
        print("|---|" + "---:|" * width)
        for name, means, _ in rows:
            print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in means[i]) + " |")
        print(f"\nanswers with such a target: {rows[0][2][i].tolist()}")


if __name__ == "__main__":
    main()
