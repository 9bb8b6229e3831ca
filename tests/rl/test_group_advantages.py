"""Sequence-level advantage estimators (the GRPO family) against hand-computed vectors."""

import functools

import jax
import numpy as np
import pytest

from jalign.rl import advantages
from tests.numerics import assert_f32_close

R6 = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def _check(name, rewards, expected, **options):
    """The estimator, eager and jitted, equals ``expected`` within float32 rounding of a
    few operations on values of the rewards' size."""
    fn = advantages.get(name)
    for f in (fn, jax.jit(functools.partial(fn, **options))):
        got = np.asarray(f(np.asarray(rewards, np.float32), **({} if f is not fn else options)))
        assert got.shape == (len(rewards),)
        assert np.isfinite(got).all()
        assert_f32_close(got, expected, terms=len(rewards), scale=float(np.max(np.abs(rewards))),
                         depth=4, err_msg=name)


def test_rloo_leaves_each_completion_out_of_its_baseline():
    _check("rloo", R6, [-1.5, 0.0, 1.5, -1.5, 0.0, 1.5], group_size=3)
    # G = 2: each one's baseline is the other
    _check("rloo", [1.0, 0.0, 2.0, 5.0], [1.0, -1.0, -3.0, 3.0], group_size=2)


def test_grpo_divides_by_the_groups_unbiased_std_plus_eps():
    # group [1, 2, 3]: mean 2, unbiased std 1; group [4, 4, 4]: all equal -> 0, not NaN
    _check("grpo", [1.0, 2.0, 3.0, 4.0, 4.0, 4.0],
           [-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0], group_size=3)
    # group [0, 4]: mean 2, unbiased std sqrt(8) (population std would be 2)
    _check("grpo", [0.0, 4.0], [-2 / (8 ** 0.5 + 1e-4), 2 / (8 ** 0.5 + 1e-4)], group_size=2)


def test_grpo_batch_scale_and_no_scale():
    # [0, 1, 0, 1]: centred by group ±0.5; the batch's unbiased std is sqrt(1/3)
    s = (1 / 3) ** 0.5 + 1e-4
    _check("grpo", [0.0, 1.0, 0.0, 1.0], [-0.5 / s, 0.5 / s, -0.5 / s, 0.5 / s],
           group_size=2, scale="batch")
    _check("grpo", R6, [-1.0, 0.0, 1.0, -1.0, 0.0, 1.0], group_size=3, scale="none")
    _check("grpo", [3.0, 3.0, 7.0, 7.0], [0.0] * 4, group_size=2, scale="batch")


def test_reinforce_pp_whitens_over_the_batch():
    # group baseline: [-1, 0, 1, 0, 0, 0], mean 0, population std sqrt(2/6)
    s = (2 / 6) ** 0.5 + 1e-8
    _check("reinforce_pp", [1.0, 2.0, 3.0, 4.0, 4.0, 4.0],
           [-1 / s, 0.0, 1 / s, 0.0, 0.0, 0.0], group_size=3)
    # global baseline: r - 3 = [-2, -1, 0, 3], population std sqrt(14/4)
    s = 3.5 ** 0.5 + 1e-8
    _check("reinforce_pp", [1.0, 2.0, 3.0, 6.0], [-2 / s, -1 / s, 0.0, 3 / s],
           group_size=2, baseline="global")


@pytest.mark.parametrize("name", sorted(advantages.ESTIMATORS))
def test_equal_rewards_give_zero_advantages(name):
    _check(name, [0.5] * 6, [0.0] * 6, group_size=3)


@pytest.mark.parametrize("name, group_size, options, match", [
    ("grpo", 4, {}, "group_size=4"),             # 6 rewards are not groups of 4
    ("grpo", 1, {}, "at least 2"),               # one completion has no std
    ("rloo", 1, {}, "at least 2"),
    ("grpo", 3, {"scale": "token"}, "one of"),
    ("reinforce_pp", 3, {"baseline": "none"}, "one of"),
])
def test_bad_options_are_named(name, group_size, options, match):
    with pytest.raises(ValueError, match=match):
        advantages.get(name)(np.asarray(R6, np.float32), group_size=group_size, **options)


def test_an_unknown_estimator_lists_the_known_ones():
    with pytest.raises(ValueError, match="rloo"):
        advantages.get("gae2")
