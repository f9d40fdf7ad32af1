"""The modules of ``tokentrack_client`` import each other without a cycle.

Every ``import`` and ``from ... import`` is counted, wherever it stands: at module level,
inside a function (the usual way to hide a cycle), or under ``if TYPE_CHECKING:`` (a cycle
that only the type checker follows is still a cycle of the design). Relative imports are
resolved against the importing module's package. Importing a package's submodule is an edge
to that submodule only, not to the package's ``__init__`` (which Python runs first, but which
does not import back unless it says so, and then that is an edge of its own).

The cycle finder is tested on a synthetic graph and on a throwaway package, so that a cycle
would not go unnoticed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

PACKAGE = "tokentrack_client"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / "python" / PACKAGE


# --------------------------------------------------------------------------------------------
# The import graph and its cycles
# --------------------------------------------------------------------------------------------


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module under ``root`` (the directory of ``package``) by its dotted name."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported(tree: ast.AST, name: str, is_package: bool) -> Iterator[tuple[str, list[str]]]:
    """(module, names imported from it) for every import statement anywhere in ``tree``."""
    here = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                if node.level > 1:
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base, [alias.name for alias in node.names]


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """The imports between the modules of ``package``: module -> modules it imports."""
    modules = module_names(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for base, names in _imported(tree, name, path.name == "__init__.py"):
            targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            if len(targets) < len(names) or not names:
                # A name that is not a submodule comes from the module itself; `import a.b.c`
                # needs a.b.c, whose longest known prefix is the module meant.
                prefix = base
                while prefix and prefix not in modules:
                    prefix = prefix.rpartition(".")[0]
                if prefix:
                    targets.append(prefix)
            graph[name].update(t for t in targets if t != name)
    return graph


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) for every strongly connected group of nodes that has
    one, in a stable order; ``[]`` when the graph is acyclic."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(_cycle_in(graph, group) for group in groups)


def _cycle_in(graph: Mapping[str, set[str]], group: set[str]) -> list[str]:
    """A shortest path from the group's first node back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph.get(node, set()) & group):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# The package
# --------------------------------------------------------------------------------------------


def test_the_client_package_has_no_import_cycle() -> None:
    cycles = find_cycles(import_graph(PACKAGE_DIR, PACKAGE))
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_covers_every_module_and_the_client_layers() -> None:
    graph = import_graph(PACKAGE_DIR, PACKAGE)
    assert set(graph) == set(module_names(PACKAGE_DIR, PACKAGE))
    assert {"tokentrack_client", "tokentrack_client.ops", "tokentrack_client.ops.sweep"} <= set(
        graph
    )
    # The layers, bottom up: contract, errors, answers, results / validation, tracking, client.
    assert graph["tokentrack_client.contract"] == set()
    assert graph["tokentrack_client.errors"] == set()
    assert graph["tokentrack_client.answers"] == {"tokentrack_client.errors"}
    assert "tokentrack_client.answers" in graph["tokentrack_client.results"]
    assert "tokentrack_client.validation" in graph["tokentrack_client.tracking"]
    # Usage (the token classes and the provider adapters) sits beside validation, below
    # tracking and the client, and imports no SDK (the adapters read objects duck-typed).
    assert graph["tokentrack_client.usage"] == {
        "tokentrack_client.contract",
        "tokentrack_client.errors",
        "tokentrack_client.validation",
    }
    assert "tokentrack_client.usage" in graph["tokentrack_client.tracking"]
    assert "tokentrack_client.client" not in graph["tokentrack_client.tracking"]
    assert "tokentrack_client.tracking" in graph["tokentrack_client.client"]
    assert "tokentrack_client.client" in graph["tokentrack_client"]
    # The operations commands read answers through the client's modules.
    assert {"tokentrack_client.answers", "tokentrack_client.results"} <= graph[
        "tokentrack_client.ops.sweep"
    ]


# --------------------------------------------------------------------------------------------
# The cycle finder can fail
# --------------------------------------------------------------------------------------------


def test_find_cycles_on_synthetic_graphs() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]
    two = {"a": {"b"}, "b": {"a"}, "x": {"y"}, "y": {"z"}, "z": {"x", "a"}}
    assert find_cycles(two) == [["a", "b", "a"], ["x", "y", "z", "x"]]


def _write(root: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize(
    ("files", "cycle"),
    [
        pytest.param(
            {
                "__init__.py": "",
                "a.py": "from pkg.b import B\n",
                "b.py": "def f():\n    from pkg.a import A\n    return A\n",
            },
            ["pkg.a", "pkg.b", "pkg.a"],
            id="function-level-absolute",
        ),
        pytest.param(
            {
                "__init__.py": "",
                "a.py": "from . import b\n",
                "b.py": (
                    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n"
                ),
            },
            ["pkg.a", "pkg.b", "pkg.a"],
            id="relative-and-type-checking",
        ),
        pytest.param(
            {
                "__init__.py": "from pkg.sub.c import C\n",
                "sub/__init__.py": "",
                "sub/c.py": "from .. import VERSION\n",
            },
            ["pkg", "pkg.sub.c", "pkg"],
            id="parent-relative-to-the-package-init",
        ),
        pytest.param(
            {
                "__init__.py": "",
                "a.py": "import pkg.sub.c\n",
                "sub/__init__.py": "",
                "sub/c.py": "import pkg.a as a\n",
            },
            ["pkg.a", "pkg.sub.c", "pkg.a"],
            id="plain-import",
        ),
    ],
)
def test_find_cycles_in_a_throwaway_package(
    tmp_path: Path, files: Mapping[str, str], cycle: list[str]
) -> None:
    _write(tmp_path / "pkg", files)
    assert find_cycles(import_graph(tmp_path / "pkg", "pkg")) == [cycle]


def test_a_throwaway_package_without_cycle_passes(tmp_path: Path) -> None:
    _write(
        tmp_path / "pkg",
        {
            "__init__.py": "from pkg.a import A\nfrom pkg import b\n",
            "a.py": "import json\nfrom pkg.b import B\n",
            "b.py": "def f():\n    from . import c\n    return c\n",
            "c.py": "import pkg.sub.d\n",
            "sub/__init__.py": "",
            "sub/d.py": "X = 1\n",
        },
    )
    graph = import_graph(tmp_path / "pkg", "pkg")
    assert graph == {
        "pkg": {"pkg.a", "pkg.b"},
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.c"},
        "pkg.c": {"pkg.sub.d"},
        "pkg.sub": set(),
        "pkg.sub.d": set(),
    }
    assert find_cycles(graph) == []
