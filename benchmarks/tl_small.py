"""Benchmark: ctlens EAP against TransformerLens 4.3's own edge attribution on a
student-sized model (issue 21: "small models are where students start").

A randomly initialised GPT-2-style model with 6 layers, d_model 384 and 6 heads (vocab
50257, built locally), batch 8 x 32, one thread. Times one-group `ctlens.attribute` (EAP,
corrupt ablation, the whole batch at once) and TL 4.3's
``attribution_patch(..., EdgeAttributionConfig(granularity="edge"))`` over the same 8
examples (TL takes one prompt pair and one metric per call, so it is called per example,
as `benchmarks/attribution.py` does), interleaved over rounds after a warm-up; the ratio
is the median of the per-round ratios (target: EAP / TL <= 0.05). For the cause of a miss
it also times the floor of any gradient-based attribution on the batch: the corrupt and
the clean forward and one backward to the residual stream's input (no parameter gradients,
logits at the metric position only, as ctlens computes them), and counts each operation's
matrix-product FLOPs and the share of its CPU time spent in them (`benchmarks/flops.py`'s
`count`). Writes the "tl-small" section of docs/benchmarks.md.

Run: ``python benchmarks/tl_small.py [--repeats 3] [--threads 1] [--no-report]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import ctlens
from ctlens.bridge.hooks import final_logits, run_to_final_residual

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import markdown_table, write_section  # noqa: E402
from attribution import _operations, _task  # noqa: E402
from flops import count  # noqa: E402

SHAPE = {"n_layer": 6, "n_embd": 384, "n_head": 6, "vocab_size": 50257}
BATCH, SEQ = 8, 32
TARGET = 0.05


OPERATIONS = ("eap", "tl", "floor")


def floor_operation(model: Any, data: Any) -> Callable[[], None]:
    """Two forwards and one input-only backward of the metric: what any gradient-based
    attribution of the batch must compute, with no hook, buffer or score product."""
    rows = torch.arange(len(data))
    start: list[torch.Tensor] = []  # the residual stream's input, a leaf per clean forward

    def leaf(x: torch.Tensor, hook: Any) -> torch.Tensor:
        start.append(x.detach().requires_grad_(True))
        return start[-1]

    def floor() -> None:
        start.clear()
        with torch.no_grad():
            run_to_final_residual(model, data.corrupt, [])
        resid = run_to_final_residual(model, data.clean, [("blocks.0.hook_resid_pre", leaf)])
        logits = final_logits(model, resid[:, -1])
        metric = (logits[rows, data.correct] - logits[rows, data.wrong]).sum()
        torch.autograd.grad(metric, start)

    return floor


def measure(repeats: int) -> tuple[list[dict[str, float]], dict[str, tuple[float, float]], int]:
    """Per-round seconds of ``eap``, ``tl`` (all ``BATCH`` examples) and ``floor``
    (`floor_operation`), each one's (FLOPs, matrix-product share of its
    time), and the edges."""
    torch.manual_seed(0)
    config = GPT2Config(**SHAPE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = ctlens.load_model(GPT2LMHeadModel(config))
    data = _task(model.cfg.d_vocab, BATCH, SEQ)
    ops = {**_operations(model, data, tl_examples=BATCH), "floor": floor_operation(model, data)}
    for name in OPERATIONS:  # warm-up
        ops[name]()
    rounds = []
    for _ in range(repeats):
        times = {}
        for name in OPERATIONS:
            start = time.perf_counter()
            ops[name]()
            times[name] = time.perf_counter() - start
        rounds.append(times)
        sys.stderr.write(", ".join(f"{k} {v:.2f}s" for k, v in times.items()) + "\n")
    counts = {name: count(ops[name]) for name in ("eap", "floor")}
    # profiling all of TL's calls holds millions of events (24 GB): count one example
    flops, share = count(_operations(model, data[:1], tl_examples=1)["tl"])
    counts["tl"] = (flops * BATCH, share)
    return rounds, counts, ctlens.Graph.from_model(model).n_edges


def report(
    rounds: list[dict[str, float]], counts: dict[str, tuple[float, float]], edges: int,
    threads: int,
) -> str:
    def median(name: str, over: str | None = None) -> float:
        return statistics.median(r[name] / (r[over] if over else 1.0) for r in rounds)

    ratio = median("eap", "tl")
    verdict = "met" if ratio <= TARGET else "missed"
    floor = median("floor", "tl")

    def row(label: str, name: str, vs_tl: str, target: str, mark: str) -> list[str]:
        flops, share = counts[name]
        return [label, f"{median(name):.2f} s", vs_tl, target, mark, f"{flops / 1e9:.1f}",
                f"{share:.0%}"]

    return "\n".join([
        "## EAP against TransformerLens on a student-sized model (`benchmarks/tl_small.py`)",
        "",
        f"GPT-2-style random model, 6 layers, d_model 384, 6 heads ({edges} edges), batch "
        f"{BATCH} x {SEQ}; torch {torch.__version__}, {threads} thread(s), "
        f"{platform.processor() or platform.machine()}, load average "
        f"{os.getloadavg()[0]:.1f} when it finished. Median of {len(rounds)} interleaved "
        "rounds after a warm-up; TL's `attribution_patch` (edge granularity) is called once "
        "per example, over all of them. GFLOP: the matrix products of one call as "
        "`torch.profiler` counts them (TL's: one example's count times "
        f"{BATCH}); share: the part of the call's CPU time in those products.",
        "",
        markdown_table(["operation", "time", "/ TL", "target", "", "GFLOP",
                        "share in products"], [
            row("ctlens EAP (one group)", "eap", f"{ratio:.3f}", f"<= {TARGET}", verdict),
            row("TL 4.3 attribution_patch (edge)", "tl", "", "", ""),
            row("floor: 2 forwards + input-only backward", "floor", f"{floor:.3f}", "", ""),
        ]),
        "",
        f"EAP takes {median('eap', 'floor'):.2f}x the floor (two forwards and an input-only "
        f"backward of the same batch, no hooks), which alone takes {floor:.3f} of TL's time.",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-report", action="store_true", help="do not write docs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds, counts, edges = measure(args.repeats)
    markdown = report(rounds, counts, edges, args.threads)
    sys.stdout.write(markdown + "\n")
    if not args.no_report:
        write_section("tl-small", markdown)


if __name__ == "__main__":
    main()
