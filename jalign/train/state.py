"""The train state: one pytree holding everything a step reads and writes.

``params`` is ``{role: what of it trains}`` as nested dicts (``nnx.to_pure_dict``
layout, the layout of the ``params`` checkpoint item and the HF converter); the optimizer
state covers exactly that. ``fixed`` is ``{role: what is read but never trained}``: frozen
roles (a DPO/PPO reference) and the frozen rest of trained ones (a LoRA base, what a
trainable regex leaves out). No gradient, no optimizer state, not saved, sharded by the
same rules (``jalign.train.roles``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jalign.models.build import params_of  # noqa: F401 (re-exported)
from jalign.sharding import DEFAULT_RULES, Rules, param_shardings


class TrainState(NamedTuple):
    step: jax.Array        # int32 scalar: updates applied (skipped ones included)
    params: Any            # {role: nested dict of trained arrays}
    opt_state: Any         # optax state for params
    rng: jax.Array         # uint32 key data; split once per step
    skipped: jax.Array     # int32 scalar: non-finite updates skipped
    fixed: Any = None      # {role: nested dict of frozen arrays} or None (not saved)


def init_state(params, optimizer, seed: int, fixed=None) -> TrainState:
    rng = jax.random.key_data(jax.random.key(seed))
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng,
                      jnp.zeros((), jnp.int32), fixed)


def state_shardings(abstract_state: TrainState, param_sharding_tree, mesh: Mesh,
                    fixed_sharding_tree=None) -> TrainState:
    """Shardings for every leaf of the state.

    Parameters follow the rules table. Optimizer leaves that mirror a parameter (Adam's
    mu and nu, momentum ...) are found by the parameter's path at the end of theirs and
    take its sharding; everything else (counts, scalars, factored stats) is replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    table = {tuple(k): v for k, v in traverse_util.flatten_dict(param_sharding_tree).items()}
    shapes = {tuple(k): v.shape for k, v in
              traverse_util.flatten_dict(abstract_state.params).items()}

    def opt_leaf(path, leaf):
        keys = tuple(getattr(p, "key", getattr(p, "name", getattr(p, "idx", None))) for p in path)
        for i in range(len(keys)):
            if keys[i:] in table and shapes[keys[i:]] == leaf.shape:
                return table[keys[i:]]
        return replicated

    opt = jax.tree_util.tree_map_with_path(opt_leaf, abstract_state.opt_state)
    fixed = fixed_sharding_tree if abstract_state.fixed is not None else None
    return TrainState(replicated, param_sharding_tree, opt, replicated, replicated, fixed)


def model_param_shardings(abstract_model_state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Nested dict of NamedShardings for a model's parameters (pure-dict layout)."""
    return nnx.to_pure_dict(param_shardings(abstract_model_state, mesh, rules))
