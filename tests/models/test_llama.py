"""Invariances of the Llama forward: scanned == unscanned, packed == unpacked,
sharded == single device, remat and attention backends change nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jalign.models.build import create_model, forward
from jalign.models.config import LlamaConfig, preset
from jalign.models.llama import positions_from_segments
from jalign.sharding import MeshConfig, logical_to_spec, make_mesh, use_mesh
from tests.numerics import (abs_sum, assert_f32_close, f32_tolerance, llama_grad_bound,
                            llama_logits_bound, llama_logp_bound)

CONFIG = preset("tiny", vocab_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16})


@pytest.fixture(scope="module")
def model():
    return create_model(CONFIG, seed=3)


def _ids(shape, seed=0, vocab=CONFIG.vocab_size):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _with_config(model, **changes):
    """Same parameters, different execution config."""
    other = create_model(model.config.replace(**changes))
    nnx.update(other, nnx.state(model))
    return other


def test_scanned_equals_unscanned(model):
    ids = _ids((2, 24))
    scanned = np.asarray(forward(model, ids))
    unscanned = np.asarray(forward(_with_config(model, scan_layers=False), ids))
    # Two programs for one forward: the logits chain of 3 layers over 24 tokens.
    assert_f32_close(unscanned, scanned, **llama_logits_bound(model, 24))


REMAT_IDS = _ids((2, 16))


def _remat_loss(m):
    return jnp.mean(jax.nn.log_softmax(m(REMAT_IDS))[..., 0])


@pytest.fixture(scope="module")
def remat_grad_scales(model):
    """Per parameter: sum over the loss's 32 terms (log p of token 0 at each position) of
    |d term / d param| / 32, the magnitude of what the mean's gradient sums."""
    graphdef, state = nnx.split(model)

    def term(state, b, t):
        return jax.nn.log_softmax(nnx.merge(graphdef, state)(REMAT_IDS))[b, t, 0]

    b, t = np.divmod(np.arange(32), 16)
    per_term = jax.jit(jax.vmap(jax.grad(term), in_axes=(None, 0, 0)))(state, b, t)
    return [abs_sum(x) / 32 for x in jax.tree.leaves(per_term)]


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
@pytest.mark.parametrize("scan", [True, False])
def test_remat_changes_neither_values_nor_gradients(model, remat_grad_scales, policy, scan):
    base = _with_config(model, scan_layers=scan)
    remat = _with_config(model, scan_layers=scan, remat_policy=policy)
    l0, g0 = nnx.jit(nnx.value_and_grad(_remat_loss))(base)
    l1, g1 = nnx.jit(nnx.value_and_grad(_remat_loss))(remat)
    # Recomputing in the backward pass may fuse differently: the mean of 32 log-probs (one
    # token's bound), and each gradient on the scale of its per-term gradients.
    assert_f32_close(float(l1), float(l0), **llama_logp_bound(model, 16, tokens=32, mean=True))
    leaves0, leaves1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
    assert len(leaves0) == len(leaves1) == len(remat_grad_scales)
    for a, b, scale in zip(leaves0, leaves1, remat_grad_scales):
        assert_f32_close(b, a, **llama_grad_bound(model, 16, 32, scale))


def test_packed_equals_each_sequence_alone(model):
    a, b = _ids((1, 11), seed=1), _ids((1, 15), seed=2)
    pad = 6
    packed = np.concatenate([a, b, np.zeros((1, pad), np.int32)], axis=1)
    segments = np.array([[1] * 11 + [2] * 15 + [0] * pad], np.int32)
    positions = np.array([list(range(11)) + list(range(15)) + [0] * pad], np.int32)
    out = np.asarray(forward(model, packed, positions, segments))
    alone_a = np.asarray(forward(model, a))
    alone_b = np.asarray(forward(model, b))
    # The packed row's softmax runs over 32 keys (the masked ones add exact zeros).
    bound = llama_logits_bound(model, 32)
    assert_f32_close(out[:, :11], alone_a, **bound)
    assert_f32_close(out[:, 11:26], alone_b, **bound)
    # Positions default to restarting per segment (computed inside the program instead).
    out_default = np.asarray(forward(model, packed, None, segments))
    assert_f32_close(out_default[:, :26], out[:, :26], **bound)
    assert np.isfinite(out).all()
    # Without segment ids the second sequence would see the first: the test can fail, by
    # far more than the bound.
    unsegmented = np.asarray(forward(model, packed, positions, None))
    assert np.abs(unsegmented[:, 11:26] - alone_b).max() > 2 * f32_tolerance(**bound)


def test_positions_from_segments():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]])
    np.testing.assert_array_equal(positions_from_segments(seg),  # integers
                                  [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])


def test_inputs_embeds_equals_input_ids(model):
    ids = _ids((2, 12))
    from_ids = model(jnp.asarray(ids))
    embeds = model.embedding_table()[ids]
    from_embeds = model(inputs_embeds=embeds)
    assert_f32_close(from_embeds, from_ids, **llama_logits_bound(model, 12))  # other programs
    with pytest.raises(ValueError, match="exactly one"):
        model.backbone(jnp.asarray(ids), inputs_embeds=embeds)


def test_dot_product_attention_backend_matches_xla(model):
    ids = _ids((2, 20))
    segments = np.array([[1] * 8 + [2] * 12, [1] * 20], np.int32)
    ref = np.asarray(forward(model, ids, None, segments))
    other = np.asarray(forward(_with_config(model, attention_impl="cudnn"), ids, None, segments))
    # Another attention formula (jax.nn.dot_product_attention's), same chain over 20 tokens.
    assert_f32_close(other, ref, **llama_logits_bound(model, 20))


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)])
def test_sharded_forward_equals_single_device(model, shape):
    mesh = make_mesh(MeshConfig(*shape))
    sharded = create_model(CONFIG, seed=3, mesh=mesh)
    # Parameters land where the rules table says.
    wq = sharded.layers.wq[...]
    assert wq.sharding.spec == logical_to_spec(("layers", "embed", "q_heads", "head_dim"),
                                               wq.shape, mesh)
    assert wq.sharding.spec[1] == "fsdp" and wq.sharding.spec[2] == "tensor"
    assert sharded.embed[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(model))):
        # exact by construction: the same integer RNG bits and elementwise scaling; the
        # sharding only decides where each element is computed
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = _ids((4, 24))
    segments = np.array([[1] * 10 + [2] * 14] * 4, np.int32)
    ref = np.asarray(forward(model, ids, None, segments))
    out = forward(sharded, ids, None, segments, mesh=mesh)
    assert len(out.sharding.device_set) == 8
    # Sharded contractions sum their shards' partial sums: the same chain over 24 tokens.
    assert_f32_close(out, ref, **llama_logits_bound(model, 24))


def test_sharding_constraints_are_applied_inside_the_mesh():
    mesh = make_mesh(MeshConfig(2, 2, 2))
    from jalign.sharding import constrain

    @jax.jit
    def f(x):
        with use_mesh(mesh):
            return constrain(x * 2, ("batch", "length", "act_mlp"))

    out = f(jnp.ones((4, 3, 8)))
    assert out.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_kv_heads"):
        LlamaConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="remat_policy"):
        LlamaConfig(remat_policy="some")
    with pytest.raises(ValueError, match="rope_type"):
        LlamaConfig(rope_scaling={"rope_type": "yarn"})
    assert preset("llama3_2_1b").num_params() == 1_235_814_400
    assert preset("llama3_1_8b").num_params() == 8_030_261_248
    assert preset("llama2_7b").num_params() == 6_738_415_616
