"""Roles: the named models a run trains and holds.

A recipe (``jalign.algos``) names its roles: ``policy`` (the model being trained),
``reference`` (DPO/PPO: a frozen copy of the initial policy), ``value`` (PPO's value
model), ``reward`` (a reward model being trained) ... Each ``Role`` has

- a head: ``lm`` (next-token logits) or ``scalar`` (one score per sequence);
- where its initial weights come from: the run's ``ModelInit.source`` (default), a model
  source of its own (``source``), or another role's initial weights (``like``: a copy, or
  that role's source read with this role's head);
- what of it trains (``trains``): ``all``, ``none``, ``adapters`` (LoRA adapters, and a
  scalar head's score), or the parameters whose path matches a regex;
- whether the train step reads it (``in_step``; a role that trains always is).

One mechanism decides what trains. What trains of a role is in ``TrainState.params[role]``:
differentiated, in the optimizer, saved with every checkpoint. Everything else (a frozen
role's whole model, a trained role's frozen rest: its LoRA base or what a regex leaves out)
is in ``TrainState.fixed[role]``: never differentiated, not in the optimizer, not saved;
rebuilt from its source on restore and checked against checksums saved with each step.
Two cases hold nothing of their own:
- a frozen role ``like`` a role that trains adapters reads that role's base with the
  adapters off (the DPO/PPO reference under LoRA: one base in memory);
- a scalar role ``like`` an lm role, both training adapters, with
  ``LoraConfig.value_base='shared'``, reads that role's base backbone (PPO's value model).

This module is also the only one that knows the model kinds recorded by checkpoints
written before roles (``causal_lm``, ``scalar_head``, ``policy_value``).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
from flax import nnx, traverse_util

from jalign.models.build import abstract_model
from jalign.models.heads import HEADS, LM, SCALAR, SCORE_PARAM, lm_backbone
from jalign.models.lora import is_adapter

ALL, NONE, ADAPTERS = "all", "none", "adapters"
KEYWORDS = (ALL, NONE, ADAPTERS)


@dataclasses.dataclass(frozen=True)
class Role:
    name: str
    head: str = LM
    source: str | None = None   # a model source of its own; None: the run's ModelInit
    like: str | None = None     # start from another role's initial weights
    trains: str = ALL           # all | none | adapters | a regex over parameter paths
    in_step: bool = True        # read by the train step (a trained role always is)
    set_by: str | None = None   # the binding that chose its source (named in errors)

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"role {self.name!r}: head={self.head!r}; one of {HEADS}")
        if self.source is not None and self.like is not None:
            raise ValueError(f"role {self.name!r}: give source or like, not both")
        if self.trains not in KEYWORDS:
            try:
                re.compile(self.trains)
            except re.error as e:
                raise ValueError(f"role {self.name!r}: trains={self.trains!r} is neither one "
                                 f"of {KEYWORDS} nor a regex: {e}") from None

    @property
    def trained(self) -> bool:
        return self.trains != NONE

    @property
    def read_in_step(self) -> bool:
        return self.trained or self.in_step


def with_user_choices(roles, *, lora, trainable: str | None) -> tuple[Role, ...]:
    """The recipe's roles with what the user chose to train: every role the recipe trains
    whole trains adapters (``LoraConfig.rank > 0``) or the parameters matching
    ``OptimizerConfig.trainable``."""
    out = []
    for role in roles:
        if role.trains == ALL and lora is not None and lora.enabled:
            role = dataclasses.replace(role, trains=ADAPTERS)
        elif role.trains == ALL and trainable is not None:
            role = dataclasses.replace(role, trains=trainable)
        out.append(role)
    return tuple(out)


# ------------------------------------------------------------------ what trains

def is_trained(trains: str, path: tuple, qualified: str) -> bool:
    """Whether the parameter at ``path`` trains; a regex is searched in ``qualified`` (the
    path as 'a/b/c', prefixed with the role's name when the run trains several roles, as
    the parameter trees of such runs have always been named)."""
    if trains == ALL:
        return True
    if trains == NONE:
        return False
    if trains == ADAPTERS:  # a fresh score head has nothing to adapt: it trains too
        return is_adapter(str(path[-1])) or path[-1] == SCORE_PARAM
    return bool(re.search(trains, qualified))


def split(tree: dict, trains: str, prefix: str = "") -> tuple[dict, dict | None]:
    """(trained, fixed) parts of a role's full parameter tree; fixed None when all train.
    ``prefix``: 'role/' when the run trains several roles (see ``is_trained``)."""
    if trains == ALL:
        return tree, None
    flat = traverse_util.flatten_dict(tree)
    mark = {k: is_trained(trains, k, prefix + "/".join(map(str, k))) for k in flat}
    return (traverse_util.unflatten_dict({k: v for k, v in flat.items() if mark[k]}),
            traverse_util.unflatten_dict({k: v for k, v in flat.items() if not mark[k]}))


def join(trained: dict | None, fixed: dict | None) -> dict:
    """A role's full tree from its two parts (the inverse of ``split``)."""
    if not fixed:
        return trained or {}
    flat = traverse_util.flatten_dict(fixed)
    flat.update(traverse_util.flatten_dict(trained or {}))
    return traverse_util.unflatten_dict(flat)


def regex_prefix(roles, name: str) -> str:
    """What a trains-regex of role ``name`` is matched after (see ``is_trained``)."""
    return f"{name}/" if sum(r.trained for r in roles) > 1 else ""


# ------------------------------------------------------------------ a run's models

@dataclasses.dataclass(frozen=True, eq=False)
class RunModels:
    """A run's roles with their model configs, and how their parameter trees are put
    together from ``TrainState.params`` and ``TrainState.fixed``."""

    roles: tuple[Role, ...]
    configs: dict          # role name -> model config (``lora`` set when it trains adapters)
    value_base: str = "shared"

    @classmethod
    def single(cls, config, head: str = LM, name: str = "policy") -> "RunModels":
        """One role that trains every parameter of ``config``'s model (tests, benchmarks,
        planners)."""
        return cls((Role(name, head=head),), {name: config})

    def role(self, name: str) -> Role:
        return next(r for r in self.roles if r.name == name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.roles)

    @property
    def trained(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.roles if r.trained)

    @property
    def in_step(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.roles if r.read_in_step)

    @property
    def primary(self) -> str:
        """The role a run is judged and exported by: its first trained role."""
        return self.trained[0]

    @property
    def adapters(self) -> bool:
        return any(r.trains == ADAPTERS for r in self.roles)

    @functools.cached_property
    def views(self) -> dict:
        """role -> (other role, 'base' | 'backbone') for roles that read another's fixed
        part instead of holding their own (see the module docstring)."""
        out = {}
        for r in self.roles:
            other = self.role(r.like) if r.like is not None else None
            if other is None or other.trains != ADAPTERS:
                continue
            if r.trains == NONE and r.head == other.head:
                out[r.name] = (other.name, "base")
            elif (r.trains == ADAPTERS and (other.head, r.head) == (LM, SCALAR)
                  and self.value_base == "shared"):
                out[r.name] = (other.name, "backbone")
        return out

    @property
    def stored_fixed(self) -> tuple[str, ...]:
        """Roles with a part of their own in ``TrainState.fixed``."""
        return tuple(r.name for r in self.roles if r.trains != ALL and r.name not in self.views)

    def split(self, name: str, tree: dict) -> tuple[dict | None, dict | None]:
        """(trained part or None, fixed part to store or None) of role ``name``'s full tree."""
        role = self.role(name)
        trained, fixed = split(tree, role.trains, regex_prefix(self.roles, name))
        if name in self.views:
            fixed = None
        return (trained if role.trained else None), fixed

    def fixed_tree(self, name: str, fixed: dict | None):
        if name in self.views:
            other, how = self.views[name]
            return fixed[other] if how == "base" else lm_backbone(fixed[other])
        return (fixed or {}).get(name)

    def tree(self, name: str, params: dict, fixed: dict | None) -> dict:
        """Role ``name``'s full parameter tree."""
        return join(params.get(name) if self.role(name).trained else None,
                    self.fixed_tree(name, fixed))

    def trees(self, params: dict, fixed: dict | None, names=None) -> dict:
        return {n: self.tree(n, params, fixed) for n in (names or self.names)}

    @functools.cached_property
    def _graphdefs(self) -> dict:
        return {r.name: abstract_model(self.configs[r.name], head=r.head)[0] for r in self.roles}

    def graphdef(self, name: str):
        return self._graphdefs[name]

    def models(self, params: dict, fixed: dict | None, names=None) -> dict:
        """{role: NNX model} merged from the state's parts (default: the step's roles);
        the fixed parts are read without gradient."""
        fixed = jax.lax.stop_gradient(fixed) if fixed else fixed
        return self.merged(self.trees(params, fixed, names or self.in_step))

    def merged(self, trees: dict) -> dict:
        """{role: NNX model} of full parameter trees ``{role: tree}``."""
        return {n: nnx.merge(self._graphdefs[n], tree) for n, tree in trees.items()}


def role_config(config, role: Role, roles: tuple[Role, ...], lora):
    """The model config of ``role`` given the trained architecture ``config`` (plain) and
    the run's LoraConfig: adapters where it trains them, the base with adapters off where
    it reads a role's base, a plain model otherwise."""
    plain = config.replace(lora=None)
    if role.trains == ADAPTERS:
        return plain.replace(lora=lora)
    other = next((r for r in roles if r.name == role.like), None)
    if other is not None and other.trains == ADAPTERS and role.trains == NONE:
        return plain.replace(lora=lora.adapters_off())
    return plain


# ------------------------------------------------------------------ what checkpoints record

LAYOUT = 2  # params item {role: trained part}; roles in metadata['roles']
# Checkpoints written before roles: the model kind they trained -> its roles.
LEGACY_KINDS = {
    "causal_lm": (Role("policy"),),
    "scalar_head": (Role("reward", head=SCALAR),),
    "policy_value": (Role("policy"), Role("value", head=SCALAR, like="policy")),
}
LEGACY_MODEL = "causal_lm"  # what a checkpoint without a model kind holds


def role_record(role: Role, source: str | None, seed: int, use_execution_config: bool,
                index: int = 0) -> dict:
    """What a checkpoint's metadata says about a role (``metadata['roles'][name]``):
    enough to rebuild its fixed part. ``source``: the pinned model source it was read from
    (for a role ``like`` another: None, the other's source); ``index``: its place among
    the run's roles."""
    return {"head": role.head, "trains": role.trains, "in_step": role.in_step,
            "like": role.like, "source": source, "seed": seed,
            "use_execution_config": use_execution_config, "index": index}


@dataclasses.dataclass(frozen=True)
class StoredRoles:
    """The roles a checkpoint holds, read from its metadata (any layout)."""

    roles: tuple[Role, ...]
    records: dict            # name -> role_record dict (sources, seeds)
    bare: bool               # the params item is the one trained role's tree itself
    legacy: bool             # written before roles

    def saved_path(self, name: str) -> tuple:
        """Where role ``name``'s trained part is in the params item."""
        return () if self.bare else (name,)

    def run_models(self, config) -> RunModels:
        """The roles' models given the checkpoint's model config."""
        configs = {r.name: role_config(config, r, self.roles, config.lora) for r in self.roles}
        lora = config.lora
        return RunModels(self.roles, configs, lora.value_base if lora is not None else "shared")


def _legacy_roles(metadata: dict) -> StoredRoles:
    kind = metadata.get("model_kind", LEGACY_MODEL)
    if kind not in LEGACY_KINDS:
        raise ValueError(f"unknown model kind {kind!r} in checkpoint metadata")
    pointer = metadata.get("lora_base")  # a LoRA run: its base's source
    trained = LEGACY_KINDS[kind]
    if pointer is not None:
        trained = tuple(dataclasses.replace(r, trains=ADAPTERS) for r in trained)
        if kind == "policy_value" and pointer.get("value_init", "policy") != "policy":
            trained = (trained[0], dataclasses.replace(trained[1], like=None,
                                                        source=pointer["value_init"]))
    if "frozen" in metadata:
        frozen_names = tuple(metadata["frozen"])
    else:  # before the list: only a DPO reference, recorded as its mode
        frozen_names = ("reference",) if metadata.get("reference") == "in_step" else ()
    # PPO's reference was held for the rollouts, not read by the step.
    frozen = tuple(Role(n, like="policy", trains=NONE, in_step=kind != "policy_value")
                   for n in frozen_names)
    records = {}
    for index, r in enumerate(trained + frozen):
        source = None
        if pointer is not None and r.like is None:
            source = r.source or _pointer_source(pointer)
        records[r.name] = role_record(r, source, (pointer or {}).get("seed", 0),
                                      (pointer or {}).get("use_execution_config", True), index)
    return StoredRoles(trained + frozen, records, bare=kind != "policy_value", legacy=True)


def _pointer_source(pointer: dict) -> str:
    source, step = pointer["source"], pointer.get("step")
    return f"{source}@{step}" if step is not None and source.startswith("jalign:") else source


def stored_roles(metadata: dict) -> StoredRoles:
    """The roles of a checkpoint from its metadata: recorded since roles exist, derived
    from the model kind before; a params-only model checkpoint holds one role (its head)."""
    if metadata.get("layout") == LAYOUT:
        roles, records = [], {}
        # In the recipe's order (JSON writers may sort the keys): the first trained role
        # is the run's primary one.
        ordered = sorted(metadata["roles"].items(), key=lambda kv: kv[1].get("index", 0))
        for name, rec in ordered:
            roles.append(Role(name, head=rec["head"], like=rec.get("like"),
                              trains=rec["trains"], in_step=rec.get("in_step", True)))
            records[name] = rec
        return StoredRoles(tuple(roles), records, bare=False, legacy=False)
    if "head" in metadata:  # a model checkpoint (jalign convert hf-to-jalign)
        return StoredRoles((Role("policy" if metadata["head"] == LM else "reward",
                                 head=metadata["head"]),), {}, bare=True, legacy=False)
    return _legacy_roles(metadata)


def fixed_checksums(metadata: dict, stored: StoredRoles) -> dict:
    """{'role/path': checksum} of the fixed parts a step's run held (empty when none were
    recorded), whatever the layout."""
    sums = metadata.get("checksums", {})
    if not stored.legacy:
        return dict(sums.get("fixed", {}))
    out = dict(sums.get("frozen", {}))  # frozen models, already keyed by their names
    base = sums.get("base", {})  # a LoRA base: the trained role's rest
    if stored.bare:
        name = next(r.name for r in stored.roles if r.trained)
        base = {f"{name}/{k}": v for k, v in base.items()}
    out.update(base)
    return out
