"""KV-cache decoding of G completions per prompt that share the prompt's keys and values.

Group sampling (the GRPO family) prefills each prompt once; copying its cache G times
(one per completion) would make every decoded token read the prompt's keys and values G
times over. Here the cache has two parts: the prompt's, one copy per prompt
([layers, B, kv_heads, P, head_dim], as ``decode.prefill`` writes it), and the
completions', one per row ([layers, B·G, kv_heads, N, head_dim]: ``decode``'s head-major
layout, sharded over rows like it, read by the attention matmuls without a transpose).
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
                                  _write)
from jalign.models.llama import finish_layer, project_qkv
from jalign.models.rope import rope_angles
from jalign.sharding import constrain


class GroupCache(NamedTuple):
    prompt: KVCache   # k, v [layers, B, kv_heads, P, head_dim]; valid [B, P]
    k: jax.Array      # [layers, B·G, kv_heads, N, head_dim]: the completions' keys
    v: jax.Array      # same as k
    valid: jax.Array  # [B·G, N] bool: completion slot holds a fed token


def group_cache(prompt: KVCache, group_size: int, slots: int) -> GroupCache:
    """The prompts' prefilled cache plus ``slots`` empty completion slots per row."""
    layers, b, g, _, h = prompt.k.shape
    shape = (layers, b * group_size, g, max(slots, 1), h)
    zeros = constrain(jnp.zeros(shape, prompt.k.dtype), _CACHE_AXES)
    return GroupCache(prompt, zeros, zeros, jnp.zeros((shape[1], shape[3]), bool))


def _attention(q_btnh, kp_bgsh, vp_bgsh, mask_p_bs, kc_bgsh, vc_bgsh, mask_c_bs):
    """Softmax attention of B·G query rows over their group's prompt slots [B, kv, P, H]
    and their own completion slots [B·G, kv, N, H] (one softmax over both), as
    ``decode._cached_attention`` computes it over one cache."""
    bg, t, n, h = q_btnh.shape
    b, g = kp_bgsh.shape[:2]
    G = bg // b  # noqa: N806 (the group size)
    q = q_btnh.reshape(b, G, t, g, n // g, h).transpose(0, 1, 3, 4, 2, 5)  # [b,G,g,r,t,h]
    kc = kc_bgsh.reshape(b, G, *kc_bgsh.shape[1:])  # rows of a group are consecutive
    vc = vc_bgsh.reshape(b, G, *vc_bgsh.shape[1:])
    scale = h ** -0.5
    f32 = jnp.float32
    sp = jnp.einsum("bGgrth,bgsh->bGgrts", q, kp_bgsh, preferred_element_type=f32) * scale
    sc = jnp.einsum("bGgrth,bGgsh->bGgrts", q, kc, preferred_element_type=f32) * scale
    sp = jnp.where(mask_p_bs[:, None, None, None, None, :], sp, MASK_VALUE)
    sc = jnp.where(mask_c_bs.reshape(b, G, 1, 1, 1, -1), sc, MASK_VALUE)
    probs = jax.nn.softmax(jnp.concatenate([sp, sc], axis=-1), axis=-1)
    pp = probs[..., :sp.shape[-1]].astype(vp_bgsh.dtype)
    pc = probs[..., sp.shape[-1]:].astype(vc.dtype)
    # Both halves summed in float32 and rounded once (as one einsum over one cache is).
    out = (jnp.einsum("bGgrts,bgsh->bGgrth", pp, vp_bgsh, preferred_element_type=f32)
           + jnp.einsum("bGgrts,bGgsh->bGgrth", pc, vc, preferred_element_type=f32))
    return out.astype(q_btnh.dtype).transpose(0, 1, 4, 2, 3, 5).reshape(bg, t, n, h)


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
                      layers: list[dict] | None = None, slots: int | None = None):
    """Feeds one token per row [B·G] at completion slot ``state.index``; returns
    (logits [B·G, V], cache, state). ``layers``: ``decode.split_layers(model)``.
    ``slots`` (static): attend over the first ``slots`` completion slots only (they must
    hold every fed token, ``state.index`` < ``slots``): the later ones are empty, and
    reading them costs as much memory traffic per token as the weights do."""
    cfg = model.config
    eps = cfg.rms_norm_eps
    idx = state.index
    valid = jax.lax.dynamic_update_slice_in_dim(
        cache.valid, jnp.ones((token_ids.shape[0], 1), bool), idx, axis=1)
    mask_p, mask_c = _masks(cfg, cache, valid, idx)
    mask_c = mask_c[:, :slots]
    cos, sin = rope_angles(state.positions[:, None], cfg)

    def layer(p, x, k_all, v_all, i):
        q, k, v = project_qkv(p, x, cos, sin, eps)
        k_all, v_all = _write(k_all, i, k, idx), _write(v_all, i, v, idx)

        def at(a):
            return jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False)

        o = _attention(q, at(cache.prompt.k), at(cache.prompt.v), mask_p,
                       at(k_all)[:, :, :slots], at(v_all)[:, :, :slots], mask_c)
        return finish_layer(p, x, o, eps), k_all, v_all

    x, k_all, v_all = _run_layers(model, model.embed_tokens(token_ids[:, None]), layer,
                                  KVCache(cache.k, cache.v, None), layers)
    logits = _final_logits(model, x)[:, 0]
    state = DecodeState(index=idx + 1, positions=state.positions + 1)
    return logits, GroupCache(cache.prompt, k_all, v_all, valid), state
