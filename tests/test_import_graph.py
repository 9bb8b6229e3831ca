"""No import circles in the package, counting imports inside functions too (a lazy import
that closes a circle is still a circle: it only moves the failure to run time), and the
training loop imports no loss."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jalign"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """jalign module -> the jalign modules it imports (anywhere in the file)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from jalign.x import y`: y is a module of its own or a name in x.
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                           else node.module for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        # Importing a.b.c runs a/__init__ and a/b/__init__ (empty here, so no edges).
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_in_the_package():
    graph = import_graph()
    assert "jalign.train.loop" in graph and graph["jalign.train.loop"], "graph is empty"
    assert cycles(graph) == []


def _reach(graph, module):
    """Every jalign module ``module`` imports, directly or through others."""
    reach, todo = set(), [module]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in reach:
                reach.add(dep)
                todo.append(dep)
    return reach


def test_the_loop_imports_no_loss():
    graph = import_graph()
    for module in ("jalign.train.loop", "jalign.train.run", "jalign.train.step"):
        losses = sorted(m for m in _reach(graph, module)
                        if m.startswith("jalign.losses.") and m != "jalign.losses.types")
        assert losses == [], f"{module} imports {losses}"


def test_gin_registration_does_not_import_the_loop():
    reach = _reach(import_graph(), "jalign.config")
    assert "jalign.train.loop" not in reach
    assert {"jalign.algos.registry", "jalign.train.train_config"} <= reach


def test_losses_import_no_rl_train_or_recipe():
    """losses/ is math: it reaches nothing of rl/, train/ or algos/."""
    graph = import_graph()
    for module in (m for m in graph if m.startswith("jalign.losses.")):
        bad = sorted(m for m in _reach(graph, module)
                     if m.startswith(("jalign.rl.", "jalign.train.", "jalign.algos.")))
        assert bad == [], f"{module} imports {bad}"


def test_train_imports_no_recipe_and_names_no_family():
    """train/ is generic: no module of it imports a recipe (jalign.algos) or a model
    family's own modules (it goes through jalign.models.families and heads)."""
    graph = import_graph()
    family_modules = {"jalign.models.llama", "jalign.models.config", "jalign.models.llama_hf"}
    for module in (m for m in graph if m.startswith("jalign.train.")):
        bad = sorted(m for m in graph[module]
                     if m.startswith("jalign.algos.") or m in family_modules)
        assert bad == [], f"{module} imports {bad}"
        recipes = sorted(m for m in _reach(graph, module) if m.startswith("jalign.algos."))
        assert recipes == [], f"{module} reaches {recipes}"
