"""PPO losses by hand on small tensors: ratio clipping on both sides, dual clip, value
clipping, entropy, aggregation."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jalign.losses.ppo import (aggregate, entropy_from_logits, explained_variance,
                               policy_loss, value_loss)
from tests.numerics import TRANSCENDENTAL_TERMS, assert_f32_close

LOG = math.log
# Roundings per token before any sum: an exp (TRANSCENDENTAL_TERMS), a subtraction, a
# clip, two products and a max.
PER_TOKEN = TRANSCENDENTAL_TERMS + 5


def test_policy_loss_clips_both_sides():
    # Four tokens: ratios 1.5, 0.5, 1.1, 0.6 with advantages +1, +1, -2, -2; eps 0.2.
    ratio = np.array([[1.5, 0.5, 1.1, 0.6]])
    old = np.zeros((1, 4))
    adv = np.array([[1.0, 1.0, -2.0, -2.0]])
    mask = np.ones((1, 4))
    total, weight, m = policy_loss(jnp.log(ratio), old, adv, mask, clip_low=0.2, clip_high=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped high, A > 0: no gain past 1 + eps)
    # token 2: max(-0.5, -0.8) = -0.5 (unclipped: the loss keeps the worse, lower ratio)
    # token 3: ratio 1.1 is inside [0.8, 1.2]: both terms are 2 * 1.1 = 2.2
    # token 4: max(1.2, 1.6) = 1.6 (clipped low, A < 0: no gain below 1 - eps)
    want = [-1.2, -0.5, 2.2, 1.6]
    assert float(weight) == 4
    # float32: per token an exp, a clip and products (PER_TOKEN), then a 4-term sum.
    assert_f32_close(float(total), sum(want), terms=PER_TOKEN + 4, scale=sum(map(abs, want)))
    assert float(m["clip_fraction"][0]) == 2  # tokens 1 and 4
    kl = [0.5 * LOG(r) ** 2 for r in ratio[0]]
    assert_f32_close(float(m["approx_kl"][0]), sum(kl), terms=PER_TOKEN + 4, scale=sum(kl) + 1)
    # Asymmetric clipping (clip-higher): eps_high 0.6 lets token 1 keep its ratio 1.5.
    total, _, _ = policy_loss(jnp.log(ratio), old, adv, mask, clip_low=0.2, clip_high=0.6)
    assert_f32_close(float(total), -1.5 - 0.5 + 2.2 + 1.6, terms=PER_TOKEN + 4, scale=5.8)


def test_dual_clip_bounds_negative_advantage_tokens():
    ratio = np.array([[5.0, 5.0, 0.5]])
    adv = np.array([[-1.0, 1.0, -1.0]])
    mask = np.ones((1, 3))
    plain, _, _ = policy_loss(jnp.log(ratio), np.zeros((1, 3)), adv, mask)
    dual, _, _ = policy_loss(jnp.log(ratio), np.zeros((1, 3)), adv, mask, dual_clip=3.0)
    # token 1 (A < 0, ratio 5): max(5, 1.2) = 5, dual clip min(5, 3) = 3; token 2 (A > 0):
    # max(-5, -1.2) = -1.2 untouched; token 3: max(0.5, 0.8) = 0.8 < 3 untouched.
    assert_f32_close(float(plain), 5 - 1.2 + 0.8, terms=PER_TOKEN + 3, scale=7.0)
    assert_f32_close(float(dual), 3 - 1.2 + 0.8, terms=PER_TOKEN + 3, scale=7.0)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(jnp.log(ratio), np.zeros((1, 3)), adv, mask, dual_clip=0.5)


def test_value_loss_clipping_by_hand():
    v = np.array([[1.0, 0.0, 2.0]])
    v_old = np.array([[0.5, 0.5, 0.0]])
    r = np.array([[2.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 1]])
    total, weight, m = value_loss(v, v_old, r, mask, clip=0.2)
    # token 1: plain (1-2)^2 = 1; clipped v = 0.5 + 0.2 = 0.7: (0.7-2)^2 = 1.69 -> 1.69
    # token 2: plain 0; clipped 0.5 - 0.2 = 0.3: 0.09 -> 0.09
    # token 3: plain 4; clipped 0.2: 0.04 -> 4
    assert_f32_close(float(total), 0.5 * (1.69 + 0.09 + 4.0), terms=PER_TOKEN + 3, scale=6.0)
    assert float(weight) == 3 and float(m["value_clip_fraction"][0]) == 2
    total, _, _ = value_loss(v, v_old, r, mask, clip=None)
    assert_f32_close(float(total), 0.5 * (1 + 0 + 4), terms=PER_TOKEN + 3, scale=6.0)


def test_entropy_by_hand():
    logits = jnp.array([[0.0, 0.0], [0.0, LOG(3.0)]])  # p = (1/2, 1/2), (1/4, 3/4)
    h = np.asarray(entropy_from_logits(logits))
    want = [LOG(2.0), -(0.25 * LOG(0.25) + 0.75 * LOG(0.75))]
    assert_f32_close(h, want, terms=2 * TRANSCENDENTAL_TERMS + 4, scale=2.0)


def test_aggregations_by_hand():
    x = np.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    t, w = aggregate(x, mask, "token_mean")
    assert (float(t), float(w)) == (10.0, 4.0)  # exact: small integers
    t, w = aggregate(x, mask, "seq_mean_token_mean")
    assert float(w) == 2.0
    assert_f32_close(float(t), 2.0 + 4.0, terms=8, scale=6.0)  # divisions, then a sum
    t, w = aggregate(x, mask, "seq_mean_token_sum")
    assert (float(t), float(w)) == (10.0, 2.0)  # (6 + 4) / 2 sequences
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(x, mask, "mean")


def test_explained_variance():
    r = jnp.array([[1.0, 2.0, 3.0, 99.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    assert float(explained_variance(r, r, mask)) == 1.0  # exact: residuals are exactly 0
    # predicting the mean explains nothing
    assert_f32_close(float(explained_variance(jnp.full((1, 4), 2.0), r, mask)), 0.0, terms=12,
                     scale=2.0)  # 1 - var/var: variances of 3 small integers
    assert float(explained_variance(r, jnp.ones((1, 4)), mask)) == 0.0  # constant returns


def test_masked_positions_cannot_poison_the_losses():
    """NaN or inf at masked positions (sentinels, padding) stay out of values and gradients."""
    import jax
    mask = np.array([[1, 1, 0]])
    old = np.array([[-1.0, -2.0, -1e4]])
    adv = np.array([[0.5, -1.0, np.nan]])

    def loss(logp):
        t, w, _ = policy_loss(logp, old, adv, mask, dual_clip=3.0)
        return t / w

    logp = jnp.array([[-1.1, -1.9, 0.0]])
    value, grad = jax.value_and_grad(loss)(logp)
    assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()
    assert float(np.asarray(grad)[0, 2]) == 0.0
    t, w, _ = value_loss(np.array([[1.0, 2.0, np.inf]]), np.array([[1.0, 2.0, np.nan]]),
                         np.array([[0.0, 0.0, np.nan]]), mask)
    assert float(t) == 0.5 * (1 + 4) and float(w) == 2  # exact: squares of small integers
    assert np.isfinite(float(explained_variance(np.array([[1.0, 2.0, np.nan]]),
                                                np.array([[1.5, 2.5, np.nan]]), mask)))
    h = np.asarray(entropy_from_logits(jnp.array([[0.0, 0.0, -jnp.inf]])))
    # a filtered token adds nothing
    assert_f32_close(h, [LOG(2.0)], terms=2 * TRANSCENDENTAL_TERMS + 4, scale=2.0)


def test_kl_loss_term_by_hand_and_its_gradient():
    import jax

    from jalign.losses.ppo import kl_loss
    logp = jnp.array([[-1.0, -2.0, 0.0]])
    ref = jnp.array([[-1.5, -1.0, jnp.nan]])  # masked position: a NaN stays out
    mask = jnp.array([[1, 1, 0]])
    x = np.array([0.5, -1.0])
    t, w = kl_loss(logp, ref, mask, kind="k3")
    assert float(w) == 2
    assert_f32_close(float(t), float(np.sum(np.exp(-x) - 1 + x)), terms=PER_TOKEN + 2, scale=3.0)
    # d k3 / d logp = 1 - exp(-x): pushes the policy back toward the reference
    g = np.asarray(jax.grad(lambda lp: kl_loss(lp, ref, mask, kind="k3")[0])(logp))
    assert_f32_close(g[0, :2], 1 - np.exp(-x), terms=PER_TOKEN, scale=3.0)
    assert g[0, 2] == 0
