"""Packing round trips, packed loss == unpacked loss, and exact resume of pipelines."""

import json
from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jalign.data.packing import pad_example, unpack_row
from jalign.data.pipeline import DataConfig, build_iterator, tokenize_records
from jalign.data.tokenize import ChatTokenizer, load_tokenizer
from jalign.losses.sft import sft_loss, target_log_probs
from jalign.models.build import create_model
from jalign.models.config import preset
from tests.numerics import assert_f32_close, f32_tolerance, llama_logp_bound


@pytest.fixture(scope="module")
def chat():
    return ChatTokenizer(load_tokenizer())


def _config(**kw):
    base = dict(path="bundled:add", format="messages", batch_size=4, max_length=64,
                bundled_size=60, seed=3)
    base.update(kw)
    return DataConfig(**base)


def test_packed_rows_unpack_to_the_examples(chat):
    from jalign.data import tasks

    config = _config(packing=True, shuffle=False, num_epochs=1)
    examples, _ = tokenize_records(tasks.sft_records("add", 60, 3), config, chat)
    key = lambda e: (e["input_ids"].tobytes(), e["loss_mask"].tobytes())  # noqa: E731
    wanted = Counter(key(e) for e in examples)  # the generator may repeat a problem
    unpacked = []
    for batch in build_iterator(config, chat=chat):
        assert batch["input_ids"].shape == (4, 64)
        for row in range(4):
            unpacked += unpack_row({k: v[row] for k, v in batch.items()})
    # First-fit places examples in the first row with room, so rows reorder them; each
    # example comes back exactly once, with positions restarting at 0.
    keys = Counter(key(e) for e in unpacked)
    assert all(keys[k] <= wanted[k] for k in keys), "an example came back twice or altered"
    assert keys.total() >= len(examples) - 4 * 3  # only the dropped partial last batch is missing
    for got in unpacked:
        np.testing.assert_array_equal(got["positions"], np.arange(len(got["input_ids"])))  # ints
    # Padding is pad_id with no segment, no target.
    assert (batch["input_ids"][batch["segment_ids"] == 0] == chat.pad_id).all()
    assert (batch["loss_mask"][batch["segment_ids"] == 0] == 0).all()


def test_packed_sft_loss_equals_unpacked(chat):
    config = _config(packing=True, shuffle=False, batch_size=2)
    batch = next(build_iterator(config, chat=chat))
    rows = [{k: v[r] for k, v in batch.items()} for r in range(2)]
    examples = [e for row in rows for e in unpack_row(row)]
    assert len(examples) >= 4  # several examples per row: packing really happened
    unpacked = [pad_example(e, 64, chat.pad_id) for e in examples]
    unpacked = {k: np.stack([u[k] for u in unpacked]) for k in unpacked[0]}

    model = create_model(preset("small", num_layers=2), seed=0)

    @nnx.jit
    def loss(m, b):
        out = sft_loss(m, b)
        return out.total, out.weight

    packed_total, packed_weight = loss(model, {k: jnp.asarray(v) for k, v in batch.items()})
    total, weight = loss(model, {k: jnp.asarray(v) for k, v in unpacked.items()})
    # exact by construction: float32 sums of 0/1 mask entries, integers below 2**24
    assert float(packed_weight) == float(weight) == sum(e["loss_mask"].sum() for e in examples)
    # Other rows, other row shapes: the summed log-probs of every target over the 512-entry
    # vocabulary, after the small model's logits chain over 64 tokens.
    assert_f32_close(float(packed_total), float(total),
                     **llama_logp_bound(model, 64, tokens=int(weight)))

    # Token by token, which that sum's bound is too coarse to see (it grows with the
    # tokens): each target's log p in its packed row and in its own row, one log-prob's bound.
    @nnx.jit
    def token_logps(m, b):
        return target_log_probs(m, b["input_ids"], b["loss_mask"], b["segment_ids"],
                                b["positions"])[0]

    def packed_targets(b):  # log p of each example's targets, in unpack_row's order
        logp = np.asarray(token_logps(model, {k: jnp.asarray(v) for k, v in b.items()}))
        out = []
        for r in range(2):
            seg = batch["segment_ids"][r]
            for s in dict.fromkeys(seg[seg > 0].tolist()):
                idx = np.flatnonzero(seg == s)  # token idx[j + 1] is predicted at idx[j]
                out.append(logp[r, idx[:-1]][batch["loss_mask"][r, idx[1:]] > 0])
        return np.concatenate(out)

    alone = np.asarray(token_logps(model, {k: jnp.asarray(v) for k, v in unpacked.items()}))
    alone = alone[unpacked["loss_mask"][:, 1:] > 0]  # the same targets, the same order
    per_token = llama_logp_bound(model, 64)
    assert_f32_close(packed_targets(batch), alone, **per_token)
    # Sanity: the same tokens without segment ids attend across examples and differ, by
    # more than that bound.
    crossed = dict(batch, segment_ids=np.ones_like(batch["segment_ids"]),
                   positions=np.broadcast_to(np.arange(64), (2, 64)))
    assert np.abs(packed_targets(crossed) - alone).max() > 2 * f32_tolerance(**per_token)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])  # integer batches, exact


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("hosts", [1, 2])
def test_resume_is_exact_across_epochs(chat, packing, hosts):
    # 60 records; ~15 batches of 4 unpacked per epoch; packed fewer. k + 20 crosses epochs.
    config = _config(packing=packing, batch_size=4 * hosts)
    for host in range(hosts):
        kw = dict(chat=chat, process_index=host, process_count=hosts)
        reference = build_iterator(config, **kw)
        k = 9
        _take(reference, k)
        epoch_len = reference.stats["examples"]
        expected = _take(reference, 20)

        interrupted = build_iterator(config, **kw)
        _take(interrupted, k)
        state = json.loads(json.dumps(interrupted.get_state()))  # must survive JSON
        del interrupted
        resumed = build_iterator(config, **kw)
        resumed.set_state(state)
        _assert_same(_take(resumed, 20), expected)
        assert resumed.batches == k + 20
        # The window really crosses an epoch boundary.
        examples_seen = (k + 20) * 4 * (3 if packing else 1)
        assert examples_seen > epoch_len, (examples_seen, epoch_len)


def test_hosts_read_disjoint_records(chat):
    config = _config(batch_size=8, shuffle=False, num_epochs=1)
    seen = []
    for host in range(2):
        it = build_iterator(config, chat=chat, process_index=host, process_count=2)
        assert it.rows == 4
        seen.append({tuple(r[r > 0]) for b in it for r in b["input_ids"]})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_shuffle_is_deterministic_by_seed_and_reshuffles_each_epoch(chat):
    a = _take(build_iterator(_config(seed=1), chat=chat), 30)
    b = _take(build_iterator(_config(seed=1), chat=chat), 30)
    c = _take(build_iterator(_config(seed=2, bundled_size=60), chat=chat), 30)
    _assert_same(a, b)
    assert any(not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))
    epoch = 15  # 60 examples / 4 rows
    first = [r.tobytes() for x in a[:epoch] for r in x["input_ids"]]
    second = [r.tobytes() for x in a[epoch:2 * epoch] for r in x["input_ids"]]
    assert sorted(first) == sorted(second) and first != second


def test_batches_always_have_targets_and_fixed_shapes(chat):
    for packing in (False, True):
        it = build_iterator(_config(packing=packing, num_epochs=2), chat=chat)
        n = 0
        for batch in it:
            n += 1
            assert batch["input_ids"].shape == (4, 64)
            assert all(batch["loss_mask"][r].sum() > 0 for r in range(4))
        assert n > 0


def test_preference_and_prompt_batches(chat):
    it = build_iterator(_config(format="preference", batch_size=2), chat=chat)
    b = next(it)
    assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape == (2, 64)
    for r in range(2):
        n_prompt = int(np.flatnonzero(b["chosen_loss_mask"][r])[0])
        np.testing.assert_array_equal(b["chosen_input_ids"][r, :n_prompt],  # token ids
                                      b["rejected_input_ids"][r, :n_prompt])
    it = build_iterator(_config(format="prompt", batch_size=2, max_prompt_length=32), chat=chat)
    b = next(it)
    assert b["prompt_ids"].shape == (2, 32)
    assert (b["prompt_mask"][:, -1] == 1).all() and (b["prompt_mask"][:, 0] == 0).all()  # left padded
    for r in range(2):
        text = chat.tokenizer.decode(b["prompt_ids"][r][b["prompt_mask"][r] == 1])
        assert text.startswith("<s><|user|>\n") and text.endswith("<|assistant|>\n")
