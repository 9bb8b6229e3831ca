"""SFT loss: hand-checked values, chunked == full logits, masks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jalign.losses.sft import chunked_log_probs, sft_loss, token_log_probs
from jalign.models.build import create_model
from jalign.models.config import preset


def test_token_log_probs_by_hand():
    logits = jnp.array([[[0.0, math.log(3.0)], [2.0, 2.0]]])  # p = [1/4, 3/4], [1/2, 1/2]
    lp = token_log_probs(logits, jnp.array([[1, 0]]))
    np.testing.assert_allclose(np.asarray(lp), [[math.log(0.75), math.log(0.5)]], rtol=1e-6)


def test_sft_loss_matches_hand_computation():
    """Loss = -sum of log p(next token) over masked targets, from the model's own logits."""
    model = create_model(preset("tiny", vocab_size=64), seed=1)
    ids = jnp.array([[5, 9, 3, 7, 2], [4, 4, 8, 1, 0]], jnp.int32)
    mask = jnp.array([[0, 0, 1, 1, 1], [0, 1, 0, 1, 0]], jnp.int32)
    out = sft_loss(model, {"input_ids": ids, "loss_mask": mask})
    logits = np.asarray(model(ids), np.float64)
    expected = 0.0
    for b in range(2):
        for t in range(1, 5):
            if mask[b, t]:
                row = logits[b, t - 1]
                expected -= row[ids[b, t]] - np.log(np.exp(row - row.max()).sum()) - row.max()
    assert float(out.weight) == 5
    np.testing.assert_allclose(float(out.total), expected, rtol=1e-5)
    assert float(out.aux["nll"][1]) == 5


def test_chunked_equals_full_values_and_gradients():
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(37, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 50, 37), jnp.int32)

    def loss(h, w, chunk):
        return jnp.sum(chunked_log_probs(h, w, t, chunk) * jnp.arange(37))

    full, g_full = jax.value_and_grad(loss, argnums=(0, 1))(h, w, 1000)
    part, g_part = jax.value_and_grad(loss, argnums=(0, 1))(h, w, 8)  # 5 chunks, padded
    np.testing.assert_allclose(float(part), float(full), rtol=1e-6)
    for a, b in zip(g_part, g_full):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_sft_loss_chunking_does_not_change_the_model_loss():
    model = create_model(preset("tiny", vocab_size=64), seed=2)
    rng = np.random.default_rng(1)
    batch = {"input_ids": jnp.asarray(rng.integers(0, 64, (2, 24)), jnp.int32),
             "loss_mask": jnp.asarray(rng.integers(0, 2, (2, 24)), jnp.int32)}
    full = nnx.jit(lambda m: sft_loss(m, batch, chunk_tokens=4096))(model)
    chunked = nnx.jit(lambda m: sft_loss(m, batch, chunk_tokens=10))(model)
    np.testing.assert_allclose(float(chunked.total), float(full.total), rtol=1e-6)
