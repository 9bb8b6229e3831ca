"""Advantage estimation for PPO, as pure functions of arrays [batch, length].

``gae``: generalised advantage estimation (Schulman et al. 2016, "High-Dimensional
Continuous Control Using Generalized Advantage Estimation"). Positions where ``mask`` is
0 (the prompt, padding, anything after the response) take no part: the recursion runs
over the unmasked positions of each row in order, so a masked gap inside a row is
skipped, and the value after a row's last unmasked token is 0 (the episode ends there).
For unmasked positions t < t' consecutive among them:

    δ_t = r_t + γ V_{t'} − V_t,      A_t = δ_t + γ λ A_{t'},      returns R_t = A_t + V_t

and 0 at masked positions.

``whiten``: (x − mean) / sqrt(var + eps) over the unmasked entries only (the mean and
the unbiased variance both ignore masked ones); masked entries come back 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.losses.sequences import masked_mean, masked_var  # noqa: F401 (re-exported)


def _float(x):
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def gae(rewards, values, mask, *, gamma: float, lam: float):
    """(advantages, returns), each [batch, length] (float32, or float64 inputs' dtype), 0
    where ``mask`` is 0."""
    r = _float(rewards)
    v = _float(values).astype(r.dtype)
    m = jnp.asarray(mask) > 0

    def step(carry, xs):  # right to left; carry: the next unmasked position's (V, A)
        next_v, next_a = carry
        r_t, v_t, m_t = xs
        delta = r_t + gamma * next_v - v_t
        a_t = delta + gamma * lam * next_a
        keep = (jnp.where(m_t, v_t, next_v), jnp.where(m_t, a_t, next_a))
        return keep, jnp.where(m_t, a_t, 0.0)

    zeros = jnp.zeros(r.shape[:1], r.dtype)
    _, adv_tb = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
    adv = adv_tb.T
    return adv, jnp.where(m, adv + v, 0.0)


def whiten(x, mask, *, shift_mean: bool = True, eps: float = 1e-8):
    """Whitened ``x`` over its unmasked entries (masked entries -> 0). ``shift_mean=False``
    only rescales (the mean is added back), as for rewards."""
    x = jnp.asarray(x, jnp.float32)
    m = jnp.asarray(mask) > 0
    mean = masked_mean(x, m)
    out = (jnp.where(m, x, mean) - mean) * jax.lax.rsqrt(masked_var(x, m) + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(m, out, 0.0)


def clip_scores(scores, limit: float | None):
    """Scores clipped to [-limit, limit] (None: unchanged)."""
    scores = jnp.asarray(scores, jnp.float32)
    return scores if limit is None else jnp.clip(scores, -limit, limit)
