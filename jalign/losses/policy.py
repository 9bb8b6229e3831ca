"""Policy-gradient losses by name (``POLICY_LOSSES``; ``get``), per token, before
aggregation (``jalign.losses.aggregation``).

Each is ``fn(logp, old_logp, advantages, mask, *, clip_low, clip_high, dual_clip) ->
(per_token [B, T], metrics)`` with ``logp`` the trained policy's log-probs of the sampled
tokens, ``old_logp`` the sampling policy's (no gradient), ``advantages`` per token (a
sequence-level advantage repeated on its tokens) and ``mask`` 1 on completion tokens.
``metrics``: per-token values to be averaged over the mask (``clip_fraction``,
``approx_kl`` = ½ (log ρ)², ``ratio``). ρ = π / π_old.

- ``clip`` (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"; separate low
  and high clip as in Yu et al. 2025, "DAPO", clip-higher): ℓ = max(−A ρ, −A clip(ρ,
  1 − ε_low, 1 + ε_high)); with ``dual_clip`` c > 1 (Ye et al. 2020, "Mastering Complex
  Control in MOBA Games with Deep Reinforcement Learning"), for A < 0: ℓ = min(ℓ, −c A).
- ``gspo`` (Zheng et al. 2025, "Group Sequence Policy Optimization"): the same clipped
  objective with one ratio per sequence, s = exp(mean over its tokens of log ρ) (the
  geometric mean of its token ratios, differentiable), on every token of the sequence.
- ``cispo`` (MiniMax 2025, "MiniMax-M1", CISPO): ℓ = −sg(min(ρ, 1 + ε_high)) A log π: the
  importance weight is clipped and carries no gradient, so every token keeps a gradient
  (no token is dropped by the clip). The cap is 1 + ``clip_high`` (the paper's
  ε_high; TRL's ``epsilon_high`` is the cap itself: its 5.0 is clip_high 4.0 here).
  ``clip_low`` is not used (the paper sets no lower bound).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _prepare(logp, old_logp, advantages, mask):
    m = jnp.asarray(mask).astype(jnp.float32)
    on = m > 0
    a = jnp.where(on, jnp.asarray(advantages, jnp.float32), 0.0)
    log_ratio = jnp.where(on, jnp.asarray(logp, jnp.float32) - jnp.asarray(old_logp, jnp.float32),
                          0.0)
    return m, a, log_ratio


def _clipped_objective(a, ratio, clip_low, clip_high, dual_clip):
    unclipped = -a * ratio
    clipped = -a * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        loss = jnp.where(a < 0, jnp.minimum(loss, -dual_clip * a), loss)
    return loss, (clipped > unclipped).astype(jnp.float32)


def clip(logp, old_logp, advantages, mask, *, clip_low: float = 0.2, clip_high: float = 0.2,
         dual_clip: float | None = None):
    m, a, log_ratio = _prepare(logp, old_logp, advantages, mask)
    ratio = jnp.exp(log_ratio)
    loss, clipped = _clipped_objective(a, ratio, clip_low, clip_high, dual_clip)
    return loss, {"clip_fraction": clipped, "approx_kl": 0.5 * log_ratio ** 2, "ratio": ratio}


def gspo(logp, old_logp, advantages, mask, *, clip_low: float = 3e-4, clip_high: float = 4e-4,
         dual_clip: float | None = None):
    m, a, log_ratio = _prepare(logp, old_logp, advantages, mask)
    per_seq = jnp.sum(log_ratio, axis=1, keepdims=True) / jnp.maximum(
        jnp.sum(m, axis=1, keepdims=True), 1.0)
    ratio = jnp.broadcast_to(jnp.exp(per_seq), log_ratio.shape)
    loss, clipped = _clipped_objective(a, ratio, clip_low, clip_high, dual_clip)
    return loss, {"clip_fraction": clipped, "approx_kl": 0.5 * log_ratio ** 2, "ratio": ratio}


def cispo(logp, old_logp, advantages, mask, *, clip_low: float | None = None,
          clip_high: float = 5.0, dual_clip: float | None = None):
    m, a, log_ratio = _prepare(logp, old_logp, advantages, mask)
    ratio = jnp.exp(log_ratio)
    weight = jax.lax.stop_gradient(jnp.minimum(ratio, 1.0 + clip_high))
    loss = -weight * a * jnp.where(m > 0, jnp.asarray(logp, jnp.float32), 0.0)
    return loss, {"clip_fraction": (ratio > 1.0 + clip_high).astype(jnp.float32),
                  "approx_kl": 0.5 * log_ratio ** 2, "ratio": ratio}


POLICY_LOSSES = {"clip": clip, "gspo": gspo, "cispo": cispo}


def get(name: str):
    if name not in POLICY_LOSSES:
        raise ValueError(f"policy loss {name!r}; one of {tuple(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def tis_weight(logp, sampler_logp, mask, cap):
    """Truncated importance sampling (Yao et al. 2025): the weight min(π_trainer(t) /
    π_sampler(t), C) of each sampled token t, 0 off the mask."""
    return jnp.where(mask > 0, jnp.minimum(jnp.exp(logp - sampler_logp), cap), 0.0)
