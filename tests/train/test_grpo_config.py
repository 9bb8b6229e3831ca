"""GRPOConfig refuses settings that cannot train, naming the binding."""

import pytest

from jalign.algos.grpo import GRPOConfig, roles


@pytest.mark.parametrize("overrides, match", [
    ({"group_size": 1}, "group_size=1"),                                   # grpo: group mean
    ({"group_size": 1, "scale_rewards": "none"}, "group_size=1"),          # still the group's mean
    ({"group_size": 1, "advantage": "reinforce_pp"}, "group_size=1"),      # baseline 'group'
    ({"advantage": "gae"}, "GRPOConfig.advantage='gae'"),
    ({"policy_loss": "ppo"}, "GRPOConfig.policy_loss='ppo'"),
    ({"aggregation": "mean"}, "GRPOConfig.aggregation='mean'"),
    ({"kl_in": "both"}, "GRPOConfig.kl_in='both'"),
    ({"beta": -0.1}, "GRPOConfig.beta"),
    ({"dual_clip": 1.0}, "GRPOConfig.dual_clip"),
    ({"overlong_buffer": 64}, "GRPOConfig.overlong_buffer=64"),            # = max_new_tokens
    ({"tis_cap": 0.0}, "GRPOConfig.tis_cap"),
    ({"sampler_draw": "multinomial"}, "GRPOConfig.sampler_draw='multinomial'"),
])
def test_bad_settings_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**overrides)


def test_one_completion_per_prompt_with_a_global_baseline_is_allowed():
    GRPOConfig(group_size=1, advantage="reinforce_pp", baseline="global")


def test_a_reference_model_only_with_a_kl():
    assert [r.name for r in roles(GRPOConfig())] == ["policy"]
    assert [r.name for r in roles(GRPOConfig(beta=0.04))] == ["policy", "reference"]


def test_a_shared_prompt_needs_whole_groups_in_every_micro_batch():
    """8 completions of 6 prompts divide into 4 micro-batches of rows (12 each), but 6
    prompts do not: with share_prompt that is refused at start, naming the bindings; row
    by row it trains."""
    import types

    from jalign.algos.grpo import recipe
    from jalign.data.pipeline import DataConfig
    from jalign.errors import ConfigError
    from jalign.train.train_config import TrainConfig

    def configs(**grpo):
        return types.SimpleNamespace(train=TrainConfig(steps=4, save_every=4, accum_steps=2),
                                     data=DataConfig(batch_size=6),
                                     grpo=GRPOConfig(minibatches=2, **grpo))

    c = configs()
    with pytest.raises(ConfigError, match=r"batch_size=6 prompts must divide into "
                       r"GRPOConfig.minibatches=2 × TrainConfig.accum_steps=2"):
        recipe(c.grpo).check(c)
    c = configs(share_prompt=False)
    recipe(c.grpo).check(c)
