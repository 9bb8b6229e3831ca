"""PPO losses as pure functions of per-token arrays [batch, length] (Schulman et al. 2017,
"Proximal Policy Optimization Algorithms"), each returning ``(total, weight, metrics)``
sums so that micro-batches accumulate exactly (``LossOutput``'s contract).

Policy loss, per token, with ratio ρ = exp(log π − log π_old) and advantage A:
    ℓ = max(−A ρ, −A clip(ρ, 1 − ε_low, 1 + ε_high))
and with dual clip c > 1 (Ye et al. 2020, "Mastering Complex Control in MOBA Games with
Deep Reinforcement Learning"), for A < 0 only: ℓ = min(ℓ, −c A), which bounds the loss
of a token whose ratio has grown far beyond 1 + ε_high.

Value loss, per token, with returns R and the rollout's values v_old:
    ℓ_v = ½ max((v − R)², (v_old + clip(v − v_old, −ε_v, ε_v) − R)²)

Entropy bonus: −coef · H(π(· | context)) per token, H from the logits.

Aggregation (``aggregate``, ``jalign.losses.aggregation``), over tokens where ``mask`` is
1: ``token_mean`` (Σ ℓ / the tokens of the batch), ``seq_mean_token_mean``,
``seq_mean_token_sum``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.losses import policy
from jalign.losses.aggregation import aggregate
from jalign.losses.kl import kl_per_token
from jalign.losses.sequences import masked_var

# PPO's aggregations (jalign.losses.aggregation has these and the GRPO family's).
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def _mean(x, m):
    return jnp.sum(jnp.where(m > 0, x, 0.0)), jnp.sum(m)


def policy_loss(logp, old_logp, advantages, mask, *, clip_low: float = 0.2,
                clip_high: float = 0.2, dual_clip: float | None = None,
                how: str = "token_mean"):
    """(total, weight, metrics): the clipped policy loss; metrics are (sum, count) pairs:
    ``clip_fraction`` (tokens where the clipped term is the one taken), ``approx_kl``
    (½ (log π − log π_old)², per token), ``ratio``."""
    m = jnp.asarray(mask).astype(jnp.float32)
    loss, per_token = policy.clip(logp, old_logp, advantages, m, clip_low=clip_low,
                                  clip_high=clip_high, dual_clip=dual_clip)
    total, weight = aggregate(loss, m, how)
    metrics = {name: _mean(value, m) for name, value in per_token.items()}
    return total, weight, metrics


def value_loss(values, old_values, returns, mask, *, clip: float | None = 0.2,
               how: str = "token_mean"):
    """(total, weight, metrics): ½ max((v − R)², (v_old + clip(v − v_old, ±clip) − R)²)
    (without ``clip``: ½ (v − R)²); metric ``value_clip_fraction``."""
    m = jnp.asarray(mask).astype(jnp.float32)
    v = jnp.where(m > 0, jnp.asarray(values, jnp.float32), 0.0)
    r = jnp.where(m > 0, jnp.asarray(returns, jnp.float32), 0.0)
    plain = (v - r) ** 2
    if clip is None:
        loss, frac = plain, jnp.zeros_like(plain)
    else:
        v_old = jnp.where(m > 0, jnp.asarray(old_values, jnp.float32), 0.0)
        clipped = (v_old + jnp.clip(v - v_old, -clip, clip) - r) ** 2
        loss, frac = jnp.maximum(plain, clipped), (clipped > plain).astype(jnp.float32)
    total, weight = aggregate(0.5 * loss, m, how)
    return total, weight, {"value_clip_fraction": _mean(frac, m)}


def kl_loss(logp, ref_logp, mask, *, kind: str = "k3", how: str = "token_mean"):
    """(total, weight): the KL to the reference as a loss term (the alternative to the
    per-token reward penalty of ``jalign.rl.kl.penalized_rewards``), the per-token estimate
    ``kind`` aggregated like the policy loss; differentiable in ``logp``. k3 is the usual
    choice here (unbiased, >= 0, low variance)."""
    m = jnp.asarray(mask).astype(jnp.float32)
    on = m > 0
    per_token = kl_per_token(jnp.where(on, logp, 0.0), jnp.where(on, ref_logp, 0.0), kind)
    return aggregate(per_token, m, how)


def entropy_from_logits(logits):
    """H(softmax(logits)) over the last axis, in float32."""
    z = jnp.asarray(logits, jnp.float32)
    logp = jax.nn.log_softmax(z, axis=-1)
    # A -inf logit (a filtered token) has p log p = 0, not 0 * -inf.
    return -jnp.sum(jnp.where(jnp.isneginf(logp), 0.0, jnp.exp(logp) * logp), axis=-1)


def explained_variance(values, returns, mask):
    """1 − Var(R − v) / Var(R) over the unmasked tokens (1: perfect, ≤ 0: no better than
    the mean); NaN-free: 0 when the returns do not vary."""
    m = jnp.asarray(mask) > 0
    var_r = masked_var(jnp.asarray(returns, jnp.float32), m)
    var_e = masked_var(jnp.asarray(returns, jnp.float32) - jnp.asarray(values, jnp.float32), m)
    return jnp.where(var_r > 0, 1.0 - var_e / jnp.where(var_r > 0, var_r, 1.0), 0.0)


def response_log_probs(policy, ids_bt, segment_ids_bt, positions_bt, *, temperature: float,
                       chunk_tokens: int, entropy: bool = False, last: int | None = None,
                       group_size: int = 1):
    """(log π(token t+1 | ≤ t) at ``temperature`` [B, T-1], the entropy of that
    distribution [B, T-1] or None), ``chunk_tokens`` tokens of logits at a time.

    ``last``: only the last ``last`` targets get the vocabulary projection (a rollout row
    is a fixed-length prompt and then the response's ``last`` slots); the positions
    before are 0. The LM head is then not run on the prompt, whose log-probs no loss reads.
    ``group_size`` G > 1 (with ``last``): rows come in groups of G consecutive rows with
    the same prompt (the T - ``last`` first tokens), which then runs once per group
    (``jalign.models.group_forward``)."""
    from jalign.losses import sft
    b, t = ids_bt.shape
    skip = 0 if last is None else t - 1 - last
    if not 0 <= skip < t - 1:
        raise ValueError(f"last={last} response targets do not fit rows of {t} tokens")
    if group_size > 1 and last is not None:
        from jalign.models.group_forward import group_target_hidden
        hidden_btd = group_target_hidden(policy, ids_bt, segment_ids_bt, positions_bt,
                                         group_size=group_size, completion_len=last)
    else:
        hidden_btd = policy.backbone(ids_bt, positions_bt, segment_ids_bt)[:, skip:-1]
    w_dv = policy.lm_head_weight().astype(hidden_btd.dtype)

    def one(h_cd, t_c):
        z = sft._logits(h_cd, w_dv) / temperature
        lse = jax.nn.logsumexp(z, axis=-1)
        logp = jnp.take_along_axis(z, t_c[:, None], axis=-1)[:, 0] - lse
        if not entropy:
            return logp, jnp.zeros_like(logp)
        return logp, lse - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)

    kept_per_token = (sft.LOGITS_KEPT_PER_VOCAB + 4 * entropy) * w_dv.shape[-1]
    logp, ent = sft.map_token_chunks(one, hidden_btd, ids_bt[:, skip + 1:], chunk_tokens,
                                     remat=True, kept_bytes_per_token=kept_per_token)

    def rows(x):
        return jnp.pad(x, ((0, 0), (skip, 0)))

    return rows(logp), (rows(ent) if entropy else None)
