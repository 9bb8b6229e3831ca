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

from jalign.errors import ConfigError

# Fields whose change cannot alter what is trained (or only its float summation order).
SAFE = {
    "TrainConfig": {"steps", "save_every", "keep", "async_save", "eval_every", "eval_batches",
                    "eval_at_start", "log_every", "progress", "peak_flops", "run_name",
                    "output_root"},
    "DataConfig": {"prefetch"},
    "eval/DataConfig": "*",  # what is evaluated, never what is trained
    # checkpoints restore onto any mesh
    "MeshConfig": {"data", "fsdp", "tensor", "num_devices", "dcn_data", "dcn_fsdp"},
    "LlamaConfig": {"scan_layers", "remat_policy", "attention_impl"},
}
NOTES = {"TrainConfig.steps": "the learning-rate schedule spans the new total"}


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
        if a == b or (key not in old and key in defaults and defaults[key] == b):
            continue
        binding, field = key.rsplit(".", 1)
        line = f"{key}: {a!r} -> {b!r}"
        if SAFE.get(binding) == "*" or field in SAFE.get(binding, ()):
            note = NOTES.get(key)
            safe.append(line + (f" ({note})" if note else ""))
        else:
            unsafe.append(line)
    return safe, unsafe


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
    """The LlamaConfig fields that decide the run: all of them for a random init; only the
    execution fields for a model read from a checkpoint (its architecture comes from there,
    and the checkpoint's own config is what a resumed run restores)."""
    record = config_record({"LlamaConfig": model_config})
    if model_init.source == "random":
        return record
    keep = execution_fields if model_init.use_execution_config else ()
    return {k: v for k, v in record.items() if k.split(".", 1)[1] in keep}
