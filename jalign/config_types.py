"""Type checks of gin bindings against the config dataclasses' annotations.

gin passes a bound value to the constructor as written: ``TrainConfig.steps = 'eight'`` or
``OptimizerConfig.learning_rate = '3e-3'`` would otherwise fail later, far from the
binding (``'<=' not supported between 'str' and 'int'``), and ``DataConfig.batch_size =
4.5`` would pass as a batch that does not divide. Each bound value is checked against its
field's annotation before the config is built, and a mismatch is one ConfigError naming the
binding. An int is accepted where a float is expected (``learning_rate = 1``); a bool is
never taken for a number.
"""

from __future__ import annotations

import collections.abc
import functools
import types
import typing

from jalign.errors import ConfigError

_NAMES = {int: "an int", float: "a number", str: "a string", bool: "True or False",
          type(None): "None", tuple: "a tuple", list: "a list", dict: "a dict"}
_GOT = {**_NAMES, float: "a float", bool: "a bool"}


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve here: nothing to check against
        return {}


def _matches(value, hint) -> bool:
    """Whether ``value`` is of the annotation ``hint`` (unknown kinds of hint pass)."""
    if hint is typing.Any or isinstance(hint, typing.TypeVar):
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (tuple, list)):
            return False
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(map(_matches, value, args))
        return all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint) or not hint.__module__.startswith(("builtins", "jalign"))
    return True


def _expected(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        inner = f" of {_expected(args[0])}s" if args and args[0] is not Ellipsis else ""
        return ("a tuple" if origin is tuple else "a list") + inner.replace("an ", "").replace(
            "a ", "")
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def check_bindings(cls, bound: dict, where: str) -> None:
    """ConfigError for the first value of ``bound`` ({field: value}, as gin will pass them
    to ``cls``) that is not of its field's annotated type; ``where(field)``: the binding's
    prefix as the user wrote it (``'eval/DataConfig'`` or ``'DataConfig'``)."""
    hints = _hints(cls)
    for name, value in bound.items():
        hint = hints.get(name)
        if hint is None or _matches(value, hint):
            continue
        hint_text = _expected(hint)
        got = _GOT.get(type(value), type(value).__name__)
        if isinstance(value, (tuple, list)) and typing.get_args(hint):
            bad = next((v for v in value if not _matches(v, typing.get_args(hint)[0])), None)
            if bad is not None:
                got += f" holding {bad!r}, {_GOT.get(type(bad), type(bad).__name__)}"
        advice = ""
        if isinstance(value, str) and _matches(_number(value), hint):
            advice = f" (a number is written without quotes: {where(name)}.{name} = {value})"
        raise ConfigError(f"{where(name)}.{name} = {value!r}: expected {hint_text}, got "
                          f"{got}{advice}")
