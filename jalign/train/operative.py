"""The operative config a run prints and saves, describing the model it actually trains.

gin's operative config lists the model config class's bindings (a preset's, or the
defaults), but those build only a ``random`` model: a model read from ``hf:``, ``gguf:``
or ``jalign:`` has the config its source describes. Printing the gin values for such a
run would describe another model (hidden 4096, 32 layers, a 32000-token vocabulary for a
135M SmolLM), so that section is replaced by the config of the model the run trains.
"""

from __future__ import annotations

import dataclasses

_RULE = "# " + "=" * 78


def _sections(text: str) -> list[list[str]]:
    """gin's operative text as blank-line separated sections of lines."""
    out, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def _binding(cls: str, field: str, value) -> str:
    """``Class.field = value`` as gin reads it; values gin has no literal for (a rope
    scaling dataclass) stay readable, as a comment."""
    if dataclasses.is_dataclass(value):
        return f"# {cls}.{field} = {value!r}"
    return f"{cls}.{field} = {value!r}"


def model_section(config, role: str, source: str, others: dict) -> list[str]:
    """The lines describing ``config`` (role ``role``, read from ``source``); ``others``:
    {role: (config, source)} of the run's other roles, each said where it differs."""
    cls = type(config).__name__
    lines = [f"# Parameters for {cls}:", _RULE,
             f"# The model trained (role {role!r}), as read from {source}: gin's {cls} "
             "bindings build only a 'random' model."]
    fields = [f for f in dataclasses.fields(config) if f.name != "lora"]  # see LoraConfig
    lines += [_binding(cls, f.name, getattr(config, f.name)) for f in fields]
    for name, (other, other_source) in others.items():
        if type(other) is not type(config):
            lines.append(f"# role {name!r} ({other_source}): a {type(other).__name__}")
            continue
        diff = [f.name for f in fields if getattr(other, f.name) != getattr(config, f.name)]
        if diff:
            lines.append(f"# role {name!r} ({other_source}) differs: " + ", ".join(
                f"{f}={getattr(other, f)!r}" for f in diff))
    return lines


def operative_for_models(operative: str, models, records: dict) -> str:
    """``operative`` with its model config section describing the models trained (kept
    as it is for a run whose primary role starts from 'random': that section built it)."""
    primary = models.primary
    source = records[primary].get("source") or records[_origin(models, primary)]["source"]
    if not operative or str(source) == "random":
        return operative
    config = models.configs[primary]
    header = f"# Parameters for {type(config).__name__}:"
    others = {n: (models.configs[n], records[_origin(models, n)]["source"])
              for n in models.names if n != primary}
    section = model_section(config, primary, source, others)
    sections = [s for s in _sections(operative) if s[0] != header]
    at = next((i for i, s in enumerate(sections) if s[0] > header), len(sections))
    sections.insert(at, section)  # gin orders sections by name
    return "\n\n".join("\n".join(s) for s in sections) + "\n"


def _origin(models, name: str) -> str:
    """The role whose source ``name`` starts from (following ``like``)."""
    role = models.role(name)
    while role.like is not None:
        role = models.role(role.like)
    return role.name
