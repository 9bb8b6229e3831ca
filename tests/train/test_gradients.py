"""Gradients are float32 whatever the parameter dtype, and exist only for what trains."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jalign.losses.sft import sft_loss
from jalign.models.build import abstract_model, create_model
from jalign.models.config import preset
from jalign.sharding import MeshConfig, make_mesh
from jalign.train.optimizer import OptimizerConfig, make_optimizer, trainable_mask
from jalign.train.state import init_state, params_of
from jalign.train.step import accumulate, make_train_step
from tests.numerics import f32_tolerance

BF16 = preset("tiny", vocab_size=128, num_heads=4, num_kv_heads=2, dtype="bfloat16",
              param_dtype="bfloat16")


def _batch(rows=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, BF16.vocab_size, (rows, length)).astype(np.int32)
    return {"input_ids": ids, "loss_mask": np.ones_like(ids),
            "segment_ids": np.ones_like(ids),
            "positions": np.broadcast_to(np.arange(length), ids.shape).copy()}


def _grads(params, graphdef, batch, accum, mesh, trainable=None):
    fn = jax.jit(lambda p, b: accumulate(sft_loss, graphdef, p, b, jax.random.key(0), accum,
                                         mesh=mesh, trainable=trainable))
    return jax.device_get(fn(params, batch)[1])


def test_bf16_parameters_accumulate_float32_gradients():
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    model = create_model(BF16, seed=0, mesh=mesh)
    graphdef, _ = abstract_model(BF16, mesh)
    params = params_of(model)
    batch = _batch()
    accumulated = _grads(params, graphdef, batch, 4, mesh)
    assert {np.asarray(g).dtype for g in jax.tree.leaves(accumulated)} == {np.dtype(np.float32)}
    # The accumulated gradient is the float32 sum of the 4 micro-batches' gradients (rows
    # i, i+4 make micro-batch i): 4 terms of float32 addition, nothing rounded to bf16
    # (which would be off by ~2^-9 of the magnitude, far beyond this bound).
    micro = [_grads(params, graphdef, {k: v[i::4] for k, v in batch.items()}, 1, mesh)
             for i in range(4)]
    flat_acc = traverse_util.flatten_dict(accumulated)
    flat_micro = [traverse_util.flatten_dict(m) for m in micro]
    for key, got in flat_acc.items():
        parts = np.stack([np.asarray(m[key], np.float64) for m in flat_micro])
        bound = f32_tolerance(4, float(np.abs(parts).sum(0).max()))
        np.testing.assert_allclose(got, parts.sum(0), rtol=0, atol=bound, err_msg=str(key))


def test_only_trained_parameters_get_gradients_and_updates():
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    config = preset("tiny", vocab_size=128, num_heads=4, num_kv_heads=2)
    model = create_model(config, seed=0, mesh=mesh)
    graphdef, _ = abstract_model(config, mesh)
    params = params_of(model)
    opt = OptimizerConfig(learning_rate=1e-2, trainable=r"^layers/(wq|wo)$", clip_norm=None)
    mask = trainable_mask(params, opt)
    grads = _grads(params, graphdef, _batch(), 1, mesh, trainable=mask)
    assert sorted("/".join(k) for k in traverse_util.flatten_dict(grads)) == ["layers/wo",
                                                                              "layers/wq"]
    tx, lr = make_optimizer(opt, params, total_steps=4)
    state = init_state(params, tx, seed=0)
    step = make_train_step(sft_loss, tx, graphdef, mesh=mesh, state_sharding=None,
                           global_batch=8, schedule=lr, trainable=mask, donate=False)
    new, _ = step(state, _batch())
    before = traverse_util.flatten_dict(jax.device_get(state.params))
    after = traverse_util.flatten_dict(jax.device_get(new.params))
    for key in before:
        changed = not np.array_equal(before[key], after[key])
        assert changed == ("/".join(key) in ("layers/wq", "layers/wo")), key
