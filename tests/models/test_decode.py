"""The KV-cache path (prefill + decode_step) reproduces the full forward on the same
parameters: left-padded batches, GQA, llama3 RoPE scaling past the original context."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jalign.models.build import abstract_model, create_model, forward
from jalign.models.config import preset
from jalign.models.decode import DecodeState, KVCache, decode_step, init_cache, prefill
from jalign.models.llama import Llama
from tests.numerics import assert_f32_close, llama_logits_bound

PROMPT_LENS = (20, 13, 5)  # one batch, left-padded to the longest
P = max(PROMPT_LENS)
STEPS = 6

CONFIGS = {
    "gqa": preset("tiny"),  # 4 q heads share 2 kv heads
    # Prompts of 20 tokens run past original_max_position_embeddings=16, where llama3
    # scaling has reshaped the low frequencies.
    "llama3_rope": preset("tiny", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
}


@functools.lru_cache(maxsize=None)
def _compiled(graphdef):
    """Jitted prefill / decode_step for one model structure, shared by all tests."""
    pre = jax.jit(lambda s, ids, mask, cache: prefill(nnx.merge(graphdef, s), ids, mask, cache))
    step = jax.jit(lambda s, tok, cache, st: decode_step(nnx.merge(graphdef, s), tok, cache, st))
    return pre, step


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return create_model(CONFIGS[request.param], seed=11)


def _prompts(vocab, seed=0):
    rng = np.random.default_rng(seed)
    # Tokens from 3 up: never pad (0) or EOS (2), so "real" is unambiguous.
    return [rng.integers(3, vocab, n).astype(np.int32) for n in PROMPT_LENS]


def _left_pad(prompts, length, pad_id=0):
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for r, p in enumerate(prompts):
        ids[r, length - len(p):] = p
        mask[r, length - len(p):] = 1
    return ids, mask


def _run_cached(model, prompts, fed, pad_id=0, cache=None):
    """Prefill logits [B, V] and the logits of each decode step [steps, B, V]."""
    graphdef, state = nnx.split(model)
    pre, step = _compiled(graphdef)
    ids, mask = _left_pad(prompts, P, pad_id)
    if cache is None:
        # One cache size for every test, so each structure compiles each function once.
        cache = init_cache(model.config, len(prompts), P + STEPS)
    last, cache, st = pre(state, ids, mask, cache)
    steps = []
    for s in range(fed.shape[1]):
        logits, cache, st = step(state, jnp.asarray(fed[:, s]), cache, st)
        steps.append(np.asarray(logits))
    return np.asarray(last), np.asarray(steps).reshape(len(steps), *last.shape), cache, st


def test_prefill_matches_forward_of_each_unpadded_prompt(model):
    prompts = _prompts(model.config.vocab_size)
    last, *_ = _run_cached(model, prompts, np.zeros((len(prompts), 0), np.int32))
    for r, p in enumerate(prompts):
        want = np.asarray(forward(model, p[None]))[0, -1]
        # Cached prefill vs the full forward: one model's logits chain over P keys.
        assert_f32_close(last[r], want, **llama_logits_bound(model, P), err_msg=f"row {r}")


def test_every_decode_step_matches_full_forward(model):
    vocab = model.config.vocab_size
    prompts = _prompts(vocab, seed=1)
    fed = np.random.default_rng(2).integers(3, vocab, (len(prompts), STEPS)).astype(np.int32)
    last, steps, cache, st = _run_cached(model, prompts, fed)

    # One forward over each row's prompt + fed tokens, right-padded: the forward is
    # causal, so position t's logits are those of the prefix ending at t.
    full = np.zeros((len(prompts), P + STEPS), np.int32)
    for r, p in enumerate(prompts):
        full[r, : len(p) + STEPS] = np.concatenate([p, fed[r]])
    ref = np.asarray(forward(model, full))
    # Each decode step vs the full forward: the logits chain over up to P + STEPS keys.
    bound = llama_logits_bound(model, P + STEPS)
    for r, p in enumerate(prompts):
        n = len(p)
        assert_f32_close(last[r], ref[r, n - 1], **bound, err_msg=f"row {r} prefill")
        for s in range(STEPS):
            assert_f32_close(steps[s, r], ref[r, n + s], **bound, err_msg=f"row {r} step {s}")

    # Bookkeeping (integers and booleans): one scalar slot index, per-row positions, pad
    # slots never valid.
    assert int(st.index) == P + STEPS
    np.testing.assert_array_equal(np.asarray(st.positions), np.asarray(PROMPT_LENS) + STEPS)
    _, mask = _left_pad(prompts, P)
    np.testing.assert_array_equal(np.asarray(cache.valid),
                                  np.concatenate([mask, np.ones((len(prompts), STEPS))], 1) > 0)


def test_pad_token_ids_are_invisible(model):
    """What sits in the pad slots cannot matter: the mask, not the pad id, hides them."""
    prompts = _prompts(model.config.vocab_size, seed=3)
    fed = np.full((len(prompts), 2), 7, np.int32)
    a = _run_cached(model, prompts, fed, pad_id=0)
    b = _run_cached(model, prompts, fed, pad_id=5)
    # exact by construction: the same compiled programs on the same real tokens; a masked
    # slot's score is replaced by a constant whose exp is exactly 0, so the pad's key and
    # value add exact zeros in the same order
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_a_used_cache_can_be_prefilled_again(model):
    """Slots left valid by a longer earlier rollout must not leak into the next one."""
    vocab = model.config.vocab_size
    first = _run_cached(model, _prompts(vocab, seed=6), np.full((3, STEPS), 4, np.int32))
    prompts, fed = _prompts(vocab, seed=7), np.full((3, 2), 8, np.int32)
    fresh, reused = _run_cached(model, prompts, fed), _run_cached(model, prompts, fed,
                                                                 cache=first[2])
    # exact by construction: the same compiled programs; the stale slots are masked, so
    # they add exact zeros (as the pad slots above)
    np.testing.assert_array_equal(reused[0], fresh[0])
    np.testing.assert_array_equal(reused[1], fresh[1])


def test_unscanned_layers_give_the_same_logits(model):
    # Same parameters, only the execution config differs.
    graphdef, _ = abstract_model(model.config.replace(scan_layers=False))
    unscanned = nnx.merge(graphdef, nnx.state(model))
    prompts = _prompts(model.config.vocab_size, seed=5)
    fed = np.full((len(prompts), 1), 9, np.int32)
    a, b = _run_cached(model, prompts, fed), _run_cached(unscanned, prompts, fed)
    # Other programs for the same prefill and decode step: the chain over P + 1 keys.
    bound = llama_logits_bound(model, P + 1)
    assert_f32_close(b[0], a[0], **bound)
    assert_f32_close(b[1], a[1], **bound)


def test_cache_layout_and_dtype():
    config = preset("tiny", dtype="bfloat16")
    cache = init_cache(config, batch=3, max_len=10)
    assert isinstance(cache, KVCache)
    assert cache.k.shape == cache.v.shape == (2, 3, 2, 10, 16)  # [layers, B, kv heads, slots, H]
    assert cache.k.dtype == jnp.bfloat16
    assert cache.valid.shape == (3, 10) and not bool(cache.valid.any())
    assert DecodeState._fields == ("index", "positions")


def test_prompt_longer_than_cache_is_rejected():
    # Shapes only: the check fires before any parameter is read.
    model = nnx.eval_shape(lambda: Llama(CONFIGS["gqa"], rngs=nnx.Rngs(0)))
    ids = np.ones((1, 8), np.int32)
    with pytest.raises(ValueError, match="slots"):
        prefill(model, ids, np.ones_like(ids), init_cache(model.config, 1, 4))


def test_a_group_cache_splits_per_layer_and_grows_keeping_its_slots():
    """The group sampler's cache (jalign.models.group_decode): the prompts' stacked cache
    split into one array per layer, and the completions' per-layer arrays grown between
    segments of the token loop: the filled slots and their valid marks kept in place, the
    new slots empty and invalid; it never shrinks. Exact by construction (copies)."""
    from jalign.models.decode import _write, split_cache
    from jalign.models.group_decode import group_cache, grow
    config = preset("tiny")
    layers, b, g, p_len, h = config.num_layers, 2, 3, 5, config.resolved_head_dim
    kv = config.num_kv_heads
    rng = np.random.default_rng(0)
    prompt = KVCache(jnp.asarray(rng.normal(size=(layers, b, kv, p_len, h)), jnp.float32),
                     jnp.asarray(rng.normal(size=(layers, b, kv, p_len, h)), jnp.float32),
                     jnp.ones((b, p_len), bool))
    split = split_cache(prompt)
    assert len(split.k) == layers
    for i in range(layers):
        np.testing.assert_array_equal(split.k[i], prompt.k[i])
        np.testing.assert_array_equal(split.v[i], prompt.v[i])
    cache = group_cache(prompt, g, 2)
    assert [a.shape for a in cache.k] == [(b * g, kv, 2, h)] * layers
    new = jnp.asarray(rng.normal(size=(b * g, 1, kv, h)), jnp.float32)  # [rows, T, kv, H]
    k = _write(cache.k, 1, new, 1)  # layer 1, slot 1
    cache = cache._replace(k=k, valid=cache.valid.at[:, 1].set(True))
    grown = grow(cache, 5)
    assert [a.shape for a in grown.k] == [(b * g, kv, 5, h)] * layers
    np.testing.assert_array_equal(grown.k[1][:, :, 1], new[:, 0])
    np.testing.assert_array_equal(grown.k[1][:, :, :2], k[1])
    assert not np.asarray(grown.k[1][:, :, 2:]).any() and not np.asarray(grown.k[0]).any()
    np.testing.assert_array_equal(grown.valid, np.eye(5, dtype=bool)[1][None].repeat(b * g, 0))
    with pytest.raises(ValueError, match="shrink"):
        grow(grown, 4)
