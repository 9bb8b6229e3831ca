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

Aggregation (``aggregate``), over tokens where ``mask`` is 1:
- ``token_mean``: Σ ℓ / number of tokens in the batch (long responses weigh more);
- ``seq_mean_token_mean``: the mean over sequences of each one's token mean;
- ``seq_mean_token_sum``: the mean over sequences of each one's token sum.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jalign.losses import sequences
from jalign.rl.advantages import masked_var
from jalign.rl.kl import ESTIMATORS, kl_per_token
from jalign.rl.rewards import RewardConfig

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def aggregate(per_token, mask, how: str = "token_mean"):
    """(total, weight) of masked per-token losses; total / weight is the loss."""
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation {how!r}; one of {AGGREGATIONS}")
    m = jnp.asarray(mask).astype(jnp.float32)
    # where, not a product: a NaN or inf at a masked position (a sentinel, padding) must
    # not reach the sum.
    x = jnp.where(m > 0, jnp.asarray(per_token, jnp.float32), 0.0)
    if how == "token_mean":
        return sequences.reduce(x, m, normalize="tokens")
    if how == "seq_mean_token_mean":
        return sequences.reduce(x, m, normalize="sequences")
    has = (jnp.sum(m, axis=1) > 0).astype(jnp.float32)
    return jnp.sum(x * m), jnp.sum(has)


def _mean(x, m):
    return jnp.sum(jnp.where(m > 0, x, 0.0)), jnp.sum(m)


def policy_loss(logp, old_logp, advantages, mask, *, clip_low: float = 0.2,
                clip_high: float = 0.2, dual_clip: float | None = None,
                how: str = "token_mean"):
    """(total, weight, metrics): the clipped policy loss; metrics are (sum, count) pairs:
    ``clip_fraction`` (tokens where the clipped term is the one taken), ``approx_kl``
    (½ (log π − log π_old)², per token), ``ratio``."""
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    m = jnp.asarray(mask).astype(jnp.float32)
    on = m > 0
    a = jnp.where(on, jnp.asarray(advantages, jnp.float32), 0.0)
    log_ratio = jnp.where(on, jnp.asarray(logp, jnp.float32) - jnp.asarray(old_logp, jnp.float32),
                          0.0)
    ratio = jnp.exp(log_ratio)
    unclipped = -a * ratio
    clipped = -a * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = jnp.where(a < 0, jnp.minimum(loss, -dual_clip * a), loss)
    total, weight = aggregate(loss, m, how)
    metrics = {"clip_fraction": _mean((clipped > unclipped).astype(jnp.float32), m),
               "approx_kl": _mean(0.5 * log_ratio ** 2, m),
               "ratio": _mean(ratio, m)}
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


# ------------------------------------------------------------------ the PPO algorithm

ROLLOUT_SHARDINGS = ("train", "replicated")
VALUE_INITS = ("policy",)  # or a 'jalign:DIR' / 'hf:PATH' reward model
KL_PLACES = ("reward", "loss")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO settings (gin: ``PPOConfig.epochs = 4``); ``rewards`` is built from the
    ``RewardConfig`` bindings.

    One rollout samples a response for each of the ``DataConfig.batch_size`` prompts,
    scores it, and is trained on for ``epochs`` passes of ``minibatches`` optimizer steps
    each: ``TrainConfig.steps`` counts those steps (a multiple of epochs × minibatches).

    ``temperature`` / ``top_k`` / ``top_p``: sampling; log-probs (sampler's and
    trainer's) are of softmax(logits / temperature). ``kl_coef``: the KL-to-reference
    coefficient, fixed, or adaptive toward ``kl_target`` (per-sequence KL, nats) over
    ``kl_horizon`` samples (Ziegler et al. 2019) when ``kl_target`` is set; ``kl_in``:
    ``reward`` (−coef·KL per token added to the rewards, the classic RLHF form) or
    ``loss`` (coef·KL as a loss term, estimator ``kl_estimator``). ``value_init``:
    ``policy`` (the policy's backbone with a fresh score head) or a reward model
    ``jalign:DIR`` / ``hf:PATH`` of the policy's architecture. ``missing_eos_penalty``:
    subtracted from the score of a response that hit ``max_new_tokens`` without EOS.
    ``rollout_sharding``: ``train`` (sample with the training layout) or ``replicated``
    (gather the policy once per rollout, then decode without per-token all-gathers)."""

    epochs: int = 4
    minibatches: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_target: float | None = None
    kl_horizon: int = 10000
    kl_estimator: str = "k1"
    kl_in: str = "reward"
    whiten_advantages: bool = True
    score_clip: float | None = None
    missing_eos_penalty: float | None = None
    aggregation: str = "token_mean"
    value_init: str = "policy"
    rollout_sharding: str = "train"
    chunk_tokens: int = 2048
    rewards: RewardConfig = RewardConfig()

    def __post_init__(self):
        positive = {"epochs": self.epochs, "minibatches": self.minibatches,
                    "max_new_tokens": self.max_new_tokens, "kl_horizon": self.kl_horizon,
                    "chunk_tokens": self.chunk_tokens}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"PPOConfig.{name} must be positive, got {value}")
        if self.temperature <= 0:
            raise ValueError(f"PPOConfig.temperature must be > 0 (sampling), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"PPOConfig.top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"PPOConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.kl_coef < 0 or (self.kl_target is not None and self.kl_target <= 0):
            raise ValueError(f"PPOConfig.kl_coef={self.kl_coef} must be >= 0 and kl_target="
                             f"{self.kl_target} > 0")
        if self.kl_target is not None and self.kl_coef == 0:
            raise ValueError("PPOConfig.kl_target needs kl_coef > 0 to adapt from")
        choices = {"kl_estimator": (self.kl_estimator, ESTIMATORS),
                   "kl_in": (self.kl_in, KL_PLACES),
                   "aggregation": (self.aggregation, AGGREGATIONS),
                   "rollout_sharding": (self.rollout_sharding, ROLLOUT_SHARDINGS)}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"PPOConfig.{name}={value!r}; one of {allowed}")
        if self.value_init not in VALUE_INITS and not self.value_init.startswith(("jalign:", "hf:")):
            raise ValueError(f"PPOConfig.value_init={self.value_init!r}: 'policy', 'jalign:DIR' "
                             "or 'hf:PATH'")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"PPOConfig.dual_clip must be > 1, got {self.dual_clip}")

    @property
    def steps_per_rollout(self) -> int:
        return self.epochs * self.minibatches


def response_log_probs(policy, ids_bt, segment_ids_bt, positions_bt, *, temperature: float,
                       chunk_tokens: int, entropy: bool = False):
    """(log π(token t+1 | ≤ t) at ``temperature`` [B, T-1], the entropy of that
    distribution [B, T-1] or None), ``chunk_tokens`` tokens of logits at a time."""
    from jalign.losses.sft import map_token_chunks
    hidden_btd = policy.backbone(ids_bt, positions_bt, segment_ids_bt)
    b, t, d = hidden_btd.shape
    w_dv = policy.lm_head_weight().astype(hidden_btd.dtype)

    def one(h_cd, t_c):
        z = jnp.dot(h_cd, w_dv, preferred_element_type=jnp.float32) / temperature
        lse = jax.nn.logsumexp(z, axis=-1)
        logp = jnp.take_along_axis(z, t_c[:, None], axis=-1)[:, 0] - lse
        if not entropy:
            return logp, jnp.zeros_like(logp)
        return logp, lse - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)

    logp, ent = map_token_chunks(one, hidden_btd[:, :-1].reshape(-1, d),
                                 ids_bt[:, 1:].reshape(-1), chunk_tokens, remat=True)
    return logp.reshape(b, t - 1), (ent.reshape(b, t - 1) if entropy else None)


def make_ppo_loss(config: PPOConfig):
    """``loss(model, batch, ctx) -> LossOutput`` for a policy-and-value model on a rollout
    minibatch (``jalign.rl.rollout``): the clipped policy loss, vf_coef × the clipped value
    loss, minus entropy_coef × the entropy, plus (kl_in='loss') the KL term; all
    aggregated alike, so they share one weight (response tokens or sequences)."""
    from jalign.losses.types import LossOutput
    how = config.aggregation

    def ppo_loss(model, batch, ctx):
        ids, seg, pos = batch["input_ids"], batch["segment_ids"], batch["positions"]
        mask = batch["response_mask"]
        logp, ent = response_log_probs(model.policy, ids, seg, pos,
                                       temperature=config.temperature,
                                       chunk_tokens=config.chunk_tokens, entropy=True)
        values = model.value(ids, pos, seg)[:, :-1]
        p_total, weight, p_metrics = policy_loss(
            logp, batch["old_logp"], batch["advantages"], mask, clip_low=config.clip_low,
            clip_high=config.clip_high, dual_clip=config.dual_clip, how=how)
        v_total, _, v_metrics = value_loss(values, batch["old_values"], batch["returns"], mask,
                                           clip=config.value_clip, how=how)
        e_total, _ = aggregate(ent, mask, how)
        total = p_total + config.vf_coef * v_total - config.entropy_coef * e_total
        aux = {"policy_loss": (p_total, weight), "value_loss": (v_total, weight),
               "entropy": (e_total, weight), **p_metrics, **v_metrics}
        if config.kl_in == "loss":
            # The coefficient rides with each row (it may change between rollouts).
            m = jnp.asarray(mask).astype(jnp.float32)
            kl = kl_per_token(jnp.where(m > 0, logp, 0.0),
                              jnp.where(m > 0, batch["ref_logp"], 0.0), config.kl_estimator)
            k_total, _ = aggregate(kl * batch["kl_coef"][:, None], m, how)
            total = total + k_total
            aux["kl_loss"] = (k_total, weight)
        return LossOutput(total, weight, aux)

    return ppo_loss
