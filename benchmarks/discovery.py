"""Benchmark: circuit discovery methods compared on the zoo, and the speed of learning one.

``python benchmarks/discovery.py compare`` (every zoo model, a few hours on 2 cores;
``--models`` to run some, ``--methods`` to leave out an attribution method, ``--quick`` for
a smoke run) compares, for every model of
``ctlens.zoo.names()`` and the ``agreement`` and ``ioi`` tasks:

- **EAP**, **EAP-IG** (5 steps) and **exact** patching score every edge once on 256
  discovery examples (task sample seed 0); their circuit at each size is the top-|score|
  edges (`ctlens.faithfulness_curve`);
- **learned** circuits (`ctlens.learn_circuit`, default settings) are trained for each
  size separately on the same examples, with seeds 0, 1 and 2;
- faithfulness of every circuit on the task's 256 *held-out* evaluation examples
  (``task.evals[task]``, their own sampling stream), corrupt
  ablation, logit difference, at MIB's sizes (0.1 % ... 100 % of the valid edges, rounded
  as `ctlens.sizes.fraction_edges` does), with MIB's areas CPR (higher is better) and CMD
  (lower is better); the in-sample faithfulness (on the discovery examples) is stored too;
- the wall time of each method (one scoring for all sizes; one training per size).

At 100 % every method's circuit is the whole graph (faithfulness 1), so no gate is trained
there. Results go to ``benchmarks/results/discovery.json`` per model and task (a run of some
models keeps the others') and ``docs/discovery.md`` is written from all stored results.

``python benchmarks/discovery.py speed`` writes the "learned" section of docs/benchmarks.md:
the time of `learn_circuit` on each zoo model with 256 examples (target: within 2 minutes
on one core), and one optimisation step against one forward+backward of the model on the
same batch (GPT-2-small shape, random weights, batch 16 x 32, one thread; target 2.5x).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

import ctlens
from ctlens import Circuit, Graph, TaskData
from ctlens.files import atomic_write_text
from ctlens.learning import learn
from ctlens.learning.gates import GatedForward
from ctlens.learning.learn import DEFAULT_STEPS, TargetNotReachedError
from ctlens.masking import MIB_FRACTIONS, curve_areas
from ctlens.reference import resolve_reference
from ctlens.sizes import fraction_edges
from ctlens.types import Ablation

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "discovery.json"
PAGE = HERE.parent / "docs" / "discovery.md"
TASKS = ("agreement", "ioi")
ATTRIBUTION = ("eap", "eap-ig", "exact")
SEEDS = (0, 1, 2)
N_EXAMPLES = 256


# ------------------------------------------------------------------------------ compare


def _curve(model: Any, data: TaskData, circuits: list[Circuit]) -> list[float]:
    return [ctlens.faithfulness(model, data, c).faithfulness for c in circuits]


def compare_one(model_name: str, task: str, n: int, seeds: tuple[int, ...],
                steps: int, methods: tuple[str, ...] = ATTRIBUTION) -> dict[str, Any]:
    """The faithfulness curves of the attribution ``methods`` and of learned circuits for
    one zoo model and task (one thread)."""
    torch.set_num_threads(1)
    model = ctlens.load_model(f"zoo:{model_name}")
    bundle = ctlens.tasks.load(task, n=n, seed=0, tokenizer=model.tokenizer)
    discovery, held_out = bundle.discovery, bundle.evals[task]
    graph = Graph.from_model(model)
    counts = [fraction_edges(f, graph.n_edges) for f in MIB_FRACTIONS]
    record: dict[str, Any] = {
        "model": model_name, "task": task, "n_edges": graph.n_edges, "n_examples": n,
        "steps": steps, "fractions": list(MIB_FRACTIONS), "counts": counts, "methods": {},
    }
    for method in methods:
        start = time.perf_counter()
        scores = ctlens.attribute(model, discovery, method=method, progress=False)
        seconds = time.perf_counter() - start
        circuits = [Circuit.from_scores(scores, top_n=k) for k in counts]
        record["methods"][method] = {"seconds": seconds, "runs": [{
            "held_out": _curve(model, held_out, circuits),
            "in_sample": _curve(model, discovery, circuits),
        }]}
        _say(f"{model_name} {task} {method}: {seconds:.1f}s")
    runs = []
    for seed in seeds:
        circuits, seconds, reported = [], [], []
        for k in counts:
            if k == graph.n_edges:
                circuits.append(Circuit.full(graph))
                seconds.append(0.0)
                reported.append(1.0)
                continue
            start = time.perf_counter()
            circuit = _learn(model, discovery, k, steps, seed)
            seconds.append(time.perf_counter() - start)
            circuits.append(circuit)
            reported.append(circuit.metadata["learning"]["faithfulness"])
            _say(f"{model_name} {task} learned k={k} seed={seed}: {seconds[-1]:.1f}s "
                 f"faithfulness {reported[-1]:.3f}")
        runs.append({"seed": seed, "seconds": seconds, "in_sample": reported,
                     "held_out": _curve(model, held_out, circuits)})
    record["methods"]["learned"] = {"seconds": sum(sum(r["seconds"]) for r in runs) / len(runs),
                                    "runs": runs}
    record["load"] = os.getloadavg()[0]  # the machine's load when the pair finished
    return record


def _learn(model: Any, data: TaskData, top_n: int, steps: int, seed: int) -> Circuit:
    """`ctlens.learn_circuit` with its defaults; when the gates miss the size, once more
    with twice the steps (what the error advises; the circuit's metadata records the steps)."""
    try:
        return ctlens.learn_circuit(model, data, top_n, steps=steps, seed=seed, progress=False)
    except TargetNotReachedError as err:
        _say(f"  {err}; again with {2 * steps} steps")
        return ctlens.learn_circuit(model, data, top_n, steps=2 * steps, seed=seed,
                                    progress=False)


def compare(pairs: list[tuple[str, str]], n: int, seeds: tuple[int, ...], steps: int,
            jobs: int, methods: tuple[str, ...] = ATTRIBUTION) -> list[dict[str, Any]]:
    """`compare_one` for every (model, task) pair, ``jobs`` processes at a time."""
    if jobs == 1:
        return [compare_one(m, t, n, seeds, steps, methods) for m, t in pairs]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=spawn) as pool:
        futures = [pool.submit(compare_one, m, t, n, seeds, steps, methods) for m, t in pairs]
        return [f.result() for f in futures]


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _store(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge ``records`` into the stored results (by model and task) and write them."""
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"results": []}
    keys = {(r["model"], r["task"]) for r in records}
    kept = [r for r in stored["results"] if (r["model"], r["task"]) not in keys]
    stored["results"] = sorted(kept + records, key=lambda r: (r["model"], r["task"]))
    stored["environment"] = _environment()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(stored, indent=1) + "\n")
    os.replace(tmp, RESULTS)
    return stored


def _environment() -> str:
    return (f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), "
            f"{platform.processor() or platform.machine()}")


# ------------------------------------------------------------------------------ the page


def _areas(record: dict[str, Any], method: str, which: str = "held_out"
           ) -> list[tuple[float, float]]:
    """(CPR, CMD) of each run of ``method``."""
    runs = record["methods"][method]["runs"]
    return [curve_areas(record["fractions"], run[which]) for run in runs]


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{round(values[0], 3) + 0.0:.3f}"  # + 0.0: no "-0.000"
    return f"{round(statistics.mean(values), 3) + 0.0:.3f} ± {statistics.stdev(values):.3f}"


def _curve_cell(runs: list[dict[str, Any]], index: int, which: str = "held_out") -> str:
    return _mean_sd([run[which][index] for run in runs])


def page(stored: dict[str, Any]) -> str:
    """docs/discovery.md from the stored results (tables, then what wins where)."""
    results = stored["results"]
    models = sorted({rec["model"] for rec in results})
    missing = [m for m in ctlens.zoo.names() if m not in models]
    lines = [
        "# Discovery methods compared",
        "",
        "Written by `benchmarks/discovery.py compare` from `benchmarks/results/discovery.json` "
        f"(re-run it to refresh). For the zoo models {', '.join(models)} and the `agreement` "
        f"and `ioi` tasks, circuits were found on {N_EXAMPLES} discovery examples (task "
        f"sample seed 0) and measured on the task's {N_EXAMPLES} held-out evaluation "
        "examples (`task.evals`, sampled apart from the discovery examples), corrupt "
        "ablation, logit difference. EAP, EAP-IG (5 steps) and exact patching score every "
        "edge once; their circuit at each size is the top-|score| edges. A learned circuit "
        "(`ctlens.learn_circuit`, default settings: Edge Pruning's KL objective, 400 steps, "
        "batch 32, lr 0.1) is trained for each size, with the seeds its section names "
        "(several: mean ± sd over seeds). "
        "Sizes are MIB's grid (0.1 % ... 100 % of the valid edges); CPR is the area under "
        "the faithfulness curve (higher is better), CMD the area of |1 - faithfulness| "
        "(lower is better). Times: one scoring serves every size; a learned circuit is one "
        "training per size (the time column sums them). Each (model, task) pair ran in a "
        "process of its own, one thread, on two cores (each section gives the load average "
        "when its pair finished where it was recorded).",
        "",
        f"Environment: {stored.get('environment', '?')}.",
    ]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)} (`--models` runs it and keeps "
                  "the stored results of the others)."]
    for record in results:
        lines += _record_section(record)
    lines += ["", "## What wins where", ""] + _verdicts(results)
    return "\n".join(lines) + "\n"


def _record_section(record: dict[str, Any]) -> list[str]:
    methods = list(record["methods"])
    skipped = [m for m in ATTRIBUTION if m not in methods]
    seeds = [run["seed"] for run in record["methods"]["learned"]["runs"]]
    notes = "".join([
        f" Learned circuits: seed{'s' if len(seeds) > 1 else ''} "
        f"{', '.join(map(str, seeds))}.",
        f" Not run here: {', '.join(skipped)} (`--methods`)." if skipped else "",
        f" Load average {record['load']:.1f} when it finished." if "load" in record else "",
    ])
    lines = [
        "", f"## {record['model']}, {record['task']}", "",
        f"{record['n_edges']} valid edges.{notes} Held-out faithfulness by circuit size:", "",
        "| edges | " + " | ".join(methods) + " |",
        "|---:|" + "---:|" * len(methods),
    ]
    for i, (fraction, count) in enumerate(zip(record["fractions"], record["counts"],
                                               strict=True)):
        cells = [_curve_cell(record["methods"][m]["runs"], i) for m in methods]
        lines.append(f"| {count} ({fraction:.1%}) | " + " | ".join(cells) + " |")
    lines += ["", "| method | CPR (held-out) | CMD (held-out) | CPR (in-sample) | "
              "CMD (in-sample) | seconds |", "|---|---:|---:|---:|---:|---:|"]
    for m in methods:
        held, seen = _areas(record, m), _areas(record, m, "in_sample")
        lines.append(
            f"| {m} | {_mean_sd([a[0] for a in held])} | {_mean_sd([a[1] for a in held])} | "
            f"{_mean_sd([a[0] for a in seen])} | {_mean_sd([a[1] for a in seen])} | "
            f"{record['methods'][m]['seconds']:.1f} |"
        )
    return lines


def _verdicts(records: list[dict[str, Any]]) -> list[str]:
    """One measured sentence per model and task: the best areas, and learned against EAP
    size by size (held-out, seed mean): closer to 1 means a smaller |1 - faithfulness|; sizes
    where both show the same value to 3 decimals are ties."""
    lines = []
    totals = {"closer": 0, "tie": 0, "farther": 0}
    overshoot = 0
    for record in records:
        areas = {m: (statistics.mean(a[0] for a in _areas(record, m)),
                     statistics.mean(a[1] for a in _areas(record, m)))
                 for m in record["methods"]}
        best_cmd = min(areas, key=lambda m: areas[m][1])
        best_cpr = max(areas, key=lambda m: areas[m][0])
        learned = [statistics.mean(r["held_out"][i] for r in record["methods"]["learned"]["runs"])
                   for i in range(len(record["counts"]))]
        eap = record["methods"]["eap"]["runs"][0]["held_out"]
        outcome: dict[str, list[str]] = {"closer": [], "tie": [], "farther": []}
        for count, lf, ef in zip(record["counts"], learned, eap, strict=True):
            if count == record["n_edges"]:
                continue
            key = _closer(lf, ef)
            totals[key] += 1
            overshoot += key == "farther" and lf > 1
            outcome[key].append(f"{count} ({_mean_sd([lf])} vs {_mean_sd([ef])})")
        sized = sum(len(v) for v in outcome.values())
        lines.append(
            f"- **{record['model']}, {record['task']}**: lowest CMD {best_cmd} "
            f"({areas[best_cmd][1]:.4f}), highest CPR {best_cpr} ({areas[best_cpr][0]:.4f}). "
            f"Learned vs EAP at the {sized} sizes below 100 %: closer to 1 at "
            f"{len(outcome['closer'])}, farther at {len(outcome['farther'])}, equal at "
            f"{len(outcome['tie'])}"
            + "".join(f"; {key}: {', '.join(v)}" for key, v in outcome.items()
                      if v and key != "tie") + "."
        )
    met = "met" if totals["closer"] > totals["farther"] else "not met"
    return [
        f"Over all {sum(totals.values())} (model, task, size) points below 100 %, the learned "
        f"circuit's held-out faithfulness is closer to 1 than the EAP circuit's of the same "
        f"size at {totals['closer']}, farther at {totals['farther']} and equal at "
        f"{totals['tie']}: the goal (learned closer to 1 at equal size) is {met} on the zoo. "
        f"At {overshoot} of the {totals['farther']} points where it is farther, the learned "
        "circuit overshoots (faithfulness above 1).",
        "",
    ] + lines


def _closer(learned: float, eap: float) -> str:
    """``"closer"``, ``"farther"`` or ``"tie"``: |1 - learned| against |1 - eap|, compared
    as shown (3 decimals)."""
    gap_l, gap_e = round(abs(1 - learned), 3), round(abs(1 - eap), 3)
    return "tie" if gap_l == gap_e else "closer" if gap_l < gap_e else "farther"


# ------------------------------------------------------------------------------ speed


def _gpt2_small() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return ctlens.load_model(GPT2LMHeadModel(config).eval())


def step_ratio(repeats: int, cached: bool) -> tuple[float, float, float]:
    """Median fwd+bwd seconds, median learning-step seconds and median paired ratio on the
    GPT-2-small shape, batch 16 x 32, corrupt ablation: the step as `learn_circuit` runs it,
    with the corrupt reference cached (``cached``) or recorded by a forward every step."""
    model = _gpt2_small()
    gen = torch.Generator().manual_seed(0)
    data = TaskData(clean=torch.randint(0, 50257, (16, 32), generator=gen),
                    corrupt=torch.randint(0, 50257, (16, 32), generator=gen),
                    correct=torch.randint(0, 50257, (16,), generator=gen),
                    wrong=torch.randint(0, 50257, (16,), generator=gen))
    graph = Graph.from_model(model)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(data.clean)
        torch.nn.functional.cross_entropy(logits[:, -1], data.correct).backward()

    settings = {"top_n": 500, "steps": 1000, "seed": 0, "objective": "kl", "batch_size": 16,
                "lr": 0.1, "ablation": "corrupt"}
    times: list[tuple[float, float]] = []
    limit = learn.REFERENCE_CACHE_BYTES
    learn.REFERENCE_CACHE_BYTES = limit if cached else 0
    try:
        with learn.frozen_parameters(model), learn.eval_mode(model):
            corrupt, _ = resolve_reference(model, graph, data, Ablation.CORRUPT, None, 16)
            gated = GatedForward(model, graph, Ablation.CORRUPT)
            with model.hooks(fwd_hooks=gated.hooks()):
                targets = learn._targets(gated, data, corrupt, 16)
                trainer = learn._Trainer(gated, data, corrupt, targets, settings)
                for k in range(repeats + 1):
                    with gated.paused():
                        plain = _seconds(lambda: _unfrozen(model, forward_backward))
                    step = _seconds(lambda k=k: trainer.step(k))
                    if k:  # the first round warms up
                        times.append((plain, step))
    finally:
        learn.REFERENCE_CACHE_BYTES = limit
    plain_s = statistics.median(t[0] for t in times)
    step_s = statistics.median(t[1] for t in times)
    return plain_s, step_s, statistics.median(s / p for p, s in times)


def _unfrozen(model: Any, fn: Any) -> None:
    """Run ``fn`` with every parameter requiring grad (a training step's backward)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        fn()
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.zero_grad(set_to_none=True)


def _seconds(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def zoo_times(n: int) -> list[tuple[str, str, float, float]]:
    """``learn_circuit`` wall time per zoo model on ``n`` ioi examples (5 % of the edges)."""
    rows = []
    for name in ctlens.zoo.names():
        model = ctlens.load_model(f"zoo:{name}")
        data = ctlens.tasks.load("ioi", n=n, seed=0, tokenizer=model.tokenizer).discovery
        start = time.perf_counter()
        circuit = ctlens.learn_circuit(model, data, 0.05, progress=False)
        rows.append((name, "ioi", time.perf_counter() - start,
                     circuit.metadata["learning"]["faithfulness"]))
        _say(f"{name}: {rows[-1][2]:.1f}s")
    return rows


def speed_section(rows: list[tuple[str, str, float, float]],
                  ratios: dict[str, tuple[float, float, float]], repeats: int) -> str:
    lines = [
        "## Learned circuits (`benchmarks/discovery.py speed`)",
        "",
        f"`ctlens.learn_circuit` with its defaults (400 steps, batch 32), {N_EXAMPLES} ioi "
        "examples, 5 % of the edges, corrupt ablation, one CPU thread; target: within 2 "
        "minutes.",
        "",
        "| model | seconds | faithfulness (in-sample) | within 2 minutes |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {m} | {s:.1f} | {f:.3f} | {'yes' if s <= 120 else 'no'} |"
              for m, _, s, f in rows]
    lines += [
        "",
        "One optimisation step (sample the gates, gated forward to the final residual, logits "
        "at the answer, KL, backward to the gates, both Adam updates) against one forward + "
        "backward of the model (all parameters requiring grad, cross-entropy at the last "
        "position) on the same batch: GPT-2-small shape with random weights, batch 16 x 32, "
        f"corrupt ablation, one thread, median of {repeats} interleaved rounds; target 2.5x. "
        "`learn_circuit` records the corrupt reference of the whole dataset once when it fits "
        "in 1 GiB (as here), else with one no-grad forward every step: both are measured.",
        "",
        "| corrupt reference | forward+backward (s) | learning step (s) | ratio (median of "
        "paired) |",
        "|---|---:|---:|---:|",
    ]
    for label, (plain_s, step_s, ratio) in ratios.items():
        lines.append(f"| {label} | {plain_s:.3f} | {step_s:.3f} | {ratio:.2f}x |")
    lines += ["", f"Environment: {_environment()}, load average {os.getloadavg()[0]:.1f}."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compare_cmd = commands.add_parser(
        "compare", help="the discovery comparison (docs/discovery.md)")
    compare_cmd.add_argument("--models", nargs="*", default=None,
                             help="zoo models to run (default: all of ctlens.zoo.names())")
    compare_cmd.add_argument("--tasks", nargs="*", default=list(TASKS))
    compare_cmd.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS),
                             help="learned circuits' seeds (default: 0 1 2)")
    compare_cmd.add_argument("--methods", nargs="*", choices=ATTRIBUTION,
                             default=list(ATTRIBUTION),
                             help="attribution methods to compare with learned circuits "
                             "(default: all; exact patching takes longest)")
    compare_cmd.add_argument("--jobs", type=int, default=1,
                             help="(model, task) pairs run at once, one process and thread each")
    compare_cmd.add_argument("--quick", action="store_true",
                             help="32 examples, 150 steps, one seed: a smoke run that prints and "
                             "stores nothing")
    compare_cmd.add_argument("--page-only", action="store_true",
                             help="rewrite docs/discovery.md from the stored results")
    speed = commands.add_parser("speed", help="the learned-circuit rows of docs/benchmarks.md")
    speed.add_argument("--repeats", type=int, default=5)
    speed.add_argument("--no-report", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.command == "compare":
        if not args.page_only:
            if "eap" not in args.methods:
                parser.error("--methods must include eap: learned circuits are compared with it")
            n, seeds, steps = ((32, (0,), 150) if args.quick
                               else (N_EXAMPLES, tuple(args.seeds), DEFAULT_STEPS))
            pairs = [(m, t) for m in (args.models or ctlens.zoo.names()) for t in args.tasks]
            records = compare(pairs, n, seeds, steps, args.jobs, tuple(args.methods))
            if args.quick:
                sys.stdout.write(json.dumps(records, indent=1) + "\n")
                return
            _store(records)
        text = page(json.loads(RESULTS.read_text()))
        atomic_write_text(PAGE, text)
        sys.stdout.write(text)
        return
    ratios = {"cached": step_ratio(args.repeats, cached=True),
              "recorded every step": step_ratio(args.repeats, cached=False)}
    markdown = speed_section(zoo_times(N_EXAMPLES), ratios, args.repeats)
    sys.stdout.write(markdown + "\n")
    if not args.no_report:
        sys.path.insert(0, str(HERE))
        from _report import write_section  # type: ignore[import-not-found]

        write_section("learned", markdown)


if __name__ == "__main__":
    main()
