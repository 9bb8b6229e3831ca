"""PPO (RLHF; Schulman et al. 2017): a policy and a value model trained on rollouts.

Roles: ``policy`` (trained), ``value`` (a scalar head, trained: from the policy's
backbone with a fresh head, or a reward model, ``PPOConfig.value_init``) and
``reference`` (a frozen copy of the initial policy, held for the rollouts' KL, not read
by the step). The batch source is ``jalign.rl.rollout.RolloutSource``: each rollout
samples, scores and computes advantages once, then yields ``epochs`` × ``minibatches``
ordinary train steps of this recipe's loss (the math is ``jalign.losses.ppo``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jalign.errors import ConfigError
from jalign.losses.kl import ESTIMATORS, kl_per_token
from jalign.losses.ppo import AGGREGATIONS, aggregate, policy_loss, response_log_probs, value_loss
from jalign.losses.types import LossOutput
from jalign.models.heads import SCALAR
from jalign.rl import draws
from jalign.rl.generate import check_sampling
from jalign.rl.rewards import RewardConfig
from jalign.sources import ModelSource
from jalign.rl.recipe import RolloutRecipe
from jalign.train.recipe import POLICY, Recipe
from jalign.train.roles import NONE, Role

VALUE, REFERENCE = "value", "reference"


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
    (gather the policy once per rollout, then decode without per-token all-gathers).
    ``sampler_draw``: how a token is drawn (``jalign.rl.draws``; ``gumbel``, the default,
    samples what earlier jalign versions sampled, so older runs resume exactly)."""

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
    sampler_draw: str = "gumbel"
    rewards: RewardConfig = RewardConfig()

    def __post_init__(self):
        positive = {"epochs": self.epochs, "minibatches": self.minibatches,
                    "max_new_tokens": self.max_new_tokens, "kl_horizon": self.kl_horizon,
                    "chunk_tokens": self.chunk_tokens}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"PPOConfig.{name} must be positive, got {value}")
        check_sampling("PPOConfig", self.temperature, self.top_k, self.top_p)
        if self.kl_coef < 0 or (self.kl_target is not None and self.kl_target <= 0):
            raise ValueError(f"PPOConfig.kl_coef={self.kl_coef} must be >= 0 and kl_target="
                             f"{self.kl_target} > 0")
        if self.kl_target is not None and self.kl_coef == 0:
            raise ValueError("PPOConfig.kl_target needs kl_coef > 0 to adapt from")
        choices = {"kl_estimator": (self.kl_estimator, ESTIMATORS),
                   "kl_in": (self.kl_in, KL_PLACES),
                   "aggregation": (self.aggregation, AGGREGATIONS),
                   "sampler_draw": (self.sampler_draw, tuple(draws.DRAWS)),
                   "rollout_sharding": (self.rollout_sharding, ROLLOUT_SHARDINGS)}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"PPOConfig.{name}={value!r}; one of {allowed}")
        if self.value_init not in VALUE_INITS:
            source = ModelSource.parse(self.value_init, what="PPOConfig.value_init")
            if source.scheme == "random":
                raise ValueError("PPOConfig.value_init='random': use 'policy', 'jalign:DIR' "
                                 "or 'hf:PATH'")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"PPOConfig.dual_clip must be > 1, got {self.dual_clip}")

    @property
    def steps_per_rollout(self) -> int:
        return self.epochs * self.minibatches


def make_ppo_loss(config: PPOConfig):
    """``loss(models, batch, ctx) -> LossOutput`` of the policy and value roles on a rollout
    minibatch (``jalign.rl.rollout``): the clipped policy loss, vf_coef × the clipped value
    loss, minus entropy_coef × the entropy, plus (kl_in='loss') the KL term; all
    aggregated alike, so they share one weight (response tokens or sequences)."""
    how = config.aggregation

    def ppo_loss(models, batch, ctx):
        ids, seg, pos = batch["input_ids"], batch["segment_ids"], batch["positions"]
        mask = batch["response_mask"]
        logp, ent = response_log_probs(models[POLICY], ids, seg, pos,
                                       temperature=config.temperature,
                                       chunk_tokens=config.chunk_tokens, entropy=True)
        values = models[VALUE](ids, pos, seg)[:, :-1]
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


CONFIG = PPOConfig


def roles(config: PPOConfig) -> tuple[Role, ...]:
    if config.value_init == "policy":
        value = Role(VALUE, head=SCALAR, like=POLICY)
    else:
        value = Role(VALUE, head=SCALAR, source=config.value_init, set_by="PPOConfig.value_init")
    return (Role(POLICY), value, Role(REFERENCE, like=POLICY, trains=NONE, in_step=False))


class PPORecipe(RolloutRecipe):
    def check(self, configs) -> None:
        from jalign.rl.rollout import check_config
        check_config(self.config, configs.train, configs.data)
        self.config.rewards.load_functions()  # each user reward function imports
        lora = configs.lora
        if lora.enabled and lora.value_base == "shared" and self.config.value_init != "policy":
            raise ConfigError(f"LoraConfig.value_base='shared' puts the value model on the "
                              f"policy's base, but PPOConfig.value_init="
                              f"{self.config.value_init!r} gives it another backbone; set "
                              "LoraConfig.value_base='own'")

    def step_rows(self, batch_size: int) -> int:
        return batch_size // self.config.minibatches  # a train step is one minibatch

    def source_class(self):
        from jalign.rl.rollout import RolloutSource
        return RolloutSource

    def batch_source(self, data, ctx):
        return self.source_class()(data, self.config, ctx)


def recipe(config: PPOConfig) -> Recipe:
    return PPORecipe("ppo", make_ppo_loss(config), roles(config), data_kind="prompt",
                     weight_name="response_tokens" if config.aggregation == "token_mean"
                     else "sequences", config=config)


SUMMARY = ("PPO (RLHF) on prompts: sampled responses, rewards, a value model and a KL "
           "penalty to the reference")
