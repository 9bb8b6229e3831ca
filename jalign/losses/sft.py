"""Supervised fine-tuning loss: next-token cross-entropy on trainable targets only.

The vocabulary projection and softmax are computed chunk by chunk over tokens, in
float32, each chunk rematerialised in the backward pass: the full [batch, length, vocab]
logits (2 GB in fp32 for 4 x 1024 tokens of a 128k vocabulary) never exist at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.losses.types import LossOutput

DEFAULT_CHUNK_TOKENS = 2048


def token_log_probs(logits_btv, targets_bt):
    """log p(target) per position from full logits, computed in float32."""
    logits = logits_btv.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _logits(h_nd, w_dv):
    # Accumulate in float32 even when computing in bf16: the softmax needs the precision.
    return jnp.dot(h_nd, w_dv, preferred_element_type=jnp.float32)


def chunked_log_probs(hidden_nd, w_dv, targets_n, chunk: int = DEFAULT_CHUNK_TOKENS):
    """log p(target) for N tokens of hidden states, ``chunk`` tokens of logits at a time."""
    n, d = hidden_nd.shape
    if n <= chunk:
        return token_log_probs(_logits(hidden_nd, w_dv)[None], targets_n[None])[0]
    pad = (-n) % chunk
    hidden = jnp.pad(hidden_nd, ((0, pad), (0, 0))).reshape(-1, chunk, d)
    targets = jnp.pad(targets_n, (0, pad)).reshape(-1, chunk)

    @jax.checkpoint  # recompute each chunk's logits in the backward pass instead of storing
    def one(args):
        h_cd, t_c = args
        return token_log_probs(_logits(h_cd, w_dv)[None], t_c[None])[0]

    return jax.lax.map(one, (hidden, targets)).reshape(-1)[:n]


def target_log_probs(model, ids_bt, mask_bt, segment_ids_bt=None, positions_bt=None,
                     chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
    """(log p of each next token [B, T-1], its target mask [B, T-1] in float32).

    Position t predicts token t+1; the mask of token t+1 says whether it is a target.
    """
    hidden_btd = model.backbone(ids_bt, positions_bt, segment_ids_bt)
    b, t, d = hidden_btd.shape
    w_dv = model.lm_head_weight().astype(hidden_btd.dtype)
    logp = chunked_log_probs(hidden_btd[:, :-1].reshape(-1, d), w_dv,
                             ids_bt[:, 1:].reshape(-1), chunk_tokens)
    return logp.reshape(b, t - 1), mask_bt[:, 1:].astype(jnp.float32)


def sft_loss(model, batch, ctx=None, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> LossOutput:
    """Sum of -log p over targets where ``loss_mask`` is 1; weight = number of targets.

    Position t predicts token t+1; the mask of token t+1 says whether it is a target.
    Packed rows are safe: the first token of every segment has mask 0, so no target is
    predicted from the previous segment.
    """
    logp, mask = target_log_probs(model, batch["input_ids"], batch["loss_mask"],
                                  batch.get("segment_ids"), batch.get("positions"), chunk_tokens)
    total = -jnp.sum(logp * mask)
    weight = jnp.sum(mask)
    return LossOutput(total, weight, {"nll": (total, weight)})
