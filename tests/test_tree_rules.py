"""The layout rules of the package (issue 13): small modules, short functions, no upward imports.

Each module is read as text and parsed; nothing is imported, so these checks are instant.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ctlens"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_module_and_function_sizes(path: Path) -> None:
    source = path.read_text()
    assert source.count("\n") <= MAX_MODULE_LINES, (
        f"{_name(path)} has {source.count(chr(10))} lines; split it along a real seam "
        f"(the limit is {MAX_MODULE_LINES})"
    )
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{_name(path)}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def _is_submodule(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


@pytest.mark.parametrize("path", [p for p in MODULES if p.name != "__init__.py"], ids=_name)
def test_no_module_imports_through_the_package_face(path: Path) -> None:
    """Inside the library, ``from ctlens import x`` may only name a submodule: a name that
    the face re-exports (``ctlens.attribute``, ``ctlens.Circuit``) would make the stage
    depend on the face, and the face's lazy loading could not hold."""
    upward = [
        f"line {node.lineno}: {alias.name}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module == "ctlens" and node.level == 0
        for alias in node.names
        if not _is_submodule(alias.name)
    ]
    assert not upward, f"{_name(path)} imports names from the ctlens face: {upward}"
