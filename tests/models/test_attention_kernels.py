"""The fused attention kernels against the XLA path: outputs and gradients on packed,
padded, grouped-query batches (the TPU's splash kernel in Pallas interpret mode here)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jalign.models.attention import SelfMask, attention
from jalign.models.build import create_model
from jalign.models.config import preset
from jalign.sharding import MeshConfig, make_mesh, use_mesh
from tests.numerics import TRANSCENDENTAL_TERMS, assert_f32_close


def _batch(t: int, seed: int = 0):
    """Two rows of 4 q heads over 2 kv heads (head_dim 64): row 0 packs three segments and
    ends in padding (segment 0), row 1 is one sequence."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(2, t, n, 64)), jnp.float32) for n in (4, 2, 2))
    a, b = t // 3, t // 2
    seg = np.ones((2, t), np.int32)
    seg[0, a:b], seg[0, b:t - 7], seg[0, t - 7:] = 2, 3, 0
    return q, k, v, jnp.asarray(seg)


def _bound(t: int, scale: float) -> dict:
    # A 64-term q.k dot, a softmax over at most t keys (a max, t exps, a sum), then a t-term
    # probs.v sum; the backward chains as many again. Values are O(scale).
    return dict(terms=t + 64 + 2 * TRANSCENDENTAL_TERMS, depth=6, scale=scale)


@pytest.mark.parametrize("impl", ["splash", "blockwise"])
@pytest.mark.parametrize("t,window", [(64, None), (200, None), (200, 24)])
def test_kernel_equals_xla_outputs_and_gradients(t, window, impl):
    q, k, v, seg = _batch(t)
    mask = SelfMask(seg, window)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, t, 4, 64)), jnp.float32)

    def run(impl):
        def f(q, k, v):
            out = attention(q, k, v, mask, impl=impl)
            return jnp.sum(out * weights), out
        (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    out_x, g_x = run("xla")
    out_s, g_s = run(impl)
    scale = float(np.max(np.abs(np.asarray(v)))) * float(np.max(np.abs(np.asarray(weights))))
    assert_f32_close(out_s, out_x, **_bound(t, float(np.max(np.abs(np.asarray(v))))))
    for name, a, b in zip("qkv", g_s, g_x):
        assert_f32_close(a, b, **_bound(t, scale * 64), err_msg=f"d/d{name}")


def test_a_dense_mask_runs_on_xla_whatever_the_impl():
    """A KV cache's or a shared prompt's mask is not self-attention over 0..T-1: splash
    takes only a SelfMask, and a dense mask with impl='splash' is the XLA path's result."""
    q, k, v, seg = _batch(64)
    dense = SelfMask(seg).dense()
    np.testing.assert_array_equal(np.asarray(attention(q, k, v, dense, impl="splash")),
                                  np.asarray(attention(q, k, v, dense, impl="xla")))


@pytest.mark.parametrize("impl", ["splash", "blockwise"])
def test_a_sharded_model_with_a_kernel_equals_xla(impl):
    """The kernel runs per shard (shard_map: rows over fsdp) inside a jitted, sharded
    model: logits and gradients equal the XLA path's."""
    config = preset("tiny", vocab_size=64, max_position_embeddings=128)
    mesh = make_mesh(MeshConfig(1, 8, 1), jax.devices()[:8])
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(0, 64, (8, 40)), jnp.int32)
    seg = np.ones((8, 40), np.int32)
    seg[::2, 25:] = 2
    seg = jnp.asarray(seg)

    def run(impl):
        model = create_model(config.replace(attention_impl=impl), seed=3)

        @nnx.jit
        def f(model):
            def loss(model):
                with use_mesh(mesh):
                    logits = model(ids, segment_ids=seg)
                return jnp.sum(jax.nn.log_softmax(logits)[..., 0]), logits
            (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
            return logits, nnx.to_pure_dict(nnx.state(grads))
        return f(model)

    logits_x, g_x = run("xla")
    logits_s, g_s = run(impl)
    # the tiny model's chain: 2 layers of reductions over <= 40 keys and 64-wide dots
    assert_f32_close(logits_s, logits_x, terms=64 + 40 + 2 * TRANSCENDENTAL_TERMS, depth=24)
    for path, a in jax.tree_util.tree_leaves_with_path(g_s):
        b = g_x
        for key in path:
            b = b[key.key]
        assert_f32_close(a, b, terms=8 * 40 + 64 + 2 * TRANSCENDENTAL_TERMS, depth=30,
                         scale=float(np.max(np.abs(np.asarray(b)))) + 1e-6,
                         err_msg=jax.tree_util.keystr(path))
