"""The ``ctlens`` command line: discover circuits, circuit-tune, diff, report, and the zoo.

Each stage module registers its own sub-commands; this module only assembles them and
implements ``discover``, which shows the whole first half of the pipeline in one command::

    ctlens discover                                  # zoo default model, agreement task
    ctlens discover --model zoo:tiny-gpt2 --task ioi --method eap-ig --top 30 --out ioi.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ctlens.sizes import parse_size

DEFAULT_MODEL = "zoo:tiny-llama"
DEFAULT_TASK = "agreement"


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for the docs' CLI reference)."""
    from ctlens import __version__
    from ctlens.delta_cli import add_delta_commands
    from ctlens.plan_cli import add_plan_command
    from ctlens.tuning.cli import add_tune_commands
    from ctlens.viz.cli import add_viz_commands
    from ctlens.zoo.cli import add_zoo_commands

    parser = argparse.ArgumentParser(
        prog="ctlens",
        description="Find the circuit a transformer uses for a task, fine-tune inside it, "
        "and show how it changes.",
    )
    parser.add_argument("--version", action="version", version=f"ctlens {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_discover(commands)
    add_tune_commands(commands)
    add_viz_commands(commands)
    add_zoo_commands(commands)
    add_plan_command(commands)
    add_delta_commands(commands)
    return parser


def _add_discover(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "discover",
        help="score every edge for a task and print the top of the circuit",
        description="Score every edge of a model's graph on a task with EAP, EAP-IG or exact "
        "patching, print the strongest edges and nodes, and optionally save the circuit.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL}): "
                   "zoo:NAME, a local HF directory or a hub name")
    p.add_argument("--task", default=DEFAULT_TASK, help=f"task name or JSONL file "
                   f"(default {DEFAULT_TASK}; see ctlens.tasks.names())")
    p.add_argument("--method", default="eap", choices=["eap", "eap-ig", "exact"])
    p.add_argument("--ablation", default="corrupt", choices=["corrupt", "mean", "zero"])
    p.add_argument("--n", type=int, default=128, help="examples to attribute on (default 128)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per pass (default 32)")
    p.add_argument("--steps", type=int, default=5, help="integration steps for eap-ig")
    p.add_argument("--top", type=int, default=20, help="edges to print (default 20)")
    p.add_argument("--top-n", type=parse_size, default=None,
                   help="edges to keep in the saved circuit: a count, or a fraction of the "
                   "valid edges such as 0.01 (default: --top)")
    p.add_argument("--mlp-groups", type=int, default=1,
                   help="split each MLP into this many neuron groups, nodes m{l}.n{j} "
                   "(default 1: one node per MLP)")
    p.add_argument("--seed", type=int, default=0, help="seed for the task sample")
    p.add_argument("--device", default=None, help="torch device (default cpu)")
    p.add_argument("--out", default=None, help="write the circuit as JSON to this path")
    p.set_defaults(func=_run_discover)


@contextmanager
def _phase(name: str) -> Iterator[None]:
    """Print a phase name, then its duration once it finishes."""
    print(f"{name} ...", end=" ", flush=True, file=sys.stderr)
    start = time.perf_counter()
    yield
    print(f"{time.perf_counter() - start:.2f}s", file=sys.stderr)


def _run_discover(args: argparse.Namespace) -> int:
    import ctlens

    if args.n < 1 or args.top < 1:
        raise ValueError("--n and --top must be positive")
    with _phase(f"loading {args.model}"):
        model = ctlens.load_model(args.model, device=args.device)
    with _phase(f"building task {args.task!r} ({args.n} examples)"):
        task = ctlens.tasks.load(args.task, n=args.n, seed=args.seed, tokenizer=model.tokenizer)
        data = task.discovery
    graph = ctlens.Graph.from_model(model, mlp_groups=args.mlp_groups)
    with _phase(f"attributing ({args.method}, {args.ablation} ablation)"):
        scores = ctlens.attribute(
            model, data, method=args.method, ablation=args.ablation,
            batch_size=args.batch_size, steps=args.steps, progress=False, graph=graph,
        )
    graph = scores.graph
    meta = scores.metadata
    print(f"{graph!r}")
    print(f"metric {meta['metric']}: clean {meta['metric_clean']:+.3f}", end="")
    if "metric_corrupt" in meta:
        print(f", corrupt {meta['metric_corrupt']:+.3f}", end="")
    print()
    top = min(args.top, graph.n_edges)
    print(f"\ntop {top} edges by |score|:")
    print(f"  {'rank':>4}  {'edge':<28} {'score':>10}")
    for rank, (sender, receiver, value) in enumerate(scores.top(top), start=1):
        print(f"  {rank:>4}  {sender + ' -> ' + receiver:<28} {value:>+10.4f}")
    nodes = sorted(scores.node_scores().items(), key=lambda kv: -abs(kv[1]))[:10]
    print("\ntop 10 nodes by |total effect|:")
    for name, value in nodes:
        print(f"  {name:<10} {value:+.4f}")
    if args.out:
        circuit = ctlens.Circuit.from_scores(scores, top_n=args.top_n or top)
        circuit.save(args.out)
        print(f"\ncircuit of {circuit.n_edges} edges written to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ctlens`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, TypeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"ctlens {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
