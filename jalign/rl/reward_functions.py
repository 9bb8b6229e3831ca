"""User reward functions: Python functions named ``'module:function'`` in
``RewardConfig.functions``.

A reward function is called once per rollout on all its completions::

    def my_reward(prompts, completions, **fields) -> list[float]:   # one per completion

``prompts``: the prompt each completion answers, as the model read it (decoded: the chat
template's text, special tokens left out);
``completions``: the decoded completions; ``fields``: the prompt records' other columns
(e.g. ``answer``), each a list aligned with the completions, and ``completion_lengths``
(tokens). Accept ``**fields`` to ignore what you do not use. Completions of one prompt are
consecutive (a group, for the GRPO family). Every process of a multi-host run calls it on
all rows: it must return the same values for the same inputs (checked; a difference stops
the run).

The module is imported from the directories of the run's config files, the working
directory and ``PYTHONPATH``, in that order, when the run starts: a name that does not
import, or does not name a callable, is an error before anything is loaded. A function
that raises, returns another number of values than completions, or a value that is not a
finite number stops the run with one line naming the function and the row.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from jalign.errors import ConfigError, first_line


# Where 'module' is looked for first: the directories of the config files of the
# experiment being run (jalign.experiment.load_experiment sets them).
_search_dirs: list[str] = []


def set_search_dirs(dirs: Sequence[str | Path]) -> None:
    _search_dirs[:] = [str(Path(d).resolve()) for d in dirs]


class RewardError(ConfigError):
    """A reward function failed or returned something unusable (names it and the row)."""


def parse_spec(spec: str) -> tuple[str, str]:
    module, sep, name = str(spec).partition(":")
    if not sep or not module or not name or not all(
            part.isidentifier() for part in module.split(".") + name.split(".")):
        raise ConfigError(f"RewardConfig.functions: {spec!r} is not 'module:function' "
                          "(e.g. 'my_rewards:exact_answer')")
    return module, name


def load_function(spec: str, search_dirs: Sequence[str | Path] | None = None) -> Callable:
    """The callable ``spec`` names, imported with ``search_dirs`` (default: the config
    files' directories) first on the path."""
    module_name, attr = parse_spec(spec)
    dirs = _search_dirs if search_dirs is None else search_dirs
    added = [str(Path(d).resolve()) for d in dirs]
    added = [d for d in dict.fromkeys(added) if d not in sys.path]
    sys.path[:0] = added
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        where = ", ".join(added + ["the working directory", "PYTHONPATH"])
        raise ConfigError(f"RewardConfig.functions: {spec!r}: cannot import {module_name!r} "
                          f"({first_line(e)}); looked in {where}") from None
    except Exception as e:  # the module itself raised while importing
        raise ConfigError(f"RewardConfig.functions: {spec!r}: importing {module_name!r} "
                          f"raised {type(e).__name__}: {first_line(e)}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ConfigError(f"RewardConfig.functions: {spec!r}: {module_name!r} has no "
                          f"callable {attr!r}")
    _check_signature(spec, fn)
    return fn


def _check_signature(spec: str, fn: Callable) -> None:
    """It must take (prompts, completions, ...) positionally (known at start)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C function: trust it
    try:
        sig.bind_partial([], [])
    except TypeError:
        raise ConfigError(f"RewardConfig.functions: {spec!r} must accept (prompts, completions, "
                          f"**fields); its signature is {sig}") from None


def call(name: str, fn: Callable, prompts: Sequence[str], completions: Sequence[str],
         fields: dict) -> np.ndarray:
    """``fn``'s rewards as float32 [n], checked (RewardError naming ``name`` and the row)."""
    n = len(completions)
    try:
        out = fn(list(prompts), list(completions), **fields)
    except Exception as e:
        raise RewardError(f"reward function {name} raised {type(e).__name__}: "
                          f"{first_line(e)}") from e
    try:
        out = list(out)
    except TypeError:
        raise RewardError(f"reward function {name} returned {type(out).__name__}, not one "
                          "number per completion") from None
    if len(out) != n:
        raise RewardError(f"reward function {name} returned {len(out)} values for {n} "
                          "completions")
    values = []
    for row, v in enumerate(out):
        try:
            v = float(v)
            shown = str(v)
        except (TypeError, ValueError):
            v, shown = None, repr(out[row])
        if v is None or not math.isfinite(v):
            raise RewardError(f"reward function {name} returned {shown} for row {row} "
                              f"(prompt {_short(prompts[row])}, completion "
                              f"{_short(completions[row])})")
        values.append(v)
    return np.asarray(values, np.float32)


def _short(text: str, limit: int = 60) -> str:
    text = str(text)
    return repr(text if len(text) <= limit else text[:limit] + "...")
