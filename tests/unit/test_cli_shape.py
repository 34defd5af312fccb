"""The CLI is a thin front door: each command reads its options and calls the library, in a small module.

A command's options are its signature (what ``--help`` shows, kept as it is); what is measured is the rest,
the body after the docstring: the work a command does itself. Work longer than that belongs in the pipeline,
training or report modules, or in a named helper beside the command.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from retinagrade.cli import app

#: Most lines a command's body may take (after its docstring); the longest took 65 when the CLI was one file.
MAX_BODY_LINES = 40
#: Most lines of one CLI module: one command group and its helpers.
MAX_MODULE_LINES = 400
CLI = Path(__file__).resolve().parents[2] / "src" / "retinagrade" / "cli"


def _commands(group: typer.Typer, prefix: str = "") -> Iterator[tuple[str, Callable[..., Any]]]:
    for command in group.registered_commands:
        assert command.callback is not None
        yield prefix + (command.name or command.callback.__name__.replace("_", "-")), command.callback
    for sub in group.registered_groups:
        assert sub.typer_instance is not None and sub.name is not None
        yield from _commands(sub.typer_instance, f"{prefix}{sub.name} ")


def body_lines(function: Callable[..., Any]) -> int:
    """Lines from the first statement after the docstring to the end of the function."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    node = tree.body[0]
    assert isinstance(node, ast.FunctionDef)
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    assert node.end_lineno is not None
    return node.end_lineno - body[0].lineno + 1


COMMANDS = dict(_commands(app))


def test_every_command_is_seen() -> None:
    assert {"grade", "train", "calibrate", "dicomweb", "sources prepare", "sources list"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_command_body_is_short(name: str) -> None:
    lines = body_lines(COMMANDS[name])
    assert lines <= MAX_BODY_LINES, f"`retinagrade {name}` does {lines} lines of work itself; move it to the library"


def test_the_cli_is_a_package_of_small_modules() -> None:
    modules = sorted(CLI.glob("*.py"))
    assert len(modules) > 2, "the CLI is one module, not one per command group"
    sizes = {path.name: len(path.read_text(encoding="utf-8").splitlines()) for path in modules}
    assert all(lines <= MAX_MODULE_LINES for lines in sizes.values()), sizes


def test_the_body_is_measured_after_the_docstring() -> None:
    def documented() -> None:
        """Two lines
        of docstring."""
        x = 1
        del x

    def bare() -> None:
        pass

    assert body_lines(documented) == 2
    assert body_lines(bare) == 1
