"""The handler's modules import each other in one direction: no cycle anywhere in handler/."""

import ast
import subprocess
import sys
from pathlib import Path

HANDLER = Path(__file__).resolve().parent.parent / "handler"
PACKAGE = "jaiserve"


def module_name(path: Path) -> str:
    parts = path.relative_to(HANDLER).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The handler modules ``path`` imports (absolute ``jaiserve...`` or relative), at any depth in the file."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import x` names a module
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in HANDLER.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_reads_relative_and_absolute_imports():
    edges = graph()
    assert "jaiserve.api" in edges["jaiserve.openai_api"]  # from .api import ...
    assert {"jaiserve.api", "jaiserve.openai_api"} <= edges["jaiserve.routes"]
    assert "jaiserve.routes" in edges["jai_handler"]  # from jaiserve.routes import route


def test_no_import_cycle_in_handler():
    assert find_cycle(graph()) is None


def test_the_core_does_not_know_the_openai_view():
    edges = graph()
    assert "jaiserve.openai_api" not in edges["jaiserve.api"]


def test_each_module_imports_alone_in_a_fresh_interpreter():
    """Every module loads on its own as the first one imported: none relies on another being loaded before."""
    names = sorted(n for n in graph() if n.startswith(PACKAGE))
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n" \
             "    for m in [m for m in sys.modules if m.startswith('jaiserve')]: del sys.modules[m]\n" \
             "    importlib.import_module(name)\n"
    subprocess.run([sys.executable, "-c", script, *names], check=True, cwd=HANDLER, timeout=120)
