"""Pairs from a policy's own answers: chosen passes the task checker, rejected fails it,
and every problem is accounted for."""

import json

from jalign.data import tasks
from jalign.data.tokenize import ChatTokenizer, load_tokenizer
from jalign.models.build import create_model
from jalign.models.config import preset
from jalign.rl.pairs import policy_pairs, write_jsonl


def test_policy_pairs_are_judged_by_the_checker(tmp_path):
    chat = ChatTokenizer(load_tokenizer(None), None)
    model = create_model(preset("tiny", vocab_size=512), seed=0)
    records, stats = policy_pairs(model, chat, "add", n=24, samples=2, batch_size=16)
    assert stats["problems"] == 24 and stats["samples"] == 48
    assert stats["pairs_from_policy"] + stats["pairs_synthetic"] == len(records) == 24
    assert stats["pairs_from_policy"] > 0  # an untrained model gets answers wrong
    for r in records:
        assert tasks.check("add", r, r["chosen"][0]["content"])
        assert not tasks.check("add", r, r["rejected"][0]["content"])
    # The same problems as the bundled prompt records of that seed, in order.
    assert [r["prompt"] for r in records] == [p["prompt"] for p in tasks.prompt_records("add", 24, 0)]
    path = write_jsonl(records, tmp_path / "pairs.jsonl")
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == records

    kept, stats = policy_pairs(model, chat, "add", n=24, samples=1, fill_synthetic=False,
                               batch_size=16)
    assert stats["left_out"] + stats["pairs_from_policy"] == 24 == stats["left_out"] + len(kept)


def test_problems_answered_right_get_the_synthetic_mistake(monkeypatch):
    import jalign.rl.pairs as pairs

    prompts = tasks.prompt_records("add", 6, 0)
    # Right on even problems, a fixed wrong answer on odd ones.
    fake = [p["answer"] if i % 2 == 0 else "7" for i, p in enumerate(prompts)]
    monkeypatch.setattr(pairs, "complete", lambda *a, **k: list(fake))
    records, stats = policy_pairs(None, None, "add", n=6, samples=2)
    assert stats["sample_accuracy"] == 0.5
    assert stats["pairs_from_policy"] == 3 == stats["pairs_synthetic"]
    synthetic = tasks.preference_records("add", 6, 0)
    for i, r in enumerate(records):
        want = synthetic[i]["rejected"] if i % 2 == 0 else [{"role": "assistant", "content": "7"}]
        assert r["rejected"] == want and r["prompt"] == prompts[i]["prompt"]
