"""docs/experiments.md from the experiment's results JSON (numbers only, no tuning of words
to a favoured outcome: every statement is computed from the table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _report import markdown_table
from experiment import PAPER, is_full
from experiment_stats import area_vs_reference, t_interval

import ctlens.files


def _ci(x: list[float | None] | None, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    mean, half = x
    return f"{mean:.{digits}f}" if half is None else f"{mean:.{digits}f} ± {half:.{digits}f}"


def _size(c: dict[str, Any]) -> str:
    if c["size"] is None:
        return "all"
    return f"{c['size']:.1%}" + (f" ({c['top_n']} edges)" if c.get("top_n") else "")


def _main_table(results: dict[str, Any], model: str, groups: int) -> str:
    header = ["size", "mode", "lr", "seeds", "trainable (matched to)", "target at end",
              "general at end",
              *(f"general at target {t:+g} (reached)" for t in results["thresholds"]),
              "area vs full", "params moved"]
    rows = []
    for c in results["conditions"]:
        if c["model"] != model or (c["groups"] != groups and not is_full(c["mode"])):
            continue
        if not c["seeds"]:
            lr = "no sweep" if c["lr"] is None else f"{c['lr']:g}"
            rows.append([_size(c), c["mode"], lr, "0 (not run)", *[""] * (
                len(header) - 4)])
            continue
        trainable = _ci(c["trainable_fraction"])
        if c.get("discovered_trainable_fraction"):
            trainable += f" ({_ci(c['discovered_trainable_fraction'])})"
        if c.get("lora_rank"):
            trainable += f", rank {c['lora_rank']}"
        rows.append([
            _size(c), c["mode"], f"{c['lr']:g}", f"{len(c['seeds'])}/{len(c['seeds_planned'])}",
            trainable, _ci(c["final_target"]), _ci(c["final_general"], 3),
            *(f"{_ci(a['general'], 3)} ({a['reached']}/{a['of']})"
              for a in c["at_threshold"].values()),
            "reference" if is_full(c["mode"]) else _ci(c["area_vs_full"], 3),
            _ci(c["params_moved"]),
        ])
    return markdown_table(header, rows)


def _paired(a: dict[str, Any], b: dict[str, Any], key: str) -> list[float | None] | None:
    """Mean and t-interval of a - b over the seeds both have (seeds are paired: the same
    seed gives the same batch order)."""
    if key == "area":  # the two runs' curves compared directly, over their common range
        pa, pb = a["points_by_seed"], b["points_by_seed"]
        va = {s: area_vs_reference(pa[s], pb[s]) for s in pa if s in pb}
        vb = {s: 0.0 for s in va}
    else:
        va, vb = (x["at_threshold"][key]["by_seed"] for x in (a, b))
    diffs = [va[s] - vb[s] for s in va if s in vb and va[s] is not None and vb[s] is not None]
    if not diffs:
        return None
    mean, half = t_interval(diffs)
    return [mean, half]


CONTROLS = {"gradient": ("full", "forward", "random-parameters", "random-composition", "lora"),
            PAPER + "gradient": (PAPER + "full", PAPER + "random-parameters")}


def comparison_rows(results: dict[str, Any], model: str, groups: int
                    ) -> list[tuple[float, str, str, str, str]]:
    """(size, circuit mode, control, verdict at the middle threshold, verdict on the area)
    for every circuit-tuning condition and each of its controls that ran."""
    conds = {(c["size"], c["mode"]): c for c in results["conditions"]
             if c["model"] == model and (c["groups"] == groups or is_full(c["mode"]))
             and c["seeds"]}
    middle = f"{results['thresholds'][len(results['thresholds']) // 2]:g}"
    rows = []
    for (size, mode), grad in sorted(conds.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
        for other in CONTROLS.get(mode, ()):
            o = conds.get((None if is_full(other) else size, other))
            if o is not None:
                rows.append((size, mode, other, _verdict(_paired(grad, o, middle)),
                             _verdict(_paired(grad, o, "area"))))
    return rows


def _comparisons(results: dict[str, Any], model: str, groups: int) -> list[str]:
    middle = f"{results['thresholds'][len(results['thresholds']) // 2]:g}"
    rows = [[f"{size:.1%}", f"{mode} - {other}", at, area]
            for size, mode, other, at, area in comparison_rows(results, model, groups)]
    if not rows:
        return []
    return [markdown_table(["size", "difference", f"general at target +{middle}",
                            "area between the two curves"], rows), ""]


def _summary(results: dict[str, Any], models: list[str]) -> list[str]:
    """How often each control came out resolved lower, higher or unresolved (both columns)."""
    tally: dict[tuple[str, str, str], dict[str, int]] = {}
    for model in models:
        for groups in sorted({c["groups"] for c in results["conditions"]
                              if c["model"] == model and c["seeds"]}):
            for _, mode, other, at, area in comparison_rows(results, model, groups):
                key = (model.removeprefix("zoo:"), f"{mode} - {other}",
                       "ungrouped" if groups == 1 else f"{groups} groups")
                counts = tally.setdefault(key, {})
                for verdict in (at, area):
                    word = verdict.split(": ")[-1] if ": " in verdict else "not comparable"
                    counts[word] = counts.get(word, 0) + 1
    if not tally:
        return []
    words = ("circuit-tuning lower", "circuit-tuning higher", "no difference resolved",
             "not comparable")
    rows = [[m, d, g, *(str(c.get(w, 0)) for w in words)] for (m, d, g), c in tally.items()]
    return [
        "## Summary", "",
        "Counted from the paired tables below: for each model, grouping and difference, how "
        "many (size, measure) cells came out with circuit-tuning's general LM loss resolved "
        "lower, resolved higher, or not resolved (the 95 % interval of the paired difference "
        "contains 0); measures are the general loss at the middle target threshold and the "
        "area between the two target -> general curves. 'not comparable': a seed pair did not "
        "both reach the threshold.", "",
        markdown_table(["model", "difference", "MLPs", *words], rows), ""]


def _verdict(d: list[float | None] | None) -> str:
    if d is None:
        return "n/a (not both reached)"
    mean, half = d
    if half is None:
        return f"{mean:+.3f} (one seed)"
    if mean + half < 0:
        word = "circuit-tuning lower"
    elif mean - half > 0:
        word = "circuit-tuning higher"
    else:
        word = "no difference resolved"
    return f"{mean:+.3f} ± {half:.3f}: {word}"


def write_page(results: dict[str, Any], figures: list[tuple[str, str]], path: Path) -> None:
    models = sorted({c["model"] for c in results["conditions"]})
    chosen = ", ".join(f"{k.removeprefix('zoo:')} {v:g}" for k, v in
                       sorted(results["chosen_lr"].items()))
    parts = [
        "# Experiments: circuit-tuning against matched controls",
        "",
        "Does fine-tuning only inside the task circuit cost less general capability than "
        "full fine-tuning, or than training a random subgraph of the same size, at equal "
        "progress on the task? The summary comes first; then how the runs were made, one "
        "table per model, the figures, the learning-rate sweep, and the command that "
        "regenerates this page.",
        "",
        *_summary(results, models),
        "## How the runs were made",
        "",
        f"**What ran.** {results['runs_done']} of {results['runs_planned']} planned reported "
        f"runs, plus {len(results['sweep'])} learning-rate sweep runs; {results['machine']}.",
        "",
    ]
    if results.get("note"):
        parts += [f"**What was cut, and why.** {results['note']}", ""]
    parts += [
        "**Setup.** Task `agreement-flip` (the paper's subject-verb *disagreement*: tune the "
        "model to prefer the wrong verb number). Target metric: logit(wrong form) - "
        "logit(correct form) on held-out prompts (higher is further towards the goal); "
        "general capability: LM loss on 128 held-out rows of the general corpus. Every run "
        f"is {results['steps']} steps of batch 16 (AdamW, loss on the target token), constant "
        "lr, gradient clip 1.0, "
        f"evaluated every {results['eval_every']} steps. Circuit modes rediscover every step "
        "(K = 1) by EAP on the training batch with mean ablation and keep the top-N edges. "
        "`gradient`: only circuit nodes' parameters move; `forward`: edges outside the "
        "circuit are mean-ablated in the forward pass (its target is measured on the "
        "unmasked model); `random-parameters`: a random circuit redrawn every step with as "
        "many trainable parameters as the circuit discovery selects at that step on the "
        "random run's own weights and batch; `random-composition`: the same, per node kind; "
        "`lora`: rank-r adapters on every attention and MLP projection (alpha = 2r), r chosen "
        "so the adapters hold as many parameters as the step-0 circuit of that size "
        "unlocks (so at these budgets LoRA's rank is near the model width); `full`: full "
        "fine-tuning (no size; the reference of the area column). `paper-full`, "
        "`paper-gradient` and `paper-random-parameters` are full fine-tuning, gradient "
        "circuit-tuning and its parameter-matched control under the circuit-tuning authors' "
        "official options: edges chosen by top-nodes selection (edge |score| x its sender's "
        "and receiver's summed |scores|), SGD with momentum 0.9 and weight decay 1e-4, and "
        "the LM loss on every token of the training sentence; their area column is measured "
        "against `paper-full`. Parameters moved by node kind are counted on the exported "
        "weights against the zoo's shipped weights.",
        "",
        "**Statistics.** Each condition runs on seeds "
        f"{', '.join(map(str, results['seeds']))} (the seed sets the batch order and the "
        "random draws; seeds are paired across modes). Cells show the mean and the half-width "
        "of the 95 % Student-t interval over seeds. *General at target t*: general LM loss "
        "where the target first reaches t, linearly interpolated between the two "
        "evaluations around it (reached: how many seeds got there). *Area vs full*: the mean "
        "over targets of general(mode) - general(full) along the two runs' target -> "
        "general curves (general loss at each target's first crossing), over the target "
        "range both reached, paired by seed; negative means less general damage than full "
        "fine-tuning at equal target (each row's range is its own, so compare rows through "
        "the paired table, which measures the area between gradient's curve and each "
        "control's directly, over the range both reached, seed by seed). *Trainable*: "
        "fraction of real parameters the circuit "
        "lets move, mean over steps (in brackets: the fraction of the circuit discovery "
        "selected, which the random control matches). *Params moved*: fraction of real "
        "parameters that differ from the start at the end (the union over all steps' "
        "circuits).",
        "",
        "**Learning rates.** Chosen per model and mode by one run per lr in "
        f"{', '.join(f'{x:g}' for x in results['lrs'])} (AdamW; SGD for the paper-* modes: "
        f"{', '.join(f'{x:g}' for x in results.get('paper_lrs', []))}) on seed "
        f"{results['sweep_seed']} "
        f"(not a reported seed), with circuits of {results['sweep_size']:.0%} of the edges "
        "(full fine-tuning has no size), ungrouped: the lr with the "
        f"lowest general LM loss where the target first reaches "
        f"+{results['thresholds'][len(results['thresholds']) // 2]:g} (if none reaches it, the "
        f"highest final target). Chosen: {chosen or 'sweep not finished'} (the sweep's "
        "runs are tabulated [at the end](#learning-rate-sweep)).",
        "",
    ]
    sweep: list[str] = []
    if results["sweep"]:
        sweep += [markdown_table(
            ["model", "mode", "lr", "target at end", "general at end",
             "general at middle threshold", "chosen"],
            [[s["model"].removeprefix("zoo:"), s["mode"], f"{s['lr']:g}",
              f"{s['final_target']:+.2f}", f"{s['final_general']:.3f}",
              "not reached" if s["general_at_middle"] is None else
              f"{s['general_at_middle']:.3f}", "yes" if s["chosen"] else ""]
             for s in results["sweep"]]), ""]
    for model in models:
        start = results["start"].get(model)
        parts += [f"## {model}", ""]
        if start:
            parts += [f"Before tuning: target {start['target']:+.2f}, general LM loss "
                      f"{start['general']:.3f}.", ""]
        for groups in sorted({c["groups"] for c in results["conditions"]
                              if c["model"] == model and c["seeds"]}):
            label = "ungrouped MLPs" if groups == 1 else f"MLPs in {groups} neuron groups"
            parts += [f"### {label}", "", _main_table(results, model, groups), "",
                      "Paired differences, circuit-tuning minus each control, seed by seed "
                      "(negative: circuit-tuning keeps general LM loss lower; 'no difference "
                      "resolved': the 95 % interval contains 0):", "",
                      *_comparisons(results, model, groups)]
    parts += ["## Figures", ""]
    for caption, rel in figures:
        if rel.endswith(".png"):
            parts += [f"![{caption}]({rel})", ""]
        else:
            parts += [f"[{caption} (interactive HTML)]({rel})", ""]
    parts += ["## Learning-rate sweep", "", *sweep, "## Regenerating this page", "",
              "Written by `python benchmarks/experiment.py` from its run directories. "
              "Regenerate this page, `benchmarks/results/experiment.json` and the figures with "
              "one command (`all` runs the grid in `--jobs` processes, default 2, then writes "
              "the report; re-running skips finished runs; `run --part I/N` and `report` do the "
              "two halves by hand):", "", f"    {results['command']}", ""]
    ctlens.files.atomic_write_text(path, "\n".join(parts))
