"""KL estimators, the KL-penalised rewards and the KL controllers, by hand."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from tests.numerics import TRANSCENDENTAL_TERMS, assert_f32_close

from jalign.rl.kl import (AdaptiveKLController, FixedKLController, kl_per_token,
                          penalized_rewards)


def test_estimators_by_hand():
    logp, ref = jnp.array([-1.0, -2.0, -0.5]), jnp.array([-1.5, -1.0, -0.5])
    x = np.array([0.5, -1.0, 0.0])
    # exact: differences and halved squares of these binary fractions are representable
    np.testing.assert_array_equal(np.asarray(kl_per_token(logp, ref, "k1")), x)
    np.testing.assert_array_equal(np.asarray(kl_per_token(logp, ref, "k2")), 0.5 * x ** 2)
    # k3: an expm1 and an addition of terms below 2 in magnitude
    assert_f32_close(kl_per_token(logp, ref, "k3"), np.exp(-x) - 1 + x,
                     terms=TRANSCENDENTAL_TERMS + 2, scale=4.0)
    with pytest.raises(ValueError, match="k4"):
        kl_per_token(logp, ref, "k4")


def test_penalized_rewards_put_the_score_on_the_last_response_token():
    logp = jnp.array([[-1.0, -1.0, -2.0, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = jnp.array([[-1.0, -1.5, -1.5, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    mask = jnp.array([[0, 1, 1, 0], [0, 0, 0, 0]])
    out = np.asarray(penalized_rewards(jnp.array([2.0, 5.0]), logp, ref, mask, coef=0.1))
    # row 0: kl = [., 0.5, -0.5, .]; the score 2 sits on position 2, the last response token
    # a product and a sum of terms adding to at most 2.05 per entry
    assert_f32_close(out[0], [0.0, -0.05, 2.0 + 0.05, 0.0], terms=3, scale=2.1)
    np.testing.assert_array_equal(out[1], 0.0)  # no response: no score, no penalty


def test_adaptive_controller_follows_the_formula():
    c = AdaptiveKLController(init_coef=0.2, target=6.0, horizon=10000)
    kls, steps = [3.0, 6.0, 9.0, 30.0, 0.0], [256, 256, 512, 256, 1024]
    want = 0.2
    for kl, n in zip(kls, steps):
        e = min(max(kl / 6.0 - 1, -0.2), 0.2)  # -0.2 (clipped at -0.5), 0, 0.2 (0.5), 0.2 (4), -0.2
        want *= 1 + e * n / 10000
        assert c.update(kl, n) == pytest.approx(want, rel=1e-12)
    # by hand: 0.2 (1 - 0.00512) (1) (1 + 0.01024) (1 + 0.00512) (1 - 0.02048)
    assert want == pytest.approx(0.2 * 0.99488 * 1.01024 * 1.00512 * 0.97952, rel=1e-12)
    state = c.get_state()
    d = AdaptiveKLController(0.5, 1.0, 1)
    d.set_state(state)
    assert d.value == c.value
    f = FixedKLController(0.05)
    assert f.update(100.0, 10) == 0.05 and f.value == 0.05
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, 0.0, 100)
    with pytest.raises(ValueError, match="init_coef > 0"):
        AdaptiveKLController(0.0, 6.0, 100)  # could never move
    before = c.value
    with pytest.raises(ValueError, match="KL is nan"):
        c.update(float("nan"), 10)
    assert c.value == before  # a NaN KL does not poison the coefficient
    assert math.isfinite(c.value)
