"""Checks that a notebook's printed sentences agree with the numbers printed beside them.

The notebooks print every output-dependent sentence from the numbers of the cell that
computes them (a rank and where it stands, which method is closer, whether a run reached
its target). Each check here re-derives, independently, what the printed numbers allow the
sentence to say, so that a notebook whose text and output disagree fails CI:
``scripts/run_notebooks.py`` runs `check` on every notebook it executes, and
``tests/test_notebook_claims.py`` tests the checks themselves.

Usage (on an executed notebook)::

    python scripts/notebook_claims.py executed.ipynb
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import nbformat

Check = Callable[[str], list[str]]


def printed_text(notebook: nbformat.NotebookNode) -> str:
    """Everything the notebook's cells printed (stdout and stderr streams), in order."""
    return "".join(
        output["text"]
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "stream"
    )


def standing_of(rank: int, n: int) -> str:
    """The start of the phrase a rank of ``n`` may be described with."""
    share = rank / n
    if share <= 0.05:
        return "among the strongest"
    if share <= 0.25:
        return "in the top quarter"
    if share <= 0.5:
        return "in the top half"
    return "in the bottom half"


def _need(pattern: str, out: str, what: str, problems: list[str]) -> re.Match[str] | None:
    found = re.search(pattern, out, flags=re.M)
    if found is None:
        problems.append(f"no {what} in the output")
    return found


def check_induction(out: str) -> list[str]:
    """03: the key edge's rank words, EAP vs the real effect, which method is closer, and
    where the five largest misses go."""
    problems: list[str] = []
    said = _need(r"The edge into the key ranks (\d+) of (\d+) by \|EAP score\|: (.*)\.$", out,
                 "sentence about the key edge's rank", problems)
    key = _need(r"-> a\d\.g\d+\.k\s+score [-+]\d\.\d+\s+rank (\d+) of (\d+)$", out,
                "rank of the key edge", problems)
    if said and key:
        rank, n = int(key.group(1)), int(key.group(2))
        if (int(said.group(1)), int(said.group(2))) != (rank, n):
            problems.append(f"the sentence says rank {said.group(1)}, the table {rank}")
        if not said.group(3).startswith(standing_of(rank, n)):
            problems.append(f"rank {rank} of {n} is not {said.group(3)!r}")
    for method, rank_s, n_s, words in re.findall(
        r"^(exact|eap|eap-ig)\s+score [-+]\d\.\d+, rank\s+(\d+) of (\d+): (.*)$", out, re.M
    ):
        if not words.startswith(standing_of(int(rank_s), int(n_s))):
            problems.append(f"{method}: rank {rank_s} of {n_s} is not {words!r}")
    real = _need(r"real effect ([-+]\d+\.\d+)", out, "real effect", problems)
    estimate = _need(r"EAP estimated ([-+]\d+\.\d+)", out, "EAP estimate", problems)
    if real and estimate:
        ratio = abs(float(real.group(1))) / max(abs(float(estimate.group(1))), 1e-9)
        # printed numbers are rounded: judge only clear cases
        if ratio >= 3.05 and "the estimate misses most of it" not in out:
            problems.append(f"the real effect is {ratio:.1f} x EAP's, the text does not say so")
        if 1 / 2.95 < ratio < 2.95 and "within a factor of 3" not in out:
            problems.append(f"EAP is within a factor of 3 ({ratio:.2f}), the text says otherwise")
        if ratio <= 1 / 3.05 and "EAP overestimates it" not in out:
            problems.append(f"EAP overestimates ({ratio:.2f}), the text does not say so")
    pearson = {m: float(v) for m, v in re.findall(r"^(eap|eap-ig)\s+Pearson (-?\d\.\d+)", out,
                                                  re.M)}
    if len(pearson) == 2 and len(set(pearson.values())) == 2:
        closer = max(pearson, key=lambda m: pearson[m])
        if f"{closer} tracks the exact scores more closely" not in out:
            problems.append(f"{closer} has the higher Pearson, the text names the other")
    recovered = {m: int(v) for m, v in re.findall(
        r"^(eap|eap-ig)\s+underestimates \d+ of the 10 largest exact effects and recovers "
        r"(\d+)% of their total size", out, re.M)}
    if len(recovered) == 2 and len(set(recovered.values())) == 2:
        best = max(recovered, key=lambda m: recovered[m])
        if f"{best} recovers more of the large effects" not in out:
            problems.append(f"{best} recovers more, the text names the other")
    misses = re.findall(r"^\s*\S+ -> (\S+)\s+eap [-+]\d\.\d+\s+exact [-+]\d\.\d+$", out, re.M)
    if len(misses) != 5:
        problems.append(f"expected the five largest misses, found {len(misses)}")
    else:
        attention = sum(r.endswith((".q", ".k")) for r in misses)
        values = sum(r.endswith(".v") for r in misses)
        sentence = (f"Of the five largest misses, {attention} go into queries or keys, "
                    f"{values} into values and {5 - attention - values} into MLPs or the logits.")
        if sentence not in out:
            problems.append(f"the misses go to {misses}; expected {sentence!r}")
    return problems


def check_tuning(out: str) -> list[str]:
    """02: the start of the target metric, which runs reached the target, which ended with
    the lower general loss, and parameters moved against the last circuit's share."""
    problems: list[str] = []
    start = _need(r"target metric at step 0: ([-+]\d+\.\d+) \((.*)\)", out, "start", problems)
    if start and (float(start.group(1)) < 0) != start.group(2).startswith("negative"):
        problems.append(f"step 0 metric {start.group(1)} described as {start.group(2)!r}")
    ends = re.findall(r"^(circuit-tuning|full fine-tuning)\s+target ([-+]\d+\.\d+)\s+general loss "
                      r"(\d+\.\d+)", out, re.M)
    reached = _need(r"^reached the target \(metric > 0\): (.*)$", out, "target verdict", problems)
    if len(ends) != 2:
        problems.append(f"expected two runs' end metrics, found {len(ends)}")
    elif reached:
        expected = [name for name, target, _ in ends if float(target) > 0]
        if reached.group(1) != (", ".join(expected) or "neither"):
            problems.append(f"targets {ends}, but the text says {reached.group(1)!r} reached it")
        losses = {name: float(loss) for name, _, loss in ends}
        lower = _need(r"^lower general loss at the end: (.*)$", out, "loss verdict", problems)
        if lower and len(set(losses.values())) == 2 and lower.group(1) != min(
            losses, key=lambda m: losses[m]
        ):
            problems.append(f"general losses {losses}, the text names {lower.group(1)!r}")
    moved = _need(r"moved (\d+\.\d)% of the parameters over the run, (more|no more) than its "
                  r"last circuit holds \((\d+\.\d)%\)", out, "moved-vs-circuit sentence", problems)
    if moved and float(moved.group(1)) != float(moved.group(3)):  # equal when rounded: either
        expected = "more" if float(moved.group(1)) > float(moved.group(3)) else "no more"
        if moved.group(2) != expected:
            problems.append(f"moved {moved.group(1)} % vs {moved.group(3)} %: not "
                            f"{moved.group(2)!r}")
    problems += check_grouped_share(out)
    return problems


def check_grouped_share(out: str) -> list[str]:
    """02: the grouped-vs-ungrouped sentence agrees with the two printed trainable shares."""
    problems: list[str] = []
    shares = dict(re.findall(r"^(\d+) group\(s\) per MLP: .* parameters trainable "
                             r"\((\d+\.\d)%\)$", out, re.M))
    said = _need(r"the grouped circuit makes (fewer|no fewer) parameters trainable than the "
                 r"ungrouped one \((\d+\.\d)% vs (\d+\.\d)%\)$", out, "grouped-share sentence",
                 problems)
    if said is None:
        return problems
    grouped = [float(v) for g, v in shares.items() if g != "1"]
    if "1" not in shares or len(grouped) != 1:
        return problems + [f"expected one ungrouped and one grouped share, found {shares}"]
    if (float(said.group(2)), float(said.group(3))) != (grouped[0], float(shares["1"])):
        problems.append(f"the sentence quotes {said.group(2)} % vs {said.group(3)} %, the "
                        f"lines {grouped[0]} % vs {shares['1']} %")
    if grouped[0] != float(shares["1"]):  # equal when rounded: either word
        expected = "fewer" if grouped[0] < float(shares["1"]) else "no fewer"
        if said.group(1) != expected:
            problems.append(f"{grouped[0]} % vs {shares['1']} % is not {said.group(1)!r}")
    return problems


def check_own_model(out: str) -> list[str]:
    """04: whether the zoo model does the user's task, and whether the trained model does."""
    problems: list[str] = []
    zoo = _need(r"logit difference: clean ([-+]\d+\.\d+), corrupt ([-+]\d+\.\d+)\n(.*)$", out,
                "zoo model's metric and verdict", problems)
    if zoo:
        clean, corrupt, verdict = float(zoo.group(1)), float(zoo.group(2)), zoo.group(3)
        if clean > 1.01 and corrupt < -1.01:
            expected = "the zoo model does this task"
        elif max(abs(clean), abs(corrupt)) < 0.49:
            expected = "both are close to 0"
        else:
            expected = ""
        if expected and not verdict.startswith(expected):
            problems.append(f"clean {clean}, corrupt {corrupt}: expected {expected!r}")
    trained = _need(r"after ([-+]\d+\.\d+)\n(.*)$", out, "trained model's verdict", problems)
    if trained:
        after, verdict = float(trained.group(1)), trained.group(2)
        if after > 1.01 and not verdict.startswith("the trained model does the task"):
            problems.append(f"metric {after} after training, but the text says {verdict!r}")
        if after < 0.99 and not verdict.startswith("the model has not learned"):
            problems.append(f"metric {after} after training, but the text says {verdict!r}")
    return problems


CHECKS: dict[str, Check] = {
    "02_circuit_tuning.ipynb": check_tuning,
    "03_teaching_induction.ipynb": check_induction,
    "04_your_own_model.ipynb": check_own_model,
}


def check(name: str, notebook: nbformat.NotebookNode) -> list[str]:
    """The disagreements between an executed notebook's text and its numbers (none: [])."""
    checker = CHECKS.get(name)
    return [] if checker is None else checker(printed_text(notebook))


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    status = 0
    for path in paths:
        for problem in check(path.name, nbformat.read(path, as_version=4)):
            print(f"{path.name}: {problem}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
