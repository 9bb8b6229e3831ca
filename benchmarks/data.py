"""Data pipeline throughput: tokenize + pack + batch, against the cost of a training step.

Measures, on the bundled synthetic task (and on longer chat records made from the sample
files), how fast the pipeline turns records into batches: the up-front tokenization pass
(records/s, tokens/s) and iteration (batches/s with packing and batching). For scale it
also times one forward+backward pass of the SFT loss of the ``small`` preset on a batch of
the same shape: the pipeline is not the bottleneck if a batch is ready in a small fraction
of that.

    .venv/bin/python benchmarks/data.py [--records 20000] [--batch 16] [--length 256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _chat_records(n: int) -> list[dict]:
    """Longer multi-turn chats built from the sample files (varied lengths)."""
    from jalign.data import formats
    from jalign.data.tokenize import BUNDLED_TOKENIZER

    base = [r["messages"] for r in formats.read_records(
        str(BUNDLED_TOKENIZER.parent / "samples" / "messages.jsonl"))]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        turns = base[i % len(base)]
        reps = int(rng.integers(1, 4))
        body = [m for m in turns if m["role"] != "system"] * reps
        out.append({"messages": body})
    return out


def run(records, config, chat, n_batches: int):
    from jalign.data.pipeline import build_iterator

    t0 = time.perf_counter()
    it = build_iterator(config, records=records, chat=chat)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    targets = 0
    for _ in range(n_batches):
        batch = next(it)
        targets += int(batch["loss_mask"].sum())
    t_iter = time.perf_counter() - t0
    s = it.stats
    fill = None
    if "segment_ids" in batch:
        fill = float((batch["segment_ids"] > 0).mean())
    return {"records/s (tokenize)": s["records"] / t_tok, "tokens/s (tokenize)": s["tokens"] / t_tok,
            "batches/s (pack+batch)": n_batches / t_iter,
            "ms/batch (pack+batch)": 1000 * t_iter / n_batches, "row fill": fill,
            "tokenize s": t_tok, "examples": s["examples"]}


def step_time(batch_size: int, length: int, repeats: int = 3) -> float:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jalign.losses.sft import sft_loss
    from jalign.models.build import create_model
    from jalign.models.config import preset

    model = create_model(preset("small"), seed=0)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(0, 512, (batch_size, length)), jnp.int32),
             "loss_mask": jnp.ones((batch_size, length), jnp.int32)}

    @jax.jit
    def grad(state, batch):
        def f(s):
            out = sft_loss(nnx.merge(graphdef, s), batch)
            return out.total / out.weight
        return jax.grad(f)(state)

    jax.block_until_ready(grad(state, batch))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(state, batch))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()

    from jalign.data import tasks
    from jalign.data.pipeline import DataConfig
    from jalign.data.tokenize import ChatTokenizer, load_tokenizer

    chat = ChatTokenizer(load_tokenizer())
    rows = []
    for name, records in (("bundled add", tasks.sft_records("add", args.records, 0)),
                          ("sample chats", _chat_records(args.records))):
        for packing in (False, True):
            config = DataConfig(path=name, batch_size=args.batch, max_length=args.length,
                                packing=packing)
            rows.append((name, packing, run(records, config, chat, args.batches)))
    step = step_time(args.batch, args.length)

    print(f"records={args.records} batch={args.batch}x{args.length}; one SFT fwd+bwd of the "
          f"'small' preset on this batch shape: {1000 * step:.0f} ms\n")
    print("| data | packing | records/s (tokenize) | tokens/s (tokenize) | ms/batch (pack+batch)"
          " | row fill | batch time / step time |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, packing, r in rows:
        fill = "-" if r["row fill"] is None else f"{r['row fill']:.2f}"
        print(f"| {name} | {'yes' if packing else 'no'} | {r['records/s (tokenize)']:,.0f} | "
              f"{r['tokens/s (tokenize)']:,.0f} | {r['ms/batch (pack+batch)']:.2f} | {fill} | "
              f"{r['ms/batch (pack+batch)'] / (1000 * step):.4f} |")


if __name__ == "__main__":
    main()
