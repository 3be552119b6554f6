"""Benchmark: ctlens EAP against TransformerLens 4.3's own edge attribution on a
student-sized model (issue 21: "small models are where students start").

A randomly initialised GPT-2-style model with 6 layers, d_model 384 and 6 heads (vocab
50257, built locally), batch 8 x 32, one thread. Times one-group `ctlens.attribute` (EAP,
corrupt ablation, the whole batch at once) and TL 4.3's
``attribution_patch(..., EdgeAttributionConfig(granularity="edge"))`` over the same 8
examples (TL takes one prompt pair and one metric per call, so it is called per example,
as `benchmarks/attribution.py` does), interleaved over rounds after a warm-up; the ratio
is the median of the per-round ratios (target: EAP / TL <= 0.05). Writes the "tl-small"
section of docs/benchmarks.md.

Run: ``python benchmarks/tl_small.py [--repeats 3] [--threads 1] [--no-report]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import ctlens

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import markdown_table, write_section  # noqa: E402
from attribution import _operations, _task  # noqa: E402

SHAPE = {"n_layer": 6, "n_embd": 384, "n_head": 6, "vocab_size": 50257}
BATCH, SEQ = 8, 32
TARGET = 0.05


def measure(repeats: int) -> tuple[list[dict[str, float]], int]:
    """Per-round seconds of ``eap`` and ``tl`` (all ``BATCH`` examples), and the edges."""
    torch.manual_seed(0)
    config = GPT2Config(**SHAPE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = ctlens.load_model(GPT2LMHeadModel(config))
    data = _task(model.cfg.d_vocab, BATCH, SEQ)
    ops = _operations(model, data, tl_examples=BATCH)
    ops["eap"](), ops["tl"]()  # warm-up
    rounds = []
    for _ in range(repeats):
        times = {}
        for name in ("eap", "tl"):
            start = time.perf_counter()
            ops[name]()
            times[name] = time.perf_counter() - start
        rounds.append(times)
        sys.stderr.write(f"eap {times['eap']:.2f}s, TL {times['tl']:.2f}s\n")
    return rounds, ctlens.Graph.from_model(model).n_edges


def report(rounds: list[dict[str, float]], edges: int, threads: int) -> str:
    ratio = statistics.median(r["eap"] / r["tl"] for r in rounds)
    eap = statistics.median(r["eap"] for r in rounds)
    tl = statistics.median(r["tl"] for r in rounds)
    verdict = "met" if ratio <= TARGET else "missed"
    return "\n".join([
        "## EAP against TransformerLens on a student-sized model (`benchmarks/tl_small.py`)",
        "",
        f"GPT-2-style random model, 6 layers, d_model 384, 6 heads ({edges} edges), batch "
        f"{BATCH} x {SEQ}; torch {torch.__version__}, {threads} thread(s), "
        f"{platform.processor() or platform.machine()}, load average "
        f"{os.getloadavg()[0]:.1f} when it finished. Median of {len(rounds)} interleaved "
        "rounds after a warm-up; TL's `attribution_patch` (edge granularity) is called once "
        "per example, over all of them.",
        "",
        markdown_table(["operation", "time", "EAP / TL", "target", ""], [
            ["ctlens EAP (one group)", f"{eap:.2f} s", "", "", ""],
            ["TL 4.3 attribution_patch (edge)", f"{tl:.2f} s", f"{ratio:.3f}",
             f"<= {TARGET}", verdict],
        ]),
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-report", action="store_true", help="do not write docs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds, edges = measure(args.repeats)
    markdown = report(rounds, edges, args.threads)
    sys.stdout.write(markdown + "\n")
    if not args.no_report:
        write_section("tl-small", markdown)


if __name__ == "__main__":
    main()
