"""The jitted train and eval steps, generic over the loss and the roles.

A loss is ``loss_fn(models, batch, ctx) -> LossOutput``: ``models`` maps each role the
step reads to its NNX model (``jalign.train.roles.RunModels.models``: trained roles merged
from ``state.params`` and their fixed parts, frozen roles from ``state.fixed``, read
without gradient), ``ctx`` a StepContext (rng, step, train). The step never knows which
algorithm it runs.

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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jalign.losses.types import LossOutput, combine_aux
from jalign.sharding import DEFAULT_RULES, Rules, logical_to_spec, use_mesh
from jalign.train.state import TrainState

NAN_POLICIES = ("abort", "skip")


@dataclasses.dataclass
class StepContext:
    rng: jax.Array
    step: jax.Array  # optimizer steps taken before this one
    train: bool = True  # False in the eval step (losses drop training-only noise)


LossFn = Callable[[dict, dict, StepContext], LossOutput]


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
    return LossOutput(a.total + b.total, a.weight + b.weight, combine_aux(a.aux, b.aux))


def _metrics(out: LossOutput) -> dict:
    m = {"loss": out.total / jnp.maximum(out.weight, 1e-9), "loss_weight": out.weight}
    for name, (s, c) in out.aux.items():
        m[name] = s / jnp.maximum(c, 1e-9)
    return m


def _to_f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32)
                        if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def accumulate(loss_fn: LossFn, models, params, fixed, batch: dict, rng, accum_steps: int, *,
               mesh: Mesh, rules: Rules = DEFAULT_RULES, step=0, micro_sharding=None,
               dropout: bool = False) -> tuple[LossOutput, Any]:
    """Summed LossOutput and gradient of the summed ``total`` over ``accum_steps``
    micro-batches (not yet divided by the weight).

    ``models`` (a ``RunModels``) puts each role together from ``params`` (what trains)
    and ``fixed`` (never differentiated). Gradients are float32 whatever the parameter
    dtype: each trained parameter is differentiated through a float32 view of it, so the
    sum over micro-batches never rounds to bf16. Returns the gradients as a tree like
    ``params`` (float32). ``dropout``: the adapters' dropout is on, keyed per micro-batch."""
    dtypes = jax.tree.map(lambda x: x.dtype, params)

    def loss_of(p32, micro_batch, micro_rng):
        p = jax.tree.map(lambda x, d: x.astype(d), p32, dtypes)
        with use_mesh(mesh, rules), _dropout(dropout, micro_rng):
            out = loss_fn(models.models(p, fixed), micro_batch, StepContext(micro_rng, step))
        return out.total, out

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    params32 = _to_f32(params)
    if accum_steps == 1:
        (_, out), grads = grad_fn(params32, batch, rng)
        return out, grads
    micro = _split_micro(batch, accum_steps)
    rngs = jax.random.split(rng, accum_steps)

    def body(carry, xs):
        mb, r = xs
        if micro_sharding is not None:
            mb = jax.lax.with_sharding_constraint(mb, micro_sharding)
        (_, out), g = grad_fn(params32, mb, r)
        acc_out, acc_g = carry
        return (_sum_outputs(acc_out, out), jax.tree.map(jnp.add, acc_g, g)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zero_out = jax.eval_shape(lambda: grad_fn(params32, first, rngs[0])[0][1])
    zero_out = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_out)
    zero_g = jax.tree.map(jnp.zeros_like, params32)
    (out, grads), _ = jax.lax.scan(body, (zero_out, zero_g), (micro, rngs))
    return out, grads


def _dropout(on: bool, rng):
    import contextlib

    from jalign.models.lora import dropout_key
    # A key of its own: the loss's own randomness keeps using ``rng`` unchanged.
    return dropout_key(jax.random.fold_in(rng, 0x10A)) if on else contextlib.nullcontext()


def adapter_dropout(models) -> bool:
    """Whether a trained role's adapters have input dropout (keyed per micro-batch)."""
    return any(getattr(models.configs[n].lora, "dropout", 0) > 0 for n in models.trained)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, models, *,
                    mesh: Mesh, state_sharding: TrainState, global_batch: int,
                    accum_steps: int = 1, rules: Rules = DEFAULT_RULES, schedule=None,
                    donate: bool = True):
    """``step(state, batch) -> (state, metrics)``, jitted once with explicit shardings.

    ``models``: the run's roles (``jalign.train.roles.RunModels``). A non-finite loss or
    gradient norm leaves params and optimizer state bit-unchanged (``metrics["finite"]``
    is False); the loop decides whether to abort or go on. Gradients, their division by
    the loss weight and their norm are float32; the optimizer's state keeps the dtype it
    was created with.
    """
    if global_batch % accum_steps:
        raise ValueError(f"global batch {global_batch} is not divisible by accum_steps={accum_steps}")
    data_sharding = batch_sharding(mesh, global_batch, rules)
    micro_sharding = batch_sharding(mesh, global_batch // accum_steps, rules)
    dropout = adapter_dropout(models)

    def step(state: TrainState, batch: dict):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        out, grads = accumulate(loss_fn, models, state.params, state.fixed, batch, step_rng,
                                accum_steps, mesh=mesh, rules=rules, step=state.step,
                                micro_sharding=micro_sharding, dropout=dropout)
        weight = jnp.maximum(out.weight, 1e-9).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / weight, grads)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
        new_opt = jax.tree.map(lambda new, old: new.astype(old.dtype), new_opt, state.opt_state)
        new_params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state.params, updates)
        finite = jnp.isfinite(out.total) & jnp.isfinite(grad_norm)

        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_state = TrainState(state.step + 1, keep(new_params, state.params),
                               keep(new_opt, state.opt_state), jax.random.key_data(rng),
                               state.skipped + (~finite).astype(jnp.int32), state.fixed)
        metrics = _metrics(out)
        metrics.update(grad_norm=grad_norm, finite=finite)
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(state_sharding, data_sharding),
                   out_shardings=(state_sharding, replicated),
                   donate_argnums=(0,) if donate else ())


def make_eval_step(loss_fn: LossFn, models, *, mesh: Mesh, state_sharding: TrainState,
                   global_batch: int, rules: Rules = DEFAULT_RULES):
    """``eval_step(state, batch) -> LossOutput`` of unreduced sums (add them up, divide once)."""
    data_sharding = batch_sharding(mesh, global_batch, rules)

    def eval_step(state: TrainState, batch: dict):
        with use_mesh(mesh, rules):
            ctx = StepContext(jax.random.wrap_key_data(state.rng), state.step, train=False)
            return loss_fn(models.models(state.params, state.fixed), batch, ctx)

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(eval_step, in_shardings=(state_sharding, data_sharding),
                   out_shardings=replicated)
