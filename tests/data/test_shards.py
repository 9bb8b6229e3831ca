"""Data shards: the global batches depend on the shard count, never on how many processes
read them, and every host's position survives a save on one process and a restore on
another process count."""

import json

import numpy as np
import pytest

from jalign.data.pipeline import DataConfig, build_iterator
from jalign.data.tokenize import ChatTokenizer, load_tokenizer
from jalign.train.hosts import _merge_into
from jalign.train.preflight import open_data
from jalign.errors import ConfigError


@pytest.fixture(scope="module")
def chat():
    return ChatTokenizer(load_tokenizer())


def _config(**kw):
    base = dict(path="bundled:add", format="messages", batch_size=8, max_length=64,
                bundled_size=120, seed=3, packing=True, prefetch=0)
    base.update(kw)
    return DataConfig(**base)


def _global(iterators, n):
    """n global batches: each process's rows side by side, in process order (what
    make_array_from_process_local_data assembles)."""
    out = []
    for _ in range(n):
        parts = [next(it) for it in iterators]
        out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _merged(states):
    out = {}
    for i, s in enumerate(states):
        _merge_into(out, json.loads(json.dumps(s)), i, "")
    return out


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_global_batches_depend_on_the_shard_count_only(chat, processes):
    config = _config(shards=4)
    reference = _global([build_iterator(config, chat=chat)], 12)  # 1 process, 4 shards
    its = [build_iterator(config, chat=chat, process_index=p, process_count=processes)
           for p in range(processes)]
    assert all(it.rows == 8 // processes for it in its)
    _assert_same(_global(its, 12), reference)


def test_positions_of_every_host_restore_on_another_process_count(chat):
    config = _config(shards=2)
    two = [build_iterator(config, chat=chat, process_index=p, process_count=2) for p in (0, 1)]
    _global(two, 5)
    states = [it.get_state() for it in two]
    # Packing: the hosts' streams advance differently, so one host's position is not the
    # other's (restoring process 0's state everywhere would be wrong).
    p0, p1 = (s["positions"][k]["grain"] for s, k in zip(states, "01"))
    assert p0 != p1
    expected = _global(two, 6)
    merged = _merged(states)
    assert sorted(merged["positions"]) == ["0", "1"]

    one = build_iterator(config, chat=chat)  # the run's shard count is kept on resume
    one.set_state(merged)
    _assert_same(_global([one], 6), expected)
    again = [build_iterator(config, chat=chat, process_index=p, process_count=2) for p in (0, 1)]
    for it in again:
        it.set_state(merged)
    _assert_same(_global(again, 6), expected)


def test_a_state_without_this_hosts_shard_is_refused(chat):
    config = _config(shards=2)
    host0 = build_iterator(config, chat=chat, process_index=0, process_count=2)
    only0 = host0.get_state()  # what a primary-only save would have kept
    host1 = build_iterator(config, chat=chat, process_index=1, process_count=2)
    with pytest.raises(Exception, match=r"no position for shard\(s\) \[1\]"):
        host1.set_state(only0)


def test_single_shard_states_of_earlier_versions_still_restore(chat):
    config = _config(packing=False)
    a = build_iterator(config, chat=chat)
    _global([a], 3)
    old = a.get_state()["positions"]["0"]  # a version-1 state, as checkpoints held before
    expected = _global([a], 4)
    b = build_iterator(config, chat=chat)
    b.set_state(old)
    _assert_same(_global([b], 4), expected)


def test_merging_refuses_host_state_that_differs():
    out = {}
    _merge_into(out, {"drawn": 4, "positions": {"0": {"b": 1}}}, 0, "")
    _merge_into(out, {"drawn": 4, "positions": {"1": {"b": 2}}}, 1, "")
    assert out == {"drawn": 4, "positions": {"0": {"b": 1}, "1": {"b": 2}}}
    with pytest.raises(RuntimeError, match="'drawn' differs between processes"):
        _merge_into(out, {"drawn": 5}, 2, "")


@pytest.mark.parametrize("bad, needle", [
    (dict(shards=3, batch_size=6), "DataConfig.shards=3: the data's 3 shards cannot be split"),
    (dict(shards=4, batch_size=6), "DataConfig.batch_size=6: not divisible by the 4 shards"),
])
def test_shard_problems_name_the_binding(chat, bad, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        open_data(_config(**bad), "DataConfig", chat=chat, process_count=2)
