"""``ctlens discover``: score every edge of a model on a task and print the top of the circuit.

Shows the whole first half of the pipeline in one command::

    ctlens discover                                  # zoo:tiny-gpt2, agreement task
    ctlens discover --model zoo:tiny-gpt2 --task ioi --method eap-ig --top 30 --out ioi.json
    ctlens discover --method learned --top-n 0.05 --out learned.json   # a gate per edge

``--method learned`` trains a gate per edge (`ctlens.learn_circuit`) instead of scoring
edges, and prints and saves the learned circuit of ``--top-n`` edges with its faithfulness.

The parser is built from light modules (``ctlens --help`` loads no torch); the run imports
the model, task and attribution code when it starts.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ctlens.cli.support import (
    DEFAULT_MODEL,
    UsageError,
    add_n_examples,
    check_model_and_task,
    memory_size,
    phase,
    positive_int,
)
from ctlens.sizes import parse_size
from ctlens.types import Ablation, Method

if TYPE_CHECKING:
    from ctlens.circuit import Circuit
    from ctlens.data import TaskData
    from ctlens.graph import Graph
    from ctlens.scores import EdgeScores

DEFAULT_TASK = "agreement"
"""The behaviour ``ctlens tune``'s default task (agreement-flip) fine-tunes away from."""
LEARNED = "learned"
"""The ``--method`` that learns a gate per edge (`ctlens.learn_circuit`) instead of scoring."""
EAP_IG_STEPS = 5


def add_discover_command(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``ctlens discover`` on the sub-parser collection; returns its parser."""
    p = commands.add_parser(
        "discover",
        help="score every edge for a task and print the top of the circuit",
        description="Score every edge of a model's graph on a task with EAP, EAP-IG or exact "
        "patching, print the strongest edges and nodes, and optionally save the circuit; or, "
        "with --method learned, train a gate per edge for a circuit of --top-n edges (Edge "
        "Pruning) and print its edges and faithfulness. Phases and their times go to stderr, "
        "results to stdout.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="zoo:NAME, a local HF directory "
                   "or a hub name; ctlens tune starts from the same model")
    p.add_argument("--task", default=DEFAULT_TASK, help="a built-in task (ctlens tasks lists "
                   "them) or a JSONL file; agreement is the behaviour that ctlens tune's "
                   "agreement-flip fine-tunes away from")
    p.add_argument("--method", default=Method.EAP.value,
                   choices=[*(m.value for m in Method), LEARNED],
                   help="eap, eap-ig or exact attribution, or learned: a gate per edge trained "
                   "for faithfulness at the --top-n size")
    p.add_argument("--ablation", default=Ablation.CORRUPT.value,
                   choices=[a.value for a in Ablation], help="what an ablated edge carries")
    add_n_examples(p, 128, "examples to attribute on")
    p.add_argument("--batch-size", type=positive_int, default=32, help="examples per pass")
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"eap-ig: integration steps ({EAP_IG_STEPS} unless given); learned: "
                   "optimisation steps (400 unless given, learn_circuit's default)")
    p.add_argument("--objective", default=None, choices=["kl", "metric"],
                   help="learned only: kl (Edge Pruning's, KL from the full model's answer "
                   "distribution; the default) or metric (match the task metric per example)")
    p.add_argument("--lr", type=float, default=None,
                   help="learned only: learning rate of the gate logits (default: 0.1)")
    p.add_argument("--top", type=positive_int, default=20, help="edges to print")
    p.add_argument("--top-n", type=parse_size, default=None,
                   help="edges to keep in the saved circuit: a count (at most the graph's "
                   "valid edges, checked before attribution runs), or a fraction of the valid "
                   "edges such as 0.01 (default: --top)")
    p.add_argument("--mlp-groups", type=positive_int, default=1,
                   help="split each MLP into this many neuron groups, nodes m{l}.n{j} "
                   "(default 1: one node per MLP)")
    p.add_argument("--max-memory", type=memory_size, default=None,
                   help="memory attribution's buffers may use per pass, e.g. 8GB or 7.5GiB "
                   "(default: half of what is free on the device); over it, fewer receiver "
                   "gradients are queued, the sender buffer is kept in the model's dtype, "
                   "batches are split and, for long prompts, senders are scored in groups")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the task sample (and, with --method learned, the gates)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: $OMP_NUM_THREADS, else physical cores "
                   "minus one, at least 1)")
    p.add_argument("--out", default=None, help="write the circuit as JSON to this path")
    p.set_defaults(func=run_discover, out_kind="file", check=_check_discover)
    return p


def run_discover(args: argparse.Namespace) -> int:
    """Run ``ctlens discover``: load, build the task, check sizes, attribute, print, save."""
    from ctlens.attribution import attribute
    from ctlens.circuit import Circuit
    from ctlens.graph import Graph
    from ctlens.model import load_model
    from ctlens.sizes import CircuitSize
    from ctlens.tasks.bundle import load

    with phase(f"loading {args.model}"):
        model = load_model(args.model, device=args.device)
    graph = Graph.from_model(model, mlp_groups=args.mlp_groups)
    # sizes are checked against the graph before any task or attribution work
    top_n = None if args.top_n is None else \
        CircuitSize.of(args.top_n, "--top-n").edges(graph.n_edges)
    with phase(f"building task {args.task!r} ({args.n} examples)"):
        task = load(args.task, n=args.n, seed=args.seed, tokenizer=model.tokenizer)
    if args.method == LEARNED:
        return _run_learned(args, model, task.discovery, graph, top_n or args.top)
    with phase(f"attributing ({args.method}, {args.ablation} ablation)"):
        scores = attribute(
            model, task.discovery, method=args.method, ablation=args.ablation,
            batch_size=args.batch_size, steps=args.steps or EAP_IG_STEPS,
            progress=sys.stderr.isatty(), graph=graph, max_memory=args.max_memory,
        )
    top = min(args.top, scores.graph.n_edges)
    _print_scores(scores, top)
    if "memory" in scores.metadata:
        print(f"\nwithin max_memory: {_fit_summary(scores.metadata['memory'])}")
    if args.out:
        circuit = Circuit.from_scores(scores, top_n=top_n or top)
        circuit.save(args.out)
        print(f"\ncircuit of {circuit.n_edges} edges written to {args.out}")
    return 0


def _check_discover(args: argparse.Namespace) -> None:
    """Before torch: the model and task names, and flags the method would silently ignore."""
    _check_method_flags(args)
    check_model_and_task(args)


def _check_method_flags(args: argparse.Namespace) -> None:
    """Refuse flags that the chosen method would silently ignore."""
    if args.method == LEARNED:
        if args.max_memory is not None:
            raise UsageError("--max-memory bounds attribution's buffers; --method learned "
                             "does not use it (drop the flag)")
        if args.lr is not None and not args.lr > 0:
            raise UsageError(f"--lr must be a positive number, got {args.lr}")
        return
    for flag, value in (("--objective", args.objective), ("--lr", args.lr)):
        if value is not None:
            raise UsageError(f"{flag} is for --method learned, not {args.method}")


def _run_learned(
    args: argparse.Namespace, model: Any, data: TaskData, graph: Graph, size: int
) -> int:
    """``--method learned``: learn a circuit of ``size`` edges, print it, save it."""
    from ctlens.learning import learn_circuit

    options = {"objective": args.objective, "lr": args.lr, "steps": args.steps}
    chosen = {k: v for k, v in options.items() if v is not None}
    with phase(f"learning a circuit of {size} edges ({args.ablation} ablation)"):
        circuit = learn_circuit(
            model, data, size, args.ablation, seed=args.seed, batch_size=args.batch_size,
            graph=graph, progress=sys.stderr.isatty(), **chosen,
        )
    _print_learned(circuit, min(args.top, circuit.n_edges))
    if args.out:
        circuit.save(args.out)
        print(f"\ncircuit of {circuit.n_edges} edges written to {args.out}")
    return 0


def _print_learned(circuit: Circuit, top: int) -> None:
    """The graph, the learned circuit's faithfulness and its ``top`` edges by gate, on stdout."""
    learning = circuit.metadata["learning"]
    print(f"{circuit.graph!r}")
    print(f"learned {circuit.n_edges} edges ({learning['objective']} objective, "
          f"{learning['ablation']} ablation, {learning['steps']} steps, seed "
          f"{learning['seed']}, {learning['n_examples']} examples): faithfulness "
          f"{learning['faithfulness']:.3f}, {learning['expected_edges']:.1f} gates expected "
          "open")
    assert circuit.scores is not None
    ranked = sorted(circuit.edge_scores().items(), key=lambda kv: -(kv[1] or 0.0))[:top]
    print(f"\ntop {top} edges by open probability:")
    print(f"  {'rank':>4}  {'edge':<28} {'gate':>8}")
    for rank, ((sender, receiver), value) in enumerate(ranked, start=1):
        print(f"  {rank:>4}  {sender + ' -> ' + receiver:<28} {value or 0.0:>8.4f}")
    print(f"\ncomponents: {', '.join(circuit.components)}")


def _print_scores(scores: EdgeScores, top: int) -> None:
    """The graph, the metric, the ``top`` edges and the ten strongest nodes, on stdout."""
    meta = scores.metadata
    print(f"{scores.graph!r}")
    print(f"metric {meta['metric']}: clean {meta['metric_clean']:+.3f}", end="")
    if "metric_corrupt" in meta:
        print(f", corrupt {meta['metric_corrupt']:+.3f}", end="")
    print()
    print(f"\ntop {top} edges by |score|:")
    print(f"  {'rank':>4}  {'edge':<28} {'score':>10}")
    for rank, (sender, receiver, value) in enumerate(scores.top(top), start=1):
        print(f"  {rank:>4}  {sender + ' -> ' + receiver:<28} {value:>+10.4f}")
    nodes = sorted(scores.node_scores().items(), key=lambda kv: -abs(kv[1]))[:10]
    print("\ntop 10 nodes by |total effect|:")
    for name, value in nodes:
        print(f"  {name:<10} {value:+.4f}")


def _fit_summary(memory: dict) -> str:
    """What `ctlens.attribute` changed to fit its budget, from the scores' metadata."""
    parts = [f"{memory['buffer_dtype']} sender buffer", f"batches of {memory['batch_size']}"]
    if memory["receivers"] is not None:
        parts.append(f"{memory['receivers']} receiver column(s) per product")
    if memory["senders"] is not None:
        parts.append(f"senders in groups of {memory['senders']}")
    return ", ".join(parts)
