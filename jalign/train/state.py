"""The train state: one pytree holding everything a step reads and writes.

``params`` is the model's parameters as a nested dict (``nnx.to_pure_dict``), the same
layout the ``params`` checkpoint item and the HF converter use. ``frozen`` holds extra
models that are read but never trained (a DPO/PPO reference policy, a reward model): no
gradient, no optimizer state, sharded by the same rules as ``params``. With LoRA,
``params`` holds only what trains and ``base`` the frozen rest of the model
(``jalign.train.partition``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jalign.sharding import DEFAULT_RULES, Rules, param_shardings


class TrainState(NamedTuple):
    step: jax.Array        # int32 scalar: updates applied (skipped ones included)
    params: Any            # nested dict of arrays
    opt_state: Any         # optax state for params
    rng: jax.Array         # uint32 key data; split once per step
    skipped: jax.Array     # int32 scalar: non-finite updates skipped
    frozen: Any = None     # {name: nested dict of arrays} or None
    base: Any = None       # with adapters: the frozen base's nested dict (not saved)


def params_of(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def init_state(params, optimizer, seed: int, frozen=None, base=None) -> TrainState:
    rng = jax.random.key_data(jax.random.key(seed))
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng,
                      jnp.zeros((), jnp.int32), frozen, base)


def state_shardings(abstract_state: TrainState, param_sharding_tree, mesh: Mesh,
                    frozen_sharding_trees: dict | None = None,
                    base_sharding_tree=None) -> TrainState:
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
    frozen = None
    if abstract_state.frozen is not None:
        frozen = {name: frozen_sharding_trees[name] for name in abstract_state.frozen}
    return TrainState(replicated, param_sharding_tree, opt, replicated, replicated, frozen,
                      base_sharding_tree)


def model_param_shardings(abstract_model_state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Nested dict of NamedShardings for a model's parameters (pure-dict layout)."""
    return nnx.to_pure_dict(param_shardings(abstract_model_state, mesh, rules))
