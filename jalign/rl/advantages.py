"""Advantage estimation: token-level GAE for PPO, and sequence-level estimators for the
critic-free methods (the GRPO family), chosen by name.

Sequence-level estimators (``get(name)``; ``ESTIMATORS``) are called
``fn(rewards, group_size=G, **options)`` on n = prompts · G rewards (float [n]; rows of a
group consecutive: row i is in group i // G) and return n advantages, one per completion
(every token of a completion takes its sequence's advantage):

- ``grpo`` (Shao et al. 2024, "DeepSeekMath", GRPO; Liu et al. 2025, "Understanding
  R1-Zero-Like Training", Dr. GRPO for ``scale='none'``): r − its group's mean, divided by
  the group's standard deviation + eps (``scale='group'``), by the batch's (``'batch'``)
  or by nothing (``'none'``). The defaults are TRL GRPOTrainer's numerics: the unbiased
  standard deviation (n − 1), eps 1e-4. A group whose rewards are all equal gets 0.
- ``rloo`` (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
  Optimization", REINFORCE leave-one-out): r_i − the mean of the other G − 1 rewards of
  its group.
- ``reinforce_pp`` (Hu et al. 2025, "REINFORCE++"): r − a baseline (``baseline='group'``:
  its group's mean, REINFORCE++-baseline; ``'global'``: the batch's mean), then whitened
  over the batch: (a − mean) / (std + eps), std the population one (n), eps 1e-8.

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


def _groups(rewards, group_size: int, minimum: int = 1):
    """rewards as float32 [prompts, G], checked."""
    r = _float(rewards)
    if r.ndim != 1:
        raise ValueError(f"rewards must be one per completion, [n]; got shape {r.shape}")
    if group_size < minimum or r.shape[0] % group_size:
        raise ValueError(f"{r.shape[0]} rewards do not make groups of group_size={group_size} "
                         f"(at least {minimum}, dividing the count)")
    return r.reshape(-1, group_size)


def grpo(rewards, *, group_size: int, scale: str = "group", eps: float = 1e-4):
    """(r − group mean) / (std + eps); std unbiased, of the group (``scale='group'``) or
    of the whole batch (``'batch'``); ``'none'``: not divided (Dr. GRPO)."""
    if scale not in GRPO_SCALES:
        raise ValueError(f"scale={scale!r}; one of {GRPO_SCALES}")
    g = _groups(rewards, group_size, minimum=2 if scale == "group" else 1)
    centred = (g - jnp.mean(g, axis=1, keepdims=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = jnp.repeat(jnp.std(g, axis=1, ddof=1), group_size)
    else:
        if g.size < 2:
            raise ValueError("scale='batch' needs at least 2 rewards for an unbiased std")
        std = jnp.std(g, ddof=1)
    return centred / (std + eps)


def rloo(rewards, *, group_size: int):
    """r_i − mean_{j ≠ i} r_j within each group (needs G ≥ 2)."""
    g = _groups(rewards, group_size, minimum=2)
    others = (jnp.sum(g, axis=1, keepdims=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def reinforce_pp(rewards, *, group_size: int, baseline: str = "group", eps: float = 1e-8):
    """r − baseline (``group``: the group's mean; ``global``: the batch's), then whitened
    over the batch with the population std."""
    if baseline not in REINFORCE_PP_BASELINES:
        raise ValueError(f"baseline={baseline!r}; one of {REINFORCE_PP_BASELINES}")
    g = _groups(rewards, group_size)
    axis = 1 if baseline == "group" else None
    a = (g - jnp.mean(g, axis=axis, keepdims=True)).reshape(-1)
    return (a - jnp.mean(a)) / (jnp.std(a) + eps)


GRPO_SCALES = ("group", "batch", "none")
REINFORCE_PP_BASELINES = ("group", "global")
ESTIMATORS = {"grpo": grpo, "rloo": rloo, "reinforce_pp": reinforce_pp}


def get(name: str):
    """The sequence-level estimator ``name`` (``ESTIMATORS``)."""
    if name not in ESTIMATORS:
        raise ValueError(f"advantage estimator {name!r}; one of {tuple(ESTIMATORS)} "
                         "(PPO's token-level GAE is jalign.rl.advantages.gae)")
    return ESTIMATORS[name]


def clip_scores(scores, limit: float | None):
    """Scores clipped to [-limit, limit] (None: unchanged)."""
    scores = jnp.asarray(scores, jnp.float32)
    return scores if limit is None else jnp.clip(scores, -limit, limit)
