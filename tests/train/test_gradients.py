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

# bf16 parameters (a bf16 checkpoint trained without float32 master weights), float32
# compute: each gradient is float32 until it meets its bf16 parameter.
BF16 = preset("tiny", vocab_size=128, num_heads=4, num_kv_heads=2, dtype="float32",
              param_dtype="bfloat16")


def _batch(rows=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, BF16.vocab_size, (rows, length)).astype(np.int32)
    return {"input_ids": ids, "loss_mask": np.ones_like(ids),
            "segment_ids": np.ones_like(ids),
            "positions": np.broadcast_to(np.arange(length), ids.shape).copy()}


def _grads(params, graphdef, batch, accum, mesh, trainable=None):
    kwargs = {"trainable": trainable} if trainable is not None else {}
    fn = jax.jit(lambda p, b: accumulate(sft_loss, graphdef, p, b, jax.random.key(0), accum,
                                         mesh=mesh, **kwargs))
    return jax.device_get(fn(params, batch)[1])


def test_bf16_parameters_accumulate_float32_gradients():
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    model = create_model(BF16, seed=0, mesh=mesh)
    graphdef, _ = abstract_model(BF16, mesh)
    params = params_of(model)
    batch = _batch()
    accumulated = _grads(params, graphdef, batch, 4, mesh)
    assert {np.asarray(g).dtype for g in jax.tree.leaves(accumulated)} == {np.dtype(np.float32)}
    # The carry was never rounded to bf16: a sum of four bf16 gradients of different
    # magnitudes needs more than bf16's 8 significant bits, so in float32 many elements are
    # not bf16 numbers (with a bf16 carry every element would be one).
    flat_acc = traverse_util.flatten_dict(accumulated)
    values = np.concatenate([np.ravel(g) for g in flat_acc.values()])
    as_bf16 = np.asarray(jnp.asarray(values).astype(jnp.bfloat16).astype(jnp.float32))
    assert np.mean(as_bf16 != values) > 0.5
    # And it is the sum of the 4 micro-batches' gradients (rows i, i+4 make micro-batch i).
    # Each micro-batch gradient is computed in float32, inside the scan here and alone
    # below (XLA may fuse the two differently), then rounded once to its bf16 parameter's
    # precision: two roundings of values that agree to float32 precision differ by at most
    # one bf16 step (2^-8 relative), and the float32 differences themselves are orders of
    # magnitude below that (counted once more), plus the 4-term float32 sum. A dropped or
    # doubled micro-batch is off by O(|g|).
    micro = [_grads(params, graphdef, {k: v[i::4] for k, v in batch.items()}, 1, mesh)
             for i in range(4)]
    flat_micro = [traverse_util.flatten_dict(m) for m in micro]
    for key, got in flat_acc.items():
        parts = np.stack([np.asarray(m[key], np.float64) for m in flat_micro])
        magnitude = np.abs(parts).sum(0)
        bound = 2 * 2.0 ** -8 * magnitude + f32_tolerance(4, float(magnitude.max()))
        assert np.all(np.abs(got - parts.sum(0)) <= bound), key


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
