"""Benchmark: the arithmetic behind issue 21's time targets, counted rather than timed.

A time ratio depends on the machine and its load; the floating-point work of an operation
does not. For each of issue 21's time targets this counts, with ``torch.profiler``
(``with_flops``), the FLOPs of the matrix products (mm, bmm, addmm, ...: everything the
profiler counts) of the operation and of its baseline, and the share of the operation's
CPU time spent in them:

- **grouped EAP**: EAP with MLPs in 48 neuron groups of 64 against one-group EAP
  (GPT-2-small shape, batch 16 x 32; target 1.5x);
- **grouped edge_mask**: the forward under a 1,000-edge circuit of the 48-group graph
  (mean ablation, no grad) against a plain forward (target 1.6x);
- **the tuning step**: one circuit-tuning step at K = 1 (`mode="gradient"`, batch
  discovery) against one full fine-tuning step, on the tiny-gpt2 and tiny-llama shapes,
  ungrouped and with 8 neuron groups (batch 16 x 24, N = 5 % of the edges, as
  `benchmarks/circuit_tuning.py speed`; target 1.5x), averaged over 4 steps.

Where the FLOP ratio alone is above the target, the arithmetic of today's algorithm is the
cause of the miss: meeting the target needs less work, not a faster kernel. Where it is
below but the time ratio is above, the rest (copies, hooks, small ops; see the matrix-product
share of the time) is. The shares are times, so run it alone. Writes the "flops" section of
docs/benchmarks.md.

Run: ``python benchmarks/flops.py [--threads 1] [--no-report]``
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import ctlens
import ctlens.zoo
from ctlens import Circuit, EdgeScores, Graph
from ctlens.masking import EdgeMask
from ctlens.types import Ablation

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import markdown_table, write_section  # noqa: E402
from attribution import _gpt2, _task  # noqa: E402
from circuit_tuning import _speed_task, speed_tuner  # noqa: E402

TARGETS = {"grouped EAP": 1.5, "grouped edge_mask": 1.6, "tuning step": 1.5}
TUNING_STEPS = 4


def count(fn: Callable[[], object]) -> tuple[float, float]:
    """(FLOPs, share of CPU time in the ops that carry FLOPs) of one call, after a warm-up."""
    fn()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.key != "ProfilerStep*"]
    flops = sum(e.flops for e in events)
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.flops)
    return float(flops), matmul / total if total else 0.0


def gpt2_rows() -> list[tuple[str, str, Callable[[], object], Callable[[], object]]]:
    """(target, label, operation, baseline) on the GPT-2-small shape, batch 16 x 32."""
    model = _gpt2(False)
    data = _task(model.cfg.d_vocab, 16, 32)
    grouped = Graph.from_model(model, mlp_groups=48)
    gen = torch.Generator().manual_seed(1)
    scores = EdgeScores(torch.randn(grouped.dense_shape, generator=gen), grouped)
    mask = EdgeMask(model, Circuit.from_scores(scores, "top_n", top_n=1000), Ablation.MEAN,
                    grouped)
    mask.set_means(ctlens.mean_activations(model, data.corrupt, graph=grouped))
    hooks = mask.hooks()

    def plain() -> None:
        with torch.no_grad():
            model(data.clean)

    def masked() -> None:
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(data.clean)

    return [
        ("grouped EAP", "EAP, 48 groups / one-group EAP (GPT-2 small, 16 x 32)",
         lambda: ctlens.attribute(model, data, batch_size=16, progress=False, graph=grouped),
         lambda: ctlens.attribute(model, data, batch_size=16, progress=False)),
        ("grouped edge_mask", "edge_mask, 1,000 edges, 48 groups / plain forward (no grad)",
         masked, plain),
    ]


def tuning_rows() -> list[tuple[str, str, Callable[[], object], Callable[[], object]]]:
    """(target, label, K = 1 steps, full steps) on the zoo shapes (random weights)."""
    rows = []
    for name in ctlens.zoo.names():
        if name.startswith("mini"):
            continue  # issue 21's tuning target names the tiny shapes
        torch.manual_seed(0)
        model = ctlens.load_model(ctlens.zoo.spec(name).build().eval())
        task = _speed_task(model, 8 * 16, 24)
        n_edges = Graph.from_model(model).n_edges
        full = _steps(model, task, 1, max(1, n_edges // 20), mode="full")  # both rows' baseline
        for groups in (1, 8):
            top_n = max(1, Graph.from_model(model, mlp_groups=groups).n_edges // 20)
            label = f"tuning step K = 1 / full step, {name} shape, {groups} group(s)"
            rows.append(("tuning step", label,
                         _steps(model, task, groups, top_n, mode="gradient", every_k=1),
                         full))
    return rows


def _steps(model: Any, task: Any, groups: int, top_n: int, **mode: Any
           ) -> Callable[[], object]:
    """A call that makes `TUNING_STEPS` optimizer steps of a fresh tuner in ``mode``."""
    tuner = speed_tuner(model, task, 16, top_n, groups, **mode)
    return lambda: tuner.time_steps(TUNING_STEPS, warmup=0)


def measure() -> list[list[str]]:
    table = []
    baselines: dict[int, tuple[float, float]] = {}  # a baseline shared by rows counts once
    for target, label, op, base in [*gpt2_rows(), *tuning_rows()]:
        op_flops, op_share = count(op)
        if id(base) not in baselines:
            baselines[id(base)] = count(base)
        base_flops, base_share = baselines[id(base)]
        ratio = op_flops / base_flops
        cause = ("arithmetic" if ratio > TARGETS[target]
                 else "not the arithmetic: the rest of the time")
        table.append([label, f"{op_flops / 1e9:.2f}", f"{base_flops / 1e9:.2f}",
                      f"{ratio:.2f}", f"<= {TARGETS[target]}", f"{op_share:.0%}",
                      f"{base_share:.0%}", cause])
        sys.stderr.write(" | ".join(table[-1]) + "\n")
    return table


def report(table: list[list[str]], threads: int) -> str:
    header = ["operation / baseline", "GFLOP", "baseline GFLOP", "FLOP ratio",
              "time target", "matmul share of time", "baseline's share",
              "FLOPs alone exceed the target?"]
    return "\n".join([
        "## The arithmetic behind the time targets (`benchmarks/flops.py`)",
        "",
        "FLOPs of the matrix products (as `torch.profiler` counts them), which do not depend "
        "on the machine or its load, of each issue-21 operation and its baseline; and the "
        "share of each one's CPU time spent in those products. A FLOP ratio above the time "
        "target means today's algorithm does too much arithmetic to meet it, whatever the "
        "kernel; below it, the rest of the time (copies, hooks, small ops) is what misses. "
        f"Tuning rows: {TUNING_STEPS} steps each, batch 16 x 24, N = 5 % of the edges. "
        f"torch {torch.__version__}, {threads} thread(s), "
        f"{platform.processor() or platform.machine()}, load average "
        f"{os.getloadavg()[0]:.1f} when it finished.",
        "",
        markdown_table(header, table),
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-report", action="store_true", help="do not write docs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    markdown = report(measure(), args.threads)
    sys.stdout.write(markdown + "\n")
    if not args.no_report:
        write_section("flops", markdown)


if __name__ == "__main__":
    main()
