"""The house's layering: stages never import a front door (the CLI or the HTTP service).

Every import statement is read, including the lazy ones inside functions, which is where such an import
used to hide (``training/evaluate.py`` took ``grade_files`` from ``cli.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "retinagrade"
DOORS = ("retinagrade.cli", "retinagrade.api")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    return _imports_of(path.read_text(), _module_name(path), is_package=path.name == "__init__.py")


def _imports_of(source: str, module: str, *, is_package: bool = False) -> set[str]:
    package = module if is_package else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _is_door(name: str) -> bool:
    return any(name == door or name.startswith(door + ".") for door in DOORS)


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", [p for p in SOURCES if not _is_door(_module_name(p))], ids=_module_name)
def test_no_stage_imports_a_door(path: Path) -> None:
    doors = sorted(name for name in _imports(path) if _is_door(name))
    assert not doors, f"{_module_name(path)} imports {doors}; move what it needs out of the door"


def test_the_check_sees_lazy_and_relative_imports() -> None:
    lazy = "def f():\n    from retinagrade.cli import grade_files\n"
    relative = "from ..api import schemas\n"
    plain = "import retinagrade.api.app as a\n"
    assert _is_door(next(n for n in _imports_of(lazy, "retinagrade.training.evaluate") if "cli" in n))
    assert "retinagrade.api" in _imports_of(relative, "retinagrade.training.evaluate")
    assert "retinagrade.api.app" in _imports_of(plain, "retinagrade.report")
    assert not any(
        _is_door(n) for n in _imports_of("from retinagrade import apis\n", "retinagrade.x") - {"retinagrade"}
    )
