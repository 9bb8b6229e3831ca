"""Gradients are float32 whatever the parameter dtype, and exist only for what trains."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jalign.models.build import create_model
from jalign.models.config import preset
from jalign.sharding import MeshConfig, make_mesh
from jalign.train.optimizer import OptimizerConfig
from jalign.train.recipe import custom
from jalign.losses.sft import sft_loss
from jalign.train.roles import Role, RunModels
from jalign.train.state import init_state, params_of
from jalign.train.state_init import build_optimizer
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


LOSS = custom(sft_loss).loss_fn  # sft_loss on the policy role


def _grads(params, models, batch, accum, mesh, fixed=None):
    """Gradients of the policy's trained part ``params`` (its frozen rest ``fixed``)."""
    fn = jax.jit(lambda p, f, b: accumulate(LOSS, models, {"policy": p}, f, b,
                                            jax.random.key(0), accum, mesh=mesh))
    return jax.device_get(fn(params, fixed and {"policy": fixed}, batch)[1]["policy"])


def test_bf16_parameters_accumulate_float32_gradients():
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    model = create_model(BF16, seed=0, mesh=mesh)
    models = RunModels.single(BF16)
    params = params_of(model)
    batch = _batch()
    accumulated = _grads(params, models, batch, 4, mesh)
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
    micro = [_grads(params, models, {k: v[i::4] for k, v in batch.items()}, 1, mesh)
             for i in range(4)]
    flat_micro = [traverse_util.flatten_dict(m) for m in micro]
    for key, got in flat_acc.items():
        parts = np.stack([np.asarray(m[key], np.float64) for m in flat_micro])
        magnitude = np.abs(parts).sum(0)
        bound = 2 * 2.0 ** -8 * magnitude + f32_tolerance(4, float(magnitude.max()))
        assert np.all(np.abs(got - parts.sum(0)) <= bound), key


def test_only_trained_parameters_get_gradients_updates_and_optimizer_state():
    """A trainable regex (OptimizerConfig.trainable) splits the policy: what it matches is
    in the state's params, in the optimizer and gets gradients and updates; the rest is in
    the state's fixed part, with no optimizer state at all, and never changes."""
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    config = preset("tiny", vocab_size=128, num_heads=4, num_kv_heads=2)
    model = create_model(config, seed=0, mesh=mesh)
    opt = OptimizerConfig(learning_rate=1e-2, trainable=r"^layers/(wq|wo)$", clip_norm=None)
    models = RunModels((Role("policy", trains=opt.trainable),), {"policy": config})
    trained, fixed = models.split("policy", params_of(model))
    assert sorted("/".join(k) for k in traverse_util.flatten_dict(trained)) == ["layers/wo",
                                                                                "layers/wq"]
    grads = _grads(trained, models, _batch(), 1, mesh, fixed=fixed)
    assert sorted("/".join(k) for k in traverse_util.flatten_dict(grads)) == ["layers/wo",
                                                                              "layers/wq"]
    tx, lr = build_optimizer(opt, models, total_steps=4)
    state = init_state({"policy": trained}, tx, seed=0, fixed={"policy": fixed})
    # The optimizer's state mirrors the trained parameters only: Adam's two moments of
    # wq and wo, nothing of the frozen ones.
    moments = {tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)[-2:]
               for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
               if np.ndim(leaf) > 0}
    assert moments == {("layers", "wq"), ("layers", "wo")}, moments
    n_opt = sum(np.size(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert n_opt == 2 * sum(np.size(x) for x in jax.tree.leaves(trained))
    step = make_train_step(LOSS, tx, models, mesh=mesh, state_sharding=None, global_batch=8,
                           schedule=lr, donate=False)
    new, _ = step(state, _batch())
    before = traverse_util.flatten_dict(jax.device_get(state.params["policy"]))
    after = traverse_util.flatten_dict(jax.device_get(new.params["policy"]))
    assert all(not np.array_equal(before[k], after[k]) for k in before)
    for key, value in traverse_util.flatten_dict(jax.device_get(new.fixed["policy"])).items():
        np.testing.assert_array_equal(value, traverse_util.flatten_dict(fixed)[key])
