"""Reward-model loss: Bradley-Terry on pairs, scored in one forward over 2N rows.

per pair: -log sigmoid(r_chosen - r_rejected - margin) + center * (r_chosen + r_rejected)^2.
The optional margin (as in Llama 2's reward models) asks for a larger gap on clearer pairs;
the centering term (Eisenstein et al. 2023) keeps rewards near zero mean, which makes them
comparable across prompts when used for RL.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jalign.losses.types import LossOutput


@dataclasses.dataclass(frozen=True)
class RMConfig:
    """Reward-model loss settings (gin: ``RMConfig.center_coef = 0.01``)."""

    center_coef: float = 0.0

    def __post_init__(self):
        if self.center_coef < 0:
            raise ValueError(f"RMConfig.center_coef must be >= 0, got {self.center_coef}")


def bradley_terry(r_chosen, r_rejected, *, margin=None, center_coef: float = 0.0):
    diff = r_chosen - r_rejected - (0.0 if margin is None else margin)
    losses = -jax.nn.log_sigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (r_chosen + r_rejected) ** 2
    return losses


def rm_loss(model, batch, ctx=None, *, center_coef: float = 0.0) -> LossOutput:
    """Pairs from ``chosen_*``/``rejected_*`` rows (the preference pipeline's batches)."""
    n = batch["chosen_input_ids"].shape[0]
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    seg = jnp.concatenate([batch["chosen_segment_ids"], batch["rejected_segment_ids"]])
    scores = model.sequence_scores(ids, seg)
    r_c, r_r = scores[:n], scores[n:]
    losses = bradley_terry(r_c, r_r, margin=batch.get("margin"), center_coef=center_coef)
    count = jnp.asarray(n, jnp.float32)
    return LossOutput(jnp.sum(losses), count, {
        "accuracy": (jnp.sum((r_c > r_r).astype(jnp.float32)), count),
        "margin": (jnp.sum(r_c - r_r), count),
        "reward_chosen": (jnp.sum(r_c), count),
        "reward_rejected": (jnp.sum(r_r), count),
    })
