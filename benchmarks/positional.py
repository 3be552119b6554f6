"""Benchmark: positional circuits (token spans) against position-free ones (issue 22).

``python benchmarks/positional.py curves`` (every zoo model, the ``agreement`` and ``ioi``
tasks; ``--models`` to run some) scores every edge with EAP on 256 discovery examples
(task sample seed 0), once position-free and once per span (the task's named spans), and
measures faithfulness on the task's 256 *held-out* evaluation examples (corrupt ablation,
logit difference) of the top-|score| circuits at MIB's sizes, three ways:

- **position-free**: the top ``f`` of the valid edges;
- **positional, equal fraction**: the top ``f`` of the valid (edge, span) pairs, so as many
  pairs as the position-free circuit has edges times the number of spans;
- **positional, equal count**: as many (edge, span) pairs as the position-free circuit has
  edges: the same number of kept units, each kept at one span's positions only.

CPR (area under faithfulness, higher is better) and CMD (area of |1 - faithfulness|, lower
is better) are MIB's areas over the fractions (`ctlens.masking.curve_areas`); the equal-count
curve is placed at the position-free fractions. Results go to
``benchmarks/results/positional.json`` (a run of some models keeps the others') and
``docs/positional.md`` is written from all stored results.

``python benchmarks/positional.py oracle`` (``--models`` to run some) checks issue 22's
oracle on every zoo model: per-span EAP's Pearson r with per-span exact patching against
position-free EAP's r with position-free exact patching (agreement, 24 discovery examples,
as the slow test `tests/test_positional.py` does on the tiny models; exact patching per span
takes minutes to tens of minutes a model). Its rows are stored beside the curves and shown
on the same page.

``python benchmarks/positional.py speed`` writes the "positional" section of
docs/benchmarks.md. On a randomly initialised GPT-2 small (12 layers, d_model 768, 12
heads; built locally), batch 16 x 32, one thread, with the token positions as spans (32
spans, the worst case): positional EAP's time against position-free EAP's (interleaved
rounds, median of per-round ratios; target 1.3x), the peak memory each adds (a fresh
process per row; target 1.3x), and a 1,000-pair positional circuit's `edge_mask` forward
against a 1,000-edge position-free one's (mean ablation, no grad; target 1.2x).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ctlens
from ctlens import Circuit, EdgeScores, Graph, TaskData
from ctlens.files import atomic_write_text
from ctlens.masking import MIB_FRACTIONS, EdgeMask, curve_areas
from ctlens.types import Ablation

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import (  # noqa: E402
    markdown_table,
    proc_status_kib,
    run_worker,
    write_section,
)
from masking import BATCH, SEQ, build_model  # noqa: E402
from masking import task as random_task  # noqa: E402

RESULTS = HERE / "results" / "positional.json"
PAGE = HERE.parent / "docs" / "positional.md"
TASKS = ("agreement", "ioi")
N_EXAMPLES = 256
CURVES = ("position-free", "positional, equal fraction", "positional, equal count")
TARGETS = {"time": 1.3, "memory": 1.3, "edge_mask": 1.2}
"""Issue 22's targets: positional / position-free ratios."""


# ------------------------------------------------------------------------------ curves


def curves_one(model_name: str, task: str, n: int) -> dict[str, Any]:
    """The three faithfulness curves of one zoo model and task (one thread)."""
    torch.set_num_threads(1)
    model = ctlens.load_model(f"zoo:{model_name}")
    bundle = ctlens.tasks.load(task, n=n, seed=0, tokenizer=model.tokenizer)
    discovery, held_out = bundle.discovery, bundle.evals[task]
    free, free_s = _timed(lambda: ctlens.attribute(model, discovery, progress=False))
    spans, spans_s = _timed(lambda: ctlens.attribute(model, discovery, spans=True,
                                                     progress=False))
    by_fraction = ctlens.faithfulness_curve(model, held_out, free)
    positional = ctlens.faithfulness_curve(model, held_out, spans)
    counts = list(by_fraction.n_edges)  # the position-free sizes, as fraction_edges rounds
    distinct = sorted(set(counts))
    equal = ctlens.faithfulness_curve(model, held_out, spans,
                                      sizes=[c / spans.graph.n_edges for c in distinct])
    equal_faith = dict(zip(distinct, equal.faithfulness, strict=True))
    curves = {
        CURVES[0]: {"counts": list(by_fraction.n_edges),
                    "faithfulness": list(by_fraction.faithfulness)},
        CURVES[1]: {"counts": list(positional.n_edges),
                    "faithfulness": list(positional.faithfulness)},
        CURVES[2]: {"counts": counts, "faithfulness": [equal_faith[c] for c in counts]},
    }
    for curve in curves.values():
        curve["cpr"], curve["cmd"] = curve_areas(MIB_FRACTIONS, curve["faithfulness"])
    _say(f"{model_name} {task}: EAP {free_s:.1f}s, positional EAP {spans_s:.1f}s")
    return {
        "model": model_name, "task": task, "n_examples": n, "spans": list(spans.spans),
        "n_edges": free.graph.n_edges, "n_pairs": spans.graph.n_edges,
        "fractions": list(MIB_FRACTIONS), "seconds": {"eap": free_s, "positional eap": spans_s},
        "curves": curves,
    }


def oracle_one(model_name: str, n: int = 24) -> dict[str, Any]:
    """Pearson r of EAP with exact patching, position-free and per span (one thread)."""
    torch.set_num_threads(1)
    model = ctlens.load_model(f"zoo:{model_name}")
    data = ctlens.tasks.load("agreement", n=n, seed=0).discovery
    row: dict[str, Any] = {"model": model_name, "n_examples": n}
    for key, positional in (("position-free", False), ("per span", True)):
        eap = ctlens.attribute(model, data, progress=False, spans=positional)
        exact, seconds = _timed(lambda p=positional: ctlens.attribute(
            model, data, "exact", progress=False, spans=p))
        valid = eap.graph.dense_valid
        pair = torch.stack([eap.scores[valid], exact.scores[valid]])
        row[key] = {"r": float(torch.corrcoef(pair)[0, 1]), "exact_seconds": seconds}
        _say(f"{model_name} {key}: r {row[key]['r']:.3f} (exact {seconds:.0f}s)")
    return row


def _timed(fn: Callable[[], EdgeScores]) -> tuple[EdgeScores, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _environment() -> str:
    return (f"torch {torch.__version__}, one CPU thread per (model, task), "
            f"{platform.processor() or platform.machine()}")


def store(records: list[dict[str, Any]], part: str = "results") -> dict[str, Any]:
    """Merge ``records`` into the stored ``part`` (``results``: the curves, by model and
    task; ``oracle``: by model), written atomically; the other part is kept."""
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    stored.setdefault("results", [])
    stored.setdefault("oracle", [])

    def key(r: dict[str, Any]) -> tuple[str, str]:
        return r["model"], r.get("task", "")

    keys = {key(r) for r in records}
    kept = [r for r in stored[part] if key(r) not in keys]
    stored[part] = sorted(kept + records, key=key)
    stored["environment"] = _environment()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps(stored, indent=1) + "\n")
    return stored


def page(stored: dict[str, Any]) -> str:
    """docs/positional.md from the stored results: the method, one table per model and
    task, the areas, and what the numbers say."""
    results = stored["results"]
    models = sorted({r["model"] for r in results})
    missing = [m for m in ctlens.zoo.names() if m not in models]
    lines = [
        "# Positional and position-free circuits compared",
        "",
        "Written by `benchmarks/positional.py curves` from "
        "`benchmarks/results/positional.json` (re-run it to refresh). For each zoo model "
        "and the `agreement` and `ioi` tasks, EAP scored every edge on "
        f"{N_EXAMPLES} discovery examples (task sample seed 0), once summed over positions "
        "and once per span (the task's named spans, [positional "
        "circuits](concepts.md#positional-circuits-token-spans)). Faithfulness is measured "
        f"on the task's {N_EXAMPLES} held-out evaluation examples, corrupt ablation, logit "
        "difference, for the top-|score| circuits at MIB's sizes, three ways:",
        "",
        "- **position-free**: the top fraction of the valid edges;",
        "- **positional, equal fraction**: the top fraction of the valid (edge, span) "
        "pairs, so as many pairs as the position-free circuit has edges times the number "
        "of spans;",
        "- **positional, equal count**: as many (edge, span) pairs as the position-free "
        "circuit has edges, each kept at its span's positions only.",
        "",
        "CPR is the area under the faithfulness curve over the fractions (higher is "
        "better), CMD the area of |1 - faithfulness| (lower is better); the equal-count "
        "curve is placed at the position-free fractions. EAP has no randomness and the "
        "task sample is fixed, so each curve is one deterministic run.",
        "",
        f"Environment: {stored.get('environment', '?')}.",
    ]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)} (`--models` runs them and "
                  "keeps the stored results of the others)."]
    for record in results:
        lines += _record_section(record)
    lines += ["", "## What the numbers say", "", *_summary(results), *_oracle(stored)]
    return "\n".join(lines) + "\n"


def _record_section(record: dict[str, Any]) -> list[str]:
    curves = record["curves"]
    rows = []
    for i, fraction in enumerate(record["fractions"]):
        cells = [f"{_num(curves[c]['faithfulness'][i])} ({curves[c]['counts'][i]})"
                 for c in CURVES]
        rows.append([f"{fraction:.1%}", *cells])
    areas = [[c, _num(curves[c]["cpr"]), _num(curves[c]["cmd"])] for c in CURVES]
    seconds = record["seconds"]
    return [
        "", f"## {record['model']}, {record['task']}", "",
        f"{record['n_edges']} valid edges; spans {', '.join(record['spans'])}, so "
        f"{record['n_pairs']} valid (edge, span) pairs. EAP took {seconds['eap']:.1f} s, "
        f"positional EAP {seconds['positional eap']:.1f} s. Held-out faithfulness (kept "
        "edges or pairs in brackets):",
        "",
        markdown_table(["size", *CURVES], rows),
        "",
        markdown_table(["curve", "CPR", "CMD"], areas),
    ]


def _oracle(stored: dict[str, Any]) -> list[str]:
    """The oracle rows: per-span EAP against per-span exact patching, by model."""
    rows = [[r["model"], str(r["n_examples"]), _num(r["position-free"]["r"]),
             _num(r["per span"]["r"]), _num(r["per span"]["r"] - r["position-free"]["r"]),
             "yes" if r["per span"]["r"] >= r["position-free"]["r"] - 0.05 else "no",
             f"{r['position-free']['exact_seconds']:.0f} / {r['per span']['exact_seconds']:.0f}"]
            for r in stored.get("oracle", [])]
    if not rows:
        return []
    return ["", "## Per-span EAP against per-span exact patching", "",
            "Pearson r of EAP scores with exact-patching scores over the valid edges "
            "(position-free) or (edge, span) pairs (per span), agreement task, corrupt "
            "ablation (`benchmarks/positional.py oracle`). Issue 22's oracle: per-span r "
            "within 0.05 of position-free r.", "",
            markdown_table(["model", "examples", "r position-free", "r per span",
                            "difference", "within 0.05", "exact seconds (free / per span)"],
                           rows)]


def _num(value: float) -> str:
    """Three decimals, without "-0.000" (an ablated circuit's faithfulness can be -1e-9)."""
    return f"{round(value, 3) + 0.0:.3f}"


def _summary(results: list[dict[str, Any]]) -> list[str]:
    """Counts of which curve has the better area, from the stored numbers."""
    lines = []
    for other in CURVES[1:]:
        cpr = sum(r["curves"][other]["cpr"] > r["curves"][CURVES[0]]["cpr"] for r in results)
        cmd = sum(r["curves"][other]["cmd"] < r["curves"][CURVES[0]]["cmd"] for r in results)
        lines.append(
            f"- **{other}** against position-free: higher CPR in {cpr} of {len(results)} "
            f"(model, task) pairs, lower CMD in {cmd} of {len(results)}."
        )
    lines.append("")
    lines.append("Per pair (CPR / CMD; position-free, then positional at equal fraction, "
                 "then at equal count):")
    lines.append("")
    for r in results:
        cells = "; ".join(f"{_num(r['curves'][c]['cpr'])} / {_num(r['curves'][c]['cmd'])}"
                          for c in CURVES)
        lines.append(f"- {r['model']}, {r['task']}: {cells}")
    return lines


# ------------------------------------------------------------------------------ speed


def _task(n: int, seed: int) -> TaskData:
    """`benchmarks/masking.py`'s random task (GPT-2 vocabulary, 32 tokens), each position
    its own span."""
    return random_task(n, seed).with_position_spans()


def _attributions(model: Any, data: TaskData) -> dict[str, Callable[[], object]]:
    return {
        "eap": lambda: ctlens.attribute(model, data, batch_size=len(data), progress=False),
        "positional eap": lambda: ctlens.attribute(model, data, spans=True,
                                                   batch_size=len(data), progress=False),
    }


def _masked_forwards(model: Any, data: TaskData) -> dict[str, Callable[[], object]]:
    """A 1,000-edge position-free and a 1,000-pair positional circuit's masked forwards
    (mean ablation, no grad; installing the hooks is not timed)."""
    gen = torch.Generator().manual_seed(1)
    reference = _task(64, seed=2).clean
    means = ctlens.mean_activations(model, reference)
    forwards = {}
    for name, graph in (("edge_mask", Graph.from_model(model)),
                        ("positional edge_mask", Graph.from_model(model, spans=data))):
        scores = EdgeScores(torch.randn(graph.dense_shape, generator=gen), graph)
        mask = EdgeMask(model, Circuit.from_scores(scores, "top_n", top_n=1000), Ablation.MEAN,
                        graph)
        mask.set_means(means)
        if graph.positional:
            mask.set_spans(data.spans)
        hooks = mask.hooks()

        def forward(hooks: list = hooks) -> None:
            with torch.no_grad(), model.hooks(fwd_hooks=hooks):
                model(data.clean)

        forwards[name] = forward
    return forwards


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in a fresh process: interleaved timing rounds, or one call's peak
    memory."""
    torch.set_num_threads(spec["threads"])
    model = build_model()
    data = _task(BATCH, seed=0)
    if spec["job"] == "memory":
        op = _attributions(model, data)[spec["op"]]
        rss = proc_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:  # reset the peak (VmHWM)
            handle.write("5")
        op()
        return {"peak_delta_mib": (proc_status_kib("VmHWM") - rss) / 1024}
    ops = {**_attributions(model, data), **_masked_forwards(model, data)}
    for op in ops.values():  # warm-up round
        op()
    rounds = []
    for _ in range(spec["repeats"]):
        times = {}
        for name, op in ops.items():
            start = time.perf_counter()
            op()
            times[name] = time.perf_counter() - start
        rounds.append(times)
    return {"rounds": rounds}


def speed(repeats: int, threads: int) -> str:
    """Measure and return the markdown of the "positional" section of docs/benchmarks.md."""
    script = Path(__file__).resolve()
    timing = run_worker(script, {"job": "timing", "repeats": repeats, "threads": threads})
    memory = {op: run_worker(script, {"job": "memory", "op": op, "threads": threads})
              for op in ("eap", "positional eap")}
    rounds = timing["rounds"]

    def median(name: str) -> float:
        return statistics.median(r[name] for r in rounds)

    def ratio(num: str, den: str) -> float:
        return statistics.median(r[num] / r[den] for r in rounds)

    measured = {
        "time": ratio("positional eap", "eap"),
        "memory": memory["positional eap"]["peak_delta_mib"] / memory["eap"]["peak_delta_mib"],
        "edge_mask": ratio("positional edge_mask", "edge_mask"),
    }

    def verdict(key: str) -> str:
        return "met" if measured[key] <= TARGETS[key] else "missed"

    rows = [
        ["EAP, time", f"{median('eap'):.2f} s", f"{median('positional eap'):.2f} s",
         f"{measured['time']:.2f}", f"<= {TARGETS['time']}", verdict("time")],
        ["EAP, peak memory added", f"{memory['eap']['peak_delta_mib']:,.0f} MiB",
         f"{memory['positional eap']['peak_delta_mib']:,.0f} MiB",
         f"{measured['memory']:.2f}", f"<= {TARGETS['memory']}", verdict("memory")],
        ["edge_mask forward, 1,000 kept (mean, no grad)", f"{median('edge_mask'):.3f} s",
         f"{median('positional edge_mask'):.3f} s", f"{measured['edge_mask']:.2f}",
         f"<= {TARGETS['edge_mask']}", verdict("edge_mask")],
    ]
    return "\n".join([
        "## Positional circuits (`benchmarks/positional.py speed`)",
        "",
        f"GPT-2-small shape (random weights), batch {BATCH} x {SEQ} tokens, the token "
        f"positions as spans ({SEQ} spans, the worst case); torch {torch.__version__}, "
        f"{threads} thread(s), {platform.processor() or platform.machine()}, load average "
        f"{os.getloadavg()[0]:.1f} when it finished. Times: median of {repeats} interleaved "
        "rounds after a warm-up, ratio the median of per-round ratios. Memory: peak RSS "
        "added by one call, each in a fresh process. The `edge_mask` rows keep the top "
        "1,000 edges (position-free) or (edge, span) pairs (positional) of random scores.",
        "",
        markdown_table(["measurement", "position-free", "positional", "ratio", "target", ""],
                       rows),
    ])


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command")
    curves = sub.add_parser("curves", help="size-faithfulness curves on the zoo")
    curves.add_argument("--models", default=",".join(ctlens.zoo.names()),
                        help="comma-separated zoo models")
    curves.add_argument("--tasks", default=",".join(TASKS))
    curves.add_argument("--n", type=int, default=N_EXAMPLES, help="examples per set")
    curves.add_argument("--no-report", action="store_true", help="do not write the files")
    oracle = sub.add_parser("oracle", help="per-span EAP against per-span exact patching")
    oracle.add_argument("--models", default=",".join(ctlens.zoo.names()),
                        help="comma-separated zoo models")
    fast = sub.add_parser("speed", help="time and memory rows of docs/benchmarks.md")
    fast.add_argument("--repeats", type=int, default=3)
    fast.add_argument("--threads", type=int, default=1)
    fast.add_argument("--no-report", action="store_true", help="do not write docs")
    args = parser.parse_args(argv)
    if args.worker:
        sys.stdout.write(json.dumps(worker(json.loads(args.worker))) + "\n")
        return
    if args.command == "curves":
        pairs = [(m, t) for m in args.models.split(",") for t in args.tasks.split(",")]
        records = [curves_one(m, t, args.n) for m, t in pairs]
        if args.no_report:
            sys.stdout.write(json.dumps(records, indent=1) + "\n")
            return
        atomic_write_text(PAGE, page(store(records)))
        sys.stdout.write(f"wrote {RESULTS} and {PAGE}\n")
    elif args.command == "oracle":
        stored = store([oracle_one(m) for m in args.models.split(",")], part="oracle")
        atomic_write_text(PAGE, page(stored))
        sys.stdout.write(f"wrote {RESULTS} and {PAGE}\n")
    elif args.command == "speed":
        markdown = speed(args.repeats, args.threads)
        sys.stdout.write(markdown + "\n")
        if not args.no_report:
            write_section("positional", markdown)
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
