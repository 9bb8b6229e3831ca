"""Evaluation: task accuracy by generation, and loss/perplexity over a dataset."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jalign.data import tasks
from jalign.data.packing import left_pad_prompt
from jalign.data.pipeline import DataConfig, build_iterator
from jalign.data.tokenize import ChatTokenizer
from jalign.losses.sft import sft_loss
from jalign.rl.generate import decode_text, generate


def complete(model, chat: ChatTokenizer, prompts: list, *, rng=None, greedy: bool = True,
             temperature: float = 1.0, batch_size: int = 64, max_new_tokens: int = 8,
             prompt_length: int = 48) -> list[str]:
    """The completion text of each chat prompt (a list of messages).

    Every batch has the same shape (the last is padded with repeats, dropped from the
    result), so generation compiles once; fewer prompts than ``batch_size`` are one batch
    of their own number of rows (not padded up to ``batch_size``: 16 problems would
    otherwise generate 64 rows)."""
    rng = jax.random.key(0) if rng is None else rng
    rows = [left_pad_prompt({"prompt_ids": chat.encode_prompt(p)}, prompt_length, chat.pad_id)
            for p in prompts]
    batch_size = max(1, min(batch_size, len(rows)))
    texts = []
    for i, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start:start + batch_size]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - real)
        ids = np.stack([c["prompt_ids"] for c in chunk])
        mask = np.stack([c["prompt_mask"] for c in chunk])
        out = generate(model, ids, mask, max_new_tokens=max_new_tokens,
                       rng=jax.random.fold_in(rng, i), greedy=greedy, temperature=temperature,
                       eos_id=chat.eos_id, pad_id=chat.pad_id)
        texts += decode_text(chat, out["tokens"], out["lengths"])[:real]
    return texts


def task_accuracy(model, chat: ChatTokenizer, task: str, *, n: int = 256, seed: int = 1234,
                  split: str = "eval", batch_size: int = 64, max_new_tokens: int = 8,
                  prompt_length: int = 48, show: int = 0) -> dict:
    """Exact-match accuracy of greedy answers on ``n`` held-out problems of a bundled task."""
    records = tasks.prompt_records(task, n, seed, split=split)
    texts = complete(model, chat, [r["prompt"] for r in records], batch_size=batch_size,
                     max_new_tokens=max_new_tokens, prompt_length=prompt_length)
    correct, samples = 0, []
    for record, text in zip(records, texts):
        ok = tasks.check(task, record, text)
        correct += ok
        if len(samples) < show:
            samples.append((record["prompt"][-1]["content"], text, ok))
    return {"task": task, "accuracy": correct / n, "correct": correct, "total": n,
            "samples": samples}


def dataset_loss(model, data_config: DataConfig, *, max_batches: int = 50) -> dict:
    """Mean next-token loss (and perplexity) over trainable tokens of a dataset."""
    it = build_iterator(data_config)
    loss_fn = nnx.jit(lambda m, b: sft_loss(m, b)[:2])
    total = weight = 0.0
    batches = 0
    for batch in it:
        t, w = loss_fn(model, {k: jnp.asarray(v) for k, v in batch.items()})
        total += float(t)
        weight += float(w)
        batches += 1
        if batches >= max_batches:
            break
    if batches == 0:
        from jalign.data.formats import DataError
        raise DataError(f"{data_config.path}: no complete batch of batch_size="
                        f"{data_config.batch_size} ({it.stats.get('examples', 0)} examples); "
                        "lower the batch size")
    loss = total / max(weight, 1e-9)
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "tokens": weight,
            "batches": batches}
