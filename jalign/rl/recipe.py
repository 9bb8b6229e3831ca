"""``RolloutRecipe``: a recipe trained on its own rollouts (PPO, the GRPO family)."""

from __future__ import annotations

import types

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

    def planned_programs(self, models, configs, mesh, rules, state) -> dict:
        """The rollout's sampler and scoring pass, built by its source as a run builds
        them, without prompts, rewards or eval data (the stated EOS/pad ids are traced
        numbers; one EOS id stands for the template's)."""
        from jalign.train.source import SourceContext
        prompts = types.SimpleNamespace(config=configs.data,
                                        chat=types.SimpleNamespace(eos_id=0, pad_id=0))
        ctx = SourceContext(mesh=mesh, rules=rules, seed=configs.train.seed, models=models,
                            initial=None, initial_key=None, run_dir=None,
                            accum_steps=configs.train.accum_steps)
        source = self.source_class()(prompts, self.config, ctx, connect=False)
        return source.planned_programs(state)

    def memory_knobs(self, program: str = "train step") -> list[str]:
        owner = type(self.config).__name__
        if program == "sampler":
            out = ([f"{owner}.rollout_sharding='train' (the sampler's weights stay sharded "
                    "as in training instead of a whole copy per chip)"]
                   if self.config.rollout_sharding == "replicated" else [])
            return out + [f"a smaller {owner}.max_new_tokens or DataConfig.batch_size (the KV "
                          "cache holds prompts x completions x their tokens)"]
        if program == "scoring pass":
            return [f"a smaller {owner}.chunk_tokens (the logits held at once) or "
                    "DataConfig.batch_size (the rows scored in one pass)"]
        return []
