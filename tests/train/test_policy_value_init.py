"""PPO's policy-and-value model from its sources: the value model from the policy (its
backbone, a fresh head) or from a reward-model checkpoint, refused when that reward model
has another architecture; the frozen reference is the policy part."""

import jax
import numpy as np
import pytest

from jalign.checkpoint import save_model
from jalign.errors import ConfigError
from jalign.models.build import create_model
from jalign.models.config import preset
from jalign.models.heads import ScalarHeadModel
from jalign.train.setup import ModelInit, initial_policy, load_initial_model
from jalign.train.state import params_of

CONFIG = preset("tiny").replace(vocab_size=512, scan_layers=False)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_same(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):  # exact by construction: copies of the same arrays
        np.testing.assert_array_equal(x, y)


def test_value_model_from_the_policy_or_a_reward_model(tmp_path):
    policy = create_model(CONFIG, seed=1)
    save_model(tmp_path / "sft", CONFIG, policy)
    init = ModelInit(source=f"jalign:{tmp_path / 'sft'}")
    _, both = load_initial_model(init, CONFIG, None, model_kind="policy_value")
    _assert_same(params_of(both.policy), params_of(policy))
    _assert_same(params_of(initial_policy(both)), params_of(policy))
    backbone = params_of(both.value)["backbone"]
    _assert_same(backbone, {k: v for k, v in params_of(policy).items() if k != "lm_head"})

    reward = create_model(CONFIG, seed=2, model_cls=ScalarHeadModel)
    save_model(tmp_path / "rm", CONFIG, reward)
    _, both = load_initial_model(init, CONFIG, None, model_kind="policy_value",
                                 value_source=f"jalign:{tmp_path / 'rm'}")
    _assert_same(params_of(both.value), params_of(reward))
    _assert_same(params_of(both.policy), params_of(policy))

    other = CONFIG.replace(hidden_size=CONFIG.hidden_size * 2)
    save_model(tmp_path / "big_rm", other, create_model(other, seed=3, model_cls=ScalarHeadModel))
    with pytest.raises(ConfigError, match=r"value_init=.*big_rm.*hidden_size"):
        load_initial_model(init, CONFIG, None, model_kind="policy_value",
                           value_source=f"jalign:{tmp_path / 'big_rm'}")
