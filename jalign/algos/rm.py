"""Reward model: Bradley-Terry on preference pairs, a scalar head trained on (chosen,
rejected) rows scored in one forward."""

from __future__ import annotations

from jalign.losses.rm import RMConfig, rm_loss
from jalign.models.heads import SCALAR
from jalign.train.recipe import Recipe
from jalign.train.roles import Role

CONFIG = RMConfig
SUMMARY = "Bradley-Terry reward model on preference pairs"
REWARD = "reward"


def recipe(config: RMConfig) -> Recipe:
    def loss(models, batch, ctx):
        return rm_loss(models[REWARD], batch, ctx, center_coef=config.center_coef)

    return Recipe("rm", loss, (Role(REWARD, head=SCALAR),), data_kind="preference",
                  weight_name="pairs", config=config)
