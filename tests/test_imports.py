"""The layers of qlab point one way: the import graph of qlab/ (every import, lazy ones too, read
with ast) has no cycle, config imports nothing from qlab, and no module imports another
module's private (`_name`) names."""

import ast
from pathlib import Path

import pytest

from qlab.config import PROJECT_ROOT

PACKAGE = Path(PROJECT_ROOT) / "qlab"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for every qlab import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("qlab")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qlab") and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((sub, None, node.lineno) if sub in MODULES else (node.module, a.name, node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    """module -> the qlab modules it imports (a package's __init__ counts as the package)."""
    return {name: {m for m, _, _ in imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle found by a depth-first search (one per back edge)."""
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_config_imports_nothing_from_qlab():
    assert imports(MODULES["qlab.config"]) == []


def test_no_private_name_is_imported_across_modules():
    private = [f"{module_name(path)}:{line} imports {name} from {mod}" for path in MODULES.values()
               for mod, name, line in imports(path) if name is not None and name.startswith("_")]
    assert private == []


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c", "a"]]),
    ({"a": {"b"}, "b": set(), "c": {"a", "b"}}, []),
    ({"a": {"a"}}, [["a", "a"]]),
])
def test_cycles_finds_what_it_should(edges, expected):
    assert cycles(edges) == expected
