"""KV-cache decoding of G completions per prompt that share the prompt's keys and values.

Group sampling (the GRPO family) prefills each prompt once; copying its cache G times
(one per completion) would make every decoded token read the prompt's keys and values G
times over. Here the cache has two parts: the prompt's, one copy per prompt
([B, kv_heads, P, head_dim] per layer, ``decode.prefill``'s split), and the
completions', one per row ([B·G, kv_heads, S, head_dim] per layer: ``decode``'s head-major
layout, sharded over rows like it, read by the attention matmuls without a transpose).
Each layer's keys are an array of their own, as long as the slots the current segment of
the token loop fills (``grow``), so a token reads them in place.
Each step attends over both with one softmax: the prompt's slots as a matmul of the
group's G queries against one copy of the prompt's keys.

The math is ``decode.decode_step``'s (the full forward's per-layer functions); only the
attention's layout and summation order differ. Rows are B·G, prompt i's completions at
rows iG..iG+G-1; G = 1 is plain batched sampling.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jalign.models.attention import MASK_VALUE
from jalign.models.decode import (_CACHE_AXES, DecodeState, KVCache, _final_logits, _run_layers,
                                  _write, split_cache)
from jalign.models.llama import finish_layer, project_qkv
from jalign.models.rope import rope_angles
from jalign.sharding import constrain


class GroupCache(NamedTuple):
    prompt: KVCache   # k, v: per layer [B, kv_heads, P, head_dim] (split_cache); valid [B, P]
    k: tuple          # per layer [B·G, kv_heads, S, head_dim]: the completions' keys
    v: tuple          # same as k
    valid: jax.Array  # [B·G, S] bool: completion slot holds a fed token


_LAYER_AXES = _CACHE_AXES[1:]


def group_cache(prompt: KVCache, group_size: int, slots: int) -> GroupCache:
    """The prompts' prefilled cache (stacked, as ``decode.prefill`` returns it) plus
    ``slots`` empty completion slots per row, each layer's its own array."""
    layers, b, g, _, h = prompt.k.shape
    shape = (b * group_size, g, max(slots, 1), h)
    zeros = tuple(constrain(jnp.zeros(shape, prompt.k.dtype), _LAYER_AXES)
                  for _ in range(layers))
    return GroupCache(split_cache(prompt), zeros, zeros, jnp.zeros((shape[0], shape[2]), bool))


def grow(cache: GroupCache, slots: int) -> GroupCache:
    """The cache with ``slots`` completion slots (the new ones empty). A token loop runs in
    segments, each over a cache as long as the slots it fills: the attention then reads
    every completion slot it is given, with no slice (a copy) of the filled ones per token.
    Each growth copies the filled slots once into the longer arrays, both live meanwhile:
    the last one holds ~1.75x the final completion cache for a moment (4 segments)."""
    extra = slots - cache.valid.shape[1]
    if extra < 0:
        raise ValueError(f"cannot shrink a group cache of {cache.valid.shape[1]} slots to {slots}")

    def pad(a):
        return constrain(jnp.pad(a, ((0, 0), (0, 0), (0, extra), (0, 0))), _LAYER_AXES)

    return GroupCache(cache.prompt, tuple(map(pad, cache.k)), tuple(map(pad, cache.v)),
                      jnp.pad(cache.valid, ((0, 0), (0, extra))))


def _attention(q_btnh, kp_bgsh, vp_bgsh, mask_p_bs, kc_bgsh, vc_bgsh, mask_c_bs):
    """Softmax attention of B·G query rows over their group's prompt slots [B, kv, P, H]
    and their own completion slots [B·G, kv, N, H] (one softmax over both), as
    ``decode._cached_attention`` computes it over one cache.

    The completion slots are read in their own [B·G, ...] layout, only the small scores
    and probabilities reshaped: a [B, G, ...] view of the cache is not free where the
    cache is a while loop's carry (XLA wrote a second copy of every layer's completion
    cache at every token)."""
    bg, t, n, h = q_btnh.shape
    b, g = kp_bgsh.shape[:2]
    G = bg // b  # noqa: N806 (the group size)
    r = n // g
    q = q_btnh.reshape(bg, t, g, r, h).transpose(0, 2, 3, 1, 4)  # [bG, g, r, t, h]
    qp = q.reshape(b, G, g, r, t, h)  # rows of a group are consecutive
    scale = h ** -0.5
    f32 = jnp.float32
    sp = jnp.einsum("bGgrth,bgsh->bGgrts", qp, kp_bgsh, preferred_element_type=f32) * scale
    sc = jnp.einsum("ngrth,ngsh->ngrts", q, kc_bgsh, preferred_element_type=f32) * scale
    sp = jnp.where(mask_p_bs[:, None, None, None, None, :], sp, MASK_VALUE)
    sc = jnp.where(mask_c_bs[:, None, None, None, :], sc, MASK_VALUE)
    probs = jax.nn.softmax(jnp.concatenate([sp, sc.reshape(b, G, *sc.shape[1:])], axis=-1),
                           axis=-1)
    pp = probs[..., :sp.shape[-1]].astype(vp_bgsh.dtype)
    pc = probs[..., sp.shape[-1]:].astype(vc_bgsh.dtype).reshape(sc.shape)
    # Both halves summed in float32 and rounded once (as one einsum over one cache is).
    out = (jnp.einsum("bGgrts,bgsh->bGgrth", pp, vp_bgsh, preferred_element_type=f32)
           .reshape(bg, g, r, t, h)
           + jnp.einsum("ngrts,ngsh->ngrth", pc, vc_bgsh, preferred_element_type=f32))
    return out.astype(q_btnh.dtype).transpose(0, 3, 1, 2, 4).reshape(bg, t, n, h)


def _masks(cfg, cache: GroupCache, valid_c, idx):
    """The attention masks of the prompt [B, P] and completion [B·G, N] slots; with a
    sliding window, slots more than ``window`` tokens back are off (the prompt's slots
    come first: completion slot j is slot P + j of one whole cache)."""
    mask_p = cache.prompt.valid
    if cfg.sliding_window is None:
        return mask_p, valid_c
    p_len = mask_p.shape[1]
    back_p = p_len + idx - jnp.arange(p_len, dtype=jnp.int32)
    back_c = idx - jnp.arange(valid_c.shape[1], dtype=jnp.int32)
    return (mask_p & (back_p < cfg.sliding_window)[None, :],
            valid_c & (back_c < cfg.sliding_window)[None, :])


def group_decode_step(model, token_ids, cache: GroupCache, state: DecodeState,
                      layers: list[dict]):
    """Feeds one token per row [B·G] at completion slot ``state.index`` (< the cache's
    slots: ``grow`` it first); returns (logits [B·G, V], cache, state).
    ``layers``: ``decode.split_layers(model)``."""
    cfg = model.config
    eps = cfg.rms_norm_eps
    idx = state.index
    valid = jax.lax.dynamic_update_slice_in_dim(
        cache.valid, jnp.ones((token_ids.shape[0], 1), bool), idx, axis=1)
    mask_p, mask_c = _masks(cfg, cache, valid, idx)
    cos, sin = rope_angles(state.positions[:, None], cfg)

    def layer(p, x, k_all, v_all, i):
        q, k, v = project_qkv(p, x, cos, sin, eps)
        k_all, v_all = _write(k_all, i, k, idx), _write(v_all, i, v, idx)
        o = _attention(q, cache.prompt.k[i], cache.prompt.v[i], mask_p, k_all[i], v_all[i],
                       mask_c)
        return finish_layer(p, x, o, eps), k_all, v_all

    x, k_all, v_all = _run_layers(model, model.embed_tokens(token_ids[:, None]), layer,
                                  KVCache(cache.k, cache.v, None), layers)
    logits = _final_logits(model, x)[:, 0]
    state = DecodeState(index=idx + 1, positions=state.positions + 1)
    return logits, GroupCache(cache.prompt, k_all, v_all, valid), state
