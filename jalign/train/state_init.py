"""The sharded train state of a run's roles: its abstract shape (the restore target), a
fresh one from the roles' initial models, or a restored one whose unsaved fixed parts are
rebuilt from their sources and checked against the checksums saved with the step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jalign.checkpoint import CheckpointError
from jalign.sources import rebuilt_fixed_part
from jalign.errors import ConfigError, first_line
from jalign.models.build import abstract_model, params_of
from jalign.train import roles as R
from jalign.train.hosts import agree_min
from jalign.train.optimizer import make_optimizer
from jalign.train.state import init_state, model_param_shardings, state_shardings


def _shapes(tree):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), tree)


def role_parts(models: R.RunModels, mesh=None, rules=None) -> tuple[dict, dict, dict, dict]:
    """(params, params shardings, fixed, fixed shardings) as abstract shapes: each role's
    trained part and the fixed part it holds (shardings None without a mesh)."""
    params, params_sh, fixed, fixed_sh = {}, {}, {}, {}
    for role in models.roles:
        kwargs = {} if rules is None else {"rules": rules}
        _, abstract = abstract_model(models.configs[role.name], mesh, head=role.head, **kwargs)
        shapes = _shapes(nnx.to_pure_dict(abstract))
        sh = model_param_shardings(abstract, mesh, **kwargs) if mesh is not None else shapes
        (trained, fx), (trained_sh, fx_sh) = (models.split(role.name, shapes),
                                              models.split(role.name, sh))
        if trained is not None:
            params[role.name], params_sh[role.name] = trained, trained_sh
        if fx is not None:
            fixed[role.name], fixed_sh[role.name] = fx, fx_sh
    return params, params_sh, fixed, fixed_sh


def build_optimizer(opt_config, models: R.RunModels, total_steps: int):
    """(optimizer, schedule) over what trains (a frozen parameter has no state in it)."""
    return make_optimizer(opt_config, role_parts(models)[0], total_steps)


def abstract_train_state(models: R.RunModels, optimizer, mesh, rules):
    """(abstract TrainState with shardings, its shardings): the restore target."""
    params, params_sh, fixed, fixed_sh = role_parts(models, mesh, rules)
    shapes = jax.eval_shape(lambda p, f: init_state(p, optimizer, 0, f), params, fixed or None)
    sh = state_shardings(shapes, params_sh, mesh, fixed_sh or None)
    abstract = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                            shapes, sh)
    return abstract, sh


def _aliased(parts: dict) -> set:
    """Names of the parts (``{name: tree}``) that share an array with another part."""
    owners: dict[int, set] = {}
    for name, tree in parts.items():
        for leaf in jax.tree.leaves(tree):
            owners.setdefault(id(leaf), set()).add(name)
    return {n for names in owners.values() if len(names) > 1 for n in names}


def fresh_state(models: R.RunModels, initial, optimizer, seed: int, shardings):
    """The initial TrainState placed with ``shardings`` (optimizer state created in place).

    A fixed part that shares arrays with another part (a reference read from the policy's
    initial model, two roles from one source) is copied: the step donates the state, and
    one buffer cannot be donated twice. A fixed part of its own (a LoRA base) is donated
    into the state: no second copy of the base while starting."""
    params, fixed = {}, {}
    for role in models.roles:
        if not role.trained and role.name not in models.stored_fixed:
            continue
        trained, fx = models.split(role.name, params_of(initial.model(role.name)))
        if trained is not None:
            params[role.name] = trained
        if fx is not None:
            fixed[role.name] = fx
    parts = {**{("params", n): t for n, t in params.items()},
             **{("fixed", n): t for n, t in fixed.items()}}
    shared = {n for kind, n in _aliased(parts) if kind == "fixed"}
    copies = {n: t for n, t in fixed.items() if n in shared}
    own = {n: t for n, t in fixed.items() if n not in shared}

    def init(p, c, o):
        fixed = {**jax.tree.map(jnp.copy, c), **o}
        return init_state(p, optimizer, seed, fixed or None)

    return jax.jit(init, out_shardings=shardings, donate_argnums=(2,))(params, copies, own)


def rebuilt_fixed(models: R.RunModels, initial, names, metadata: dict, run_dir) -> dict:
    """{role: fixed part} of ``names`` rebuilt from their sources, each checked against the
    checksums the step recorded (a source that changed since is refused)."""
    expected = R.fixed_checksums(metadata, R.stored_roles(metadata))
    out = {}
    for name in names:
        role = models.role(name)
        where = _where(initial, name)
        try:
            fx, bad = rebuilt_fixed_part(models, initial, name, expected)
        except (CheckpointError, OSError, ValueError) as e:
            raise ConfigError(f"resuming {run_dir}: the frozen part of role {name!r} is "
                              f"rebuilt from {where}, which fails to load: {first_line(e)}") from None
        if bad:
            what = (f"the frozen models rebuilt from {where} differ from the ones"
                    if not role.trained else
                    f"the frozen part of role {name!r} (its base) rebuilt from {where} "
                    "differs from the one")
            raise ConfigError(f"resuming {run_dir}: {what} this run trained with ({len(bad)} "
                              f"arrays, e.g. {bad[:2]}): the source changed since; restore it, "
                              "or start another TrainConfig.run_name")
        out[name] = fx
    # Own buffers: several roles may read one initial model, and the step donates the state.
    shared = _aliased(out)
    return {n: jax.tree.map(jnp.copy, t) if n in shared else t for n, t in out.items()}


def _where(initial, name: str) -> str:
    role = initial.models.role(name)
    source = str(initial.source_of(name)[0])
    binding = role.set_by or ("ModelInit.source" if role.source is None else f"role {name!r}")
    return f"{binding}={source!r}"


@dataclasses.dataclass
class Built:
    optimizer: object
    schedule: object
    shardings: object
    state: object


def planned_state(models: R.RunModels, opt_config, mesh, rules, schedule_steps: int):
    """(optimizer, schedule, abstract state, its shardings): what a run's state is before
    any array exists (``jalign plan`` compiles for it; a run restores into it)."""
    optimizer, schedule = build_optimizer(opt_config, models, schedule_steps)
    abstract, shardings = abstract_train_state(models, optimizer, mesh, rules)
    return optimizer, schedule, abstract, shardings


def build_state(models: R.RunModels, initial, configs, mesh, rules, ckpt, point, source,
                run_dir, log) -> Built:
    """The optimizer over what trains (its schedule spans the steps the run will take:
    TrainConfig.steps, or fewer when the data ends first) and the train state, restored
    at ``point`` (the source's state given back to it) or fresh."""
    tc = configs.train
    total = source.total()
    schedule_steps = tc.steps if total is None else max(1, min(tc.steps, agree_min(total)))
    optimizer, schedule, abstract, shardings = planned_state(models, configs.optimizer, mesh,
                                                             rules, schedule_steps)
    if point.step is None:
        state = fresh_state(models, initial, optimizer, tc.seed, shardings)
        return Built(optimizer, schedule, shardings, state)
    state, data_state, metadata, step = ckpt.restore_intact(abstract, log=log)
    fixed = dict(state.fixed or {})  # steps of very old runs saved their frozen models
    need = [n for n in models.stored_fixed if n not in fixed]
    if need:
        fixed.update(rebuilt_fixed(models, initial, need, metadata, run_dir))
    if fixed:
        fixed = jax.device_put(fixed, {n: shardings.fixed[n] for n in fixed})
    state = state._replace(fixed=fixed or None)
    source.set_state(data_state)
    log(f"resumed {run_dir} at step {step}")
    return Built(optimizer, schedule, shardings, state)
