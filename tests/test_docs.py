"""The committed docs and notebooks are in sync with their generators and carry no outputs."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED_NOTEBOOKS = {
    "01_quickstart.ipynb",
    "02_circuit_tuning.ipynb",
    "03_teaching_induction.ipynb",
    "04_your_own_model.ipynb",
}


def _script(name: str):
    """Import ``scripts/NAME.py`` as a module (scripts/ is not a package)."""
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_ctlens_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_up_to_date():
    text = _script("cli_reference").render()
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == text, (
        "docs/cli.md differs from the ctlens parser; run python scripts/cli_reference.py"
    )


def test_cli_reference_lists_every_command_and_option():
    from ctlens.cli import build_parser

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    parser = build_parser()
    stack = [parser]
    seen = 0
    while stack:
        p = stack.pop()
        for action in p._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                stack.extend(action.choices.values())
            for option in action.option_strings:
                if option in ("-h", "--help", "--version"):
                    continue
                assert f"`{option}" in text or f", {option}" in text, (p.prog, option)
                seen += 1
        if p is not parser:
            assert f"`{p.prog}`" in text, p.prog
    assert seen > 20


def test_expected_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= EXPECTED_NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_stripped(path: Path):
    raw = json.loads(path.read_text(encoding="utf-8"))
    nb = nbformat.reads(json.dumps(raw), as_version=4)
    nbformat.validate(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {index} has outputs"
            assert cell.execution_count is None, f"{path.name} cell {index} was executed"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    assert "widgets" not in nb.metadata, f"{path.name} holds widget state"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_matches_its_source(path: Path):
    make = _script("make_notebooks")
    source = make.SOURCES / f"{path.stem}.py"
    assert source.is_file(), f"{path.name} has no source {source.relative_to(ROOT)}"
    committed = json.loads(path.read_text(encoding="utf-8"))
    built = json.loads(make.render(source))
    # compare content, not the nbformat minor version of whoever generated it
    for key in ("cells", "metadata"):
        assert committed[key] == built[key], (
            f"{path.name} is stale; run python scripts/make_notebooks.py"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_plots_work_offline(path: Path):
    """Plots must not need a CDN: no 'notebook_connected' / 'cdn' renderers."""
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    if "plotly" in code:
        assert re.search(r'pio\.renderers\.default = "plotly_mimetype\+notebook"', code), path
    assert "notebook_connected" not in code and "include_plotlyjs=\"cdn\"" not in code


def test_make_notebooks_rejects_malformed_sources(tmp_path: Path):
    make = _script("make_notebooks")
    bad = tmp_path / "x.py"
    bad.write_text("print(1)\n# %%\nx = 1\n")
    with pytest.raises(ValueError, match="before the first"):
        make.parse(bad)
    bad.write_text("# %% [markdown]\nnot a comment\n")
    with pytest.raises(ValueError, match="markdown lines"):
        make.parse(bad)
    bad.write_text("# %% [weird]\nx = 1\n")
    with pytest.raises(ValueError, match="unknown cell marker"):
        make.parse(bad)
    good = tmp_path / "09_ok.py"
    good.write_text("# ruff: noqa: E402\n# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n"
                    "\n# %% [solution]\ny = x + 1\n")
    nb = make.parse(good)
    assert [c.cell_type for c in nb.cells] == ["markdown", "code", "code"]
    assert nb.cells[0].source == "# Title\n\ntext"
    assert nb.cells[2].metadata["jupyter"]["source_hidden"] is True
    assert "ruff" not in make.render(good)


def test_mkdocs_nav_points_at_existing_pages():
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text[text.index("\nnav:"):]
    pages = re.findall(r":\s*([\w./-]+\.(?:md|ipynb))\s*$", nav, flags=re.M)
    assert pages
    for page in pages:
        assert (ROOT / "docs" / page).exists(), f"mkdocs.yml nav names missing docs/{page}"


def test_docs_build_executes_the_tutorials_and_checks_their_outputs():
    """The site shows the tutorials' outputs and figures: mkdocs-jupyter executes them (a
    failing cell fails the build), and scripts/check_site.py, run by CI after the build,
    refuses a page without outputs or with fewer figures than its notebook draws."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!ENV", lambda loader, node: loader.construct_sequence(node)[-1])
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=_Loader)
    (jupyter,) = [p["mkdocs-jupyter"] for p in config["plugins"]
                  if isinstance(p, dict) and "mkdocs-jupyter" in p]
    assert jupyter["execute"] is True and jupyter["allow_errors"] is False
    assert "check_site.py" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    check = _script("check_site")
    drawn = {p.stem: check.figures_drawn(nbformat.read(p, as_version=4)) for p in NOTEBOOKS}
    assert drawn == {"01_quickstart": 3, "02_circuit_tuning": 5, "03_teaching_induction": 4,
                     "04_your_own_model": 1}
    notebook = nbformat.read(NOTEBOOKS[0], as_version=4)
    output = '<div class="jp-RenderedText jp-OutputArea-output" data-mime-type="text/plain">'
    figure = '<div class="plotly-graph-div" id="x"></div>'
    assert check.problems(output + figure * 3, notebook, "q") == []
    assert check.problems(figure * 3, notebook, "q") == [
        "q: no cell output (were the notebooks executed?)"]
    assert check.problems(output + figure, notebook, "q") == [
        "q: 1 plotly figures on the page, the notebook draws 3"]
