"""The GRPO family (RL with verifiable rewards, no value model): GRPO, DAPO, Dr. GRPO,
RLOO, REINFORCE++, GSPO and CISPO as settings of one recipe.

Roles: ``policy`` (trained) and, only where a KL is used (``beta`` > 0), ``reference``
(a frozen copy of the initial policy, read by the rollouts' scoring pass, not by the step).
The batch source is ``jalign.rl.group_rollout.GroupRolloutSource``: each rollout samples
``group_size`` completions per prompt, scores them with the reward functions
(``RewardConfig``: built-in and users' own), turns the scores into advantages by the
estimator ``advantage`` (``jalign.rl.advantages``), then yields ``epochs`` ×
``minibatches`` train steps of this recipe's loss: the policy loss ``policy_loss``
(``jalign.losses.policy``) aggregated by ``aggregation`` (``jalign.losses.aggregation``),
plus β · the k3 KL to the reference with ``kl_in='loss'``.

The variants (configs/algo/*.gin):
- GRPO (Shao et al. 2024): advantage ``grpo``, clip 0.2, aggregation ``grpo``.
- DAPO (Yu et al. 2025): clip-higher (0.2 / 0.28), aggregation ``dapo`` (token-level), β 0.
- Dr. GRPO (Liu et al. 2025): ``scale_rewards='none'``, aggregation ``dr_grpo``.
- RLOO (Ahmadian et al. 2024): advantage ``rloo``.
- REINFORCE++ (Hu et al. 2025): advantage ``reinforce_pp``.
- GSPO (Zheng et al. 2025): policy loss ``gspo`` (sequence ratio), clip 3e-4 / 4e-4.
- CISPO (MiniMax 2025): policy loss ``cispo``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jalign.errors import ConfigError
from jalign.losses import aggregation, policy
from jalign.losses.kl import ESTIMATORS, kl_per_token
from jalign.losses.ppo import response_log_probs
from jalign.losses.policy import tis_weight
from jalign.losses.types import LossOutput
from jalign.rl import advantages, draws
from jalign.rl.generate import check_sampling
from jalign.rl.rewards import RewardConfig
from jalign.rl.recipe import RolloutRecipe
from jalign.train.recipe import POLICY, Recipe
from jalign.train.roles import NONE, Role

REFERENCE = "reference"
KL_PLACES = ("loss", "reward")
ROLLOUT_SHARDINGS = ("train", "replicated")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO-family settings (gin: ``GRPOConfig.group_size = 8``); ``rewards`` is built from
    the ``RewardConfig`` bindings.

    A rollout samples ``group_size`` completions for each of the ``DataConfig.batch_size``
    prompts (prompts × G rows) and is trained on for ``epochs`` passes of ``minibatches``
    optimizer steps: ``TrainConfig.steps`` counts those steps (a multiple of epochs ×
    minibatches). With one step per rollout the loss is exactly on-policy (ratio 1).

    ``advantage``: the estimator (``grpo``, ``rloo``, ``reinforce_pp``), with
    ``scale_rewards`` (grpo: ``group``, ``batch``, ``none``) and ``baseline``
    (reinforce_pp: ``group``, ``global``). ``policy_loss``: ``clip``, ``gspo``, ``cispo``,
    with ``clip_low``/``clip_high`` (DAPO's clip-higher: 0.2/0.28) and ``dual_clip``.
    ``aggregation``: ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo`` (and PPO's names).
    ``beta``: the KL coefficient (0: no reference model), estimator ``kl_estimator``,
    as a loss term (``kl_in='loss'``) or subtracted from the rewards (``'reward'``).
    ``tis_cap``: truncated importance sampling of the sampler's tokens (None: off).
    ``dynamic_sampling`` (with ``max_sampling_rounds``), ``mask_truncated`` and
    ``overlong_buffer``/``overlong_penalty``: DAPO's filtering (jalign.rl.group_rollout).
    ``temperature``/``top_k``/``top_p``: sampling; ``missing_eos_penalty``: subtracted from
    the score of a completion that hit ``max_new_tokens`` without EOS.
    ``share_prompt``: the forward passes (train step, scoring) run each prompt's tokens once
    for its group (``jalign.models.group_forward``: the same values up to summation order,
    the prompt's layer work divided by G); it needs whole groups in every
    micro-batch: DataConfig.batch_size divisible by minibatches × TrainConfig.accum_steps.
    ``sampler_draw``: how the sampler draws a token (``jalign.rl.draws``)."""

    group_size: int = 8
    epochs: int = 1
    minibatches: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    advantage: str = "grpo"
    scale_rewards: str = "group"
    baseline: str = "group"
    policy_loss: str = "clip"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    aggregation: str = "grpo"
    beta: float = 0.0
    kl_estimator: str = "k3"
    kl_in: str = "loss"
    tis_cap: float | None = None
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    mask_truncated: bool = False
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    missing_eos_penalty: float | None = None
    rollout_sharding: str = "train"
    chunk_tokens: int = 2048
    share_prompt: bool = True
    sampler_draw: str = "inverse_cdf"
    rewards: RewardConfig = RewardConfig()

    def __post_init__(self):
        for name in ("group_size", "epochs", "minibatches", "max_new_tokens", "chunk_tokens",
                     "max_sampling_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPOConfig.{name} must be positive, got {getattr(self, name)}")
        check_sampling("GRPOConfig", self.temperature, self.top_k, self.top_p)
        choices = {"advantage": (self.advantage, tuple(advantages.ESTIMATORS)),
                   "scale_rewards": (self.scale_rewards, advantages.GRPO_SCALES),
                   "baseline": (self.baseline, advantages.REINFORCE_PP_BASELINES),
                   "policy_loss": (self.policy_loss, tuple(policy.POLICY_LOSSES)),
                   "aggregation": (self.aggregation, tuple(aggregation.AGGREGATIONS)),
                   "kl_estimator": (self.kl_estimator, ESTIMATORS),
                   "kl_in": (self.kl_in, KL_PLACES),
                   "rollout_sharding": (self.rollout_sharding, ROLLOUT_SHARDINGS),
                   "sampler_draw": (self.sampler_draw, tuple(draws.DRAWS))}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"GRPOConfig.{name}={value!r}; one of {allowed}")
        # Every baseline but reinforce_pp's global one is the group's: one completion per
        # prompt would be its own baseline, every advantage 0 and nothing trained.
        group_baseline = not (self.advantage == "reinforce_pp" and self.baseline == "global")
        if group_baseline and self.group_size < 2:
            raise ValueError(f"GRPOConfig.group_size={self.group_size}: the {self.advantage!r} "
                             "advantage compares completions of a prompt; it needs at least 2")
        if self.beta < 0:
            raise ValueError(f"GRPOConfig.beta must be >= 0, got {self.beta}")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError(f"GRPOConfig.clip_low={self.clip_low} and clip_high="
                             f"{self.clip_high} must be >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"GRPOConfig.dual_clip must be > 1, got {self.dual_clip}")
        if not 0 <= self.overlong_buffer < self.max_new_tokens:
            raise ValueError(f"GRPOConfig.overlong_buffer={self.overlong_buffer} must be in "
                             f"[0, max_new_tokens={self.max_new_tokens})")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"GRPOConfig.tis_cap must be > 0, got {self.tis_cap}")

    @property
    def steps_per_rollout(self) -> int:
        return self.epochs * self.minibatches

    @property
    def forward_group(self) -> int:
        """Rows per prompt that the forward passes run as one group (1: row by row)."""
        return self.group_size if self.share_prompt else 1

    @property
    def policy_in_scoring(self) -> bool:
        """Whether the rollout's scoring pass runs the policy: for the old log-probs of a
        rollout trained on by several steps, or for a KL penalty on the rewards. With one
        step per rollout (and the KL, if any, in the loss) the step's own forward gives the
        sampling policy's log-probs (ratio exactly 1), so that forward is not run twice:
        the step reports the entropy and the sampler mismatch, and weights TIS. (Trained
        adapters with dropout also keep it: that forward is not the sampler's policy,
        ``GroupRolloutSource``.)"""
        return self.steps_per_rollout > 1 or (self.beta > 0 and self.kl_in == "reward")


def _mean(x, m):
    return jnp.sum(jnp.where(m > 0, x, 0.0)), jnp.sum(m)


def _rollout_metrics(logp, entropy, batch, mask) -> dict:
    """What the scoring pass reports when it runs the policy, from the step's own forward
    on the rollout (one step per rollout): entropy, the sampler's mismatch
    (``jalign.rl.rollout.sampler_mismatch``), and the sequence-summed log-ratio to the
    reference (``kl``) where there is one."""
    on = mask > 0
    d = jnp.where(on, logp - batch["sampler_logp"], 0.0)
    out = {"rollout_entropy": _mean(entropy, mask),
           "sampler_kl": _mean(jnp.exp(d) - d - 1.0, mask),
           "sampler_logp_diff_max": (jnp.max(jnp.abs(d)), jnp.float32(1.0))}
    if "ref_logp" in batch:
        out["kl"] = (jnp.sum(jnp.where(on, logp - batch["ref_logp"], 0.0)),
                     jnp.float32(mask.shape[0]))
    return out


def make_grpo_loss(config: GRPOConfig):
    """``loss(models, batch, ctx) -> LossOutput`` of the policy on a rollout minibatch."""
    loss_of = policy.get(config.policy_loss)
    on_policy = config.steps_per_rollout == 1

    def grpo_loss(models, batch, ctx):
        mask = batch["response_mask"]
        # The rollout source ran no policy forward (policy_in_scoring): this one is the
        # rollout's only one; it says so by handing over the sampler's log-probs.
        scored = "sampler_logp" not in batch
        logp, entropy = response_log_probs(
            models[POLICY], batch["input_ids"], batch["segment_ids"], batch["positions"],
            temperature=config.temperature, chunk_tokens=config.chunk_tokens,
            entropy=not scored, last=config.max_new_tokens, group_size=config.forward_group)
        # One update per rollout: the sampling policy is this one (ratio exactly 1).
        old = jax.lax.stop_gradient(logp) if on_policy else batch["old_logp"]
        per_token, token_metrics = loss_of(logp, old, batch["advantages"], mask,
                                           clip_low=config.clip_low, clip_high=config.clip_high,
                                           dual_clip=config.dual_clip)
        aux = {}
        if not scored:
            aux.update(_rollout_metrics(old, jax.lax.stop_gradient(entropy), batch, mask))
            if config.tis_cap is not None:
                per_token = per_token * tis_weight(old, batch["sampler_logp"], mask,
                                                   config.tis_cap)
        elif "tis_weight" in batch:
            per_token = per_token * batch["tis_weight"]
        if config.beta > 0 and config.kl_in == "loss":
            on = mask > 0
            kl = kl_per_token(jnp.where(on, logp, 0.0), jnp.where(on, batch["ref_logp"], 0.0),
                              config.kl_estimator)
            per_token = per_token + config.beta * kl
            aux["kl_loss"] = _mean(config.beta * kl, mask)
        total, weight = aggregation.aggregate(per_token, mask, config.aggregation,
                                              max_length=config.max_new_tokens)
        aux.update({name: _mean(v, mask) for name, v in token_metrics.items()})
        aux["policy_loss"] = (total, weight)
        return LossOutput(total, weight, aux)

    return grpo_loss


CONFIG = GRPOConfig


def roles(config: GRPOConfig) -> tuple[Role, ...]:
    if config.beta == 0:  # no KL: no reference model is held
        return (Role(POLICY),)
    return (Role(POLICY), Role(REFERENCE, like=POLICY, trains=NONE, in_step=False))


class GRPORecipe(RolloutRecipe):
    def check(self, configs) -> None:
        from jalign.rl.rollout import check_config
        check_config(self.config, configs.train, configs.data)
        cfg, parts = self.config, self.config.minibatches * configs.train.accum_steps
        if cfg.forward_group > 1 and configs.data.batch_size % parts:
            raise ConfigError(
                f"GRPOConfig.share_prompt runs each prompt once for its group, so every "
                f"micro-batch needs whole groups: DataConfig.batch_size={configs.data.batch_size}"
                f" prompts must divide into GRPOConfig.minibatches={cfg.minibatches} × "
                f"TrainConfig.accum_steps={configs.train.accum_steps} (or set "
                "GRPOConfig.share_prompt=False)")
        self.config.rewards.load_functions()  # each user reward function imports

    def step_rows(self, batch_size: int) -> int:
        return batch_size * self.config.group_size // self.config.minibatches

    def flops_per_step(self, models, seq_len: int, rows: int) -> float:
        """With ``share_prompt`` the prompt's tokens run once per group: rows ×
        completion + groups × prompt tokens."""
        cfg = self.config
        n = cfg.max_new_tokens
        tokens = rows * n + rows // cfg.forward_group * (seq_len - n)
        return self.flops_per_token(models, seq_len) * tokens

    def source_class(self):
        from jalign.rl.group_rollout import GroupRolloutSource
        return GroupRolloutSource

    def batch_source(self, data, ctx):
        return self.source_class()(data, self.config, ctx)


def recipe(config: GRPOConfig) -> Recipe:
    return GRPORecipe("grpo", make_grpo_loss(config), roles(config), data_kind="prompt",
                      weight_name=aggregation.weight_name(config.aggregation), config=config)


SUMMARY = ("the GRPO family (GRPO, DAPO, Dr. GRPO, RLOO, REINFORCE++, GSPO, CISPO) on "
           "prompts: G sampled completions each, group-relative advantages, no value model")
