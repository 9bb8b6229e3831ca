"""The generic train step: exact accumulation, sharded == single device, NaN handling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.losses.sft import sft_loss
from jalign.models.build import abstract_model, create_model
from jalign.models.config import preset
from jalign.sharding import MeshConfig, logical_to_spec, make_mesh
from jalign.train.optimizer import OptimizerConfig, make_optimizer
from jalign.train.state import init_state, model_param_shardings, params_of, state_shardings
from jalign.train.step import accumulate, make_train_step

CONFIG = preset("tiny", vocab_size=128, num_heads=4, num_kv_heads=2)
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1, clip_norm=None)
# Plain SGD makes the update proportional to the gradient; Adam divides by sqrt(v) and so
# turns rounding-level gradients (1e-12 vs 0) into full-size steps of either sign.
SGD = OptimizerConfig(name="sgd", learning_rate=1e-1, b1=0.0, clip_norm=None)


def _batch(seed=0, rows=8, length=16):
    """Rows with very different numbers of trainable tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, CONFIG.vocab_size, (rows, length)).astype(np.int32)
    mask = np.zeros((rows, length), np.int32)
    for r in range(rows):
        n = 1 + (r * 5) % (length - 2)
        mask[r, length - n:] = 1
    return {"input_ids": ids, "loss_mask": mask,
            "segment_ids": np.ones_like(ids), "positions": np.broadcast_to(np.arange(length), ids.shape).copy()}


def _setup(mesh, accum, rows=8, seed=0, opt=OPT):
    model = create_model(CONFIG, seed=seed, mesh=mesh)
    graphdef, abstract = abstract_model(CONFIG, mesh)
    params = params_of(model)
    tx, lr = make_optimizer(opt, params, total_steps=10)
    state = init_state(params, tx, seed=0)
    shardings = state_sharding_for(state, abstract, mesh)
    state = jax.device_put(state, shardings)
    step = make_train_step(sft_loss, tx, graphdef, mesh=mesh, state_sharding=shardings,
                           global_batch=rows, accum_steps=accum, schedule=lr)
    return state, step, shardings


def state_sharding_for(state, abstract, mesh):
    abstract_state = jax.eval_shape(lambda s: s, state)
    return state_shardings(abstract_state, model_param_shardings(abstract, mesh), mesh)


def _run(mesh, accum, steps=2, opt=OPT):
    state, step, _ = _setup(mesh, accum, opt=opt)
    losses = []
    for i in range(steps):
        state, metrics = step(state, _batch(seed=i))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state.params), losses


@pytest.fixture(scope="module")
def single():
    return _run(make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1]), accum=1)


def test_accumulation_equals_full_batch():
    """Gradients and update of 4 micro-batches of 2 == 1 batch of 8 (unequal token counts)."""
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    graphdef, _ = abstract_model(CONFIG)
    params = params_of(create_model(CONFIG, seed=0))
    batch = jax.tree.map(jnp.asarray, _batch(0))
    rng = jax.random.key(0)

    full_loss, full = None, None
    for accum in (1, 4):
        out, g = jax.jit(lambda p, b, a=accum: accumulate(sft_loss, graphdef, p, b, rng, a,
                                                           mesh=mesh))(params, batch)
        loss = float(out.total / out.weight)
        g = jax.tree.map(lambda x: np.asarray(x / out.weight), g)
        if full is None:
            full_loss, full = loss, g
            continue
        assert abs(loss - full_loss) <= 1e-6 * abs(full_loss)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(full)):
            scale = np.abs(b).max()
            assert scale > 0
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * scale)
    # Whole SGD steps agree too (to parameter rounding: 2 ulp of values near 1).
    full_params, _ = _run(mesh, accum=1, steps=1, opt=SGD)
    acc_params, _ = _run(mesh, accum=4, steps=1, opt=SGD)
    for a, b in zip(jax.tree.leaves(acc_params), jax.tree.leaves(full_params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2.5e-7 * max(1.0, np.abs(b).max()))
    # Averaging per micro-batch instead would differ: micro-batches hold unequal counts.
    b = _batch(0)
    per_micro = [b["loss_mask"][i::4, 1:].sum() for i in range(4)]
    assert len(set(per_micro)) > 1


def test_accumulated_adam_losses_match(single):
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    _, losses = _run(mesh, accum=4)
    np.testing.assert_allclose(losses, single[1], rtol=1e-6)


@pytest.fixture(scope="module")
def single_sgd():
    return _run(make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1]), accum=1, opt=SGD)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)])
def test_sharded_step_equals_single_device(single, single_sgd, shape):
    mesh = make_mesh(MeshConfig(*shape))
    # Adam: shardings of params and moments, and the losses of two steps.
    state, step, shardings = _setup(mesh, accum=2)
    wq = state.params["layers"]["wq"]
    assert wq.sharding.spec == logical_to_spec(("layers", "embed", "q_heads", "head_dim"), wq.shape, mesh)
    assert "fsdp" in wq.sharding.spec and "tensor" in wq.sharding.spec
    mu = state.opt_state[0][0].mu["layers"]["wq"]  # chain(adamw=chain(adam, decay, lr))
    assert mu.sharding == wq.sharding  # optimizer moments follow their parameter
    losses = []
    for i in range(2):
        state, metrics = step(state, _batch(seed=i))
        losses.append(float(metrics["loss"]))
    assert state.params["layers"]["wq"].sharding == wq.sharding
    np.testing.assert_allclose(losses, single[1], rtol=1e-5)
    # SGD: parameters after two steps (the update is proportional to the gradient, so
    # this compares gradients; Adam would magnify rounding-level gradients to full steps).
    params, sgd_losses = _run(mesh, accum=2, opt=SGD)
    np.testing.assert_allclose(sgd_losses, single_sgd[1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single_sgd[0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_nonfinite_update_leaves_state_bit_unchanged():
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    state, step, _ = _setup(mesh, accum=1)
    state, _ = step(state, _batch(0))
    params = dict(state.params, embed=state.params["embed"].at[5].set(jnp.nan))
    poisoned = state._replace(params=params)
    batch = _batch(1)
    batch["input_ids"][0, 3] = 5  # the NaN row is used
    before = jax.device_get(poisoned)
    after, metrics = step(poisoned, batch)
    assert not bool(metrics["finite"]) and int(after.skipped) == 1
    assert int(after.step) == int(before.step) + 1
    for a, b in zip(jax.tree.leaves(jax.device_get(after.params)), jax.tree.leaves(before.params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(jax.device_get(after.opt_state)), jax.tree.leaves(before.opt_state)):
        np.testing.assert_array_equal(a, b)


def test_bf16_compute_keeps_fp32_master_weights():
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    cfg16 = CONFIG.replace(dtype="bfloat16", param_dtype="float32")
    model = create_model(cfg16, seed=0, mesh=mesh)
    graphdef, abstract = abstract_model(cfg16, mesh)
    params = params_of(model)
    tx, _ = make_optimizer(OPT, params, total_steps=10)
    state = init_state(params, tx, seed=0)
    sh = state_sharding_for(state, abstract, mesh)
    step = make_train_step(sft_loss, tx, graphdef, mesh=mesh, state_sharding=sh, global_batch=8)
    state, metrics = step(jax.device_put(state, sh), _batch(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    _, fp32_losses = _run(mesh, accum=1, steps=1)
    assert np.isfinite(float(metrics["loss"]))
    assert abs(float(metrics["loss"]) - fp32_losses[0]) < 2e-2 * fp32_losses[0]
    assert float(metrics["loss"]) != fp32_losses[0]  # it really computed in bf16


def test_weight_decay_skips_norms_and_biases():
    from jalign.train.optimizer import decay_mask, trainable_mask
    params = params_of(create_model(preset("tiny", attention_bias=True, mlp_bias=True)))
    mask = decay_mask(params, OPT)
    assert mask["layers"]["wq"] and mask["layers"]["w_down"] and mask["embed"]
    assert not mask["layers"]["attn_norm"] and not mask["final_norm"]
    assert not mask["layers"]["bq"] and not mask["layers"]["b_down"]
    only_mlp = trainable_mask(params, OptimizerConfig(trainable=r"layers/w_(gate|up|down)$"))
    assert only_mlp["layers"]["w_up"] and not only_mlp["layers"]["wq"] and not only_mlp["embed"]
    with pytest.raises(ValueError, match="matches no parameter"):
        trainable_mask(params, OptimizerConfig(trainable="nothing_like_this"))
