"""Report of the circuit-tuning experiment: results JSON, figures, docs/experiments.md.

Reads only finished run directories (``benchmarks/experiment.py`` makes them), so it can be
re-run at any time; the notebook reads the JSON it writes (benchmarks/results/experiment.json).

The JSON holds ``conditions`` (one entry per model, grouping, size, mode and lr, with its
``seeds`` and per-seed trajectories), ``cells`` (per model, grouping, size and mode: the
lrs run, the best lr, and per seed the envelope over the lrs at each threshold), and
``comparisons`` (the paired cells: circuit-tuning minus each control, per measure, with n,
the counts of seeds where one side never got there, the t interval, the Wilcoxon test and,
for the headline cells, Holm's adjustment and the verdict).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from experiment import (
    MIDDLE,
    THRESHOLDS,
    Cell,
    best_lrs,
    cell_lrs,
    cells,
    grid_flags,
    is_full,
    parse_seeds,
    points,
    records,
    seconds_per_run,
)
from experiment_figures import KINDS
from experiment_stats import (
    area_between,
    crossing,
    envelope_at,
    holm,
    mean_envelope,
    paired,
    t_interval,
)

import ctlens.files

ALPHA = 0.05
"""Family-wise error rate of the headline cells (Holm)."""

CONTROLS = {"gradient": ("random-parameters", "full", "random-composition", "forward", "lora"),
            "paper-gradient": ("paper-random-parameters", "paper-full")}
"""What each circuit-tuning mode is compared with (when both ran)."""

HEADLINE = (("gradient", "random-parameters"), ("gradient", "full"))
"""The headline comparisons (at ``--headline-size``, the middle threshold, every model and
grouping): the family Holm's correction runs over."""


def _kind(name: str) -> str:
    """Node kind of an HF GPT-2 / Llama parameter name (for the parameters-moved split)."""
    if "lm_head" in name:
        return "unembedding"
    if any(k in name for k in ("wte", "wpe", "embed_tokens")):
        return "embeddings"
    if any(k in name for k in ("ln_", "norm")):
        return "norms"
    if ".mlp." in name:
        return "MLP out" if any(k in name for k in ("c_proj", "down_proj")) else "MLP in"
    if any(k in name for k in ("c_proj", "o_proj")):
        return "attention out"
    return "attention q/k/v"


def moved_by_kind(run: Path, model: str) -> dict[str, list[int]]:
    """{kind: [parameters moved, parameters in total]} from the exported weights (cached)."""
    cache = run / "moved_by_kind.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from safetensors.torch import load_file

    import ctlens.zoo

    start = load_file(str(ctlens.zoo.model_dir(model.removeprefix("zoo:")) / "model.safetensors"))
    end = load_file(str(run / "model" / "model.safetensors"))
    tied = json.loads((run / "model" / "config.json").read_text()).get("tie_word_embeddings",
                                                                       True)
    out: dict[str, list[int]] = {k: [0, 0] for k in KINDS}
    for name, before in start.items():
        if (tied and "lm_head" in name) or not before.is_floating_point():
            continue
        kind = _kind(name)
        out[kind][0] += int((end[name] != before).sum())
        out[kind][1] += before.numel()
    ctlens.files.atomic_write_text(cache, json.dumps(out))
    return out


def _ci(values: list[float]) -> list[float | None] | None:
    if not values:
        return None
    mean, half = t_interval(values)
    return [mean, half]


def condition_row(cell: Cell, lr: float, runs: dict[int, list[dict[str, Any]]],
                  args: argparse.Namespace) -> dict[str, Any]:
    """One cell at one lr: mean and 95 % t-interval over the seeds that finished (a
    secondary view: the comparisons use the envelope over the lrs)."""
    row: dict[str, Any] = {"model": cell.model, "groups": cell.groups, "size": cell.size,
                           "mode": cell.mode, "lr": lr, "seeds": sorted(runs),
                           "seeds_planned": parse_seeds(args.seeds)}
    if not runs:
        return row
    cfg = json.loads((Path(args.out) / cell.at(lr, row["seeds"][0]).key / "run.json")
                     .read_text())["config"]
    row["top_n"] = cfg.get("top_n") if cell.size is not None else None
    row["lora_rank"] = cfg.get("lora_rank") if cell.mode == "lora" else None
    last = [r[-1] for r in runs.values()]
    row["final_target"] = _ci([x["target_metric"] for x in last])
    row["final_general"] = _ci([x["general_loss"] for x in last])
    row["params_moved"] = _ci([x["params_moved"] for x in last])
    row["trainable_fraction"] = _ci([sum(x.get("trainable_fraction", 1.0) for x in r[1:])
                                     / max(1, len(r) - 1) for r in runs.values()])
    matched = [[x["discovered_trainable_fraction"] for x in r[1:]
                if "discovered_trainable_fraction" in x] for r in runs.values()]
    row["discovered_trainable_fraction"] = _ci([sum(m) / len(m) for m in matched if m])
    row["at_threshold"] = {}
    for th in THRESHOLDS:
        hits = {s: crossing(points(r), th) for s, r in runs.items()}
        reached = [h for h in hits.values() if h is not None]
        row["at_threshold"][f"{th:g}"] = {
            "reached": len(reached), "of": len(hits),
            "general": _ci([h[1] for h in reached]), "step": _ci([h[0] for h in reached]),
            "by_seed": {s: (None if h is None else h[1]) for s, h in hits.items()},
        }
    row["points_by_seed"] = {s: points(r) for s, r in runs.items()}
    row["seconds"] = _ci([x["wall_time"] for x in last])
    kinds = [moved_by_kind(Path(args.out) / cell.at(lr, s).key, cell.model) for s in runs
             if (Path(args.out) / cell.at(lr, s).key / "model" / "model.safetensors").is_file()]
    if kinds:
        row["moved_by_kind"] = {k: sum(x[k][0] for x in kinds) / len(kinds) for k in KINDS}
        row["kind_totals"] = {k: kinds[0][k][1] for k in KINDS}
    return row


def cell_row(cell: Cell, runs: dict[float, dict[int, list[dict[str, Any]]]],
             args: argparse.Namespace) -> dict[str, Any]:
    """One cell: its lrs, and per seed the envelope over them (only seeds with every lr
    finished count: an envelope over fewer lrs would not be the protocol's)."""
    lrs, final = cell_lrs(cell, args)
    seeds = [s for s in parse_seeds(args.seeds) if all(s in runs.get(lr, {}) for lr in lrs)]
    curves = {s: [points(runs[lr][s]) for lr in lrs] for s in seeds}
    row: dict[str, Any] = {"model": cell.model, "groups": cell.groups, "size": cell.size,
                           "mode": cell.mode, "lrs": lrs, "grid_final": final,
                           "base_lrs": sorted(float(x) for x in (
                               args.paper_lrs if cell.mode.startswith("paper-") else args.lrs
                           ).split(",")), "seeds": seeds, "envelope": {}}
    for th in THRESHOLDS:
        by_seed: dict[int, dict[str, float] | None] = {}
        for s in seeds:
            hit = envelope_at(curves[s], th)
            by_seed[s] = None if hit is None else {"general": hit[0], "lr": lrs[hit[1]]}
        picked: dict[str, int] = {}
        for v in by_seed.values():
            if v is not None:
                picked[f"{v['lr']:g}"] = picked.get(f"{v['lr']:g}", 0) + 1
        row["envelope"][f"{th:g}"] = {
            "by_seed": by_seed, "reached": sum(v is not None for v in by_seed.values()),
            "of": len(seeds), "picked_lrs": picked,
            "general": _ci([v["general"] for v in by_seed.values() if v is not None]),
        }
    best = sorted(best_lrs({lr: {s: runs[lr][s] for s in seeds} for lr in lrs})) \
        if seeds else []
    row["best_lrs"] = best  # the extension rule's: most seeds' envelope pick at the middle
    row["best_on_edge"] = len(lrs) > 1 and bool({lrs[0], lrs[-1]} & set(best))
    row["curves_by_seed"] = curves
    row["curve"] = mean_envelope(curves)
    return row


def _values(cell: dict[str, Any], threshold: str) -> dict[int, float | None]:
    return {s: (None if v is None else v["general"])
            for s, v in cell["envelope"][threshold]["by_seed"].items()}


def comparison_rows(cell_rows: list[dict[str, Any]], args: argparse.Namespace
                    ) -> list[dict[str, Any]]:
    """Every paired cell: circuit-tuning minus each control that ran, per measure (each
    threshold, and the area between the envelopes), with the headline family Holm-adjusted."""
    by = {(c["model"], c["groups"], c["size"], c["mode"]): c for c in cell_rows if c["seeds"]}
    out = []
    for (model, groups, size, mode), ct in by.items():
        for other in CONTROLS.get(mode, ()):
            control = by.get((model, 1, None, other) if is_full(other)
                             else (model, groups, size, other))
            if control is None:
                continue
            for th in THRESHOLDS:
                key = f"{th:g}"
                cmp = paired(_values(ct, key), _values(control, key))
                out.append({"model": model, "groups": groups, "size": size, "mode": mode,
                            "control": other, "measure": f"target {th:+g}", **cmp,
                            "headline": (mode, other) in HEADLINE and th == MIDDLE
                            and size == args.headline_size})
            areas = {s: area_between(ct["curves_by_seed"][s], control["curves_by_seed"][s])
                     for s in ct["curves_by_seed"] if s in control["curves_by_seed"]}
            cmp = paired(areas, {s: None if a is None else 0.0 for s, a in areas.items()})
            out.append({"model": model, "groups": groups, "size": size, "mode": mode,
                        "control": other, "measure": "area", **cmp, "headline": False})
    family = [c for c in out if c["headline"]]
    for c, p in zip(family, holm([c["wilcoxon"][2] for c in family]), strict=True):
        c["holm_p"] = p
    for c in out:
        p = c.get("holm_p", c["wilcoxon"][2])
        w_plus, w_minus, _ = c["wilcoxon"]
        c["verdict"] = ("not resolved" if p >= ALPHA else
                        "circuit-tuning lower" if w_minus > w_plus else "circuit-tuning higher")
    return out


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """Every finished run, aggregated per condition (lr), per cell (envelope) and per paired
    comparison."""
    out = Path(args.out)
    conditions, cell_rows = [], []
    n_done = n_planned = 0
    start: dict[str, dict[str, Any]] = {}
    for cell in cells(args):
        lrs, _ = cell_lrs(cell, args)
        runs: dict[float, dict[int, list[dict[str, Any]]]] = {}
        for lr in lrs:
            for seed in parse_seeds(args.seeds):
                n_planned += 1
                recs = records(out / cell.at(lr, seed).key, args.steps)
                if recs is not None:
                    runs.setdefault(lr, {})[seed] = recs
                    n_done += 1
                    start.setdefault(cell.model, {"target": recs[0]["target_metric"],
                                                  "general": recs[0]["general_loss"],
                                                  "accuracy": recs[0].get("target_accuracy")})
            conditions.append(condition_row(cell, lr, runs.get(lr, {}), args))
        cell_rows.append(cell_row(cell, runs, args))
    comparisons = comparison_rows(cell_rows, args)
    for row in cell_rows:
        del row["curves_by_seed"]  # the same trajectories are in the conditions
    return {
        "protocol": "envelope",
        "command": "python benchmarks/experiment.py all " + " ".join(grid_flags(args)),
        "thresholds": list(THRESHOLDS), "middle": MIDDLE, "alpha": ALPHA,
        "headline": [list(h) for h in HEADLINE], "headline_size": args.headline_size,
        "steps": args.steps, "eval_every": args.eval_every, "batch_size": args.batch_size,
        "n_examples": args.n, "general_examples": args.general_examples,
        "data_seed": args.data_seed, "seeds": parse_seeds(args.seeds),
        "lrs": [float(x) for x in args.lrs.split(",")],
        "paper_lrs": [float(x) for x in args.paper_lrs.split(",")],
        "max_extend": args.max_extend, "start": start, "conditions": conditions,
        "cells": cell_rows, "comparisons": comparisons,
        "seconds_per_run": seconds_per_run(args),
        "runs_done": n_done, "runs_planned": n_planned,
        "machine": f"{platform.processor() or 'cpu'}, {os.cpu_count()} CPUs, torch threads "
                   f"{args.threads} per run, {args.jobs} runs at a time, load average "
                   f"{os.getloadavg()[0]:.1f} when reported",
        "note": args.note,
    }


def report(args: argparse.Namespace) -> None:
    from experiment_figures import write_figures
    from experiment_page import write_page

    torch.set_num_threads(args.threads)
    results = collect(args)
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    ctlens.files.atomic_write_text(path, json.dumps(results, indent=1))
    docs = Path(args.docs)
    figures = write_figures(results, docs / "img")
    write_page(results, figures, docs / "experiments.md")
    print(f"{results['runs_done']}/{results['runs_planned']} runs; wrote {path}, "
          f"{docs / 'experiments.md'}")
