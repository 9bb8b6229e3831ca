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
    np.testing.assert_allclose(unscanned, scanned, atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
@pytest.mark.parametrize("scan", [True, False])
def test_remat_changes_neither_values_nor_gradients(model, policy, scan):
    ids = _ids((2, 16))

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(ids))[..., 0])

    base = _with_config(model, scan_layers=scan)
    remat = _with_config(model, scan_layers=scan, remat_policy=policy)
    l0, g0 = nnx.jit(nnx.value_and_grad(loss))(base)
    l1, g1 = nnx.jit(nnx.value_and_grad(loss))(remat)
    assert abs(float(l0) - float(l1)) <= 1e-6
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-5)


def test_packed_equals_each_sequence_alone(model):
    a, b = _ids((1, 11), seed=1), _ids((1, 15), seed=2)
    pad = 6
    packed = np.concatenate([a, b, np.zeros((1, pad), np.int32)], axis=1)
    segments = np.array([[1] * 11 + [2] * 15 + [0] * pad], np.int32)
    positions = np.array([list(range(11)) + list(range(15)) + [0] * pad], np.int32)
    out = np.asarray(forward(model, packed, positions, segments))
    alone_a = np.asarray(forward(model, a))
    alone_b = np.asarray(forward(model, b))
    np.testing.assert_allclose(out[:, :11], alone_a, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[:, 11:26], alone_b, atol=1e-5, rtol=0)
    # Positions default to restarting per segment.
    out_default = np.asarray(forward(model, packed, None, segments))
    np.testing.assert_allclose(out_default[:, :26], out[:, :26], atol=1e-6, rtol=0)
    assert np.isfinite(out).all()
    # Without segment ids the second sequence would see the first: the test can fail.
    unsegmented = np.asarray(forward(model, packed, positions, None))
    assert np.abs(unsegmented[:, 11:26] - alone_b).max() > 1e-2


def test_positions_from_segments():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]])
    np.testing.assert_array_equal(positions_from_segments(seg),
                                  [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])


def test_inputs_embeds_equals_input_ids(model):
    ids = _ids((2, 12))
    from_ids = model(jnp.asarray(ids))
    embeds = model.embedding_table()[ids]
    from_embeds = model(inputs_embeds=embeds)
    np.testing.assert_allclose(np.asarray(from_embeds), np.asarray(from_ids), atol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        model.backbone(jnp.asarray(ids), inputs_embeds=embeds)


def test_dot_product_attention_backend_matches_xla(model):
    ids = _ids((2, 20))
    segments = np.array([[1] * 8 + [2] * 12, [1] * 20], np.int32)
    ref = np.asarray(forward(model, ids, None, segments))
    other = np.asarray(forward(_with_config(model, attention_impl="cudnn"), ids, None, segments))
    np.testing.assert_allclose(other, ref, atol=1e-5, rtol=0)


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
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = _ids((4, 24))
    segments = np.array([[1] * 10 + [2] * 14] * 4, np.int32)
    ref = np.asarray(forward(model, ids, None, segments))
    out = forward(sharded, ids, None, segments, mesh=mesh)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


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
