"""``Recipe``: everything the training loop needs to know about what it trains.

A recipe (one file per algorithm in ``jalign.algos``) names its config, its roles (the
models it trains and holds, ``jalign.train.roles``), its loss on those models by role,
the kind of data it trains on, and where its batches come from. The loop reads these and
never branches on an algorithm's name or imports a loss. What only some algorithms need
is a method a recipe overrides (``check``, ``batch_source``, ``flops_per_token``), not a
field the others carry.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from jalign.train.batch_spec import int32
from jalign.train.metrics import train_flops_per_token
from jalign.train.roles import ALL, Role
from jalign.train.source import DatasetSource

POLICY = "policy"


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str                          # metrics and caches are keyed by it
    loss_fn: Callable                  # (models by role, batch, ctx) -> LossOutput
    roles: tuple[Role, ...] = (Role(POLICY),)
    data_kind: str = "conversation"    # what DataConfig.format must produce
    weight_name: str = "target_tokens"  # what LossOutput.weight counts (metrics' name)
    config: object | None = None       # the algorithm's config dataclass (compared on resume)

    @property
    def family(self) -> str:
        """The algorithm's name without its variant ('dpo' of 'dpo/sigmoid')."""
        return self.name.split("/")[0]

    def check(self, configs) -> None:
        """Problems knowable from the configs alone (``RunConfigs``), raised as ConfigError
        before anything is loaded."""

    def batch_source(self, data, ctx):
        """Where the loop's batches come from (``jalign.train.source``): the data itself."""
        return DatasetSource(data)

    def step_rows(self, batch_size: int) -> int:
        """Rows of one train step given ``DataConfig.batch_size`` (checked at start)."""
        return batch_size

    def row_length(self, data) -> int:
        """Tokens per row of a train step's batch given ``DataConfig`` ``data``."""
        return data.max_length

    def batch_spec(self, models, rows: int, length: int) -> dict:
        """{field: jax.ShapeDtypeStruct} of one train step's batch of ``rows`` rows of
        ``length`` tokens: what ``jalign plan`` compiles the step for without data. The loop
        checks every run's first batch against it, so it cannot drift from the sources."""
        from jalign.data.packing import SFT_FIELDS
        prefixes = ("chosen_", "rejected_") if self.data_kind == "preference" else ("",)
        return {p + f: int32(rows, length) for p in prefixes for f in SFT_FIELDS}

    def memory_knobs(self, program: str = "train step") -> list[str]:
        """Settings of this recipe that lower the memory of its ``program`` (the train
        step, or one of ``planned_programs``): ``jalign plan`` suggests them when it does
        not fit."""
        return []

    def planned_programs(self, models, configs, mesh, rules, state) -> dict:
        """The recipe's programs besides the train step, for ``jalign plan`` to compile on
        the abstract train state ``state``: {name: ``jalign.program_spec.ProgramSpec``} (a rollout
        recipe's sampler and scoring pass)."""
        return {}

    def passes(self, models) -> float:
        """Forward-pass equivalents of one step per token, for MFU: 3 (forward, input and
        weight gradients) per role trained whole, 2 per role with frozen weights (no
        weight gradients for them), 1 per frozen role the step reads."""
        units = 0.0
        for name in models.in_step:
            role = models.role(name)
            units += (3 if role.trains == ALL else 2) if role.trained else 1
        return units

    def flops_per_token(self, models, seq_len: int) -> float:
        """Training FLOPs per row token (a batch source's own work, e.g. sampling, is not
        counted)."""
        per_pass = train_flops_per_token(models.configs[models.primary], seq_len) / 3
        return per_pass * self.passes(models)

    def flops_per_step(self, models, seq_len: int, rows: int) -> float:
        """Training FLOPs of a step of ``rows`` rows of ``seq_len`` tokens (for MFU); a
        recipe whose forward skips part of the rows' tokens counts less."""
        return self.flops_per_token(models, seq_len) * rows * seq_len


def custom(loss_fn: Callable) -> Recipe:
    """A recipe of one plain loss ``loss_fn(model, batch, ctx)`` on conversation data,
    training the policy (tests, user code)."""
    def loss(models, batch, ctx):
        return loss_fn(models[POLICY], batch, ctx)

    return Recipe(getattr(loss_fn, "__name__", "custom"), loss)
