"""The algorithms ``TrainConfig.algorithm`` names: one table from name to its recipe file.

Each file in ``jalign.algos`` is one algorithm: ``CONFIG`` (its gin-bindable settings
class, or None), ``recipe(config) -> Recipe`` and a one-line ``SUMMARY``. A new algorithm
is one file, one entry here and one gin file (``configs/algo/NAME.gin``); the
gin-registered config classes are derived from this table, and the loop reads only the
``Recipe``.
"""

from __future__ import annotations

from types import ModuleType

from jalign.algos import dpo, grpo, ift, ppo, rm, sft
from jalign.errors import ConfigError
from jalign.train.recipe import Recipe

RECIPES: dict[str, ModuleType] = {"sft": sft, "rm": rm, "dpo": dpo, "ift": ift, "ppo": ppo,
                                   "grpo": grpo}


def config_classes() -> tuple[type, ...]:
    """The algorithms' config dataclasses, for gin registration."""
    return tuple(m.CONFIG for m in RECIPES.values() if getattr(m, "CONFIG", None) is not None)


def entry(name: str) -> ModuleType:
    if name not in RECIPES:
        known = ", ".join(f"{n!r} ({m.SUMMARY})" for n, m in RECIPES.items())
        raise ConfigError(f"TrainConfig.algorithm={name!r}; one of {known}")
    return RECIPES[name]


def build(name: str, config=None) -> Recipe:
    """The recipe ``name`` with ``config`` (its config class's defaults when None)."""
    module = entry(name)
    config_class = getattr(module, "CONFIG", None)
    if config is None and config_class is not None:
        config = config_class()
    return module.recipe(config)
