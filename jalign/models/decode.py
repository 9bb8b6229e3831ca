"""KV-cache decoding on the parameters of the full forward (no new parameters).

The per-layer math is the full forward's own: ``project_qkv`` -> ``attention`` ->
``finish_layer`` on ``Llama.layers.stacked()``, so a cached step differs from the
uncached forward only by floating-point summation order.

Layout. Prompts are LEFT-padded ([B, P], ``prompt_mask`` 1 on real tokens), so every
row's next token goes to the same cache slot: slot ``index`` is one scalar for the whole
batch, while RoPE positions are per row (``cumsum(mask) - 1``: 0 at each row's first
real token, exactly as if the row had been run unpadded). ``KVCache.valid`` marks slots
holding a real token; attention only ever reads valid slots, so left padding is
invisible to real tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jalign.models.attention import MASK_VALUE, attention, make_mask
from jalign.models.config import LlamaConfig
from jalign.models.llama import finish_layer, project_qkv, rms_norm
from jalign.models.rope import rope_angles
from jalign.sharding import constrain

# Head-major: each layer's keys are [batch, kv_heads, slots, head_dim], the layout the
# attention matmuls read without a transpose (slot-major cost a transpose of every layer's
# cache at every token: a third of a decode step on CPU, docs/benchmarks.md).
_CACHE_AXES = ("layers", "batch", "act_kv_heads", "length", None)


class KVCache(NamedTuple):
    k: jax.Array      # [layers, batch, kv_heads, max_len, head_dim], compute dtype (or a
    v: jax.Array      # tuple of per-layer [batch, ...] arrays: split_cache); v as k
    valid: jax.Array  # [batch, max_len] bool: slot holds a real (prompt or generated) token


class DecodeState(NamedTuple):
    index: jax.Array      # [] int32: the cache slot the next token is written to
    positions: jax.Array  # [batch] int32: the RoPE position of the next token of each row


def init_cache(config: LlamaConfig, batch: int, max_len: int) -> KVCache:
    """An empty cache for ``max_len`` slots (prompt length + tokens to generate)."""
    shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.resolved_head_dim)
    zeros = jnp.zeros(shape, config.compute_dtype)
    return KVCache(k=constrain(zeros, _CACHE_AXES), v=constrain(zeros, _CACHE_AXES),
                   valid=jnp.zeros((batch, max_len), bool))


def _final_logits(model, x_btd):
    """Final norm + LM head, as ``Llama.backbone``/``Llama.logits`` apply them."""
    cfg = model.config
    hidden = rms_norm(x_btd, model.final_norm[...].astype(x_btd.dtype), cfg.rms_norm_eps)
    return model.logits(hidden)


def _write(cache_all, layer, new_btgh, start):
    """Stores one layer's new keys (or values) at slots ``start..`` of the cache: stacked
    [layers, ...], or a tuple of per-layer arrays (``split_cache``; ``layer`` static).

    Only the new tokens are written: inside scan and while_loop XLA updates the carried
    buffer in place, so a decode step moves [B, 1, G, H] per layer, not the whole cache.
    """
    new = new_btgh.astype(_dtype(cache_all)).transpose(0, 2, 1, 3)  # [B, G, T, H]
    if isinstance(cache_all, tuple):
        one = jax.lax.dynamic_update_slice(cache_all[layer], new, (0, 0, start, 0))
        return cache_all[:layer] + (one,) + cache_all[layer + 1:]
    return jax.lax.dynamic_update_slice(cache_all, new[None], (layer, 0, 0, start, 0))


def _dtype(cache_all):
    return (cache_all[0] if isinstance(cache_all, tuple) else cache_all).dtype


def split_cache(cache: KVCache) -> KVCache:
    """The cache with ``k``/``v`` as tuples of per-layer arrays [B, G, S, H], for a token
    loop over ``split_layers``: each decoded token then reads every layer's keys where
    they lie (read out of a stacked [layers, ...] carry and then sliced, a group sampler's
    completion cache was copied at every token: docs/benchmarks.md). The split copies the
    cache once, the stacked one live beside it until then: the group sampler splits only
    its prompts' cache; the plain sampler, which gained nothing from it, keeps the stacked
    one."""
    def split(a):
        return tuple(constrain(a[i], _CACHE_AXES[1:]) for i in range(a.shape[0]))

    return KVCache(split(cache.k), split(cache.v), cache.valid)


def split_layers(model) -> list[dict]:
    """Each layer's weights as arrays of their own (compute dtype), for a decode loop.

    Take them once, outside the token loop, and pass them to ``decode_step``: sliced from
    the stacked weights inside a ``while_loop`` body, every layer's weights are copied at
    every generated token (XLA does not hoist the slices out of the loop), which tripled
    the memory traffic of a decode step on CPU (docs/benchmarks.md)."""
    params = model.layers.stacked()
    return [{k: v[i] for k, v in params.items()} for i in range(model.config.num_layers)]


def _run_layers(model, x_btd, layer_fn, cache: KVCache, layers: list[dict] | None = None):
    """Runs ``layer_fn(p, x, k_all, v_all, i) -> (x, k_all, v_all)`` over every layer.

    The whole cache rides in the carry; scanned or unrolled per ``config.scan_layers``,
    like ``DecoderLayers``; with ``layers`` (``split_layers``), unrolled over those.
    """
    cfg = model.config
    carry = (x_btd, cache.k, cache.v)
    if layers is None and isinstance(cache.k, tuple):
        raise ValueError("a split cache (split_cache) runs over split_layers(model): pass layers")
    if layers is not None:
        for i, p in enumerate(layers):
            carry = layer_fn(p, *carry, i)
        return carry
    params = model.layers.stacked()

    def body(carry, xs):
        p, i = xs
        return layer_fn(p, *carry, i), None

    if cfg.scan_layers:
        carry, _ = jax.lax.scan(body, carry, (params, jnp.arange(cfg.num_layers, dtype=jnp.int32)))
    else:
        for i in range(cfg.num_layers):
            carry, _ = body(carry, ({k: v[i] for k, v in params.items()}, i))
    return carry


def prefill(model, prompt_ids, prompt_mask, cache: KVCache):
    """Runs left-padded prompts [B, P] and stores their keys/values in slots 0..P-1 of a
    stacked cache (``init_cache``'s).

    Returns (logits of the last prompt token [B, V], cache, DecodeState). Padding gets
    segment id 0 and real tokens 1, so the two never attend to each other (the shared
    ``make_mask`` rule); pad keys are also left invalid for all later steps.
    """
    cfg = model.config
    eps = cfg.rms_norm_eps
    b, p_len = prompt_ids.shape
    if cache.k.shape[3] < p_len:
        raise ValueError(f"cache has {cache.k.shape[3]} slots, prompt needs {p_len}")
    mask_bt = prompt_mask.astype(jnp.int32)
    positions_bt = jnp.maximum(jnp.cumsum(mask_bt, axis=1) - 1, 0)
    index_bt = jnp.broadcast_to(jnp.arange(p_len, dtype=jnp.int32), (b, p_len))
    attn_mask = make_mask(mask_bt, mask_bt, index_bt, index_bt, window=cfg.sliding_window)
    cos, sin = rope_angles(positions_bt, cfg)

    def layer(p, x, k_all, v_all, i):
        q, k, v = project_qkv(p, x, cos, sin, eps)
        # Attend over the prompt's own keys (P long), not the whole cache: same result,
        # as every later slot is empty, at a fraction of the cost.
        o = attention(q, k, v, attn_mask, impl=cfg.attention_impl)
        return finish_layer(p, x, o, eps), _write(k_all, i, k, 0), _write(v_all, i, v, 0)

    x, k_all, v_all = _run_layers(model, model.embed_tokens(prompt_ids), layer, cache)
    # Rebuilt, not updated: a reused cache's stale slots must not stay visible.
    valid = jnp.zeros_like(cache.valid).at[:, :p_len].set(prompt_mask.astype(bool))
    # Left padding puts every row's last real token at index P-1.
    logits = _final_logits(model, x[:, -1:])[:, 0]
    state = DecodeState(index=jnp.asarray(p_len, jnp.int32),
                        positions=jnp.sum(mask_bt, axis=1).astype(jnp.int32))
    return logits, KVCache(k_all, v_all, valid), state


def _cached_attention(q_btnh, k_bgsh, v_bgsh, mask_bts):
    """attention() for head-major cached keys/values [B, G, S, H] (the same softmax
    attention as ``jalign.models.attention``'s xla path, computed in that layout)."""
    b, t, n, h = q_btnh.shape
    g = k_bgsh.shape[1]
    q_bgrth = q_btnh.reshape(b, t, g, n // g, h).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("bgrth,bgsh->bgrts", q_bgrth, k_bgsh,
                        preferred_element_type=jnp.float32) * h ** -0.5
    scores = jnp.where(mask_bts[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bgsh.dtype)
    out_bgrth = jnp.einsum("bgrts,bgsh->bgrth", probs, v_bgsh)
    return out_bgrth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def decode_step(model, token_ids, cache: KVCache, state: DecodeState,
                layers: list[dict] | None = None):
    """Feeds one token per row [B] at slot ``state.index``; returns (logits [B, V], cache, state).
    ``layers``: ``split_layers(model)``, taken once outside a token loop.

    The token attends to every valid slot up to and including its own: the real prompt
    tokens and the tokens fed since (slots after ``index`` are empty and invalid). The
    caller sizes the cache: past its last slot the write would be clamped (no error can
    be raised under jit), so allocate prompt length + tokens to feed.
    """
    cfg = model.config
    eps = cfg.rms_norm_eps
    idx = state.index
    valid = jax.lax.dynamic_update_slice_in_dim(
        cache.valid, jnp.ones((token_ids.shape[0], 1), bool), idx, axis=1)
    attn_mask = valid[:, None, :]  # [B, 1, max_len]
    if cfg.sliding_window is not None:  # slots (left padding is invalid) count tokens back
        back = idx - jnp.arange(valid.shape[1], dtype=jnp.int32)
        attn_mask = attn_mask & (back < cfg.sliding_window)[None, None, :]
    cos, sin = rope_angles(state.positions[:, None], cfg)

    def layer(p, x, k_all, v_all, i):
        q, k, v = project_qkv(p, x, cos, sin, eps)
        k_all, v_all = _write(k_all, i, k, idx), _write(v_all, i, v, idx)
        o = _cached_attention(q, jax.lax.dynamic_index_in_dim(k_all, i, 0, keepdims=False),
                              jax.lax.dynamic_index_in_dim(v_all, i, 0, keepdims=False),
                              attn_mask)
        return finish_layer(p, x, o, eps), k_all, v_all

    x, k_all, v_all = _run_layers(model, model.embed_tokens(token_ids[:, None]), layer, cache,
                                  layers)
    logits = _final_logits(model, x)[:, 0]
    state = DecodeState(index=idx + 1, positions=state.positions + 1)
    return logits, KVCache(k_all, v_all, valid), state
