"""Create models with their parameters already placed on a mesh.

Parameters are initialised inside one jitted function whose ``out_shardings`` come from
the rules table, so each device only ever materialises its own shards: a model too big
for one device can still be created.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx
from jax.sharding import Mesh

from jalign.models.heads import LM, model_class
from jalign.sharding import DEFAULT_RULES, Rules, param_shardings, use_mesh


def abstract_model(config, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                   model_cls=None, *, head: str = LM):
    """(graphdef, abstract state) where each leaf is a ShapeDtypeStruct with its sharding.
    The model is ``model_cls``, or the class of ``head`` in the config's family."""
    model_cls = model_cls or model_class(head, config)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0))))
    if mesh is None:
        return graphdef, state
    shardings = param_shardings(state, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            state, shardings)
    return graphdef, abstract


def create_model(config, *, seed: int = 0, mesh: Mesh | None = None,
                 rules: Rules = DEFAULT_RULES, model_cls=None, head: str = LM):
    """A randomly initialised model (``model_cls``, or the class of ``head`` in the
    config's family); sharded per ``rules`` when a mesh is given."""
    model_cls = model_cls or model_class(head, config)
    graphdef, abstract = abstract_model(config, mesh, rules, model_cls)
    shardings = None if mesh is None else jax.tree.map(lambda a: a.sharding, abstract)

    def init():
        return nnx.split(model_cls(config, rngs=nnx.Rngs(seed)))[1]

    # jit even without a mesh: eager init dispatches one op at a time (seconds).
    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def params_of(model) -> dict:
    """A model's parameters as a nested dict (``nnx.to_pure_dict``): the layout of
    checkpoints, train states and the HF converter."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@functools.lru_cache(maxsize=64)
def _jitted_forward(graphdef, mesh: Mesh | None, rules: Rules):
    def apply(state, input_ids, positions, segment_ids):
        model = nnx.merge(graphdef, state)
        if mesh is None:
            return model(input_ids, positions, segment_ids)
        with use_mesh(mesh, rules):
            return model(input_ids, positions, segment_ids)

    return jax.jit(apply)


def forward(model, input_ids, positions=None, segment_ids=None, *, mesh: Mesh | None = None,
            rules: Rules = DEFAULT_RULES):
    """Jitted ``model(input_ids, positions, segment_ids)``; compiled once per model
    structure, mesh and input shape. The mesh is a static argument because activation
    constraints are read from it at trace time."""
    graphdef, state = nnx.split(model)
    return _jitted_forward(graphdef, mesh, tuple(rules))(state, input_ids, positions, segment_ids)
