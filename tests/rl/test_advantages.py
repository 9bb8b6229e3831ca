"""GAE against a per-step Python loop; masked whitening; reward clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.rl.advantages import clip_scores, gae, masked_mean, masked_var, whiten
from tests.numerics import assert_f32_close


def gae_loop(rewards, values, mask, gamma, lam):
    """The recursion written out, row by row, over the unmasked positions (float64)."""
    adv = np.zeros_like(rewards, np.float64)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        next_v = next_a = 0.0
        for t in reversed(idx):
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            next_a = delta + gamma * lam * next_a
            next_v = values[b, t]
            adv[b, t] = next_a
    return adv, np.where(mask > 0, adv + values, 0.0)


def _random(seed=0, rows=5, length=12):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(rows, length))
    values = rng.normal(size=(rows, length))
    mask = np.zeros((rows, length), np.int32)
    for r in range(rows):  # responses of different lengths after prompts of different lengths
        start = int(rng.integers(0, 5))
        mask[r, start:start + int(rng.integers(1, length - start + 1))] = 1
    mask[-1] = 0  # a row without response tokens
    mask[0, 3] = 0 if mask[0].sum() > 4 else mask[0, 3]  # a gap inside a response
    return rewards, values, mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (1.0, 1.0)])
def test_gae_equals_the_per_step_loop(gamma, lam):
    rewards, values, mask = _random()
    want_adv, want_ret = gae_loop(rewards, values, mask, gamma, lam)
    with jax.enable_x64(True):  # the same arithmetic in float64: equal to 1e-6 and far below
        adv, ret = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask),
                       gamma=gamma, lam=lam)
        assert adv.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=0, atol=1e-12)
    adv, ret = gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                   jnp.asarray(mask), gamma=gamma, lam=lam)
    # float32: each advantage is a chain of at most 12 steps of 3 roundings each, over
    # terms whose magnitudes add up to at most the row's sum of |r| + 2 |V|.
    scale = float(np.max(np.sum((np.abs(rewards) + 2 * np.abs(values)) * mask, 1)))
    assert_f32_close(adv, want_adv, terms=3 * 12, scale=scale)
    assert_f32_close(ret, want_ret, terms=3 * 12 + 1, scale=scale)
    assert np.all(np.asarray(adv)[mask == 0] == 0)


def test_gae_by_hand():
    # One row, three response tokens after one prompt token; gamma 1, lam 1:
    # A_t = sum of rewards from t on - V_t (the value after the last token is 0).
    r = jnp.array([[9.0, 0.0, 0.0, 1.0]])
    v = jnp.array([[5.0, 0.5, 0.25, 0.75]])
    m = jnp.array([[0, 1, 1, 1]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    # 3 chained steps of 3 roundings over terms whose magnitudes add up to 1 + 2 * 1.5
    assert_f32_close(adv, [[0.0, 0.5, 0.75, 0.25]], terms=9, scale=4.0)
    assert_f32_close(ret, [[0.0, 1.0, 1.0, 1.0]], terms=10, scale=4.0)


def test_whitening_ignores_masked_tokens():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, (4, 9))
    mask = (rng.uniform(size=(4, 9)) > 0.4).astype(np.int32)
    w = np.asarray(whiten(jnp.asarray(x), jnp.asarray(mask)))
    on = mask > 0
    assert abs(w[on].mean()) < 1e-5 and abs(w[on].var(ddof=1) - 1) < 1e-4
    assert np.all(w[~on] == 0)
    # Changing masked entries changes nothing.
    x2 = np.where(on, x, 1e6)
    np.testing.assert_array_equal(np.asarray(whiten(jnp.asarray(x2), jnp.asarray(mask))), w)
    assert float(masked_mean(jnp.asarray(x2), mask)) == pytest.approx(x[on].mean(), rel=1e-5)
    assert float(masked_var(jnp.asarray(x2), mask)) == pytest.approx(x[on].var(ddof=1), rel=1e-4)
    kept = np.asarray(whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=False))
    assert kept[on].mean() == pytest.approx(x[on].mean(), rel=1e-5)


def test_clip_scores():
    np.testing.assert_array_equal(np.asarray(clip_scores([-5.0, 0.5, 7.0], 2.0)), [-2.0, 0.5, 2.0])
    np.testing.assert_array_equal(np.asarray(clip_scores([-5.0, 7.0], None)), [-5.0, 7.0])


def test_nan_at_masked_positions_stays_out():
    x = jnp.array([[1.0, jnp.nan, 3.0, jnp.inf]])
    mask = jnp.array([[1, 0, 1, 0]])
    w = np.asarray(whiten(x, mask))
    assert np.isfinite(w).all() and w[0, 1] == 0 and w[0, 3] == 0
    assert float(masked_mean(x, mask)) == 2.0
    adv, ret = gae(jnp.array([[0.0, jnp.nan, 1.0]]), jnp.array([[0.5, jnp.nan, 0.25]]),
                   jnp.array([[1, 0, 1]]), gamma=1.0, lam=1.0)
    assert_f32_close(adv, [[0.5, 0.0, 0.75]], terms=6, scale=2.0)
