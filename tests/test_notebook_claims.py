"""A notebook's text must be true of its own output.

Sentences that depend on what a notebook computes (a rank, which method is closer, whether
a run reached its target) are printed by the cell that computes them, from its numbers, and
``scripts/run_notebooks.py`` checks every executed notebook with
``scripts/notebook_claims.py``. These tests hold that machinery to account: the lesson's
``standing`` helper says the right words at its boundaries, each check passes an output
whose sentences follow from its numbers and fails one that contradicts them (the excerpts
below are real outputs of the notebooks, trimmed), and the slow test runs the induction
lesson itself.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSON = ROOT / "notebooks" / "src" / "03_teaching_induction.py"


def _claims() -> Any:
    path = ROOT / "scripts" / "notebook_claims.py"
    spec = importlib.util.spec_from_file_location("_ctlens_notebook_claims", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


claims = _claims()


def notebook_function(source: Path, name: str) -> Any:
    """The function ``name`` defined at the top level of a notebook source, on its own."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    (node,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    namespace: dict[str, Any] = {}
    exec(compile(ast.Module([node], type_ignores=[]), str(source), "exec"), namespace)
    return namespace[name]


@pytest.mark.parametrize(("rank", "n", "words"), [
    (1, 562, "among the strongest"), (28, 562, "among the strongest"),
    (29, 562, "in the top quarter"), (140, 562, "in the top quarter"),
    (141, 562, "in the top half"), (281, 562, "in the top half"),
    (282, 562, "in the bottom half"), (306, 562, "in the bottom half"),
])
def test_standing_says_where_a_rank_is(rank: int, n: int, words: str) -> None:
    standing = notebook_function(LESSON, "standing")
    assert standing(rank, n).startswith(words)
    assert claims.standing_of(rank, n) == words


def test_lesson_markdown_drops_the_claims_its_output_contradicted() -> None:
    markdown = "\n".join(
        line for line in LESSON.read_text(encoding="utf-8").splitlines() if line.startswith("# ")
    )
    assert "among the strongest few percent" not in markdown
    assert "from `m0` into value inputs" not in markdown


INDUCTION = """\
a0.h5 -> a1.h3.q   score -0.001  rank 193 of 562
a0.h5 -> a1.g1.k   score -0.000  rank 306 of 562
a0.h5 -> a1.g1.v   score -0.001  rank 204 of 562

The edge into the key ranks 306 of 562 by |EAP score|: in the bottom half of the edges: EAP \
sees almost no effect.
metric without a0.h5 -> a1.g1.k: -0.104, full model -0.021: real effect -0.0840
EAP estimated -0.0002
The real effect is more than 100 times EAP's estimate: the estimate misses most of it.
eap     Pearson 0.498   Spearman 0.707
eap-ig  Pearson 0.898   Spearman 0.572
eap-ig tracks the exact scores more closely (Pearson 0.898 against 0.498).
eap     underestimates 10 of the 10 largest exact effects and recovers 6% of their total size
eap-ig  underestimates 9 of the 10 largest exact effects and recovers 40% of their total size
eap-ig recovers more of the large effects (40% against 6%).
exact   score -0.105, rank  24 of 562: among the strongest 4% of the edges
eap     score -0.000, rank 345 of 562: in the bottom half of the edges: EAP sees almost no effect
eap-ig  score -0.066, rank  39 of 562: in the top quarter of the edges, but not among the \
strongest few percent
 input -> a0.g3.v   eap +0.009  exact -5.150
 input -> a0.g2.v   eap -0.009  exact -5.085
    m2 -> logits    eap -0.720  exact -4.963
    m0 -> a1.g1.k   eap -0.016  exact -3.952
    m1 -> m2        eap -0.169  exact -4.087
Of the five largest misses, 1 go into queries or keys, 2 into values and 2 into MLPs or the \
logits.
"""

TUNING = """\
circuit size: 50 of 802 edges (6.2%)
target metric at step 0: -7.29 (negative: the model does agreement right)
circuit-tuning    target +3.88  general loss 1.677  moved 86.3%
                  agreement -3.88, ioi +8.71, pronoun -0.17, induction -0.17
full fine-tuning  target +3.20  general loss 3.871  moved 98.5%
                  agreement -3.20, ioi +7.01, pronoun -0.46, induction -11.97
reached the target (metric > 0): circuit-tuning, full fine-tuning
lower general loss at the end: circuit-tuning
circuit-tuning moved 86.3% of the parameters over the run, more than its last circuit holds \
(61.7%)
1 group(s) per MLP: 16 of 802 edges, 214,480 of 427,776 parameters trainable (50.1%)
8 group(s) per MLP: 37 of 1873 edges, 128,144 of 427,776 parameters trainable (30.0%)
at 2% of the edges the grouped circuit makes fewer parameters trainable than the ungrouped \
one (30.0% vs 50.1%)
"""

OWN_MODEL = """\
logit difference: clean -0.02, corrupt -0.01
both are close to 0: the zoo model cannot do this task
held-out logit difference: before training -0.02, after +8.06
the trained model does the task on held-out prompts
"""


@pytest.mark.parametrize(("check", "output", "contradiction"), [
    ("check_induction", INDUCTION,
     ("in the bottom half of the edges: EAP \\\nsees", "among the strongest 5% of the edges")),
    ("check_induction", INDUCTION, ("the estimate misses most of it", "EAP overestimates it")),
    ("check_induction", INDUCTION, ("eap-ig tracks", "eap tracks")),
    ("check_induction", INDUCTION, ("eap-ig recovers more", "eap recovers more")),
    ("check_induction", INDUCTION, ("rank  39 of 562: in the top quarter",
                                    "rank  39 of 562: among the strongest")),
    ("check_induction", INDUCTION, ("1 go into queries or keys, 2 into values",
                                    "0 go into queries or keys, 3 into values")),
    ("check_tuning", TUNING, ("circuit-tuning, full fine-tuning", "circuit-tuning")),
    ("check_tuning", TUNING, ("at the end: circuit-tuning", "at the end: full fine-tuning")),
    ("check_tuning", TUNING, ("(negative: the model", "(not negative: the model")),
    ("check_tuning", TUNING, ("run, more than", "run, no more than")),
    ("check_tuning", TUNING, ("makes fewer parameters", "makes no fewer parameters")),
    ("check_tuning", TUNING, ("(30.0% vs 50.1%)", "(50.1% vs 30.0%)")),
    ("check_tuning", TUNING, ("trainable (30.0%)", "trainable (60.0%)")),
    ("check_own_model", OWN_MODEL, ("both are close to 0", "the zoo model does this task")),
    ("check_own_model", OWN_MODEL, ("the trained model does", "the model has not learned")),
])
def test_checks_pass_agreement_and_catch_contradiction(
    check: str, output: str, contradiction: tuple[str, str]
) -> None:
    checker = getattr(claims, check)
    assert checker(output) == []
    old, new = contradiction
    old = old.replace("\\\n", "")
    assert old in output.replace("\\\n", ""), old
    broken = output.replace("\\\n", "").replace(old, new, 1)
    assert checker(broken), f"{check} missed: {new!r}"


def test_checks_refuse_an_output_without_its_sentences() -> None:
    assert claims.check_induction("") and claims.check_tuning("") and claims.check_own_model("")
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print()")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=OWN_MODEL)]
    notebook.cells.append(cell)
    assert claims.check("04_your_own_model.ipynb", notebook) == []
    assert claims.check("01_quickstart.ipynb", notebook) == []  # nothing output-dependent


@pytest.mark.slow
def test_induction_lesson_text_agrees_with_its_output() -> None:
    from nbclient import NotebookClient

    path = ROOT / "notebooks" / "03_teaching_induction.ipynb"
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    assert claims.check(path.name, notebook) == []
