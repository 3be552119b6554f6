"""docs/experiments.md from the experiment's results JSON.

Every statement is computed from the numbers: the opening summary and verdict count the
headline cells' outcomes and say which way they went, whatever that is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _report import markdown_table

import ctlens.files

LABELS = {"random-parameters": "the random circuit matched on trainable parameters",
          "full": "full fine-tuning"}


def _ci(x: list[float | None] | None, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    mean, half = x
    return f"{mean:.{digits}f}" if half is None else f"{mean:.{digits}f} ± {half:.{digits}f}"


def _where(c: dict[str, Any]) -> str:
    mlps = "ungrouped" if c["groups"] == 1 else f"{c['groups']} groups"
    return f"{c['model'].removeprefix('zoo:')} ({mlps})"


def _size(size: float | None) -> str:
    return "all" if size is None else f"{size:.1%}"


def _seed_list(seeds: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    runs: list[list[int]] = []
    for s in seeds:
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _verdict_sentence(control: str, cells: list[dict[str, Any]]) -> str:
    """What the headline cells against ``control`` say together."""
    lower = [c for c in cells if c["verdict"] == "circuit-tuning lower"]
    higher = [c for c in cells if c["verdict"] == "circuit-tuning higher"]
    empty = [c for c in cells if c["n"] == c["neither"]]
    label = LABELS.get(control, control)
    counts = (f"resolved lower in {len(lower)} of {len(cells)} headline cells"
              + (f" ({', '.join(map(_where, lower))})" if lower else "")
              + f", higher in {len(higher)}"
              + (f" ({', '.join(map(_where, higher))})" if higher else "")
              + f", not resolved in {len(cells) - len(lower) - len(higher)}"
              + (f" (in {len(empty)} of them no seed of either side got there)" if empty
                 else ""))
    if len(empty) == len(cells):
        reading = "nothing to compare yet: no seed of either side reached the threshold"
    elif lower and len(lower) == len(cells):
        reading = (f"circuit-tuning kept the general LM loss lower than {label} on every "
                   "model and grouping tested")
    elif lower and not higher:
        reading = (f"circuit-tuning kept the general LM loss lower than {label} where a "
                   "difference was resolved, and was never resolved worse")
    elif higher and not lower:
        reading = (f"circuit-tuning was resolved worse than {label} where a difference was "
                   "resolved, and never better")
    elif lower and higher:
        reading = f"the answer against {label} depends on the model: mixed"
    else:
        reading = (f"no difference from {label} was resolved: at this number of seeds the "
                   "experiment cannot tell them apart")
    return (f"**Against {label}:** circuit-tuning's general LM loss at target "
            f"+{cells[0]['measure'].split('+')[-1]} was {counts}. Verdict: {reading}.")


def summary(results: dict[str, Any]) -> list[str]:
    """The opening section: what the headline cells say, then their table."""
    headline = [c for c in results["comparisons"] if c["headline"]]
    parts = ["## Summary and verdict", ""]
    if results["runs_done"] < results["runs_planned"]:
        parts += [f"**Preliminary:** {results['runs_done']} of {results['runs_planned']} "
                  "planned runs have finished; every number below may still change.", ""]
    if not headline:
        return parts + ["No headline cell has finished runs on both sides yet.", ""]
    for control in dict.fromkeys(c["control"] for c in headline):
        parts += [_verdict_sentence(control, [c for c in headline if c["control"] == control]),
                  ""]
    edges = [c for c in results["cells"] if c["best_on_edge"] and c["grid_final"]]
    if edges:
        parts += ["**Caveat:** the best lr still sits on the edge of the grid after "
                  f"{results['max_extend']} extension(s) in "
                  + ", ".join(f"{_where(c)} {c['mode']}" for c in edges)
                  + ": a wider grid could move those envelopes.", ""]
    parts += [f"Each headline cell compares circuit-tuning (`gradient`) with a control at "
              f"{results['headline_size']:.1%} of the edges, seed by seed, on the general LM "
              f"loss where the target first reaches +{results['middle']:g} (the envelope over "
              "each mode's lrs); negative differences favour circuit-tuning. Resolved: Holm-"
              f"adjusted Wilcoxon p < {results['alpha']:g} (the protocol below).", "",
              comparison_table(headline, holm_column=True), ""]
    return parts


def comparison_table(rows: list[dict[str, Any]], holm_column: bool = False) -> str:
    """Paired cells, each with its n and how every seed entered."""
    header = ["model (MLPs)", "size", "circuit-tuning - control", "measure", "n",
              "both / only CT / only control / neither", "CT lower / higher (seeds)",
              "mean difference ± 95 % t (seeds with both)", "Wilcoxon W+ / W-, p",
              *(["Holm p"] if holm_column else []), "verdict"]
    body = []
    for c in rows:
        w_plus, w_minus, p = c["wilcoxon"]
        t = "n/a" if c["t"] is None else f"{_ci(c['t'])} ({c['both']})"
        verdict = c["verdict"] if "holm_p" in c else f"{c['verdict']} (exploratory)"
        body.append([_where(c), _size(c["size"]), f"{c['mode']} - {c['control']}",
                     c["measure"], c["n"],
                     f"{c['both']} / {c['only_a']} / {c['only_b']} / {c['neither']}",
                     f"{c['a_lower']} / {c['a_higher']}", t,
                     f"{w_plus:g} / {w_minus:g}, {p:.4f}",
                     *([f"{c['holm_p']:.4f}"] if holm_column else []), verdict])
    return markdown_table(header, body)


def protocol(results: dict[str, Any]) -> list[str]:
    """The rules, as fixed before the runs (they are what the code computes)."""
    n = len(results["seeds"])
    m = sum(c["headline"] for c in results["comparisons"]) or 2 * len(
        {(c["model"], c["groups"]) for c in results["cells"]})
    lrs = ", ".join(f"{x:g}" for x in results["lrs"])
    paper_lrs = ", ".join(f"{x:g}" for x in results["paper_lrs"])
    return [
        "## The protocol (fixed before the runs)", "",
        f"- **Learning rates.** Every mode runs at every lr of its grid: {lrs} for the AdamW "
        f"modes, {paper_lrs} for the SGD `paper-*` modes. A cell's best lr is the one the "
        "envelope (next item) picks at the middle threshold on the most seeds (with no seed "
        "there: the highest mean final target); where it sits on the lowest or highest lr, "
        "the grid grows by the next lr beyond that edge on the 1-3 ladder, for every seed, "
        f"at most {results['max_extend']} time(s) per cell. No lr is chosen on a held-out "
        "seed: every seed is reported.",
        "- **The envelope.** Per seed, a mode's runs at all its lrs count as one: at a "
        "target t, its general LM loss is the lowest that any of its lrs had where its "
        "target first reached t (linearly interpolated between the two evaluations around "
        "it). The area measure compares two such envelopes: the mean of their gap over the "
        "target range both reached.",
        f"- **Headline cells.** `gradient` against `random-parameters` and against `full`, "
        f"at {results['headline_size']:.1%} of the edges, on every model, ungrouped and "
        f"with 8 neuron groups ({m} cells), measured at target +{results['middle']:g}; "
        f"seeds {_seed_list(results['seeds'])} ({n}), paired (the same seed gives every mode "
        "the same batch order and draws).",
        "- **Tests.** Per paired cell: the mean difference with its 95 % Student-t "
        "interval over the seeds where both sides reached the threshold, and the exact "
        "two-sided Wilcoxon signed-rank test over all seeds where at least one side did. "
        "A seed where only one side reached the threshold enters the Wilcoxon test as the "
        "largest difference in favour of that side (the other side's loss counts as "
        "infinite); a seed where neither did is left out; each cell shows all four counts. "
        f"The headline family is Holm-corrected at {results['alpha']:g}; every other cell "
        "(other thresholds, the area, other modes or sizes) is exploratory and shows its "
        "unadjusted p. With n seeds the smallest possible p is 2^(1-n) "
        f"({2.0 ** (1 - n):.4f} at n = {n}); Holm's first step needs p < "
        f"{results['alpha']:g} / {m} = {results['alpha'] / m:.4f}.",
        f"- **Data.** Task `agreement-flip`, one sample for every run (data seed "
        f"{results['data_seed']}); {results['n_examples']} examples per discovery and "
        f"evaluation set; the general LM loss on {results['general_examples']} held-out "
        "rows of the general corpus.", "",
    ]


def setup(results: dict[str, Any]) -> list[str]:
    """What a run is: task, modes, optimiser, evaluation."""
    return [
        "## Setup", "",
        "Task `agreement-flip` (the paper's subject-verb *disagreement*: tune the model to "
        "prefer the wrong verb number). Target metric: logit(wrong form) - logit(correct "
        f"form) on {results['n_examples']} held-out prompts (higher is further towards the "
        "goal); general capability: the LM loss on "
        f"{results['general_examples']} held-out rows of the general corpus (64 tokens "
        f"each). Every run is {results['steps']} steps of batch {results['batch_size']} "
        "(AdamW, loss on the target token, unless paper-*), constant lr, gradient clip 1.0, "
        f"evaluated every {results['eval_every']} steps. Circuit modes rediscover every step "
        "(K = 1) by EAP on the training batch with mean ablation and keep the top-N edges. "
        "`gradient`: only circuit nodes' parameters move; `forward`: edges outside the "
        "circuit are mean-ablated in the forward pass (its target is measured on the "
        "unmasked model); `random-parameters`: a random circuit redrawn every step with as "
        "many trainable parameters as the circuit discovery selects at that step on the "
        "random run's own weights and batch (counted on the union of parameters, so a "
        "layer's shared attention-output bias counts once; the random circuit never holds "
        "more, and falls short by less than any node it did not draw would add); "
        "`random-composition`: the same, per node kind; `lora`: rank-r adapters on every "
        "attention and MLP projection (alpha = 2r), r chosen so the adapters hold as many "
        "parameters as the step-0 circuit of that size unlocks; `full`: full fine-tuning "
        "(no size, no grouping: the same runs serve both groupings). `paper-full`, "
        "`paper-gradient` and `paper-random-parameters` are the same three under the "
        "circuit-tuning authors' official options: top-nodes selection, SGD with momentum "
        "0.9 and weight decay 1e-4, the LM loss on every token of the training sentence. "
        "Every run repeats from the command line: `ctlens tune` with `--seed` (batch order "
        "and random draws) and `--data-seed` (the task sample) gives the same metrics.", "",
    ]


def what_ran(results: dict[str, Any]) -> list[str]:
    """The command, the counts, the machine and the measured time per run."""
    timing = "; ".join(
        f"{model.removeprefix('zoo:')}: " + ", ".join(f"{mode} {s:.0f} s" for mode, s in
                                                      sorted(modes.items()))
        for model, modes in results["seconds_per_run"].items())
    parts = [
        "## What ran", "",
        "Written by `python benchmarks/experiment.py` from its run directories. One "
        "resumable command regenerates this page, `benchmarks/results/experiment.json` and "
        "the figures (finished runs are reused; it first measures one run per model and "
        "prints the expected total):", "",
        f"    {results['command']}", "",
        f"{results['runs_done']} of {results['runs_planned']} planned runs; "
        f"{results['machine']}. Mean wall time per run (training and evaluations): "
        f"{timing or 'none finished'}.", "",
    ]
    if results.get("note"):
        parts += [f"**What was cut, and why.** {results['note']}", ""]
    return parts


def cell_table(results: dict[str, Any], model: str, groups: int) -> str:
    """The envelope of every cell of ``model`` and ``groups`` (and full fine-tuning)."""
    header = ["size", "mode", "lrs run", f"lr picked at +{results['middle']:g} (seeds)",
              "best", "seeds",
              *(f"general at target {t:+g} (reached)" for t in results["thresholds"])]
    rows = []
    for c in results["cells"]:
        if c["model"] != model or (c["groups"] != groups and c["size"] is not None):
            continue
        grown = [x for x in c["lrs"] if x not in c["base_lrs"]]
        lrs = ", ".join(f"{x:g}" for x in c["lrs"]) + (
            f" (grown by {', '.join(f'{x:g}' for x in grown)})" if grown else "") + (
            "" if c["grid_final"] else " (extension pending)")
        picks = c["envelope"][f"{results['middle']:g}"]["picked_lrs"]
        picked = ", ".join(f"{lr} ({n})" for lr, n in sorted(picks.items(),
                                                             key=lambda kv: float(kv[0])))
        best = ", ".join(f"{x:g}" for x in c["best_lrs"]) + (
            " (on the grid's edge)" if c["best_on_edge"] else "")
        rows.append([_size(c["size"]), c["mode"], lrs, picked or "none reached", best,
                     len(c["seeds"]),
                     *(f"{_ci(e['general'])} ({e['reached']}/{e['of']})"
                       for e in c["envelope"].values())])
    return markdown_table(header, rows)


def model_sections(results: dict[str, Any]) -> list[str]:
    """Per model and grouping: the envelope table and every paired cell."""
    parts = []
    for model in dict.fromkeys(c["model"] for c in results["cells"]):
        parts += [f"## {model}", ""]
        start = results["start"].get(model)
        if start:
            parts += [f"Before tuning: target {start['target']:+.2f}, general LM loss "
                      f"{start['general']:.3f}.", ""]
        for groups in sorted({c["groups"] for c in results["cells"]
                              if c["model"] == model and c["size"] is not None}):
            label = "ungrouped MLPs" if groups == 1 else f"MLPs in {groups} neuron groups"
            rows = [c for c in results["comparisons"]
                    if c["model"] == model and c["groups"] == groups]
            parts += [f"### {label}", "",
                      "The envelope over the lrs, mean and 95 % t-interval over the seeds "
                      "that reached each target:", "", cell_table(results, model, groups), ""]
            if rows:
                parts += ["Paired cells, circuit-tuning minus each control, every measure "
                          "(negative: circuit-tuning keeps the general LM loss lower; the "
                          "area's 'neither' counts seeds whose envelopes share no target "
                          "range):", "", comparison_table(rows), ""]
    return parts


def per_lr_appendix(results: dict[str, Any]) -> list[str]:
    """Secondary view: every condition at each single lr (not what the verdict uses)."""
    header = ["model", "MLPs", "size", "mode", "lr", "seeds", "target at end",
              "general at end",
              *(f"general at target {t:+g} (reached)" for t in results["thresholds"]),
              "trainable (matched to)", "params moved"]
    rows = []
    for c in results["conditions"]:
        if not c["seeds"]:
            continue
        trainable = _ci(c["trainable_fraction"], 3)
        if c.get("discovered_trainable_fraction"):
            trainable += f" ({_ci(c['discovered_trainable_fraction'], 3)})"
        rows.append([c["model"].removeprefix("zoo:"), c["groups"], _size(c["size"]),
                     c["mode"], f"{c['lr']:g}", f"{len(c['seeds'])}/{len(c['seeds_planned'])}",
                     _ci(c["final_target"], 2), _ci(c["final_general"]),
                     *(f"{_ci(a['general'])} ({a['reached']}/{a['of']})"
                       for a in c["at_threshold"].values()),
                     trainable, _ci(c["params_moved"], 3)])
    return ["## Appendix: each learning rate on its own", "",
            "A secondary view, not used by any comparison above: every mode at each lr, "
            "mean and 95 % t-interval over seeds.", "", markdown_table(header, rows), ""]


def write_page(results: dict[str, Any], figures: list[tuple[str, str]], path: Path) -> None:
    parts = ["# Experiments: circuit-tuning against matched controls", "",
             "Does fine-tuning only inside the task circuit cost less general capability than "
             "full fine-tuning, or than training a random subgraph with as many trainable "
             "parameters, at equal progress on the task? The summary and its verdict come "
             "first; then the protocol, fixed before the runs; the setup; one section per "
             "model; the figures; each learning rate on its own; and what ran, with the "
             "command that regenerates this page.", "",
             *summary(results), *protocol(results), *setup(results),
             *model_sections(results), "## Figures", ""]
    for caption, rel in figures:
        if rel.endswith(".png"):
            parts += [f"![{caption}]({rel})", ""]
        else:
            parts += [f"[{caption} (interactive HTML)]({rel})", ""]
    parts += [*per_lr_appendix(results), *what_ran(results)]
    ctlens.files.atomic_write_text(path, "\n".join(parts))
