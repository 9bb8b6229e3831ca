"""What a resumed run may change: the operative config compared with the checkpoint's.

A run resumed with another learning rate, model, data or loss would continue as if
nothing changed and produce a model nobody asked for. The loop records every config
field of the run (``config_record``) in each checkpoint and compares it on resume:
changes that are safe by nature (extending ``TrainConfig.steps``, logging, eval and save
cadence, progress bars, the mesh, math-preserving execution choices) are allowed and
logged; any other change is refused with the list of old -> new values, unless the user
passes ``--allow-config-change`` (``allow_config_change=True``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jalign.errors import ConfigError, first_line
from jalign.models.families import config_classes

# Fields whose change cannot alter what is trained (or only its float summation order).
SAFE = {
    "TrainConfig": {"steps", "save_every", "keep", "async_save", "eval_every", "eval_batches",
                    "eval_at_start", "log_every", "progress", "peak_flops", "run_name",
                    "output_root"},
    "DataConfig": {"prefetch"},
    "eval/DataConfig": "*",  # what is evaluated, never what is trained
    # checkpoints restore onto any mesh
    "MeshConfig": {"data", "fsdp", "tensor", "num_devices", "dcn_data", "dcn_fsdp", "topology"},
    # every model family's config: math-preserving execution choices
    **{cls.__name__: {"scan_layers", "remat_policy", "attention_impl"}
       for cls in config_classes()},
}
NOTES = {"TrainConfig.steps": "the learning-rate schedule spans the new total"}

# Settings added with a default that behaves otherwise than the code before them did:
# what a checkpoint written before the field existed ran with. Resuming it with another
# value is a change (refused unless allowed); binding the old value resumes it exactly.
BEFORE_FIELD = {
    "GRPOConfig.sampler_draw": "gumbel",   # inverse_cdf since: other tokens
    "GRPOConfig.share_prompt": False,      # whole groups shuffled since, prompt run once
}


def _plain(value):
    """JSON-comparable form of a config value (tuples -> lists, dataclasses -> dicts)."""
    return json.loads(json.dumps(value, default=lambda o: dataclasses.asdict(o)
                                 if dataclasses.is_dataclass(o) else str(o)))


def config_record(configs: dict) -> dict:
    """{"Class.field": value} for every field of every config (``{binding: dataclass}``;
    None entries are left out)."""
    out = {}
    for binding, config in configs.items():
        if config is None:
            continue
        for field in dataclasses.fields(config):
            out[f"{binding}.{field.name}"] = _plain(getattr(config, field.name))
    return out


def default_record(configs: dict) -> dict:
    """config_record of each config class's defaults (classes that have them for every
    field): a field missing from an older checkpoint's record and at its default now is a
    setting added since, with the behaviour the run had, not a change."""
    out = {}
    for binding, config in configs.items():
        if config is None:
            continue
        try:
            out.update(config_record({binding: type(config)()}))
        except TypeError:  # a field without a default
            pass
    return out


def changes(old: dict, new: dict, defaults: dict | None = None) -> tuple[list[str], list[str]]:
    """(safe, unsafe) changes between two config records, each 'binding: old -> new'.
    ``defaults``: default_record of the new configs (fields an older record lacks and that
    are at their default are not changes)."""
    safe, unsafe = [], []
    defaults = defaults or {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if key not in old and key in new and key in BEFORE_FIELD:
            a = BEFORE_FIELD[key]  # the behaviour the older run had
        elif key not in old and key in defaults and defaults[key] == b:
            continue
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and _same_but_added(a, b, defaults.get(key)):
            continue
        binding, field = key.rsplit(".", 1)
        line = f"{key}: {a!r} -> {b!r}"
        if SAFE.get(binding) == "*" or field in SAFE.get(binding, ()):
            note = NOTES.get(key)
            safe.append(line + (f" ({note})" if note else ""))
        else:
            unsafe.append(line)
    return safe, unsafe


def _same_but_added(old: dict, new: dict, default) -> bool:
    """A nested config (e.g. PPOConfig.rewards) equal to the old one but for fields added
    since, each at its default."""
    if not isinstance(default, dict):
        return False
    missing = object()
    added = {k: v for k, v in new.items() if k not in old}
    return ({k: v for k, v in new.items() if k in old} == old
            and all(default.get(k, missing) == v for k, v in added.items()))


def check_resume(old: dict | None, new: dict, *, step: int, allow: bool, log,
                 defaults: dict | None = None) -> None:
    """Refuse (ConfigError) or log what changed since the checkpoint at ``step``
    (``defaults``: see ``changes``)."""
    if old is None:
        log(f"note: the checkpoint at step {step} predates config records; the config was "
            "not compared")
        return
    safe, unsafe = changes(old, new, defaults)
    for line in safe:
        log(f"resume: changed {line}")
    if unsafe and not allow:
        raise ConfigError(
            f"resuming step {step} with a changed config: " + "; ".join(unsafe)
            + ". Restore the old values, use another TrainConfig.run_name, or pass "
            "--allow-config-change to continue with the new ones")
    for line in unsafe:
        log(f"resume: changed {line} (allowed by --allow-config-change)")


def model_record(model_config, model_init, execution_fields) -> dict:
    """The model config fields that decide the run: all of them for a random init; only
    the execution fields for a model read from a checkpoint (its architecture comes from
    there, and the checkpoint's own config is what a resumed run restores)."""
    record = config_record({type(model_config).__name__: model_config})
    if model_init.source == "random":
        return record
    keep = execution_fields if model_init.use_execution_config else ()
    return {k: v for k, v in record.items() if k.split(".", 1)[1] in keep}


def resume_defaults(configs: dict, model_config) -> dict:
    """The defaults a resumed run's record is compared with (a field an older checkpoint's
    record lacks, at its default now, is a setting added since): every config's, and the
    model's (its record holds model config fields too, e.g. ``lora``, added with LoRA)."""
    return default_record({**configs, type(model_config).__name__: model_config})


# ------------------------------------------------------------------ where a run resumes

@dataclasses.dataclass
class ResumePoint:
    """What a run starts from: a fresh start (``step`` None) or a checkpoint step."""

    record: dict                   # this run's config record (saved with every step)
    source: Any                    # the run's ModelInit source (a ModelSource), pinned
    model_config: Any              # the trained architecture (the checkpoint's on resume)
    ckpt: Any = None               # the TrainCheckpointer of an existing run directory
    data_shards: int = 1
    step: int | None = None
    metadata: dict | None = None
    stored: Any = None             # the checkpoint's roles (roles.StoredRoles)
    seed: int = 0
    use_execution_config: bool = True

    def role_records(self, models) -> dict:
        """name -> ``roles.role_record`` of each role, from this run's configs: its own
        source (``Role.source``) or the run's ModelInit, with ModelInit's seed. A jalign
        source is pinned to a step: the one the run started from (recorded with each
        checkpoint), or its latest at the start."""
        from jalign.sources import ModelSource
        from jalign.train.roles import role_record
        stored = self.stored.records if self.stored is not None else {}
        out = {}
        for index, role in enumerate(models.roles):
            source = None
            if role.like is None:
                current = (ModelSource.parse(role.source, what=role.set_by or role.name)
                           if role.source else self.source)
                recorded = stored.get(role.name, {}).get("source")
                source = _recorded_step(current, recorded)
                # A fresh run pins its sources; a resumed one keeps what it recorded (a run
                # written before roles may have recorded none: its latest step is read
                # only if its fixed part must be rebuilt).
                source = str(source.pinned() if self.step is None else source)
            out[role.name] = role_record(role, source, self.seed, self.use_execution_config,
                                         index)
        return out


def _recorded_step(current, recorded: str | None):
    """``current`` with the step a run recorded for the same jalign directory (the step it
    started from, though the directory's run may have trained on since)."""
    from jalign.sources import ModelSource
    if current.scheme != "jalign" or current.step is not None or not recorded:
        return current
    before = ModelSource.parse(recorded, what="recorded source")
    if before.scheme == "jalign" and before.location == current.location:
        return current.with_step(before.step)
    return current


def read_resume_point(ckpt, step: int, recipe, configs, by_binding: dict, record: dict, *,
                      allow: bool, log) -> ResumePoint:
    """The newest readable checkpoint of ``ckpt``'s run, checked against this run: its
    roles, its config record (changes refused unless ``allow``), its data shards."""
    from jalign.train.roles import stored_roles
    meta, step = ckpt.newest_readable()
    stored = stored_roles(meta)
    _check_roles(ckpt.run_dir, stored, recipe)
    init = configs.model_init
    check_resume(ckpt.read_config_record(step), record, step=step, allow=allow, log=log,
                 defaults=resume_defaults(by_binding, configs.model))
    try:
        model_config = resumed_model_config(ckpt.run_dir, step, configs.model, init)
    except (OSError, ValueError) as e:
        raise ConfigError(f"resuming {ckpt.run_dir}: {first_line(e)}") from None
    if stored.legacy and configs.optimizer.trainable is not None:
        raise ConfigError(
            f"resuming {ckpt.run_dir} step {step}: it was written before roles with "
            f"OptimizerConfig.trainable={configs.optimizer.trainable!r}, and its optimizer "
            "state holds moments for the frozen parameters, which runs no longer keep; start "
            f"a new run from it (ModelInit.source='jalign:{ckpt.run_dir}')")
    # Checkpoints from before shards were recorded come from one-process runs.
    data_shards = int(meta.get("data_shards", 1))
    _check_shards(ckpt.run_dir, step, data_shards)
    source = init.model_source()
    # The step of a jalign: source the run started from (its frozen parts are rebuilt from
    # it, even when that run has trained on since).
    if meta.get("initial_model_step") is not None and source.step is None:
        source = source.with_step(meta["initial_model_step"])
    return ResumePoint(record=record, source=source, model_config=model_config, ckpt=ckpt,
                       data_shards=data_shards, step=step, metadata=meta, stored=stored,
                       seed=init.seed, use_execution_config=init.use_execution_config)


def _check_roles(run_dir, stored, recipe) -> None:
    """The checkpoint holds the models this recipe trains and holds (names and heads)."""
    have = sorted((r.name, r.head) for r in stored.roles)
    want = sorted((r.name, r.head) for r in recipe.roles)
    if have != want:
        def show(pairs):
            return ", ".join(f"{n} ({h} head)" for n, h in pairs)
        raise ConfigError(f"{run_dir} holds a run with roles {show(have)}; algorithm "
                          f"{recipe.name!r} has roles {show(want)}: the train states differ, "
                          "use another TrainConfig.run_name")


def _check_shards(run_dir, step: int, data_shards: int) -> None:
    import jax
    processes = jax.process_count()
    if data_shards % processes:
        raise ConfigError(
            f"resuming {run_dir} step {step}: its data stream is split into "
            f"{data_shards} shard(s) (DataConfig.shards, or the process count the run "
            f"started with), which {processes} processes cannot share evenly; resume "
            f"on a process count that divides {data_shards}, or start runs with "
            "DataConfig.shards set to a multiple of every process count you will use")


def resumed_model_config(run_dir, step: int, gin_config, model_init):
    """The checkpoint's architecture with this run's execution fields (remat, scan,
    attention backend, compute dtype), as a fresh run from the same source would have
    them; the parameter dtype is the stored state's and cannot change on resume."""
    from jalign.checkpoint import read_model_config
    from jalign.sources import EXECUTION_FIELDS
    stored = read_model_config(run_dir, step)
    if model_init.source != "random" and not model_init.use_execution_config:
        return stored
    if gin_config.param_dtype != stored.param_dtype:
        name = type(gin_config).__name__
        raise ConfigError(f"{name}.param_dtype={gin_config.param_dtype!r}: the train state "
                          f"at step {step} is stored as {stored.param_dtype!r} and a resumed run "
                          "keeps it; convert the checkpoint or start another TrainConfig.run_name")
    return stored.replace(**{f: getattr(gin_config, f) for f in EXECUTION_FIELDS
                             if f != "param_dtype"})
