"""The reward registry: the task checker, length and format rewards, the reward-model
scorer at the last token, and weighted combination."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.numerics import assert_f32_close, llama_logits_bound

from jalign.models.config import preset
from jalign.rl.rewards import (REWARDS, RewardConfig, RewardModelScorer, combined_rewards,
                               format_reward, length_penalty, task_reward)

PROMPTS = ["What is 12 + 30?", "Compute 7 + 8.", "999 + 1 = ?"]
COMPLETIONS = ["42", "16", "1000 and more"]


def test_task_reward_checks_the_answer():
    got = task_reward(PROMPTS, COMPLETIONS, [2, 2, 4], RewardConfig())
    np.testing.assert_array_equal(got, [1.0, 0.0, 0.0])  # 7 + 8 is 15; the third says more


def test_length_and_format():
    cfg = RewardConfig(names=("length",), weights=(1.0,), length_coef=0.5, length_target=2)
    np.testing.assert_array_equal(length_penalty(PROMPTS, COMPLETIONS, [1, 2, 5], cfg),
                                  [0.0, 0.0, -1.5])
    np.testing.assert_array_equal(format_reward(PROMPTS, COMPLETIONS, [2, 2, 4], RewardConfig()),
                                  [1.0, 1.0, 0.0])


def test_weighted_combination_reports_each_part():
    cfg = RewardConfig(names=("task", "format", "length"), weights=(1.0, 0.5, 2.0),
                       length_coef=0.1, length_target=2)
    total, parts = combined_rewards(cfg, PROMPTS, COMPLETIONS, [2, 3, 4])
    # three weighted terms of magnitude <= 1 per row
    assert_f32_close(total, [1.0 + 0.5, 0.5 - 0.2, -0.4], terms=6, scale=2.0)
    assert set(parts) == {"task", "format", "length"}


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="RewardConfig.weights"):
        RewardConfig(names=("task", "format"), weights=(1.0,))
    with pytest.raises(ValueError, match="unknown reward 'speed'.*'task'"):
        RewardConfig(names=("speed",))
    with pytest.raises(ValueError, match="RewardConfig.reward_model"):
        RewardConfig(names=("reward_model",))
    with pytest.raises(ValueError, match="RewardConfig.format_regex"):
        RewardConfig(format_regex="(")
    assert set(REWARDS) == {"task", "length", "format"}


def test_reward_model_scores_at_the_last_real_token():
    from jalign.models.heads import ScalarHeadModel
    from flax import nnx
    model = ScalarHeadModel(preset("tiny", vocab_size=64), rngs=nnx.Rngs(0))
    ids = jnp.array([[1, 5, 9, 3, 0, 0], [1, 4, 4, 8, 2, 7]], jnp.int32)
    seg = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
    scores = RewardModelScorer(model)(ids, seg)
    per_position = np.asarray(model(ids, segment_ids=seg))
    # The scorer's program picks one position where the model's scores all: the same
    # function, but compiled apart, so equal up to the forward's float32 bound.
    assert_f32_close(scores, [per_position[0, 3], per_position[1, 5]],
                     **llama_logits_bound(model, ids.shape[1]))
    cfg = RewardConfig(names=("reward_model", "task"), weights=(0.5, 1.0),
                       reward_model="jalign:unused")
    total, parts = combined_rewards(cfg, PROMPTS[:2], COMPLETIONS[:2], [2, 2], tokens=(ids, seg),
                                    scorer=RewardModelScorer(model))
    assert_f32_close(total, 0.5 * scores + np.array([1.0, 0.0]), terms=4,
                     scale=float(np.abs(scores).max()) + 1.0)
    with pytest.raises(ValueError, match="scorer"):
        combined_rewards(cfg, PROMPTS[:2], COMPLETIONS[:2], [2, 2])


def test_reward_model_loads_from_a_jalign_checkpoint(tmp_path):
    from flax import nnx

    from jalign.checkpoint import save_model
    from jalign.models.heads import ScalarHeadModel
    config = preset("tiny", vocab_size=64)
    model = ScalarHeadModel(config, rngs=nnx.Rngs(3))
    save_model(tmp_path / "rm", config, model)
    ids = jnp.array([[1, 5, 9, 3]], jnp.int32)
    seg = jnp.ones_like(ids)
    loaded = RewardModelScorer.load(f"jalign:{tmp_path / 'rm'}")
    # exact by construction: the same parameters, restored
    np.testing.assert_array_equal(loaded(ids, seg), RewardModelScorer(model)(ids, seg))
    with pytest.raises(ValueError, match="jalign:DIR"):
        RewardModelScorer.load("somewhere")
