"""The package's shape (docs/architecture.md), checked on the source: imports go one way
(CLI over client, node and server; the server's HTTP over its core over its store) and no
module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "openbeepboop"

# what a package (and everything below it) must not import
FORBIDDEN = {
    "openbeepboop.client": ["openbeepboop.server", "openbeepboop.node", "openbeepboop.cli"],
    "openbeepboop.node": ["openbeepboop.server", "openbeepboop.client", "openbeepboop.cli"],
    "openbeepboop.server": ["openbeepboop.cli", "openbeepboop.node", "openbeepboop.client"],
    "openbeepboop.server.core": ["openbeepboop.server.http", "openbeepboop.server.web"],
    "openbeepboop.server.store": [
        "openbeepboop.server.core",
        "openbeepboop.server.http",
        "openbeepboop.server.web",
    ],
    # the web interface's pages work through the core, as the API's routes do
    "openbeepboop.server.web": [
        "openbeepboop.server.store.sqlite",
        "openbeepboop.server.store.postgres",
        "openbeepboop.server.store.sql_store",
    ],
    "openbeepboop.server.models": ["openbeepboop.server.core", "openbeepboop.server.store"],
    "openbeepboop.server.errors": ["openbeepboop.server.core", "openbeepboop.server.store"],
    "openbeepboop.server.topics": ["openbeepboop.server.core", "openbeepboop.server.store"],
    "openbeepboop.server.settings": ["openbeepboop.server.core", "openbeepboop.server.store"],
    # other libraries' ways in (DSPy): clients of the client, as a user's script is
    "openbeepboop.integrations": ["openbeepboop.server", "openbeepboop.node", "openbeepboop.cli"],
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path], module_level: bool) -> set[str]:
    """The project modules `path` imports (only those run at import time when
    `module_level`: not inside functions or `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    nodes: list[ast.AST] = list(tree.body) if module_level else list(ast.walk(tree))
    out: set[str] = set()
    while nodes:
        node = nodes.pop()
        if module_level and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if module_level and isinstance(node, (ast.If, ast.Try)):
            nodes.extend(node.body + node.orelse)
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("openbeepboop"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("openbeepboop"):
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else str(node.module))
    return out & modules.keys()


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_imports_go_one_way() -> None:
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        for imported in _imports(path, modules, module_level=False):
            for package, banned in FORBIDDEN.items():
                if _within(name, package):
                    wrong += [(name, imported) for b in banned if _within(imported, b)]
    assert wrong == []


def test_no_import_cycles() -> None:
    """Counting every import, lazy and type-only ones too; but for the package root's
    lazy `Client` (what `from openbeepboop import Client` reads), which the client
    imports back for `__version__`."""
    modules = _modules()
    graph = {name: _imports(path, modules, module_level=False) for name, path in modules.items()}
    graph["openbeepboop"] = set()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


@pytest.mark.parametrize("package", ["openbeepboop.server.core", "openbeepboop.server.store"])
def test_the_domain_and_the_store_know_no_web_framework(package: str) -> None:
    """The queue's rules and its storage import nothing from Starlette or FastAPI."""
    for name, path in _modules().items():
        if _within(name, package):
            text = path.read_text()
            assert "fastapi" not in text and "starlette" not in text, name
