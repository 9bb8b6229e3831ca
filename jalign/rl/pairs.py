"""Preference pairs from a policy's own answers, judged by a bundled task's checker.

For each problem the policy samples answers; a wrong one becomes ``rejected`` and the
correct answer (recomputed from the prompt) ``chosen``. Pairs built from the policy's
own mistakes teach it exactly what it gets wrong, which fixed, hand-made mistakes
(``tasks.preference_records``) need not. Problems the policy always answers right get
the task's synthetic wrong answer (``fill_synthetic``) or are left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax

from jalign.data import tasks
from jalign.data.tokenize import ChatTokenizer
from jalign.evaluate import complete


def policy_pairs(model, chat: ChatTokenizer, task: str, *, n: int, seed: int = 0,
                 split: str = "train", samples: int = 2, temperature: float = 1.0,
                 fill_synthetic: bool = True, batch_size: int = 64,
                 max_new_tokens: int = 8) -> tuple[list[dict], dict]:
    """(preference records, stats) for ``n`` problems of ``task``'s ``split``."""
    prompts = tasks.prompt_records(task, n, seed, split=split)
    synthetic = tasks.preference_records(task, n, seed, split=split) if fill_synthetic else None
    wrong: list[str | None] = [None] * n
    right = 0
    for s in range(samples):
        texts = complete(model, chat, [r["prompt"] for r in prompts],
                         rng=jax.random.fold_in(jax.random.key(seed), s), greedy=False,
                         temperature=temperature, batch_size=batch_size,
                         max_new_tokens=max_new_tokens)
        for i, (record, text) in enumerate(zip(prompts, texts)):
            if tasks.check(task, record, text):
                right += 1
            elif wrong[i] is None:
                wrong[i] = tasks.normalize_completion(text) or None
    records = []
    stats = {"problems": n, "samples": n * samples, "sample_accuracy": right / max(n * samples, 1),
             "pairs_from_policy": 0, "pairs_synthetic": 0, "left_out": 0}
    for i, record in enumerate(prompts):
        if wrong[i] is not None:
            rejected = [{"role": "assistant", "content": wrong[i]}]
            stats["pairs_from_policy"] += 1
        elif synthetic is not None:
            rejected = synthetic[i]["rejected"]
            stats["pairs_synthetic"] += 1
        else:
            stats["left_out"] += 1
            continue
        records.append({"prompt": record["prompt"],
                        "chosen": [{"role": "assistant", "content": tasks.answer(task, record)}],
                        "rejected": rejected})
    return records, stats


def write_jsonl(records: list[dict], path) -> Path:
    """One JSON record per line, written to a temporary name and renamed into place."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(out)
    return out
