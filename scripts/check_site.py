"""Check that a built docs site shows every tutorial with its outputs and figures.

``mkdocs build`` executes the notebooks (mkdocs.yml: mkdocs-jupyter's ``execute``); this
reads each tutorial's page and fails when it carries no cell output, or fewer plotly
figures than its notebook draws (a code cell whose last line shows a figure: a
``ctlens.viz.plot_...(...)`` call, a bare ``fig``, or ``.show()``). CI runs it after the
strict build::

    python scripts/check_site.py SITE_DIR
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
#: the last line of a code cell that displays a figure
FIGURE_LINE = re.compile(r"^\s*(ctlens\.viz\.plot_\w+\(.*|fig|.*\.show\(\))\s*$")
OUTPUT = re.compile(r'class="[^"]*jp-OutputArea-output[^"]*"')
FIGURE = re.compile(r'class="plotly-graph-div"')


def figures_drawn(notebook: nbformat.NotebookNode) -> int:
    """How many code cells of ``notebook`` end by showing a figure."""
    count = 0
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        lines = [line for line in cell.source.splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
        if lines and FIGURE_LINE.match(lines[-1]):
            count += 1
    return count


def problems(page: str, notebook: nbformat.NotebookNode, name: str) -> list[str]:
    """What is missing from one tutorial's built ``page``."""
    found: list[str] = []
    if not OUTPUT.search(page):
        found.append(f"{name}: no cell output (were the notebooks executed?)")
    want, have = figures_drawn(notebook), len(FIGURE.findall(page))
    if have < want:
        found.append(f"{name}: {have} plotly figures on the page, the notebook draws {want}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the folder mkdocs build wrote")
    args = parser.parse_args(argv)
    found: list[str] = []
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in notebooks:
        page = args.site / "tutorials" / path.stem / "index.html"
        if not page.is_file():
            found.append(f"{path.stem}: no page {page}")
            continue
        found += problems(page.read_text(encoding="utf-8"), nbformat.read(path, as_version=4),
                          path.stem)
    for line in found:
        print(line, file=sys.stderr)
    if not found:
        print(f"{len(notebooks)} tutorials with outputs and figures in {args.site}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
