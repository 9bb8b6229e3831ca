"""``RolloutRecipe``: a recipe trained on its own rollouts (PPO, the GRPO family)."""

from __future__ import annotations

from jalign.train.recipe import Recipe


class RolloutRecipe(Recipe):
    """A recipe trained on its own rollouts (``jalign.rl``): rows of a prompt and the
    sampled tokens, laid out by its batch source."""

    def source_class(self):
        raise NotImplementedError

    def row_length(self, data) -> int:
        from jalign.rl.rollout import row_length
        return row_length(data, self.config)

    def batch_spec(self, models, rows: int, length: int) -> dict:
        return self.source_class().batch_spec(self.config, models, rows, length)
