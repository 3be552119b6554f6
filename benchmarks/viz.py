"""Benchmark of ctlens.viz on a GPT-2-small-sized graph (12 layers x 12 heads).

Measures how long `plot_circuit` takes to build the figure of a 1,000-edge circuit (target:
under 2 s), the other figures' build times, and the size and write time of the HTML report of
a synthetic run with 20 snapshots of 1,000-edge circuits. No model is needed: scores are
random (heavy-tailed, both signs) and the run directory is written in the documented format.

    python benchmarks/viz.py            # table, and the "viz" section of docs/benchmarks.md
    python benchmarks/viz.py --no-docs  # table only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import plotly
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ctlens import Circuit, EdgeScores, Graph, GraphSpec, viz  # noqa: E402

TARGET_SECONDS = 2.0


def scores_for(graph: Graph, seed: int) -> EdgeScores:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(graph.n_senders, graph.n_receivers, generator=gen) ** 3
    return EdgeScores(values, graph, {"method": "eap"})


def write_run(path: Path, graph: Graph, n_snapshots: int, top_n: int) -> Path:
    """A synthetic run directory (docs/run-format.md, version 1) whose circuit drifts."""
    (path / "circuits").mkdir(parents=True)
    info = {
        "format": "ctlens-run", "version": 1, "model": "synthetic-gpt2-small",
        "task": "benchmark", "graph": graph.spec.to_dict(),
        "config": {"mode": "gradient", "top_n": top_n, "every_k": 1, "steps": 10 * n_snapshots},
        "created": "2026-11-21T00:00:00+00:00", "ctlens_version": "0.1.0",
    }
    (path / "run.json").write_text(json.dumps(info))
    base = scores_for(graph, 0).scores
    rows = []
    for k in range(n_snapshots):
        step = 10 * k
        drift = scores_for(graph, 1000 + k).scores
        circuit = Circuit.from_scores(EdgeScores(base + 0.15 * k * drift, graph), top_n=top_n)
        circuit.save(path / "circuits" / f"step_{step:06d}.json")
        rows.append({"step": step, "target_metric": 1.0 - 0.05 * k, "general_loss": 3.2 + 0.002 * k,
                     "circuit_edges": top_n, "params_moved": 0.01 * k, "evals": {"ioi": 0.9},
                     "wall_time": float(k)})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """(first call seconds, median of the following ``repeat`` calls, last result)."""
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times) if times else first, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, default=1000, help="circuit size (default 1000)")
    parser.add_argument("--snapshots", type=int, default=20, help="run snapshots (default 20)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repeats (default 5)")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    graph = Graph(GraphSpec(n_layers=12, n_heads=12, n_kv_heads=12))
    circuit = Circuit.from_scores(scores_for(graph, 0), top_n=args.edges)
    other = Circuit.from_scores(scores_for(graph, 1), top_n=args.edges)
    rows: list[tuple[str, str, str]] = []

    first, median, fig = timed(lambda: viz.plot_circuit(circuit), args.repeat)
    ok = "yes" if median < TARGET_SECONDS else "NO"
    rows.append((f"plot_circuit, {args.edges} edges (median of {args.repeat})",
                 f"{median:.3f} s (first call {first:.3f} s)",
                 f"target < {TARGET_SECONDS:.0f} s: {ok}; {len(fig.data)} traces"))
    first, median, html = timed(lambda: fig.to_html(include_plotlyjs=False), args.repeat)
    rows.append(("its HTML (plotly.js not included)", f"{median:.3f} s",
                 f"{len(html) / 1e6:.2f} MB"))
    first, median, _ = timed(lambda: viz.plot_diff(circuit, other), args.repeat)
    rows.append((f"plot_diff, two {args.edges}-edge circuits", f"{median:.3f} s", ""))
    first, median, _ = timed(lambda: viz.plot_node_scores(scores_for(graph, 0)), args.repeat)
    rows.append(("plot_node_scores (12 x 13 heatmap)", f"{median:.3f} s", ""))

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = write_run(Path(tmp) / "run", graph, args.snapshots, args.edges)
        start = time.perf_counter()
        evo = viz.plot_evolution(run_dir)
        evo_s = time.perf_counter() - start
        rows.append((f"plot_evolution, {args.snapshots} snapshots (top 300 edges each)",
                     f"{evo_s:.2f} s", f"{len(evo.frames)} frames"))
        for top in (300, args.edges):
            start = time.perf_counter()
            path = viz.write_report(run_dir, out=Path(tmp) / f"report-{top}.html", top=top)
            seconds = time.perf_counter() - start
            size = path.stat().st_size
            rows.append((f"write_report, {args.snapshots} snapshots, top={top}",
                         f"{seconds:.2f} s", f"{size / 1e6:.1f} MB file"))
        js = len(viz.report.get_plotlyjs().encode())
        rows.append(("of which plotly.js (inlined once)", "", f"{js / 1e6:.1f} MB"))

    header = ("measurement", "time", "result")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))

    markdown = "\n".join([
        "## Visualisation (`benchmarks/viz.py`)",
        "",
        "GPT-2-small-sized graph (12 layers x 12 heads: 157 senders x 445 receivers, 32,491 "
        "valid edges), random heavy-tailed scores, CPU, one torch thread, plotly "
        f"{plotly.__version__}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
        "CPUs while measuring (other jobs share the machine).",
        "",
        "| measurement | time | result |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        "The report holds the evolution figure (every snapshot as an animation frame, each "
        "drawn with its strongest `top` edges), the last circuit, the first-vs-last diff, the "
        "node-score heatmap, the config and the metrics table; plotly.js is inlined once, so "
        "the file opens offline.",
    ])
    if args.no_docs:
        return 0
    from benchmarks._report import write_section

    print(f"\nwrote {write_section('viz', markdown)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
