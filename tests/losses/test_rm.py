"""Reward head and Bradley-Terry loss: hand-checked values, last-token reading."""

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jalign.losses.rm import bradley_terry, rm_loss
from jalign.models.config import preset
from jalign.models.heads import ScalarHeadModel, last_token_index


def test_bradley_terry_by_hand():
    rc, rr = jnp.array([2.0, 0.0, -1.0]), jnp.array([1.0, 0.0, 1.0])
    expected = [math.log(1 + math.exp(-1.0)), math.log(2.0), math.log(1 + math.exp(2.0))]
    np.testing.assert_allclose(np.asarray(bradley_terry(rc, rr)), expected, rtol=1e-6)
    with_margin = bradley_terry(rc, rr, margin=jnp.array([1.0, 0.0, 0.0]))
    np.testing.assert_allclose(float(with_margin[0]), math.log(2.0), rtol=1e-6)
    centered = bradley_terry(rc, rr, center_coef=0.01)
    np.testing.assert_allclose(np.asarray(centered), np.array(expected) + 0.01 * np.array([9.0, 0.0, 0.0]),
                               rtol=1e-6)


def test_score_is_read_at_the_last_real_token():
    assert last_token_index(jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])).tolist() == [2, 0, 3]
    model = ScalarHeadModel(preset("tiny", vocab_size=64), rngs=nnx.Rngs(0))
    assert not hasattr(model.backbone, "lm_head")  # the backbone carries no unused LM head
    ids = jnp.array([[5, 6, 7, 0, 0], [5, 6, 7, 9, 9]], jnp.int32)
    seg = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], jnp.int32)
    s = model.sequence_scores(ids, seg)
    # Padding content after the last real token changes nothing.
    np.testing.assert_allclose(float(s[0]), float(s[1]), rtol=1e-6)
    per_position = model(ids[:1, :3])
    np.testing.assert_allclose(float(s[0]), float(per_position[0, 2]), rtol=1e-5)


def test_rm_loss_scores_pairs_in_one_forward():
    model = ScalarHeadModel(preset("tiny", vocab_size=64), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    c = jnp.asarray(rng.integers(1, 64, (3, 6)), jnp.int32)
    r = jnp.asarray(rng.integers(1, 64, (3, 6)), jnp.int32)
    seg = jnp.ones((3, 6), jnp.int32).at[0, 4:].set(0)
    out = rm_loss(model, {"chosen_input_ids": c, "rejected_input_ids": r,
                          "chosen_segment_ids": seg, "rejected_segment_ids": seg})
    rc = np.asarray(model.sequence_scores(c, seg))
    rr = np.asarray(model.sequence_scores(r, seg))
    expected = np.sum(np.logaddexp(0.0, -(rc - rr)))
    np.testing.assert_allclose(float(out.total), expected, rtol=1e-5)
    assert float(out.weight) == 3
    np.testing.assert_allclose(float(out.aux["accuracy"][0]), float(np.sum(rc > rr)))
