"""The jitted train and eval steps, generic over the loss.

A loss is ``loss_fn(model, batch, ctx) -> LossOutput``: ``model`` is the NNX model merged
from the trained params, ``ctx`` a StepContext (rng, frozen models). The step never
knows which algorithm it runs.

Gradient accumulation sums ``total`` and ``weight`` (and their gradients) over
micro-batches and divides once, so accumulated steps equal the full batch exactly, even
when micro-batches hold different numbers of trainable tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jalign.losses.types import LossOutput
from jalign.sharding import DEFAULT_RULES, Rules, logical_to_spec, use_mesh
from jalign.train.state import TrainState

NAN_POLICIES = ("abort", "skip")


@dataclasses.dataclass
class StepContext:
    rng: jax.Array
    frozen: dict  # name -> merged NNX model (read-only)
    step: jax.Array  # optimizer steps taken before this one
    train: bool = True  # False in the eval step (losses drop training-only noise)


LossFn = Callable[[Any, dict, StepContext], LossOutput]


def batch_sharding(mesh: Mesh, global_batch: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) dimension over the rules' batch axes; everything else replicated."""
    spec = logical_to_spec(("batch",), (global_batch,), mesh, rules)
    return NamedSharding(mesh, spec)


def _split_micro(batch: dict, accum: int) -> dict:
    """[B, ...] -> [accum, B/accum, ...] taking rows i, i+accum, ... for micro-batch i, so
    every micro-batch spans all devices that hold the batch."""
    def split(x):
        b = x.shape[0]
        return x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def _sum_outputs(a: LossOutput, b: LossOutput) -> LossOutput:
    return LossOutput(a.total + b.total, a.weight + b.weight, jax.tree.map(jnp.add, a.aux, b.aux))


def _metrics(out: LossOutput) -> dict:
    m = {"loss": out.total / jnp.maximum(out.weight, 1e-9), "loss_weight": out.weight}
    for name, (s, c) in out.aux.items():
        m[name] = s / jnp.maximum(c, 1e-9)
    return m


def _frozen_models(frozen_defs: dict, frozen_params) -> dict:
    if not frozen_defs:
        return {}
    return {name: nnx.merge(frozen_defs[name], jax.lax.stop_gradient(frozen_params[name]))
            for name in frozen_defs}


def _frozen_of(state, layout, frozen_defs: dict) -> dict:
    """The merged frozen models a step reads: copies in ``state.frozen``, or (with
    adapters, ``layout``) views of the base without adapters."""
    params = layout.frozen_params(state) if layout is not None else state.frozen
    return _frozen_models(frozen_defs, params)


def _split_trainable(params, trainable):
    """(trained, frozen) flat dicts {path: leaf} of ``params`` by the boolean ``trainable``
    tree (None: everything is trained)."""
    flat = traverse_util.flatten_dict(params)
    if trainable is None:
        return flat, {}
    mask = traverse_util.flatten_dict(trainable)
    return ({k: v for k, v in flat.items() if mask[k]},
            {k: v for k, v in flat.items() if not mask[k]})


def _to_f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32)
                        if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def accumulate(loss_fn: LossFn, graphdef, params, batch: dict, rng, accum_steps: int, *,
               mesh: Mesh, rules: Rules = DEFAULT_RULES, frozen: dict | None = None,
               step=0, micro_sharding=None, trainable=None, base_entries: dict | None = None,
               dropout: bool = False) -> tuple[LossOutput, Any]:
    """Summed LossOutput and gradient of the summed ``total`` over ``accum_steps``
    micro-batches (not yet divided by the weight).

    Gradients are taken only for the trained parameters (``trainable``, a boolean tree
    like ``params``; None: all), and in float32 whatever the parameter dtype: each is
    differentiated through a float32 view of the parameter, so the sum over micro-batches
    never rounds to bf16. Returns the gradients as a tree like ``params`` holding only the
    trained parameters (float32). ``base_entries`` ({full path: array}): a frozen base the
    model also reads (adapters' base), never differentiated. ``dropout``: the model's
    adapter dropout is on, keyed per micro-batch."""
    frozen = frozen or {}
    trained, fixed = _split_trainable(params, trainable)
    fixed.update({k: jax.lax.stop_gradient(v) for k, v in (base_entries or {}).items()})
    dtypes = {k: v.dtype for k, v in trained.items()}

    def loss_of(p32, micro_batch, micro_rng):
        p = {k: v.astype(dtypes[k]) for k, v in p32.items()}
        p.update(fixed)
        with use_mesh(mesh, rules), _dropout(dropout, micro_rng):
            model = nnx.merge(graphdef, traverse_util.unflatten_dict(p))
            out = loss_fn(model, micro_batch, StepContext(micro_rng, frozen, step))
        return out.total, out

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    trained32 = _to_f32(trained)
    if accum_steps == 1:
        (_, out), grads = grad_fn(trained32, batch, rng)
        return out, traverse_util.unflatten_dict(grads)
    micro = _split_micro(batch, accum_steps)
    rngs = jax.random.split(rng, accum_steps)

    def body(carry, xs):
        mb, r = xs
        if micro_sharding is not None:
            mb = jax.lax.with_sharding_constraint(mb, micro_sharding)
        (_, out), g = grad_fn(trained32, mb, r)
        acc_out, acc_g = carry
        return (_sum_outputs(acc_out, out), jax.tree.map(jnp.add, acc_g, g)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zero_out = jax.eval_shape(lambda: grad_fn(trained32, first, rngs[0])[0][1])
    zero_out = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_out)
    zero_g = jax.tree.map(jnp.zeros_like, trained32)
    (out, grads), _ = jax.lax.scan(body, (zero_out, zero_g), (micro, rngs))
    return out, traverse_util.unflatten_dict(grads)


def _dropout(on: bool, rng):
    import contextlib

    from jalign.models.lora import dropout_key
    # A key of its own: the loss's own randomness keeps using ``rng`` unchanged.
    return dropout_key(jax.random.fold_in(rng, 0x10A)) if on else contextlib.nullcontext()


def full_gradient_tree(grads, params):
    """The trained-parameter gradients as a full tree like ``params``; parameters that are
    not trained get zeros of their shape (the optimizer masks them out; XLA folds them)."""
    grads = traverse_util.flatten_dict(grads)
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: grads[k] if k in grads else jnp.zeros(v.shape, jnp.float32) for k, v in flat.items()})


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, graphdef, *,
                    mesh: Mesh, state_sharding: TrainState, global_batch: int,
                    accum_steps: int = 1, rules: Rules = DEFAULT_RULES,
                    frozen_graphdefs: dict | None = None, schedule=None, donate: bool = True,
                    trainable=None, layout=None):
    """``step(state, batch) -> (state, metrics)``, jitted once with explicit shardings.

    A non-finite loss or gradient norm leaves params and optimizer state bit-unchanged
    (``metrics["finite"]`` is False); the loop decides whether to abort or go on.
    ``trainable`` (boolean tree like the params, None: all) limits the gradient
    computation to the trained parameters. Gradients, their division by the loss weight
    and their norm are float32; the optimizer's state keeps the dtype it was created with.
    ``layout`` (a ``ParamLayout``): with adapters, ``state.params`` holds only them and the
    model also reads the frozen ``state.base``; the frozen models are views of the base.
    """
    if global_batch % accum_steps:
        raise ValueError(f"global batch {global_batch} is not divisible by accum_steps={accum_steps}")
    data_sharding = batch_sharding(mesh, global_batch, rules)
    micro_sharding = batch_sharding(mesh, global_batch // accum_steps, rules)
    frozen_graphdefs = frozen_graphdefs or {}

    def step(state: TrainState, batch: dict):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        frozen = _frozen_of(state, layout, frozen_graphdefs)
        base = layout.base_entries(state.base) if layout is not None else None
        dropout = layout is not None and layout.adapters and layout.config.lora.dropout > 0
        out, grads = accumulate(loss_fn, graphdef, state.params, batch, step_rng, accum_steps,
                                mesh=mesh, rules=rules, frozen=frozen, step=state.step,
                                micro_sharding=micro_sharding, trainable=trainable,
                                base_entries=base, dropout=dropout)
        weight = jnp.maximum(out.weight, 1e-9).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / weight, grads)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = optimizer.update(full_gradient_tree(grads, state.params),
                                            state.opt_state, state.params)
        new_opt = jax.tree.map(lambda new, old: new.astype(old.dtype), new_opt, state.opt_state)
        new_params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state.params, updates)
        finite = jnp.isfinite(out.total) & jnp.isfinite(grad_norm)

        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_state = TrainState(state.step + 1, keep(new_params, state.params),
                               keep(new_opt, state.opt_state), jax.random.key_data(rng),
                               state.skipped + (~finite).astype(jnp.int32), state.frozen,
                               state.base)
        metrics = _metrics(out)
        metrics.update(grad_norm=grad_norm, finite=finite)
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(state_sharding, data_sharding),
                   out_shardings=(state_sharding, replicated),
                   donate_argnums=(0,) if donate else ())


def make_eval_step(loss_fn: LossFn, graphdef, *, mesh: Mesh, state_sharding: TrainState,
                   global_batch: int, rules: Rules = DEFAULT_RULES,
                   frozen_graphdefs: dict | None = None, layout=None):
    """``eval_step(state, batch) -> LossOutput`` of unreduced sums (add them up, divide once)."""
    data_sharding = batch_sharding(mesh, global_batch, rules)
    frozen_graphdefs = frozen_graphdefs or {}

    def eval_step(state: TrainState, batch: dict):
        with use_mesh(mesh, rules):
            params = state.params if layout is None else layout.full_params(state)
            model = nnx.merge(graphdef, params)
            ctx = StepContext(jax.random.wrap_key_data(state.rng),
                              _frozen_of(state, layout, frozen_graphdefs), state.step,
                              train=False)
            return loss_fn(model, batch, ctx)

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(eval_step, in_shardings=(state_sharding, data_sharding),
                   out_shardings=replicated)
