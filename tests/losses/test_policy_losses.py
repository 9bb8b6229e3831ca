"""The GRPO family's policy losses and aggregations against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.losses import aggregation, policy

X = np.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]], np.float32)
MASK = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)  # row 3: no tokens


@pytest.mark.parametrize("name, total, weight", [
    ("token_mean", 10.0, 4.0), ("dapo", 10.0, 4.0),              # 10 / 4 tokens
    ("seq_mean_token_mean", 6.0, 2.0),                           # (6/3 + 4/1) / 2 sequences
    ("grpo", 6.0, 3.0),                                          # (6/3 + 4/1 + 0) / 3 rows
    ("seq_mean_token_sum", 10.0, 2.0),                           # (6 + 4) / 2 sequences
    ("bnpo", 2.5, 1.0),                                          # this batch's token mean
    ("dr_grpo", 2.5, 3.0),                                       # 10 / (3 rows x 4)
])
def test_aggregations_by_hand(name, total, weight):
    t, w = aggregation.aggregate(X, MASK, name, max_length=4)
    assert (float(t), float(w)) == pytest.approx((total, weight), rel=1e-6)
    assert aggregation.weight_name(name) in ("response_tokens", "sequences", "batches")


def test_masked_nans_do_not_reach_the_sum():
    x = np.where(MASK > 0, X, np.nan)
    for name in aggregation.AGGREGATIONS:
        t, w = aggregation.aggregate(x, MASK, name, max_length=4)
        assert np.isfinite(float(t)) and np.isfinite(float(w)), name


def test_token_mean_accumulates_to_the_full_batch_and_bnpo_does_not():
    """Σ total / Σ weight over micro-batches (how the train step accumulates): dapo's
    token mean is the full batch's; bnpo averages each micro-batch's token mean."""
    def accumulated(name):
        parts = [aggregation.aggregate(X[i:i + 1], MASK[i:i + 1], name, max_length=4)
                 for i in range(3)]
        return sum(float(t) for t, _ in parts) / sum(float(w) for _, w in parts)

    for name in ("dapo", "grpo", "seq_mean_token_sum", "dr_grpo"):
        t, w = aggregation.aggregate(X, MASK, name, max_length=4)
        assert accumulated(name) == pytest.approx(float(t) / float(w), rel=1e-6), name
    assert accumulated("bnpo") == pytest.approx((2.0 + 4.0 + 0.0) / 3)  # != 2.5


def test_dr_grpo_needs_the_completion_length_and_names_are_checked():
    with pytest.raises(ValueError, match="max_length"):
        aggregation.aggregate(X, MASK, "dr_grpo")
    with pytest.raises(ValueError, match="dapo"):
        aggregation.get("mean")
    with pytest.raises(ValueError, match="gspo"):
        policy.get("ppo2")


def _one_token(ratio, advantage):
    """logp, old_logp, advantages, mask of one token with the given ratio."""
    return (np.log(np.float32([[ratio]])), np.zeros((1, 1), np.float32),
            np.float32([[advantage]]), np.ones((1, 1), np.float32))


@pytest.mark.parametrize("ratio, advantage, dual, expected", [
    (1.5, 1.0, None, -1.2),    # above 1 + clip_high: the clipped term (-A * 1.2)
    (1.1, 1.0, None, -1.1),    # inside the clip range
    (0.5, -1.0, None, 0.8),    # below 1 - clip_low with A < 0: max(0.5, 0.8)
    (0.5, 1.0, None, -0.5),    # below with A > 0: unclipped (pessimistic) term
    (5.0, -1.0, 3.0, 3.0),     # dual clip: min(max(5, 1.2), 3)
])
def test_clip_by_hand(ratio, advantage, dual, expected):
    loss, metrics = policy.clip(*_one_token(ratio, advantage), clip_low=0.2, clip_high=0.2,
                                dual_clip=dual)
    assert float(loss[0, 0]) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["ratio"][0, 0]) == pytest.approx(ratio, rel=1e-6)


def test_clip_higher_separates_the_bounds():
    loss, _ = policy.clip(*_one_token(1.25, 1.0), clip_low=0.2, clip_high=0.28)
    assert float(loss[0, 0]) == pytest.approx(-1.25, rel=1e-6)  # inside (0.8, 1.28)


def test_gspo_uses_the_geometric_mean_ratio_of_the_sequence():
    """Token ratios 2 and 1: the sequence's ratio is sqrt(2) on both tokens; its gradient
    is the sequence ratio times the mean of the tokens' log-prob gradients."""
    old = np.zeros((1, 2), np.float32)
    logp = np.log(np.float32([[2.0, 1.0]]))
    a = np.ones((1, 2), np.float32)
    m = np.ones((1, 2), np.float32)
    loss, metrics = policy.gspo(logp, old, a, m, clip_low=0.5, clip_high=0.5)
    np.testing.assert_allclose(np.asarray(metrics["ratio"]), [[2 ** 0.5] * 2], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(loss), [[-(2 ** 0.5)] * 2], rtol=1e-6)

    def total(lp):
        per_token, _ = policy.gspo(lp, old, a, m, clip_low=0.5, clip_high=0.5)
        t, w = aggregation.aggregate(per_token, m, "grpo")
        return t / w
    grad = jax.grad(total)(jnp.asarray(logp))
    np.testing.assert_allclose(np.asarray(grad), [[-(2 ** 0.5) / 2] * 2], rtol=1e-6)
    # clipped: ratio sqrt(2) > 1 + 0.0004 -> no gradient, loss -A (1 + 0.0004)
    clipped, metrics = policy.gspo(logp, old, a, m)
    np.testing.assert_allclose(np.asarray(clipped), [[-1.0004] * 2], rtol=1e-6)
    assert float(jnp.sum(metrics["clip_fraction"])) == 2


def test_cispo_keeps_the_gradient_of_a_clipped_token():
    """ratio 2 capped at 1 + 0.5 as a constant weight: loss -1.5 A log pi, gradient -1.5 A
    (PPO's clip would give this token no gradient)."""
    logp, old, a, m = _one_token(2.0, 1.0)
    loss, metrics = policy.cispo(logp, old, a, m, clip_high=0.5)
    assert float(loss[0, 0]) == pytest.approx(-1.5 * np.log(2.0), rel=1e-6)
    assert float(metrics["clip_fraction"][0, 0]) == 1.0
    grad = jax.grad(lambda lp: jnp.sum(policy.cispo(lp, old, a, m, clip_high=0.5)[0]))(
        jnp.asarray(logp))
    assert float(grad[0, 0]) == pytest.approx(-1.5, rel=1e-6)
    ppo_grad = jax.grad(lambda lp: jnp.sum(policy.clip(lp, old, a, m)[0]))(jnp.asarray(logp))
    assert float(ppo_grad[0, 0]) == 0.0
