"""The DPO family (DPO, cDPO, IPO, hinge, robust, SimPO, ORPO, DPO-Positive, Step-DPO) on
preference pairs. The math is ``jalign.losses.dpo``.

Roles: ``policy``, and a ``reference`` (a frozen copy of the initial policy) read inside
the step when ``DPOConfig.reference='in_step'`` and the loss needs one. With
``'precomputed'`` the initial policy scores every pair once before training (its batch
source annotates the data, cached in the run directory) and the run holds one model.
"""

from __future__ import annotations

import functools

from jalign.losses import dpo
from jalign.losses.dpo import DPOConfig
from jalign.train import reference as precompute
from jalign.train.batch_spec import float32
from jalign.train.recipe import POLICY, Recipe
from jalign.train.roles import NONE, Role
from jalign.train.source import DatasetSource

CONFIG = DPOConfig
SUMMARY = "DPO family on preference pairs (IPO, SimPO, ORPO, ... are DPOConfig.loss_type values)"
REFERENCE = "reference"


class DPORecipe(Recipe):
    def batch_source(self, data, ctx):
        if self.config.needs_reference and self.config.reference == "precomputed":
            score = functools.partial(dpo.reference_scores, chunk_tokens=self.config.chunk_tokens,
                                      span=self.config.span)
            precompute.annotate_splits(data, ctx, score, role=POLICY, key=self.name)
        return DatasetSource(data)

    def memory_knobs(self, program: str = "train step") -> list[str]:
        if (program == "train step" and self.config.needs_reference
                and self.config.reference == "in_step"):
            return ["DPOConfig.reference='precomputed' (the reference scores every pair once "
                    "before training: no second model in the step)"]
        return []

    def batch_spec(self, models, rows: int, length: int) -> dict:
        spec = super().batch_spec(models, rows, length)
        if self.config.needs_reference and self.config.reference == "precomputed":
            spec |= {f"ref_{side}_logps": float32(rows) for side in ("chosen", "rejected")}
        return spec


def recipe(config: DPOConfig) -> Recipe:
    in_step = config.needs_reference and config.reference == "in_step"
    pair_loss = dpo.make_dpo_loss(config)

    def loss(models, batch, ctx):
        return pair_loss(models[POLICY], batch, ctx, reference=models.get(REFERENCE))

    roles = (Role(POLICY),) + ((Role(REFERENCE, like=POLICY, trains=NONE),) if in_step else ())
    # The name keys the precomputed-reference cache, so it names the span scored.
    name = f"dpo/{config.loss_type}" + ("" if config.span == "response" else f"/{config.span}")
    return DPORecipe(name, loss, roles, data_kind="preference", weight_name="pairs",
                     config=config)
