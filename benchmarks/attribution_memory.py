"""Benchmark attribution within a memory budget: chunked vs unchunked, same batch, one run.

Run ``python benchmarks/attribution_memory.py`` (a few minutes on 2 CPU cores; ``--quick``
for a smoke run). It prints a table and rewrites the "attribution-memory" section of
docs/benchmarks.md.

For each chunking regime of `ctlens.memory` a budget is computed (with
`ctlens.memory.bytes_per_example`) that forces it, and `ctlens.attribute` runs with that
budget and without one (``max_memory="1TB"``) at the same batch size, on a GPT-2-shaped
random model (6 layers, d_model 256, 8 heads, vocab 2048) whose MLPs are split into 64
neuron groups (433 senders, so receiver gradients are queued by default):

- **receivers**: the fp32 buffer with 8 queued receiver columns per product (default 108);
- **bf16 buffer**: the same model in bfloat16, its buffer in bf16 upcast 16 rows at a time
  (against the bf16 model with the fp32 buffer);
- **senders / G**: one example's buffer does not fit, so the senders are scored in G groups,
  each with its own passes; this regime is for batch 1 (it is chosen only when one example
  does not fit), so both sides run at batch 1.

Time: one process runs a warm-up and ``--repeats`` rounds of [unchunked, chunked] for every
regime; each ratio is the median of the per-round ratios (the machine is shared). Memory:
each call runs once in a fresh process; the number is its peak RSS minus the RSS before it
(``/proc/self/clear_refs``). Target (issue 15): time <= 1.2x unchunked for the regimes that
keep the passes (receivers, bf16 buffer); sender chunks cost one set of passes per group.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SHAPE = {"n_layer": 6, "n_embd": 256, "n_head": 8, "vocab_size": 2048}
QUICK = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 512}
GROUPS = 64
TARGET = 1.2


def _setup(regime: str, quick: bool) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Model, graph, data and the keyword arguments of the chunked call for ``regime``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import ctlens
    from ctlens.memory import SenderLayout, bytes_per_example

    torch.manual_seed(0)
    config = GPT2Config(**(QUICK if quick else SHAPE), resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    dtype = torch.bfloat16 if regime == "bf16" else torch.float32
    model = ctlens.load_model(GPT2LMHeadModel(config).to(dtype))
    graph = ctlens.Graph.from_model(model, mlp_groups=128 if quick else GROUPS)  # > 256 senders
    batch, seq = (8, 64) if not regime.startswith("senders") else (1, 256)
    n = 8 if not regime.startswith("senders") else 2
    gen = torch.Generator().manual_seed(0)
    vocab = model.cfg.d_vocab
    data = ctlens.TaskData(
        clean=torch.randint(0, vocab, (n, seq), generator=gen),
        corrupt=torch.randint(0, vocab, (n, seq), generator=gen),
        correct=torch.randint(0, vocab, (n,), generator=gen),
        wrong=torch.randint(0, vocab, (n,), generator=gen),
    )
    width = max(model.cfg.n_heads, graph.spec.mlp_groups)
    s = graph.n_senders
    layout = SenderLayout.of(model, graph)

    def need(rows: int, item: int, chunk: int | None, queue: int | None) -> int:
        return bytes_per_example(layout, rows, seq, width, item, chunk, queue)

    if regime == "receivers":
        budget = batch * need(s, 4, None, 8)
    elif regime == "bf16":
        budget = batch * need(s, 2, 16, 1)
    else:
        groups = int(regime.split("/")[1])
        budget = need(-(-s // groups), 4, None, 1)
    return model, graph, data, {"batch_size": batch, "max_memory": budget}


def _call(model: Any, graph: Any, data: Any, kwargs: dict[str, Any]) -> Any:
    import ctlens

    return ctlens.attribute(model, data, graph=graph, progress=False, **kwargs)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process: ``timing`` rounds or one ``memory`` call."""
    import torch

    torch.set_num_threads(spec["threads"] or torch.get_num_threads())
    model, graph, data, chunked = _setup(spec["regime"], spec["quick"])
    plain = {"batch_size": chunked["batch_size"], "max_memory": "1TB"}
    if spec["job"] == "memory":
        kwargs = chunked if spec["chunked"] else plain
        rss = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        scores = _call(model, graph, data, kwargs)
        return {"peak_mib": (_rss_kib("VmHWM") - rss) / 1024,
                "memory": scores.metadata.get("memory")}
    a, b = _call(model, graph, data, plain), _call(model, graph, data, chunked)  # warm-up
    error = float((a.scores - b.scores).abs().max() / a.scores.abs().max())
    rounds = []
    for _ in range(spec["repeats"]):
        times = []
        for kwargs in (plain, chunked):
            start = time.perf_counter()
            _call(model, graph, data, kwargs)
            times.append(time.perf_counter() - start)
        rounds.append(times)
    return {"rounds": rounds, "error": error, "fit": b.metadata["memory"]}


def _rss_kib(field: str) -> int:
    from _report import proc_status_kib  # type: ignore[import-not-found]

    return proc_status_kib(field)


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run `worker` in a fresh Python process and parse its JSON answer."""
    from _report import run_worker as run_script  # type: ignore[import-not-found]

    return run_script(Path(__file__).resolve(), spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds (after warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-report", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    rows = []
    for regime in ("receivers", "bf16", "senders/2", "senders/4"):
        spec = {"regime": regime, "quick": args.quick, "threads": args.threads}
        print(f"{regime}: timing ({args.repeats} rounds) and memory ...", flush=True)
        timing = run_worker({**spec, "job": "timing", "repeats": args.repeats})
        ratio = statistics.median(b / a for a, b in timing["rounds"])
        plain = statistics.median(a for a, _ in timing["rounds"])
        memory = [run_worker({**spec, "job": "memory", "chunked": c})["peak_mib"]
                  for c in (False, True)]
        rows.append([regime, _describe(timing["fit"]), f"{plain:.2f} s", f"{ratio:.2f}x",
                     f"{memory[0]:,.0f} MiB", f"{memory[1]:,.0f} MiB",
                     f"{memory[1] / memory[0]:.2f}", f"{timing['error']:.1e}"])
    markdown = report(args, rows)
    print(markdown)
    if not args.no_report and not args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _report import write_section  # type: ignore[import-not-found]

        print(f"wrote {write_section('attribution-memory', markdown)}")


def _describe(fit: dict[str, Any]) -> str:
    what = [f"{fit['buffer_dtype']}, batch {fit['batch_size']}"]
    if fit["chunk"] is not None:
        what.append(f"upcast {fit['chunk']} rows")
    if fit["receivers"] is not None:
        what.append(f"{fit['receivers']} receiver columns per product")
    if fit["senders"] is not None:
        what.append(f"{fit['senders']} senders per pass")
    return "; ".join(what)


def report(args: argparse.Namespace, rows: list[list[str]]) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from _report import markdown_table  # type: ignore[import-not-found]

    header = ["regime", "fit", "unchunked time", "time ratio", "unchunked peak",
              "chunked peak", "memory ratio", "max score diff (rel.)"]
    threads = args.threads or torch.get_num_threads()
    return "\n".join([
        "## Attribution within a memory budget (`benchmarks/attribution_memory.py`)",
        "",
        f"GPT-2-shaped random model ({SHAPE['n_layer']} layers, d_model {SHAPE['n_embd']}, "
        f"{SHAPE['n_head']} heads), MLPs in {GROUPS} neuron groups (433 senders); batch 8 x 64 "
        "tokens, and batch 1 x 256 tokens for sender chunks. Each row: `ctlens.attribute` with "
        "a budget that forces the regime against the same call unbudgeted, same batch. Time: "
        f"median of {args.repeats} per-round ratios (after a warm-up); memory: peak RSS added "
        f"by one call in a fresh process. CPU, {threads} threads, {platform.machine()}, "
        f"torch {torch.__version__}. Target: time <= {TARGET}x for the regimes that keep the "
        "passes (receivers, bf16 buffer); sender chunks run one set of passes per group.",
        "",
        markdown_table(header, rows),
    ])


if __name__ == "__main__":
    main()
