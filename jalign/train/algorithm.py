"""``Algorithm``: everything the training loop needs to know about what it trains.

The loop reads these fields and never branches on an algorithm's name or imports a loss;
the table of algorithms (``jalign.train.algorithms``) builds them from config.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from jalign.train.metrics import train_flops_per_token

FROZEN_INITS = ("initial_policy",)
# The keys of jalign.models.heads.MODEL_KINDS, named here so that the loop's import of this
# module does not import the models (tests/train/test_algorithms.py checks they agree).
MODEL_KINDS = ("causal_lm", "scalar_head", "policy_value")


@dataclasses.dataclass(frozen=True)
class FrozenModel:
    """A model the train state carries next to the trained one and never updates.

    ``init``: how it is initialised. ``initial_policy``: a copy of the initial model (its
    policy, for a policy-and-value model): the DPO and PPO reference. Frozen models are
    rebuilt from that source, not saved, on restore."""

    name: str
    init: str = "initial_policy"

    def __post_init__(self):
        if self.init not in FROZEN_INITS:
            raise ValueError(f"FrozenModel {self.name!r}: init={self.init!r}; one of {FROZEN_INITS}")


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    loss_fn: Callable                  # (model, batch, ctx) -> LossOutput
    model_kind: str = "causal_lm"      # the trained model: causal_lm, scalar_head, policy_value
    data_kind: str = "conversation"    # what DataConfig.format must produce
    frozen: tuple[FrozenModel, ...] = ()  # models run inside the step, never trained
    # Scores computed once before training by the initial model and stored with the data
    # (e.g. a precomputed DPO reference): (model, batch) -> {field: [rows]}, or None.
    precompute: Callable | None = None
    weight_name: str = "target_tokens"  # what LossOutput.weight counts (metrics' name)
    # Forward passes of the trained model without gradient per step, besides the
    # forward + backward (IFT's greedy pass): counted in the FLOPs for MFU.
    extra_forwards: int = 0
    config: object | None = None  # the algorithm's config dataclass (compared on resume)
    # Where the loop's batches come from: (data iterator) -> BatchSource (None: the data
    # itself). PPO's samples rollouts with the policy being trained.
    make_source: Callable | None = None
    # Problems knowable from the configs alone: (TrainConfig, DataConfig) -> None, raising
    # ConfigError; called before anything is loaded.
    check: Callable | None = None
    # A policy_value model's value model: 'policy' or a reward-model source.
    value_init: str = "policy"
    batch_splits: int = 1          # train steps per data batch (PPO: its minibatches)
    trained_models: int = 1        # backbones trained per step (policy + value: 2)
    frozen_in_step: bool = True    # frozen models run a forward inside each step

    def __post_init__(self):
        if self.model_kind not in MODEL_KINDS:
            raise ValueError(f"Algorithm {self.name!r}: model_kind={self.model_kind!r}; one of "
                             f"{MODEL_KINDS}")

    @property
    def rows_per_example(self) -> int:
        """Sequences per batch entry (a preference pair is two)."""
        return 2 if self.data_kind == "preference" else 1

    @property
    def frozen_models(self) -> tuple[str, ...]:
        """Names of the frozen models the train state carries."""
        return tuple(m.name for m in self.frozen)

    def flops_per_token(self, model_config, seq_len: int) -> float:
        """Training FLOPs per row token, for MFU: forward + backward of each trained
        backbone, plus a forward (a third of that) per frozen model run in the step and per
        extra no-gradient pass. (A rollout source's sampling and scoring are not counted.)"""
        passes = len(self.frozen) * self.frozen_in_step + self.extra_forwards
        return train_flops_per_token(model_config, seq_len) * (self.trained_models + passes / 3)


def custom(loss_fn: Callable) -> Algorithm:
    """A plain loss function on conversation data (tests, user code)."""
    return Algorithm(getattr(loss_fn, "__name__", "custom"), loss_fn)
