"""What `ctlens.tuning.CircuitTuner` accepts: its task, its graph and a fixed circuit, each
checked once when the tuner is built, with one error that says how to fix the input."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ctlens.circuit import Circuit
from ctlens.graph import Graph, require_graph_of
from ctlens.tuning.config import TuneConfig


def check_fixed_circuit(circuit: Any, config: TuneConfig, graph: Graph) -> Circuit | None:
    """``circuit`` if it can be the run's fixed circuit; else the error that says why."""
    if circuit is None:
        return None
    if not isinstance(circuit, Circuit):
        raise TypeError(f"circuit must be a ctlens.Circuit, got {type(circuit).__name__}")
    if not config.uses_circuit:
        raise ValueError(
            f"a fixed circuit is tuned inside in modes gradient, forward, both and random; "
            f"mode={config.mode.value!r} has no circuit (drop the circuit, or choose a mode)"
        )
    check_circuit_spans(circuit.graph.spans, graph.spans, "the fixed circuit")
    if circuit.graph != graph:
        raise ValueError(
            f"the fixed circuit belongs to another graph ({circuit.graph!r}) than this run's "
            f"({graph!r}); use a circuit found on this model, with the run's MLP grouping "
            f"(the circuit has mlp_groups={circuit.graph.spec.mlp_groups})"
        )
    if circuit.n_edges == 0:
        raise ValueError("the fixed circuit has no edges: nothing could be tuned inside it")
    return circuit


def check_circuit_spans(circuit_spans: tuple[str, ...], run_spans: tuple[str, ...],
                        what: str) -> None:
    """Refuse a circuit (``what``) whose token spans are not the run's, saying which side
    is positional and how to fix it (``TuneConfig.spans``, ``ctlens tune --spans``)."""
    if tuple(circuit_spans) == tuple(run_spans):
        return
    if not run_spans:
        raise ValueError(
            f"{what} is positional (spans {list(circuit_spans)}) but the run is position-free; "
            "tune with spans=True (ctlens tune --spans) on a task with those spans, or use "
            "circuit.coarsen() (each edge kept if it is kept at any span)"
        )
    if not circuit_spans:
        raise ValueError(
            f"{what} is position-free but the run is positional (spans {list(run_spans)}); "
            "give a positional circuit found on this task (ctlens.attribute(..., spans=True)), "
            "or tune without spans=True (--spans)"
        )
    raise ValueError(
        f"{what}'s spans {list(circuit_spans)} do not match the task's spans "
        f"{list(run_spans)}; use a circuit found on this task's span schema"
    )


def task_spans(task: Any, config: TuneConfig) -> tuple[str, ...]:
    """The span names a positional run (``config.spans``) scores over: the task's discovery
    data's, which its training rows (``train_data``, circuit modes: batch discovery and the
    forward masks read their labels) and, in the forward modes, its target evaluation set
    must share. Empty for a position-free run."""
    if not config.spans:
        return ()
    names = task.discovery.span_names
    if names is None:
        raise ValueError(
            "spans=True (--spans) scores per token span, but the task's discovery data has no "
            "spans; use a built-in task, a JSONL task with a 'spans' field on every line, or "
            "data built with TaskData.from_prompts(..., template=...)"
        )
    needed = []
    if config.mode.uses_circuit:
        needed.append(("training data (task.train_data)", getattr(task, "train_data", None)))
    if config.mode.masks_forward:
        target = getattr(task, "target_eval", None) or next(iter(task.evals))
        needed.append((f"target evaluation set {target!r}", task.evals[target]))
    for what, data in needed:
        got = None if data is None else data.span_names
        if got != names:
            raise ValueError(
                f"spans=True (--spans): the task's {what} "
                f"{'has no spans' if got is None else f'has spans {list(got)}'}, but its "
                f"discovery data has {list(names)}; give both the same span labels"
            )
    train = getattr(task, "train_data", None)
    if config.mode.uses_circuit and tuple(train.spans.shape) != tuple(task.train_tokens.shape):
        raise ValueError(
            f"spans=True (--spans): task.train_data.spans has shape {tuple(train.spans.shape)} "
            f"but train_tokens {tuple(task.train_tokens.shape)}; one span label per token"
        )
    return tuple(names)


def tuning_graph(model: Any, mlp_groups: int, graph: Graph | None,
                 spans: tuple[str, ...] = ()) -> Graph:
    """The run's graph: ``graph`` when the caller passed the model's graph with the run's
    MLP grouping (checked, not rebuilt; a position-free one made positional over ``spans``,
    the task's spans of a positional run), else the model's graph built here."""
    if graph is None:
        return Graph.from_model(model, mlp_groups=mlp_groups, spans=spans or None)
    if graph.spec.mlp_groups != mlp_groups:
        raise ValueError(f"graph= is {graph!r}; the run's config tunes on the model's graph "
                         f"with {mlp_groups} MLP group(s). Pass that graph, or none.")
    graph = require_graph_of(model, graph, what="graph passed as graph=")
    if graph.spans == spans:
        return graph
    if not graph.positional:  # the run's spans come from the task
        return Graph(replace(graph.spec, spans=spans))
    raise ValueError(f"graph= is positional (spans {list(graph.spans)}) but the run's spans are "
                     f"{list(spans)} (TuneConfig.spans and the task's); pass the position-free "
                     "graph, or none")


def check_task(task: Any) -> None:
    """Refuse a task without the fields the tuner reads, or with inconsistent ones."""
    missing = [name for name in ("discovery", "train_tokens", "train_target_mask",
                                 "train_attention_mask", "evals") if not hasattr(task, name)]
    if missing:
        raise TypeError(
            f"the task lacks {missing}; pass a ctlens.tasks.Task or an object with the "
            "fields of ctlens.tuning.TuneTask"
        )
    shape = task.train_tokens.shape
    for name in ("train_target_mask", "train_attention_mask"):
        if getattr(task, name).shape != shape:
            raise ValueError(f"task.{name} must have the shape of train_tokens {tuple(shape)}")
    if not task.evals:
        raise ValueError("the task has no evaluation sets (task.evals is empty)")
    target = getattr(task, "target_eval", None)
    if target is not None and target not in task.evals:
        raise ValueError(f"task.target_eval {target!r} is not one of {list(task.evals)}")
    if int(task.train_target_mask[:, 1:].sum()) == 0:
        raise ValueError("task.train_target_mask selects no target tokens (column 0 never counts)")


def check_lengths(task: Any, n_ctx: int) -> None:
    """Refuse token rows longer than the model's context (the embedding would fail)."""
    for name in ("train_tokens", "general_tokens"):
        tokens = getattr(task, name, None)
        if tokens is not None and tokens.shape[1] > n_ctx:
            raise ValueError(
                f"task.{name} rows are {tokens.shape[1]} tokens long but the model's context "
                f"is {n_ctx} tokens; shorten or split the rows (for a JSONL task, its prompts)"
            )
