"""The GRPO family's rollouts: G completions per prompt, group-relative advantages.

Each prompt of a rollout is prefilled once and ``group_size`` completions are sampled
from its cache (rows of a group consecutive). The scoring pass computes the policy's log-
probs (the "old" ones), the reference's where a KL is used (β > 0; with β = 0 no reference
model is held at all), the KL as a reward penalty (``kl_in='reward'``: β · the sequence's
summed per-token estimate subtracted from its score) if so configured, and the advantages
of the configured estimator (``jalign.rl.advantages.get``), one per completion, on every
token of it. With ``tis_cap`` C it also keeps the truncated importance weight
min(π_trainer / π_sampler, C) of each token (Yao et al. 2025, "Your Efficient RL Framework
Secretly Brings You Off-Policy RL Training": for a sampler that runs at another precision
or with other kernels than the trainer).
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp

from jalign.losses.kl import kl_per_token
from jalign.rl import advantages as adv
from jalign.rl.advantages import masked_mean
from jalign.rl.rollout import POLICY, REFERENCE, Rollouts


def estimator_options(config) -> dict:
    """The options of ``config.advantage`` the config sets (``scale_rewards`` is grpo's
    ``scale``, ``baseline`` reinforce_pp's)."""
    fn = adv.get(config.advantage)
    given = {"scale": config.scale_rewards, "baseline": config.baseline}
    return {k: v for k, v in given.items() if k in inspect.signature(fn).parameters}


class GroupRolloutSource(Rollouts):
    """``BatchSource`` of GRPO-family minibatches (``config``: a ``GRPOConfig``)."""

    def __init__(self, prompts, config, ctx):
        self.group_size = config.group_size
        self.SCORED = (POLICY, REFERENCE) if config.beta > 0 else (POLICY,)
        self.estimate = adv.get(config.advantage)
        self.options = estimator_options(config)
        super().__init__(prompts, config, ctx)

    def make_kl_controller(self):
        from jalign.rl.kl import FixedKLController
        return FixedKLController(self.config.beta)  # logged as kl_coef

    def score_rows(self, models, rows, sampler_logp, scores, kl_coef):
        cfg = self.config
        mask = rows["response_mask"]
        on = mask > 0
        logp, ent = self.log_probs(models[POLICY], rows, entropy=True)
        extras = {"old_logp": logp}
        metrics = {"rollout_entropy": masked_mean(ent, mask)}
        if cfg.beta > 0:
            ref_logp, _ = self.log_probs(models[REFERENCE], rows)
            extras["ref_logp"] = ref_logp
            kl = jnp.sum(jnp.where(on, kl_per_token(logp, ref_logp, cfg.kl_estimator), 0.0), axis=1)
            metrics["kl"] = jnp.mean(kl)
            if cfg.kl_in == "reward":
                scores = scores - cfg.beta * kl
        groups = scores.reshape(-1, self.group_size)
        std = jnp.std(groups, axis=1)
        a = self.estimate(scores, group_size=self.group_size, **self.options)
        extras["advantages"] = jnp.where(on, a[:, None], 0.0)
        if cfg.tis_cap is not None:
            extras["tis_weight"] = jnp.where(
                on, jnp.minimum(jnp.exp(logp - sampler_logp), cfg.tis_cap), 0.0)
        metrics.update({
            "reward_group_std": jnp.mean(std),
            # groups whose completions all scored alike: no signal (zero advantages)
            "groups_without_signal": jnp.mean((std == 0).astype(jnp.float32)),
            "advantage_mean": jnp.mean(a),
            "advantage_std": jnp.std(a),
        })
        return extras, metrics
