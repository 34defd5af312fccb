"""The house's import graph: no two modules of ``src/retinagrade`` import each other, however indirectly.

A cycle is what makes a module half-initialised at run time (the import that "works" only because it sits
inside a function) and what makes a change in one corner reach everywhere. Every import statement counts:
those inside functions (the lazy ones that optional extras need) and those under ``TYPE_CHECKING`` (a cycle
of types is a cycle of design). An optional module that a registry loads by name (a writer's, a decoder's)
is no import: the registry only knows the name, and the module imports the registry.

Run this file as a script to print the graph's figures (modules, edges, cycles; the same between the top-level
modules and packages): ``python tests/unit/test_import_graph.py``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "retinagrade"
ROOT = PACKAGE.name
Graph = dict[str, set[str]]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """``retinagrade.cli.grading`` for ``src/retinagrade/cli/grading.py``; a package is its ``__init__``."""
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, known: set[str], *, is_package: bool = False) -> set[str]:
    """The modules of ``known`` that the source imports, anywhere in it.

    ``from a import b`` is an edge to ``a.b`` where that is a module, else to ``a`` (a name defined in it);
    ``import a.b.c`` is an edge to the longest of ``a.b.c``, ``a.b``, ``a`` that is a module. The packages above
    a module are left out: every module runs them first, whoever imports it, so they say nothing.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def longest(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(filter(None, (longest(alias.name) for alias in node.names)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                found.update(
                    filter(None, [f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else longest(target)])
                )
    return found - {module}


def build_graph(sources: Mapping[str, tuple[str, bool]]) -> Graph:
    """Module -> the modules of the same tree it imports (``sources``: name -> (source, is a package))."""
    known = set(sources)
    return {
        module: imports_of(source, module, known, is_package=is_package)
        for module, (source, is_package) in sources.items()
    }


def package_sources(package: Path = PACKAGE) -> dict[str, tuple[str, bool]]:
    return {
        module_name(path, package): (path.read_text(encoding="utf-8"), path.name == "__init__.py")
        for path in sorted(package.rglob("*.py"))
    }


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (each sorted), by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def top_level(graph: Graph) -> Graph:
    """The graph between the top-level modules and packages (``retinagrade.training.train`` is ``training``)."""

    def unit(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else "__init__"

    joined: Graph = {}
    for module, targets in graph.items():
        joined.setdefault(unit(module), set()).update(unit(t) for t in targets)
    return {node: targets - {node} for node, targets in joined.items()}


def edge_count(graph: Graph) -> int:
    return sum(len(targets) for targets in graph.values())


def describe(graph: Graph, found: Iterable[list[str]]) -> str:
    """Each cycle with the imports that close it, for the failure message."""
    lines = []
    for members in found:
        inside = set(members)
        ties = [f"{a} -> {b}" for a in members for b in sorted(graph[a] & inside)]
        lines.append(f"{' <-> '.join(members)}: {'; '.join(ties)}")
    return "\n".join(lines)


GRAPH = build_graph(package_sources())


def test_no_module_of_the_package_is_in_an_import_cycle() -> None:
    found = cycles(GRAPH)
    assert not found, "import cycles (move the shared piece down, or register instead of importing):\n" + describe(
        GRAPH, found
    )


def test_no_top_level_module_or_package_is_in_an_import_cycle() -> None:
    graph = top_level(GRAPH)
    found = cycles(graph)
    assert not found, "import cycles between top-level modules and packages:\n" + describe(graph, found)


def test_a_module_that_a_registry_loads_by_name_imports_the_registry_and_not_the_other_way_round() -> None:
    from retinagrade.preprocessing.decode import DECODER_MODULES
    from retinagrade.report import PLUGGED_FORMATS

    tables = {
        "retinagrade.preprocessing.decode": list(DECODER_MODULES.values()),
        "retinagrade.report": [plugged.module for plugged in PLUGGED_FORMATS.values()],
    }
    for registry, modules in tables.items():
        for module in modules:
            assert module in GRAPH, f"{registry} names {module}, which is no module of the package"
            assert registry in GRAPH[module], f"{module} does not import {registry}, so cannot register there"
            assert module not in GRAPH[registry], f"{registry} imports {module}: a cycle the registry was for"


def test_the_graph_sees_lazy_relative_type_only_and_submodule_imports() -> None:
    sources = {
        "retinagrade": ("", True),
        "retinagrade.report": ("def f():\n    from retinagrade.cluster import records\n", False),
        "retinagrade.cluster": ("", True),
        "retinagrade.cluster.records": ("from ..report import ResultRecord\n", False),
        "retinagrade.cli": ("import typer\nfrom retinagrade import report\n", True),
        "retinagrade.cli.grading": ("if TYPE_CHECKING:\n    from . import cli_only\n", False),
        "retinagrade.cli.cli_only": ("import retinagrade.cli.grading as g\n", False),
        "retinagrade.plugins": ("import importlib\nimportlib.import_module('retinagrade.report')\n", False),
    }
    graph = build_graph(sources)
    assert graph["retinagrade.report"] == {"retinagrade.cluster.records"}
    assert graph["retinagrade.cluster.records"] == {"retinagrade.report"}
    assert graph["retinagrade.cli"] == {"retinagrade.report"}
    assert graph["retinagrade.plugins"] == set()  # a name in a string is no import
    assert cycles(graph) == [
        ["retinagrade.cli.cli_only", "retinagrade.cli.grading"],
        ["retinagrade.cluster.records", "retinagrade.report"],
    ]
    assert "retinagrade.cluster.records -> retinagrade.report" in describe(graph, cycles(graph))
    assert cycles(top_level(graph)) == [["cluster", "report"]]


def test_a_name_imported_from_a_package_is_an_edge_to_the_package() -> None:
    sources = {
        "retinagrade": ("X = 1\n", True),
        "retinagrade.a": ("from retinagrade import X\nfrom retinagrade.b import helper\n", False),
        "retinagrade.b": ("", False),
    }
    assert build_graph(sources)["retinagrade.a"] == {"retinagrade", "retinagrade.b"}


def figures() -> str:
    """The graph's figures: modules, edges, cycles, then the same between top-level modules and packages."""
    graph = top_level(GRAPH)
    return "\n".join(
        [
            f"modules {len(GRAPH)}, edges {edge_count(GRAPH)}, cycles {len(cycles(GRAPH))}",
            describe(GRAPH, cycles(GRAPH)),
            f"top level: modules and packages {len(graph)}, edges {edge_count(graph)}, cycles {len(cycles(graph))}",
            describe(graph, cycles(graph)),
        ]
    )


if __name__ == "__main__":
    sys.stdout.write(figures() + "\n")


# -- layering: stages never import a front door (the CLI or the HTTP service) ------------------------------
# Lazy imports count too: that is where such an import used to hide (``training/evaluate.py`` took
# ``grade_files`` from the CLI).

DOORS = ("retinagrade.cli", "retinagrade.api")


def is_door(name: str) -> bool:
    return any(name == door or name.startswith(door + ".") for door in DOORS)


def doors_imported(graph: Graph) -> dict[str, list[str]]:
    """Each module that is no door, with the door modules it imports (only those that import one)."""
    found = {
        module: sorted(t for t in targets if is_door(t)) for module, targets in graph.items() if not is_door(module)
    }
    return {module: doors for module, doors in found.items() if doors}


def test_no_stage_imports_a_door() -> None:
    offenders = doors_imported(GRAPH)
    assert not offenders, f"stages that import a front door (move what they need out of it): {offenders}"


def test_the_layering_check_sees_lazy_relative_and_plain_imports_of_a_door() -> None:
    sources = {
        "retinagrade": ("", True),
        "retinagrade.cli": ("", True),
        "retinagrade.api": ("", True),
        "retinagrade.api.app": ("", False),
        "retinagrade.apis": ("", False),
        "retinagrade.training": ("", True),
        "retinagrade.training.evaluate": ("def f():\n    from retinagrade.cli import grade_files\n", False),
        "retinagrade.training.report": ("from ..api import schemas\n", False),
        "retinagrade.report": ("import retinagrade.api.app as a\n", False),
        "retinagrade.x": ("from retinagrade import apis\n", False),
    }
    assert doors_imported(build_graph(sources)) == {
        "retinagrade.training.evaluate": ["retinagrade.cli"],
        "retinagrade.training.report": ["retinagrade.api"],
        "retinagrade.report": ["retinagrade.api.app"],
    }
