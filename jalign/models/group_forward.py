"""The forward pass of G completions of one prompt that runs the prompt once.

A GRPO-family batch holds each prompt G times, once per completion of its group (rows of
a group consecutive). The prompt's tokens come first and attention is causal, so their
hidden states, keys and values are the same in all G rows: the full forward computes
them G times. Here every layer runs the prompt's tokens once per group ([B, P]) and the
completions' per row ([B·G, N]); a completion's queries attend over its group's prompt
keys/values (broadcast to the group's rows) and its own completion's, with the mask the
full forward would use over the whole row. Gradients from the G completions flow back
into the one copy of the prompt through the broadcast (summed), as they would flow into
G identical copies.

The per-layer math is the full forward's (``project_qkv``, ``attention``,
``finish_layer``, the same remat and scan/unroll), so results differ from
``Llama.backbone`` on the rows only by floating-point summation order (in the compute
dtype: with bf16 compute the G completions' gradients into the prompt's keys and values
are summed in bf16). The prompt's layer work (projections, MLP, its attention) falls
from B·G·P tokens to B·P. With adapter dropout in training, a prompt token gets one
dropout mask for its whole group (the full forward draws one per row): another sample of
the same noise, not the same values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jalign.models.attention import attention, make_mask
from jalign.models.llama import finish_layer, project_qkv, rms_norm
from jalign.models.rope import rope_angles
from jalign.sharding import constrain


# Folded into a layer's adapter-dropout key for the prompt's projections: the completions'
# use the key itself, and both drawing from one key would tie a prompt token's dropout
# mask to the completion token at the same flat row.
_PROMPT_DROPOUT = 0x9F0


def _prompt_params(p):
    if "lora_dropout_key" not in p:
        return p
    key = jax.random.wrap_key_data(p["lora_dropout_key"])
    return {**p, "lora_dropout_key": jax.random.key_data(jax.random.fold_in(key, _PROMPT_DROPOUT))}


def _group_layer(p, x, angles, masks, *, config, group_size):
    """One decoder layer on (prompt [B, P, d], completions [B·G, N, d])."""
    eps = config.rms_norm_eps
    (cos_p, sin_p, cos_c, sin_c), (mask_p, mask_c) = angles, masks
    x_p, x_c = x
    p_p = _prompt_params(p)
    q_p, k_p, v_p = project_qkv(p_p, x_p, cos_p, sin_p, eps)
    q_c, k_c, v_c = project_qkv(p, x_c, cos_c, sin_c, eps)
    o_p = attention(q_p, k_p, v_p, mask_p, impl=config.attention_impl)
    # Each completion reads its group's prompt keys/values: one copy per row here, for
    # the attention kernel; the layer work that made them ran once per prompt.
    k_all = jnp.concatenate([jnp.repeat(k_p, group_size, axis=0), k_c], axis=1)
    v_all = jnp.concatenate([jnp.repeat(v_p, group_size, axis=0), v_c], axis=1)
    o_c = attention(q_c, k_all, v_all, mask_c, impl=config.attention_impl)
    return finish_layer(p_p, x_p, o_p, eps), finish_layer(p, x_c, o_c, eps)


def group_backbone(model, input_ids, segment_ids, positions, *, group_size: int,
                   prompt_len: int):
    """Final-norm hidden states of rows [B·G, T] whose first ``prompt_len`` tokens are the
    same within each group of ``group_size`` consecutive rows: (the prompts' [B, P, d],
    the completions' [B·G, T-P, d]), equal to ``model.backbone``'s [:, :P] (of each
    group's first row) and [:, P:] up to summation order. ``segment_ids``/``positions``
    as ``backbone`` takes them (0 = padding); only the group's first row's prompt is read.
    """
    cfg = model.config
    rows, t = input_ids.shape
    if group_size < 1 or rows % group_size or not 0 < prompt_len < t:
        raise ValueError(f"group_backbone: {rows} rows of {t} tokens are not groups of "
                         f"{group_size} with a {prompt_len}-token prompt")
    b, n = rows // group_size, t - prompt_len
    ids_p, ids_c = input_ids[::group_size, :prompt_len], input_ids[:, prompt_len:]
    seg_p, seg_c = segment_ids[::group_size, :prompt_len], segment_ids[:, prompt_len:]
    pos_p, pos_c = positions[::group_size, :prompt_len], positions[:, prompt_len:]
    index_p = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (b, prompt_len))
    index_all = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (rows, t))
    window = cfg.sliding_window
    mask_p = make_mask(seg_p, seg_p, index_p, index_p, window=window)
    # The completions' queries over the whole row (its prompt's slots, then its own), the
    # full forward's mask rows P.. of it.
    seg_all = jnp.concatenate([jnp.repeat(seg_p, group_size, axis=0), seg_c], axis=1)
    mask_c = make_mask(seg_c, seg_all, index_all[:, prompt_len:], index_all, window=window)
    angles = (*rope_angles(pos_p, cfg), *rope_angles(pos_c, cfg))
    x = (model.embed_tokens(ids_p), model.embed_tokens(ids_c))
    layer = functools.partial(_group_layer, config=cfg, group_size=group_size)
    x_p, x_c = model.layers.run(layer, x, angles, (mask_p, mask_c))

    def norm(h):
        return rms_norm(h, model.final_norm[...].astype(h.dtype), cfg.rms_norm_eps)

    h_p = constrain(norm(x_p), ("batch", "length", "act_embed"))
    return h_p, constrain(norm(x_c), ("batch", "length", "act_embed"))


def group_target_hidden(model, input_ids, segment_ids, positions, *, group_size: int,
                        completion_len: int):
    """The hidden states that predict the last ``completion_len`` tokens of each row
    ([B·G, N, d]: the prompt's last slot, then the completion's first N-1), as
    ``model.backbone(...)[:, T-1-N:-1]`` gives them."""
    t = input_ids.shape[1]
    h_p, h_c = group_backbone(model, input_ids, segment_ids, positions,
                              group_size=group_size, prompt_len=t - completion_len)
    last = jnp.repeat(h_p[:, -1:], group_size, axis=0)
    return jnp.concatenate([last, h_c[:, :-1]], axis=1)
