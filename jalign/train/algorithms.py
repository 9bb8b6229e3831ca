"""The algorithms ``TrainConfig.algorithm`` names: one table from name to its config class
and the function building its ``Algorithm`` (loss, model, data, frozen models, FLOPs).

A new algorithm is one loss file, one config dataclass, one entry here and one gin file
(``configs/algo/NAME.gin``); the gin-registered config classes are derived from this
table, and the loop reads only ``Algorithm`` fields.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from jalign.errors import ConfigError
from jalign.losses import dpo, ift, ppo, rm, sft
from jalign.train.algorithm import Algorithm, FrozenModel


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
    config_class: type | None            # gin-bindable settings, or None
    build: Callable[[object], Algorithm]  # config instance (or None) -> Algorithm
    summary: str


def _sft(config: sft.SFTConfig) -> Algorithm:
    return Algorithm("sft", functools.partial(sft.sft_loss, chunk_tokens=config.chunk_tokens,
                                              normalize=config.normalize),
                     weight_name="sequences" if config.normalize == "sequences"
                     else "target_tokens", config=config)


def _rm(config: rm.RMConfig) -> Algorithm:
    return Algorithm("rm", functools.partial(rm.rm_loss, center_coef=config.center_coef),
                     model_kind="scalar_head", data_kind="preference", weight_name="pairs",
                     config=config)


def _dpo(config: dpo.DPOConfig) -> Algorithm:
    reference = config.reference if config.needs_reference else None
    scores = (functools.partial(dpo.reference_scores, chunk_tokens=config.chunk_tokens,
                                span=config.span)
              if reference == "precomputed" else None)
    frozen = (FrozenModel(dpo.REFERENCE_NAME),) if reference == "in_step" else ()
    # The name keys the precomputed-reference cache, so it names the span scored.
    name = f"dpo/{config.loss_type}" + ("" if config.span == "response" else f"/{config.span}")
    return Algorithm(name, dpo.make_dpo_loss(config), data_kind="preference", frozen=frozen,
                     precompute=scores, weight_name="pairs", config=config)


def _ift(config: ift.IFTConfig) -> Algorithm:
    return Algorithm("ift", ift.make_ift_loss(config), weight_name=config.weight_name,
                     extra_forwards=1, config=config)


def _ppo(config: ppo.PPOConfig) -> Algorithm:
    from jalign.rl import rollout
    return Algorithm("ppo", ppo.make_ppo_loss(config), model_kind="policy_value",
                     data_kind="prompt", frozen=(FrozenModel("reference"),),
                     weight_name="response_tokens" if config.aggregation == "token_mean"
                     else "sequences", config=config,
                     make_source=lambda data: rollout.RolloutSource(data, config),
                     check=lambda tc, dc: rollout.check_config(config, tc, dc),
                     value_init=config.value_init, batch_splits=config.minibatches,
                     trained_models=2, frozen_in_step=False)


ALGORITHMS: dict[str, AlgorithmSpec] = {
    "sft": AlgorithmSpec(sft.SFTConfig, _sft, "supervised fine-tuning on conversations"),
    "rm": AlgorithmSpec(rm.RMConfig, _rm, "Bradley-Terry reward model on preference pairs"),
    "dpo": AlgorithmSpec(dpo.DPOConfig, _dpo,
                         "DPO family on preference pairs (IPO, SimPO, ORPO, ... are "
                         "DPOConfig.loss_type values)"),
    "ift": AlgorithmSpec(ift.IFTConfig, _ift, "Intuitive Fine-Tuning on conversations"),
    "ppo": AlgorithmSpec(ppo.PPOConfig, _ppo, "PPO (RLHF) on prompts: sampled responses, "
                         "rewards, a value model and a KL penalty to the reference"),
}


def config_classes() -> tuple[type, ...]:
    """The algorithms' config dataclasses, for gin registration."""
    return tuple(s.config_class for s in ALGORITHMS.values() if s.config_class is not None)


def spec(name: str) -> AlgorithmSpec:
    if name not in ALGORITHMS:
        known = ", ".join(f"{n!r} ({s.summary})" for n, s in ALGORITHMS.items())
        raise ConfigError(f"TrainConfig.algorithm={name!r}; one of {known}")
    return ALGORITHMS[name]


def build(name: str, config=None) -> Algorithm:
    """The algorithm ``name`` with ``config`` (its config class's defaults when None)."""
    s = spec(name)
    if config is None and s.config_class is not None:
        config = s.config_class()
    return s.build(config)
