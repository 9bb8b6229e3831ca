"""What a bad gin file or binding says: one line that names it, never a traceback.

gin reports a problem in several shapes: a message with location lines appended (an
unknown parameter, a missing include, a failed ``import``), a ``SyntaxError`` whose
location is an argument (an unparsable value), a bare ``tokenize.TokenError`` with no
location at all (a bracket or quote left open), and, for a macro that is used but never
bound, nothing until a config is built (then a ``macro()`` call error). Each becomes one
line here.
"""

from __future__ import annotations

import io
import tokenize
from pathlib import Path
from typing import Sequence

import gin


def parse_error_line(error: Exception, files: Sequence[str], bindings: Sequence[str]) -> str:
    """One line for an error gin raised while parsing ``files`` then ``bindings``."""
    if isinstance(error, tokenize.TokenError) and error.args:  # (an include's copy has none)
        where = _unclosed(files, bindings)
        return f"{error.args[0]} in {where}" if where else _one_line(error)
    if isinstance(error, SyntaxError) and len(error.args) == 2 and hasattr(error.args[1],
                                                                          "line_num"):
        where = error.args[1]
        # gin's message may hold lines of its own (an unquoted word: the ast's text, then
        # "Failed to parse token 'foo'"): the last says what it could not read
        message = [line.strip() for line in str(error.args[0]).splitlines() if line.strip()]
        return f"{(message or [''])[-1].rstrip('.')} in {_source(where, bindings)}"
    return _one_line(error)


def _one_line(error: Exception) -> str:
    """The message with the location lines gin appends ('In file "x.gin", line 3' and the
    line itself) folded into one line."""
    lines = [line.strip() for line in str(error).splitlines()]
    first, *where = [line for line in lines if line.strip("^ ")] or [""]  # not a caret line
    return first + (f" ({': '.join(where)})" if where else "")


def _source(where, bindings: Sequence[str]) -> str:
    """'--gin binding "X.y=..."' or 'file F, line N: ...' for a gin Location."""
    if where.filename is None:  # the bindings, parsed as one string, joined by newlines
        last = 0
        for binding in bindings:
            last += binding.count("\n") + 1
            if where.line_num <= last:
                return f"--gin binding {binding!r}"
        return f"the bindings' line {where.line_num}"
    line = where.line_content.strip() if where.line_content else ""
    return f"{where.filename}, line {where.line_num}" + (f": {line}" if line else "")


def _unclosed(files: Sequence[str], bindings: Sequence[str]) -> str | None:
    """The first binding or file whose text Python's tokenizer cannot finish (gin's own
    tokenizer says only 'EOF in multi-line statement', not where)."""
    for binding in bindings:
        if not _tokenizes(binding):
            return f"--gin binding {binding!r}"
    for path in files:
        if not _tokenizes(Path(path).read_text()):
            return f"config file {path}"
    return None


def _tokenizes(text: str) -> bool:
    try:
        for _ in tokenize.generate_tokens(io.StringIO(text + "\n").readline):
            pass
    except (tokenize.TokenError, SyntaxError):
        return False
    return True


def unbound_macro_line() -> str | None:
    """One line naming a binding that uses a macro (``%NAME``) nothing binds, else None.

    gin stores ``%NAME`` as a reference to its ``macro`` configurable in scope NAME and
    resolves it only when a config is built; looked up here right after parsing."""
    config = gin.config._CONFIG  # noqa: SLF001 (gin has no public view of its bindings)
    for (scope, selector), params in config.items():
        for param, value in params.items():
            for name in _macro_names(value):
                if (name, "gin.macro") not in config:
                    owner = selector.rsplit(".", 1)[-1]
                    return (f"{scope + '/' if scope else ''}{owner}.{param} = %{name}: the "
                            f"macro {name} is never bound (bind it: {name} = ...)")
    return None


def _macro_names(value):
    """The macro names ``value`` refers to, looking into tuples, lists and dicts."""
    if isinstance(value, gin.config.ConfigurableReference):
        if value.configurable.name == "macro":
            yield value.scoped_selector.rsplit("/", 1)[0]
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _macro_names(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _macro_names(item)
