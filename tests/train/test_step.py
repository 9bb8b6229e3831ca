"""The generic train step: exact accumulation, sharded == single device, NaN handling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jalign.losses.sft import sft_loss
from jalign.models.build import abstract_model, create_model
from jalign.models.config import preset
from jalign.sharding import MeshConfig, logical_to_spec, make_mesh
from jalign.train.optimizer import OptimizerConfig, make_optimizer
from jalign.train.recipe import custom
from jalign.train.roles import RunModels
from jalign.train.state import init_state, model_param_shardings, params_of, state_shardings
from jalign.train.step import accumulate, make_train_step
from tests.numerics import abs_sum, f32_tolerance, llama_grad_bound, llama_logp_bound

CONFIG = preset("tiny", vocab_size=128, num_heads=4, num_kv_heads=2)
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1, clip_norm=None)
# Plain SGD makes the update proportional to the gradient; Adam divides by sqrt(v) and so
# turns rounding-level gradients (1e-12 vs 0) into full-size steps of either sign.
SGD = OptimizerConfig(name="sgd", learning_rate=1e-1, b1=0.0, clip_norm=None)
MODELS = RunModels.single(CONFIG)  # one role, "policy", training everything
LOSS = custom(sft_loss).loss_fn     # sft_loss on it
P = "policy"


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


def _setup(mesh, accum, rows=8, seed=0, opt=OPT, config=CONFIG):
    model = create_model(config, seed=seed, mesh=mesh)
    _, abstract = abstract_model(config, mesh)
    params = {P: params_of(model)}
    tx, lr = make_optimizer(opt, params, total_steps=10)
    state = init_state(params, tx, seed=0)
    shardings = state_sharding_for(state, abstract, mesh)
    state = jax.device_put(state, shardings)
    step = make_train_step(LOSS, tx, RunModels.single(config), mesh=mesh,
                           state_sharding=shardings, global_batch=rows, accum_steps=accum,
                           schedule=lr)
    return state, step, shardings


def state_sharding_for(state, abstract, mesh):
    abstract_state = jax.eval_shape(lambda s: s, state)
    return state_shardings(abstract_state, {P: model_param_shardings(abstract, mesh)}, mesh)


def _run(mesh, accum, steps=2, opt=OPT):
    state, step, _ = _setup(mesh, accum, opt=opt)
    losses = []
    for i in range(steps):
        state, metrics = step(state, _batch(seed=i))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state.params[P]), losses


# ------------------------------------------------------------------ float32 bounds
#
# The runs below compare float32 programs that sum in other orders (micro-batches, shards).
# Their tolerances come from the data: every target token's own gradient, at the parameters
# each step starts from, gives the magnitude of what a parameter's gradient sums.


@functools.lru_cache(maxsize=None)
def _token_grad_fn(length):
    graphdef, _ = abstract_model(CONFIG)

    def one(params, batch, r, c):  # d(-log p(token c of row r)) / d params
        row = {k: jax.lax.dynamic_slice_in_dim(jnp.asarray(v), r, 1) for k, v in batch.items()}
        row["loss_mask"] = (jnp.arange(length) == c).astype(jnp.int32)[None]
        return jax.grad(lambda p: sft_loss(nnx.merge(graphdef, p), row).total)(params)

    return jax.jit(jax.vmap(one, in_axes=(None, None, 0, 0)))


def _gradient_and_tolerance(model, params, batch):
    """(the mean-loss gradient, in float64, and its float32 bound, per parameter leaf)."""
    mask = np.asarray(batch["loss_mask"])
    rows, cols = np.nonzero(mask[:, 1:])  # token c + 1 of row r is a target
    per_token = _token_grad_fn(mask.shape[1])(params, batch, rows, cols + 1)
    n, tokens = len(rows), mask.size
    grads, tols = [], []
    for leaf in jax.tree.leaves(per_token):
        leaf = np.asarray(leaf, np.float64)
        grads.append(leaf.sum(0) / n)
        tols.append(f32_tolerance(**llama_grad_bound(model, mask.shape[1], tokens,
                                                     abs_sum(leaf) / n)))
    return grads, tols


def _update_rounding(params, step):
    """p + u in float32 (u computed from a float32 gradient): two roundings, of |u| and
    of |p + u|."""
    return [f32_tolerance(2, float(np.abs(p).max() + np.abs(u).max()))
            for p, u in zip(params, step)]


@pytest.fixture(scope="module")
def bounds():
    """Tolerances of the loss, gradient and parameter comparisons below, for the two steps'
    batches (_batch(0), _batch(1)) from create_model(CONFIG, seed=0)."""
    graphdef, _ = abstract_model(CONFIG)
    p0 = params_of(create_model(CONFIG, seed=0))
    tree = jax.tree.structure(p0)

    def as_params(leaves):
        return jax.tree.unflatten(tree, [np.float32(x) for x in leaves])

    def as_model(leaves):
        return nnx.merge(graphdef, as_params(leaves))

    leaves0 = [np.asarray(x, np.float64) for x in jax.tree.leaves(p0)]
    b0, b1 = _batch(0), _batch(1)
    targets = int(b0["loss_mask"][:, 1:].sum())  # the same mask in every _batch

    def loss_tol(leaves):  # the mean NLL of the targets, on these parameters' logit scale
        return f32_tolerance(**llama_logp_bound(as_model(leaves), 16, tokens=targets, mean=True))

    g0, tol_g0 = _gradient_and_tolerance(as_model(leaves0), p0, b0)

    # SGD (momentum off): p1 = p0 - lr0 g0, p2 = p1 - lr1 g1(p1).
    _, lr = make_optimizer(SGD, {P: p0}, total_steps=10)
    lr0, lr1 = float(lr(0)), float(lr(1))
    p1 = [p - lr0 * g for p, g in zip(leaves0, g0)]
    g1, tol_g1 = _gradient_and_tolerance(as_model(p1), as_params(p1), b1)
    sgd_p1 = [lr0 * t + r
              for t, r in zip(tol_g0, _update_rounding(leaves0, [lr0 * g for g in g0]))]
    # Step 2 repeats step 1's bound at parameters already apart by it; that difference also
    # passes through the step's gradient, (I - lr1 H) d: counted twice (lr1 |H| <= 1 for this
    # tiny model: its SGD losses fall).
    sgd_p2 = [2 * a + lr1 * t + r for a, t, r in
              zip(sgd_p1, tol_g1, _update_rounding(p1, [lr1 * g for g in g1]))]
    # Step 2's loss also moves by sum |dL/dp| |dp| over the parameters' step-1 differences.
    sgd_loss2 = loss_tol(p1) + sum(float(np.abs(g).sum()) * a for g, a in zip(g1, sgd_p1))

    # AdamW's first update is -lr (g / (|g| + eps) + wd p): a gradient error t moves it by
    # up to lr |f(g +- t) - f(g)|, f(x) = x / (|x| + eps) -- up to 2 lr where t reaches past
    # 0 (the sign may flip: the reason the parameters are compared under SGD), plus its own
    # rounding. Exact zeros (embedding rows no token reads) have no terms: 0 in every run.
    tx, adam_lr = make_optimizer(OPT, {P: p0}, total_steps=10)
    alr = float(adam_lr(0))
    updates, _ = tx.update({P: as_params(g0)}, tx.init({P: p0}), {P: p0})
    adam_p1 = [p + np.asarray(u, np.float64) for p, u in zip(leaves0, jax.tree.leaves(updates))]
    adam_g1, _ = _gradient_and_tolerance(as_model(adam_p1), as_params(adam_p1), b1)
    f = lambda x: x / (np.abs(x) + OPT.eps)  # noqa: E731
    adam_loss2 = loss_tol(adam_p1)
    for g, t, p, g_next in zip(g0, tol_g0, leaves0, adam_g1):
        moved = np.maximum(np.abs(f(g + t) - f(g)), np.abs(f(g - t) - f(g)))
        big = float(np.abs(p).max())
        rounding = f32_tolerance(3, big + alr * (1 + OPT.weight_decay * big))
        dp = alr * np.where(g == 0, 0.0, moved) + rounding
        adam_loss2 += float(np.sum(np.abs(g_next) * dp))
    return {"loss": loss_tol(leaves0), "grad": tol_g0, "sgd_p1": sgd_p1, "sgd_p2": sgd_p2,
            "sgd_losses": [loss_tol(leaves0), sgd_loss2],
            "adam_losses": [loss_tol(leaves0), adam_loss2]}


def _assert_losses_close(got, want, tols, err_msg=""):
    for step, (a, b, tol) in enumerate(zip(got, want, tols, strict=True)):
        assert abs(a - b) <= tol, f"{err_msg} step {step + 1}: |{a} - {b}| > {tol:.3g}"


def _assert_params_close(got, want, tols):
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    for a, b, tol in zip(got, want, tols, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol)


@pytest.fixture(scope="module")
def single():
    return _run(make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1]), accum=1)


def test_accumulation_equals_full_batch(bounds):
    """Gradients and update of 4 micro-batches of 2 == 1 batch of 8 (unequal token counts)."""
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    params = {P: params_of(create_model(CONFIG, seed=0))}
    batch = jax.tree.map(jnp.asarray, _batch(0))
    rng = jax.random.key(0)

    full_loss, full = None, None
    for accum in (1, 4):
        out, g = jax.jit(lambda p, b, a=accum: accumulate(LOSS, MODELS, p, None, b, rng, a,
                                                           mesh=mesh))(params, batch)
        loss = float(out.total / out.weight)
        g = jax.tree.map(lambda x: np.asarray(x / out.weight), g)
        if full is None:
            full_loss, full = loss, g
            continue
        # The mean NLL of the 50 targets, and each gradient on the scale of its per-token
        # terms (see bounds).
        assert abs(loss - full_loss) <= bounds["loss"]
        leaves, full_leaves = jax.tree.leaves(g), jax.tree.leaves(full)
        for a, b, tol in zip(leaves, full_leaves, bounds["grad"], strict=True):
            assert np.abs(b).max() > 0
            np.testing.assert_allclose(a, b, rtol=0, atol=tol)
    # Whole SGD steps agree too: lr times the gradients' bound, plus the update's rounding.
    full_params, _ = _run(mesh, accum=1, steps=1, opt=SGD)
    acc_params, _ = _run(mesh, accum=4, steps=1, opt=SGD)
    _assert_params_close(acc_params, full_params, bounds["sgd_p1"])
    # Averaging per micro-batch instead would differ: micro-batches hold unequal counts.
    b = _batch(0)
    per_micro = [b["loss_mask"][i::4, 1:].sum() for i in range(4)]
    assert len(set(per_micro)) > 1


def test_accumulated_adam_losses_match(single, bounds):
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    _, losses = _run(mesh, accum=4)
    # Step 1: the mean NLL's bound; step 2 also by what AdamW's first update can make of
    # the gradients' bound (see bounds).
    _assert_losses_close(losses, single[1], bounds["adam_losses"])


@pytest.fixture(scope="module")
def single_sgd():
    return _run(make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1]), accum=1, opt=SGD)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)])
def test_sharded_step_equals_single_device(single, single_sgd, bounds, shape):
    mesh = make_mesh(MeshConfig(*shape))
    # Adam: shardings of params and moments, and the losses of two steps.
    state, step, shardings = _setup(mesh, accum=2)
    wq = state.params[P]["layers"]["wq"]
    assert wq.sharding.spec == logical_to_spec(("layers", "embed", "q_heads", "head_dim"), wq.shape, mesh)
    assert "fsdp" in wq.sharding.spec and "tensor" in wq.sharding.spec
    mu = state.opt_state[0][0].mu[P]["layers"]["wq"]  # chain(adamw=chain(adam, decay, lr))
    assert mu.sharding == wq.sharding  # optimizer moments follow their parameter
    losses = []
    for i in range(2):
        state, metrics = step(state, _batch(seed=i))
        losses.append(float(metrics["loss"]))
    assert state.params[P]["layers"]["wq"].sharding == wq.sharding
    _assert_losses_close(losses, single[1], bounds["adam_losses"], "adam")  # see bounds
    # SGD: parameters after two steps (the update is proportional to the gradient, so
    # this compares gradients; Adam would magnify rounding-level gradients to full steps).
    params, sgd_losses = _run(mesh, accum=2, opt=SGD)
    _assert_losses_close(sgd_losses, single_sgd[1], bounds["sgd_losses"], "sgd")
    _assert_params_close(params, single_sgd[0], bounds["sgd_p2"])


def test_nonfinite_update_leaves_state_bit_unchanged():
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    state, step, _ = _setup(mesh, accum=1)
    state, _ = step(state, _batch(0))
    policy = state.params[P]
    params = {P: dict(policy, embed=policy["embed"].at[5].set(jnp.nan))}
    poisoned = state._replace(params=params)
    batch = _batch(1)
    batch["input_ids"][0, 3] = 5  # the NaN row is used
    before = jax.device_get(poisoned)
    after, metrics = step(poisoned, batch)
    assert not bool(metrics["finite"]) and int(after.skipped) == 1
    assert int(after.step) == int(before.step) + 1
    # exact by construction: a non-finite step selects the old arrays (jnp.where)
    for a, b in zip(jax.tree.leaves(jax.device_get(after.params)), jax.tree.leaves(before.params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(jax.device_get(after.opt_state)), jax.tree.leaves(before.opt_state)):
        np.testing.assert_array_equal(a, b)


def test_bf16_compute_keeps_fp32_master_weights():
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    cfg16 = CONFIG.replace(dtype="bfloat16", param_dtype="float32")
    state, step, _ = _setup(mesh, accum=1, config=cfg16)
    state, metrics = step(state, _batch(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    _, fp32_losses = _run(mesh, accum=1, steps=1)
    assert np.isfinite(float(metrics["loss"]))
    # Not a float32 comparison: bfloat16 (u = 2^-8) over this chain has no useful worst-case
    # bound (n u > 1), so this is an accuracy check, 2% against the 0.02% that bf16 rounding
    # of weights and activations (the same on every CPU) costs here.
    assert abs(float(metrics["loss"]) - fp32_losses[0]) < 2e-2 * fp32_losses[0]
    assert float(metrics["loss"]) != fp32_losses[0]  # it really computed in bf16


def test_weight_decay_skips_norms_and_biases():
    from jalign.errors import ConfigError
    from jalign.train.optimizer import decay_mask
    from jalign.train.preflight import check_trainable
    from jalign.train.roles import Role
    config = preset("tiny", attention_bias=True, mlp_bias=True)
    params = params_of(create_model(config))
    mask = decay_mask({P: params}, OPT)[P]
    assert mask["layers"]["wq"] and mask["layers"]["w_down"] and mask["embed"]
    assert not mask["layers"]["attn_norm"] and not mask["final_norm"]
    assert not mask["layers"]["bq"] and not mask["layers"]["b_down"]
    # Anchored patterns see the path within the model (one trained role).
    assert not decay_mask({P: params}, OPT.__class__(no_decay=(r"^embed$",)))[P]["embed"]
    only_mlp = RunModels((Role(P, trains=r"layers/w_(gate|up|down)$"),), {P: config})
    trained, _ = only_mlp.split(P, params)
    assert "w_up" in trained["layers"] and "wq" not in trained["layers"]
    assert "embed" not in trained
    nothing = OptimizerConfig(trainable="nothing_like_this")
    with pytest.raises(ConfigError, match="matches no parameter"):
        check_trainable(RunModels((Role(P, trains=nothing.trainable),), {P: config}), nothing)
