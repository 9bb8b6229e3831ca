"""SFT: next-token cross-entropy on the trainable (assistant) tokens of conversations."""

from __future__ import annotations

from jalign.losses.sft import SFTConfig, sft_loss
from jalign.train.recipe import POLICY, Recipe

CONFIG = SFTConfig
SUMMARY = "supervised fine-tuning on conversations"


def recipe(config: SFTConfig) -> Recipe:
    def loss(models, batch, ctx):
        return sft_loss(models[POLICY], batch, ctx, chunk_tokens=config.chunk_tokens,
                        normalize=config.normalize)

    return Recipe("sft", loss, weight_name="sequences" if config.normalize == "sequences"
                  else "target_tokens", config=config)
