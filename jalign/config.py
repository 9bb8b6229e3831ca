"""gin configuration: what may be bound, how files are parsed, the operative config.

Only dataclass constructors and entry functions are registered (principle 5). gin itself
rejects an unknown configurable or parameter; we re-raise that as ``ConfigError`` so that
callers (CLI, tests) get one error type whose message names the binding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tokenize
from pathlib import Path
from typing import Sequence

import gin

from jalign.algos import registry
from jalign.config_errors import parse_error_line, unbound_macro_line
from jalign.config_types import check_bindings
from jalign.data.pipeline import DataConfig
from jalign.distributed import DistributedConfig
from jalign.errors import ConfigError  # noqa: F401 (re-exported)
from jalign.models import families
from jalign.models.lora import LoraConfig
from jalign.rl.rewards import RewardConfig
from jalign.sharding import MeshConfig
from jalign.sources import ModelInit
from jalign.train.optimizer import OptimizerConfig
from jalign.train.train_config import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS_DIR = REPO_ROOT / "configs"


# Each model family's config, the run's configs, then each algorithm's (from the
# registries: a new family's or algorithm's config class is bindable without an edit here).
CLASSES = {cls.__name__: cls for cls in (*families.config_classes(), MeshConfig,
                                          TrainConfig, OptimizerConfig, DataConfig, ModelInit,
                                          RewardConfig, LoraConfig, DistributedConfig,
                                          *registry.config_classes())}
_REGISTERED: dict[str, object] = {}


def register() -> None:
    """Register jalign's configurables with gin (idempotent)."""
    if _REGISTERED:
        return
    for name, cls in CLASSES.items():
        _REGISTERED[name] = gin.external_configurable(cls, name=name)


def build(name: str, scope: str | None = None):
    """Construct the registered dataclass ``name`` from the current bindings (optionally
    inside a gin scope, e.g. ``eval`` for ``eval/DataConfig.split = 'eval'``).

    gin returns an instance of a wrapper subclass; rebuild it as the plain dataclass so
    equality and hashing behave (a config is a static jit argument).
    """
    register()
    cls = CLASSES[name]
    try:
        # get_bindings evaluates references (@RopeScaling()): their errors are the config's
        scoped = (set(gin.get_bindings(f"{scope}/{name}", inherit_scopes=False)) if scope
                  else set())
        with gin.config_scope(scope) if scope else contextlib.nullcontext():
            check_bindings(cls, gin.get_bindings(name),
                           lambda field: f"{scope}/{name}" if field in scoped else name)
            made = _REGISTERED[name]()
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        # gin appends "In call to configurable ..." on lines of its own
        text = str(e).split("\n  In call to configurable")[0].strip()
        raise ConfigError(text if text.startswith(name) else f"{name}: {text}") from None
    values = {f.name: getattr(made, f.name) for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        # A nested config (PPOConfig.rewards) comes from its own class's bindings
        # (RewardConfig.names = ...), so that it is bound like every other config.
        if dataclasses.is_dataclass(f.default) and type(f.default).__name__ in CLASSES:
            values[f.name] = build(type(f.default).__name__, scope)
    return cls(**values)


def algorithm(name: str):
    """The recipe of algorithm ``name`` with its config class built from the current
    bindings."""
    module = registry.entry(name)
    config_class = getattr(module, "CONFIG", None)
    return registry.build(name, build(config_class.__name__) if config_class else None)


def model_config():
    """The gin-bound model config (the default family's class)."""
    config = build(families.default_config_class().__name__)
    # A part bound as ``@RopeScaling()`` arrives as gin's wrapper subclass: make it the
    # plain dataclass (configs are compared, hashed and written as JSON).
    plain = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        cls = CLASSES.get(type(value).__name__)
        if dataclasses.is_dataclass(value) and cls is not None and type(value) is not cls:
            plain[f.name] = cls(**{g.name: getattr(value, g.name)
                                   for g in dataclasses.fields(cls)})
    return config.replace(**plain) if plain else config


def _drop_package_path_reader() -> None:
    """gin also looks for an include such as 'configs/model/small.gin' as a file inside a
    Python package ``configs.model``; with the repository on sys.path that finds a
    namespace package without a file and crashes (and logs an ERROR for every miss).
    jalign's includes are plain paths, so that reader is not wanted."""
    from gin import resource_reader
    gin.config._FILE_READERS[:] = [  # noqa: SLF001 (no public way to unregister a reader)
        r for r in gin.config._FILE_READERS if r[1] is not resource_reader.system_path_file_exists]


def config_file(path: str | os.PathLike) -> Path:
    """The file a config path names: relative to the working directory, else to the
    repository root (so the repository's configs/ work from anywhere)."""
    if Path(path).exists():
        return Path(path)
    if (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    raise ConfigError(f"config file {path} does not exist")


def parse(config_files: Sequence[str | os.PathLike] = (), bindings: Sequence[str] = ()) -> None:
    """Reset gin and parse ``config_files`` then ``bindings`` (later ones win).

    Includes resolve against the working directory and the repository root, so
    ``include 'configs/model/tiny.gin'`` works from anywhere.
    """
    register()
    gin.clear_config()
    _drop_package_path_reader()
    for location in (os.getcwd(), str(REPO_ROOT)):
        if location not in gin.config._LOCATION_PREFIXES:  # noqa: SLF001 (no public getter)
            gin.add_config_file_search_path(location)
    files = [str(config_file(p)) for p in config_files]
    try:
        gin.parse_config_files_and_bindings(
            files, list(bindings), finalize_config=False, skip_unknown=False)
    except (ValueError, KeyError, TypeError, SyntaxError, IOError, ImportError,
            tokenize.TokenError) as e:
        raise ConfigError("bad gin configuration: "
                          + parse_error_line(e, files, bindings)) from None
    unbound = unbound_macro_line()
    if unbound:
        raise ConfigError(f"bad gin configuration: {unbound}")


def operative_config() -> str:
    return gin.operative_config_str()
