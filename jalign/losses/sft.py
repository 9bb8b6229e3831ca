"""Supervised fine-tuning loss: next-token cross-entropy on trainable targets only."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.losses.types import LossOutput


def token_log_probs(logits_btv, targets_bt):
    """log p(target) per position, computed in float32."""
    logits = logits_btv.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def sft_loss(model, batch, ctx=None) -> LossOutput:
    """Sum of -log p over targets where ``loss_mask`` is 1; weight = number of targets.

    Position t predicts token t+1; the mask of token t+1 says whether it is a target.
    Packed rows are safe: the first token of every segment has mask 0, so no target is
    predicted from the previous segment.
    """
    logits = model(batch["input_ids"], batch.get("positions"), batch.get("segment_ids"))
    targets = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    logp = token_log_probs(logits[:, :-1], targets)
    total = -jnp.sum(logp * mask)
    weight = jnp.sum(mask)
    return LossOutput(total, weight, {"nll": (total, weight)})
