"""The layers hold: no import cycles among ``proxy/`` and ``addons/``, mitmproxy and the adapters
imported only by ``addons/`` and ``proxy/app/``, and nothing below the app layer importing it.

Imports are read with ``ast`` from the source, so an import deferred into a function (the usual way to
hide a cycle or a heavy dependency) counts exactly like one at the top of the module. An import under
``if TYPE_CHECKING:`` never runs, so it cannot close a cycle; it still counts for the layers.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("proxy", "addons")
ADAPTER_ONLY = ("mitmproxy", "addons")  # what only the adapters and the app layer may import
MAY_IMPORT_ADAPTERS = ("addons", "proxy.app")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # a module of the tree, or the full dotted name of anything else
    file: str  # relative to the tree's root
    line: int
    type_only: bool = False  # under ``if TYPE_CHECKING:``

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def read_imports(root: Path, packages: Iterable[str] = PACKAGES) -> tuple[set[str], list[Import]]:
    """Every module of ``packages`` under ``root`` and every import statement in them."""
    files = {
        module_name(root, path): path
        for package in packages
        for path in sorted((root / package).rglob("*.py"))
    }
    imports: list[Import] = []
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        where = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        type_only = {id(n) for block in _type_checking_blocks(tree) for n in ast.walk(block)}
        for node in ast.walk(tree):
            for target in _targets(node, module, is_package, files):
                imports.append(Import(module, target, where, node.lineno, id(node) in type_only))
    return set(files), imports


def _type_checking_blocks(tree: ast.AST) -> list[ast.stmt]:
    found: list[ast.stmt] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                found.extend(node.body)
    return found


def _targets(node: ast.AST, module: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [_known_prefix(alias.name, known) for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = module.split(".")
        package = package if is_package else package[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module itself.
    targets = (
        f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else _known_prefix(base, known)
        for alias in node.names
    )
    return list(dict.fromkeys(targets))


def _known_prefix(name: str, known: dict[str, Path]) -> str:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return name


def find_cycles(modules: set[str], imports: list[Import]) -> list[list[Import]]:
    """One concrete cycle (as the import statements that close it) per strongly connected group."""
    edges: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for imp in imports:
        if imp.target in modules and not imp.type_only:
            edges[imp.module].setdefault(imp.target, imp)
    cycles = []
    for group in _strongly_connected(edges):
        start = min(group)
        if len(group) == 1 and start not in edges[start]:
            continue
        cycles.append(_cycle_through(start, group, edges))
    return cycles


def _strongly_connected(edges: dict[str, dict[str, Import]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (no recursion limit to hit on a deep import chain)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                groups.append(group)
    return groups


def _cycle_through(
    start: str, group: set[str], edges: dict[str, dict[str, Import]]
) -> list[Import]:
    """The shortest path from ``start`` back to itself inside ``group`` (breadth first)."""
    paths: dict[str, list[Import]] = {start: []}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child, imp in sorted(edges[node].items()):
                if child == start:
                    return [*paths[node], imp]
                if child in group and child not in paths:
                    paths[child] = [*paths[node], imp]
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # a strongly connected group always has one


def describe(cycle: list[Import]) -> str:
    steps = " -> ".join(f"{imp.module} ({imp})" for imp in cycle)
    return f"{steps} -> {cycle[0].module}"


def adapter_imports(imports: list[Import]) -> list[Import]:
    """Imports of mitmproxy or the adapters from modules that are neither adapters nor the app."""
    return [
        imp
        for imp in imports
        if any(is_within(imp.target, name) for name in ADAPTER_ONLY)
        and not any(is_within(imp.module, layer) for layer in MAY_IMPORT_ADAPTERS)
    ]


# -- the tree -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree() -> tuple[set[str], list[Import]]:
    modules, imports = read_imports(REPO)
    # The reader must see the tree (and deferred imports), or every check below passes vacuously.
    assert {"proxy.app.cli", "proxy.sandbox.launcher", "addons.master"} <= modules
    assert any(i.module == "proxy.app.cli" and i.target == "proxy.app.serve" for i in imports)
    return modules, imports


def test_no_import_cycles(tree: tuple[set[str], list[Import]]) -> None:
    cycles = find_cycles(*tree)
    assert not cycles, "import cycles:\n" + "\n".join(describe(c) for c in cycles)


def test_only_the_adapters_and_the_app_import_mitmproxy_or_addons(
    tree: tuple[set[str], list[Import]],
) -> None:
    found = adapter_imports(tree[1])
    assert not found, "\n".join(f"{imp}: {imp.module} imports {imp.target}" for imp in found)


def test_nothing_below_the_app_layer_imports_it(tree: tuple[set[str], list[Import]]) -> None:
    found = [
        imp
        for imp in tree[1]
        if is_within(imp.target, "proxy.app") and not is_within(imp.module, "proxy.app")
    ]
    assert not found, "\n".join(f"{imp}: {imp.module} imports {imp.target}" for imp in found)


def test_the_pure_layers_never_read_processes(tree: tuple[set[str], list[Import]]) -> None:
    """Attribution reads /proc; the core and the policy only see its answers (through a Protocol),
    so the admission order stays pure and testable without a sandbox."""
    found = [
        imp
        for imp in tree[1]
        if is_within(imp.target, "proxy.attribution")
        and (is_within(imp.module, "proxy.core") or is_within(imp.module, "proxy.policy"))
    ]
    assert not found, "\n".join(f"{imp}: {imp.module} imports {imp.target}" for imp in found)


# -- the checks themselves, on trees made to fail them ---------------------------------------------


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_cycle_hidden_in_a_function_is_found_and_named(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "proxy/__init__.py": "",
            "proxy/a.py": "from proxy import b\n",
            "proxy/b.py": "import os\n\ndef later():\n    from proxy.c import thing\n",
            "proxy/c.py": "def f():\n    from .a import x\n",
            "proxy/d.py": "from proxy import a\n",  # leads into the cycle but is not part of it
        },
    )
    cycles = find_cycles(*read_imports(root, ["proxy"]))
    assert [describe(c) for c in cycles] == [
        "proxy.a (proxy/a.py:1) -> proxy.b (proxy/b.py:4) -> proxy.c (proxy/c.py:2) -> proxy.a"
    ]


def test_a_type_only_import_closes_no_cycle(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "proxy/__init__.py": "",
            "proxy/a.py": "from proxy.b import B\n",
            "proxy/b.py": "import typing\nif typing.TYPE_CHECKING:\n    from proxy.a import A\n",
        },
    )
    modules, imports = read_imports(root, ["proxy"])
    assert [(i.module, i.target, i.type_only) for i in imports if i.module == "proxy.b"] == [
        ("proxy.b", "typing", False),
        ("proxy.b", "proxy.a", True),
    ]
    assert find_cycles(modules, imports) == []


def test_a_module_importing_itself_is_a_cycle(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {"proxy/__init__.py": "", "proxy/a.py": "import proxy.a\n"})
    assert len(find_cycles(*read_imports(root, ["proxy"]))) == 1


def test_an_acyclic_tree_passes(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {"proxy/__init__.py": "", "proxy/a.py": "import proxy.b\n", "proxy/b.py": "import os\n"},
    )
    assert find_cycles(*read_imports(root, ["proxy"])) == []


def test_a_deferred_mitmproxy_or_addons_import_below_the_app_is_found(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "proxy/__init__.py": "",
            "proxy/sandbox/__init__.py": "",
            "proxy/sandbox/run.py": "def go():\n    from addons.master import Gate\n",
            "proxy/core.py": "import mitmproxy.http\n",
            "proxy/app/__init__.py": "",
            "proxy/app/cli.py": "def go():\n    from addons.master import Gate\n",
            "addons/__init__.py": "",
            "addons/master.py": "from mitmproxy import options\n",
        },
    )
    found = adapter_imports(read_imports(root)[1])
    assert sorted((str(i), i.target) for i in found) == [
        ("proxy/core.py:1", "mitmproxy.http"),
        ("proxy/sandbox/run.py:2", "addons.master"),
    ]
