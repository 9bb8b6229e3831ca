"""IFT (Intuitive Fine-Tuning; Hua et al. 2024): SFT data, one extra forward pass of the
policy without gradient per step (its greedy predictions mix into the inputs of the
second pass). The math is ``jalign.losses.ift``."""

from __future__ import annotations

from jalign.losses.ift import IFTConfig, make_ift_loss
from jalign.train.recipe import POLICY, Recipe

CONFIG = IFTConfig
SUMMARY = "Intuitive Fine-Tuning on conversations"


class IFTRecipe(Recipe):
    def passes(self, models) -> float:
        return super().passes(models) + 1  # the no-gradient greedy pass


def recipe(config: IFTConfig) -> Recipe:
    ift_loss = make_ift_loss(config)

    def loss(models, batch, ctx):
        return ift_loss(models[POLICY], batch, ctx)

    return IFTRecipe("ift", loss, weight_name=config.weight_name, config=config)
