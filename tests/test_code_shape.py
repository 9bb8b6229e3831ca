"""Functions a reader can hold in mind: none in the package runs past 100 lines."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jalign"
MAX_LINES = 100


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    return [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > limit]


def test_the_check_finds_a_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    assert long_functions(f"def f():\n{body}\n") == [("f", MAX_LINES + 1)]
    assert long_functions("def g():\n    return 1\n") == []


def test_no_function_in_the_package_is_over_100_lines():
    found = {f"{p.relative_to(PACKAGE.parent)}:{name}": n for p in PACKAGE.rglob("*.py")
             for name, n in long_functions(p.read_text())}
    assert found == {}, found
