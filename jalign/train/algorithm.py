"""``Algorithm``: everything the training loop needs to know about what it trains.

The loop reads these fields and never branches on an algorithm's name or imports a loss;
the table of algorithms (``jalign.train.algorithms``) builds them from config.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from jalign.train.metrics import train_flops_per_token

FROZEN_INITS = ("initial_policy",)


@dataclasses.dataclass(frozen=True)
class FrozenModel:
    """A model the train state carries next to the trained one and never updates.

    ``init``: how it is initialised. ``initial_policy``: a copy of the initial model (the
    DPO reference). Frozen models are rebuilt from that source, not saved, on restore."""

    name: str
    init: str = "initial_policy"

    def __post_init__(self):
        if self.init not in FROZEN_INITS:
            raise ValueError(f"FrozenModel {self.name!r}: init={self.init!r}; one of {FROZEN_INITS}")


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    loss_fn: Callable                  # (model, batch, ctx) -> LossOutput
    model_kind: str = "causal_lm"      # the trained model: causal_lm or scalar_head
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

    @property
    def rows_per_example(self) -> int:
        """Sequences per batch entry (a preference pair is two)."""
        return 2 if self.data_kind == "preference" else 1

    @property
    def frozen_models(self) -> tuple[str, ...]:
        """Names of the frozen models the train state carries."""
        return tuple(m.name for m in self.frozen)

    def flops_per_token(self, model_config, seq_len: int) -> float:
        """Training FLOPs per row token, for MFU: forward + backward of the trained model,
        plus a forward (a third of that) per frozen model and per extra no-gradient pass."""
        passes = len(self.frozen) + self.extra_forwards
        return train_flops_per_token(model_config, seq_len) * (1 + passes / 3)


def custom(loss_fn: Callable) -> Algorithm:
    """A plain loss function on conversation data (tests, user code)."""
    return Algorithm(getattr(loss_fn, "__name__", "custom"), loss_fn)
