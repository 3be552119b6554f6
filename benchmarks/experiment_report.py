"""Report of the circuit-tuning experiment: results JSON, figures, docs/experiments.md.

Reads only finished run directories (``benchmarks/experiment.py`` makes them), so it can be
re-run at any time; the notebook reads the JSON it writes (benchmarks/results/experiment.json).
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
    RESULTS,
    ROOT,
    THRESHOLDS,
    Condition,
    grid_flags,
    main_conditions,
    points,
    records,
    reference_mode,
    sweep_conditions,
    sweep_lrs,
)
from experiment_figures import KINDS
from experiment_stats import area_vs_reference, crossing, t_interval

import ctlens.files

DOC = ROOT / "docs" / "experiments.md"
FIGURES = ROOT / "docs" / "img"


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


def _condition_row(conds: list[Condition], runs: dict[str, list[dict[str, Any]]],
                   reference: dict[int, list[dict[str, Any]]], args: argparse.Namespace
                   ) -> dict[str, Any]:
    """Mean and 95 % t-interval over the seeds that finished, for one condition."""
    done = [c for c in conds if c.key in runs]
    recs = {c.seed: runs[c.key] for c in done}
    row: dict[str, Any] = {
        "model": conds[0].model, "groups": conds[0].groups, "size": conds[0].size,
        "mode": conds[0].mode, "lr": None if conds[0].lr != conds[0].lr else conds[0].lr,
        "seeds": sorted(recs),
        "seeds_planned": sorted(c.seed for c in conds),
    }
    if not recs:
        return row
    cfg = json.loads((Path(args.out) / done[0].key / "run.json").read_text())["config"]
    row["top_n"] = cfg.get("top_n") if conds[0].size is not None else None
    row["lora_rank"] = cfg.get("lora_rank") if conds[0].mode == "lora" else None
    last = [r[-1] for r in recs.values()]
    row["final_target"] = _ci([x["target_metric"] for x in last])
    row["final_general"] = _ci([x["general_loss"] for x in last])
    row["params_moved"] = _ci([x["params_moved"] for x in last])
    trainable = [sum(x.get("trainable_fraction", 1.0) for x in r[1:]) / max(1, len(r) - 1)
                 for r in recs.values()]
    row["trainable_fraction"] = _ci(trainable)
    matched = [[x["discovered_trainable_fraction"] for x in r[1:]
                if "discovered_trainable_fraction" in x] for r in recs.values()]
    row["discovered_trainable_fraction"] = _ci([sum(m) / len(m) for m in matched if m])
    row["at_threshold"] = {}
    for th in THRESHOLDS:
        hits = [crossing(points(r), th) for r in recs.values()]
        reached = [h for h in hits if h is not None]
        row["at_threshold"][f"{th:g}"] = {
            "reached": len(reached), "of": len(hits),
            "general": _ci([h[1] for h in reached]), "step": _ci([h[0] for h in reached]),
            "by_seed": {s: (None if h is None else h[1]) for s, h in zip(recs, hits,
                                                                         strict=True)},
        }
    areas = {s: area_vs_reference(points(r), points(reference[s]))
             for s, r in recs.items() if s in reference}
    row["area_vs_full_by_seed"] = areas
    row["points_by_seed"] = {s: points(r) for s, r in recs.items()}
    row["area_vs_full"] = _ci([a for a in areas.values() if a is not None])
    steps = [x["step"] for x in next(iter(recs.values()))]
    row["curve"] = {
        "step": steps,
        "target": [_ci([r[i]["target_metric"] for r in recs.values()]) for i in range(len(steps))],
        "general": [_ci([r[i]["general_loss"] for r in recs.values()]) for i in range(len(steps))],
    }
    kinds = [moved_by_kind(Path(args.out) / c.key, c.model) for c in done
             if (Path(args.out) / c.key / "model" / "model.safetensors").is_file()]
    if kinds:
        row["moved_by_kind"] = {k: sum(x[k][0] for x in kinds) / len(kinds) for k in KINDS}
        row["kind_totals"] = {k: kinds[0][k][1] for k in KINDS}
    return row


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """Every finished run, aggregated per condition, with the sweep and the chosen lrs."""
    out = Path(args.out)
    chosen = sweep_lrs(args, wait=False)
    sweep = []
    for c in sweep_conditions(args):
        r = records(out / c.key, args.steps)
        if r is not None:
            hit = crossing(points(r), THRESHOLDS[len(THRESHOLDS) // 2])
            sweep.append({"model": c.model, "mode": c.mode, "lr": c.lr, "seed": c.seed,
                          "final_target": r[-1]["target_metric"],
                          "final_general": r[-1]["general_loss"],
                          "general_at_middle": None if hit is None else hit[1],
                          "chosen": chosen.get((c.model, c.mode)) == c.lr})
    conds = main_conditions(args, lambda m, mode: chosen.get((m, mode), float("nan")))
    runs = {c.key: r for c in conds if (r := records(out / c.key, args.steps)) is not None}
    groups: dict[tuple[Any, ...], list[Condition]] = {}
    for c in conds:
        groups.setdefault((c.model, c.groups, c.size, c.mode), []).append(c)
    rows, start = [], {}
    for (model, _, _, _), cs in groups.items():
        full = reference_mode(cs[0].mode)
        reference = {c.seed: runs[c.key] for c in groups.get((model, 1, None, full), [])
                     if c.key in runs}
        rows.append(_condition_row(cs, runs, reference, args))
        first = next((runs[c.key][0] for c in cs if c.key in runs), None)
        if first is not None:
            start[model] = {"target": first["target_metric"], "general": first["general_loss"],
                            "accuracy": first.get("target_accuracy")}
    return {
        "command": "python benchmarks/experiment.py all " + " ".join(grid_flags(args)),
        "thresholds": list(THRESHOLDS), "steps": args.steps, "eval_every": args.eval_every,
        "seeds": [int(s) for s in args.seeds.split(",")], "sweep_seed": args.sweep_seed,
        "sweep_size": args.sweep_size,
        "lrs": [float(x) for x in args.lrs.split(",")],
        "paper_lrs": [float(x) for x in args.paper_lrs.split(",")],
        "chosen_lr": {f"{m} {mode}": lr for (m, mode), lr in chosen.items()},
        "sweep": sweep, "start": start, "conditions": rows,
        "runs_done": len(runs), "runs_planned": len(conds),
        "machine": f"{platform.processor() or 'cpu'}, {os.cpu_count()} CPUs, torch threads "
                   f"{args.threads}, load average {os.getloadavg()[0]:.1f} when reported",
        "note": args.note,
    }


def report(args: argparse.Namespace) -> None:
    from experiment_figures import write_figures
    from experiment_page import write_page

    torch.set_num_threads(args.threads)
    results = collect(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    ctlens.files.atomic_write_text(RESULTS, json.dumps(results, indent=1))
    figures = write_figures(results, FIGURES)
    write_page(results, figures, DOC)
    print(f"{results['runs_done']}/{results['runs_planned']} runs; wrote {RESULTS}, {DOC}")


