"""``jalign.evaluate.complete``: how prompts become generation batches (the generation
itself is tests/rl/test_generate.py's)."""

import numpy as np

from jalign import evaluate
from jalign.data.tokenize import ChatTokenizer, load_tokenizer


def _recording_generate(calls):
    """A stand-in for ``generate`` that records each batch's prompt ids and answers each
    row with its own prompt's tokens (so a row's text says which prompt it was)."""
    def fake(model, ids, mask, *, max_new_tokens, **kwargs):
        ids, mask = np.asarray(ids), np.asarray(mask)
        calls.append(ids)
        real = [row[m > 0] for row, m in zip(ids, mask)]
        tokens = np.zeros((len(ids), ids.shape[1]), np.int32)
        for i, r in enumerate(real):
            tokens[i, :len(r)] = r
        return {"tokens": tokens, "lengths": np.asarray([len(r) for r in real], np.int32)}
    return fake


def _prompts(n):
    return [[{"role": "user", "content": f"question {i}"}] for i in range(n)]


def test_fewer_prompts_than_a_batch_are_one_batch_of_their_own_size(monkeypatch):
    chat = ChatTokenizer(load_tokenizer())
    calls = []
    monkeypatch.setattr(evaluate, "generate", _recording_generate(calls))
    texts = evaluate.complete(None, chat, _prompts(3), batch_size=64)
    assert [c.shape[0] for c in calls] == [3]  # not 64 rows, 61 of them repeats
    assert len(texts) == 3


def test_batches_keep_one_shape_and_drop_the_padding_rows(monkeypatch):
    chat = ChatTokenizer(load_tokenizer())
    calls = []
    monkeypatch.setattr(evaluate, "generate", _recording_generate(calls))
    prompts = _prompts(5)
    texts = evaluate.complete(None, chat, prompts, batch_size=2)
    assert [c.shape[0] for c in calls] == [2, 2, 2]  # one compiled shape
    np.testing.assert_array_equal(calls[2][1], calls[2][0])  # the last padded with a repeat
    # Each prompt's text comes from its own row, in order, and the repeat is dropped.
    single = []
    monkeypatch.setattr(evaluate, "generate", _recording_generate(single))
    alone = [evaluate.complete(None, chat, [p], batch_size=2)[0] for p in prompts]
    assert texts == alone and len(set(texts)) == 5 and all("question" in t for t in texts)
