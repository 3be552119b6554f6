"""Build ``notebooks/*.ipynb`` from their readable sources in ``notebooks/src/*.py``.

The sources are plain Python files split into cells by marker lines (a subset of the
"percent" format that jupytext and VS Code understand)::

    # %% [markdown]
    # # A title
    # Some text; each line starts with "# ".

    # %%
    x = 1  # a code cell

    # %% [solution]
    answer = x + 1  # a code cell for an exercise's worked solution

A ``[solution]`` cell is a code cell whose source is collapsed when the notebook opens
(``jupyter.source_hidden``) and tagged ``solution``: students see a "Solution" heading and
can expand it, and CI still executes it, so the solutions stay correct. Lines starting with
``# ruff:`` are dropped (they only serve the linter on the source files).

The generated notebooks carry no outputs and no execution counts, so they stay reviewable;
``tests/test_docs.py`` checks that the committed notebooks equal what this script builds.

Usage::

    python scripts/make_notebooks.py            # (re)write notebooks/*.ipynb
    python scripts/make_notebooks.py --check    # exit 1 if any notebook is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "notebooks" / "src"
TARGET = ROOT / "notebooks"
MARKER = "# %%"

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"name": "python", "pygments_lexer": "ipython3"}


def _strip_blank(lines: list[str]) -> list[str]:
    while lines and not lines[0].strip():
        lines = lines[1:]
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def _markdown_line(line: str, where: str) -> str:
    if line == "#":
        return ""
    if line.startswith("# "):
        return line[2:]
    if not line.strip():
        return ""
    raise ValueError(f"{where}: markdown lines must start with '# ', got {line!r}")


def parse(path: Path) -> nbformat.NotebookNode:
    """The notebook described by one source file (see the module docstring)."""
    cells: list[tuple[str, int, list[str]]] = []  # (kind, line number, lines)
    kind, start, lines = None, 0, []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith("# ruff:"):
            continue
        if line.startswith(MARKER):
            if kind is not None:
                cells.append((kind, start, lines))
            tag = line[len(MARKER):].strip()
            if tag not in ("", "[markdown]", "[solution]"):
                raise ValueError(f"{path}:{lineno}: unknown cell marker {line!r}")
            kind, start, lines = (tag or "code"), lineno, []
            continue
        if kind is None:
            if line.strip():
                raise ValueError(f"{path}:{lineno}: text before the first '# %%' marker")
            continue
        lines.append(line)
    if kind is not None:
        cells.append((kind, start, lines))

    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": dict(LANGUAGE_INFO)}
    for index, (kind, start, lines) in enumerate(cells):
        lines = _strip_blank(lines)
        if not lines:
            raise ValueError(f"{path}:{start}: empty cell")
        cell_id = f"{path.stem[:2]}-{index:03d}"
        if kind == "[markdown]":
            text = "\n".join(_markdown_line(ln, f"{path}:{start}") for ln in lines)
            cell = nbformat.v4.new_markdown_cell(text)
        else:
            cell = nbformat.v4.new_code_cell("\n".join(lines))
            if kind == "[solution]":
                cell.metadata = {"jupyter": {"source_hidden": True}, "tags": ["solution"]}
        cell.id = cell_id
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(path: Path) -> str:
    """The exact text of the ``.ipynb`` file built from ``path``."""
    return nbformat.writes(parse(path)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale notebooks")
    args = parser.parse_args(argv)
    stale = []
    for source in sorted(SOURCES.glob("*.py")):
        target = TARGET / f"{source.stem}.ipynb"
        text = render(source)
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current == text:
            continue
        stale.append(target)
        if not args.check:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target.relative_to(ROOT)}")
    if args.check and stale:
        names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
        print(f"out of date: {names}; run python scripts/make_notebooks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
