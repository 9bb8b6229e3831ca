"""The sampler's token draws (jalign.rl.draws): ``inverse_cdf`` draws from the softmax
distribution (frequencies of many draws within 5 binomial standard deviations of the
probabilities), never an entry of probability 0, whatever the rounding, and on any
vocabulary size; the name is checked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.rl import draws

DRAWS = 40_000


def _frequencies(name, logits, n=DRAWS):
    keys = jax.random.split(jax.random.key(11), n)
    tokens = jax.jit(jax.vmap(lambda k: draws.get(name)(logits[None], k)[0]))(keys)
    return np.bincount(np.asarray(tokens), minlength=logits.shape[0]) / n


@pytest.mark.parametrize("name", sorted(draws.DRAWS))
@pytest.mark.parametrize("vocab", [384, 100])  # three blocks of 128; one block of 100
def test_frequencies_follow_the_softmax(name, vocab):
    logits = jax.random.normal(jax.random.key(vocab), (vocab,), jnp.float32) * 2.0
    logits = logits.at[vocab // 3].set(-jnp.inf).at[vocab - 1].set(-jnp.inf)  # filtered out
    p = np.asarray(jax.nn.softmax(logits), np.float64)
    f = _frequencies(name, logits)
    sigma = np.sqrt(p * (1 - p) / DRAWS)
    assert np.all(np.abs(f - p) <= 5 * sigma + 1.5 / DRAWS), np.max(np.abs(f - p) / (sigma + 1e-12))
    assert f[vocab // 3] == 0 and f[vocab - 1] == 0


def test_rounding_never_picks_a_zero_weight_entry():
    """u at or past the last cumulative sum (float32 rounding of u · total, or sums taken
    in another order) lands on the last entry of positive weight, not a filtered one."""
    weights = jnp.asarray([[0.5, 0.0, 0.25, 0.0]], jnp.float32)
    cum = jnp.cumsum(weights, axis=-1)
    for u in (0.75, 0.76):
        assert int(draws._first_above(cum, jnp.asarray([u]), weights)[0]) == 2
    assert int(draws._first_above(cum, jnp.asarray([0.1]), weights)[0]) == 0
    assert int(draws._first_above(cum, jnp.asarray([0.5]), weights)[0]) == 2
    # a tree-summed cumsum: the zero-weight entry's sum one rounding above its
    # predecessor's, the last sum below the one before it
    rounded = jnp.asarray([[0.5, 0.50000006, 0.75, 0.74999994]], jnp.float32)
    assert int(draws._first_above(rounded, jnp.asarray([0.5]), weights)[0]) == 2
    assert int(draws._first_above(rounded, jnp.asarray([0.749999]), weights)[0]) == 2


def test_a_row_of_one_token():
    logits = jnp.full((2, 256), -jnp.inf).at[0, 7].set(0.0).at[1, 200].set(3.0)
    assert draws.inverse_cdf(logits, jax.random.key(0)).tolist() == [7, 200]


def test_unknown_draw_is_named():
    with pytest.raises(ValueError, match="unknown token draw 'multinomial'"):
        draws.get("multinomial")
