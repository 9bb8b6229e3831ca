"""Reward head and Bradley-Terry loss: hand-checked values, last-token reading."""

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jalign.losses.rm import bradley_terry, rm_loss
from jalign.models.config import preset
from jalign.models.heads import ScalarHeadModel, last_token_index
from tests.numerics import (TRANSCENDENTAL_TERMS, assert_f32_close, f32_tolerance,
                            llama_logits_bound)


def test_bradley_terry_by_hand():
    rc, rr = jnp.array([2.0, 0.0, -1.0]), jnp.array([1.0, 0.0, 1.0])
    expected = [math.log(1 + math.exp(-1.0)), math.log(2.0), math.log(1 + math.exp(2.0))]
    # Exact inputs; a difference then softplus = max(x, 0) + log1p(exp(-|x|)) (an exp and a
    # log) against exact values: terms of magnitude |r_c - r_r| + log 2 at most.
    diff = np.abs(np.asarray(rc) - np.asarray(rr))
    softplus = dict(terms=3 + 2 * TRANSCENDENTAL_TERMS, scale=float(np.max(diff) + math.log(2.0)))
    assert_f32_close(bradley_terry(rc, rr), expected, **softplus)
    with_margin = bradley_terry(rc, rr, margin=jnp.array([1.0, 0.0, 0.0]))
    assert_f32_close(float(with_margin[0]), math.log(2.0), **softplus)  # 2 - 1 - 1 = 0 exactly
    centered = bradley_terry(rc, rr, center_coef=0.01)
    # Plus 0.01 (r_c + r_r)^2: a sum, a square and a product (0.01 is inexact in float32).
    center = 0.01 * (np.abs(np.asarray(rc)) + np.abs(np.asarray(rr))) ** 2
    assert_f32_close(centered, np.array(expected) + 0.01 * np.array([9.0, 0.0, 0.0]),
                     terms=softplus["terms"] + 3,
                     scale=float(np.max(diff + math.log(2.0) + center)))


def test_score_is_read_at_the_last_real_token():
    assert last_token_index(jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])).tolist() == [2, 0, 3]
    model = ScalarHeadModel(preset("tiny", vocab_size=64), rngs=nnx.Rngs(0))
    assert not hasattr(model.backbone, "lm_head")  # the backbone carries no unused LM head
    ids = jnp.array([[5, 6, 7, 0, 0], [5, 6, 7, 9, 9]], jnp.int32)
    seg = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], jnp.int32)
    s = model.sequence_scores(ids, seg)
    # Padding content after the last real token changes nothing. Rows of one batch need not
    # round alike (a matmul's edge rows may take other kernels), so: the tiny model's score
    # chain over 5 tokens, on its scale from the weights (see llama_logits_bound).
    bound = llama_logits_bound(model, 5)
    assert_f32_close(float(s[0]), float(s[1]), **bound)
    per_position = model(ids[:1, :3])
    assert_f32_close(float(s[0]), float(per_position[0, 2]), **bound)  # another program


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
    # rm_loss scores the 6 rows in one forward, sequence_scores 3 at a time: each score is
    # within the score chain's bound; softplus(-(r_c - r_r)) has slope <= 1, so a pair's loss
    # moves by at most 2 score errors, plus its own rounding (|r_c - r_r| + log 2), and the
    # 3 pairs are summed.
    score = llama_logits_bound(model, 6)
    assert_f32_close(float(out.total), expected,
                     terms=max(score["terms"], 3 + 2 * TRANSCENDENTAL_TERMS),
                     depth=score["depth"] + 2,
                     scale=float(np.sum(2 * score["scale"] + np.abs(rc - rr) + np.log(2.0))))
    assert float(out.weight) == 3  # exact by construction: float32(3), the pair count
    # An integer count, exact once every pair's margin is beyond the two programs' score
    # differences, so both decide each r_c > r_r alike.
    assert np.abs(rc - rr).min() > 2 * f32_tolerance(**score)
    assert float(out.aux["accuracy"][0]) == float(np.sum(rc > rr))
