"""Faithfulness (`faithfulness`, `faithfulness_curve`): how much of the task a circuit keeps.

It uses the forward masks of `ctlens.masking.forward`: per batch, one plain forward
(M_full), one masked forward per circuit, and one with the empty circuit (M_empty);
faithfulness = (M_circuit - M_empty) / (M_full - M_empty) with every M the mean metric over
the dataset. The curve uses MIB's grid (0.1 ... 100 % of valid edges, top-N by |score|,
each fraction made a count by the one rule of every circuit size,
`ctlens.sizes.fraction_edges`: rounded to the nearest, at least 1) and MIB's areas: with
x the fraction of edges and f the faithfulness at each grid point, CPR = sum of trapezoids
``(x_{i+1} - x_i) (f_i + f_{i+1}) / 2`` and CMD = the same over ``|1 - f|``. The integration
starts at the first grid point (0.001), not at 0, exactly as MIB's evaluation does; x is
not rescaled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ctlens.bridge.hooks import eval_mode, model_device
from ctlens.circuit import Circuit
from ctlens.data import TaskData
from ctlens.graph import Graph
from ctlens.masking.forward import EdgeMask, circuit_graph
from ctlens.reference import resolve_reference
from ctlens.sizes import fraction_edges
from ctlens.types import Ablation

MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""MIB's circuit-size grid, as fractions of the valid edges (0.1 % ... 100 %)."""


@dataclass(frozen=True)
class FaithfulnessResult:
    """The result of `faithfulness`.

    ``faithfulness`` is ``(metric_circuit - metric_empty) / (metric_full - metric_empty)``;
    each metric is the mean over all examples. Never NaN: when ``metric_full`` and
    ``metric_empty`` agree, `faithfulness` raises instead (the error says why).
    """

    faithfulness: float
    metric_circuit: float
    metric_full: float
    metric_empty: float
    n_edges: int
    n_total_edges: int
    n_examples: int
    ablation: str


@dataclass(frozen=True)
class FaithfulnessCurve:
    """The result of `faithfulness_curve`.

    ``fractions[i]`` of the valid edges (``n_edges[i]`` edges) give ``faithfulness[i]`` and
    raw ``metrics[i]``. ``cpr`` (area under the curve, higher is better) and ``cmd`` (area
    of ``|1 - faithfulness|``, lower is better) use MIB's trapezoid rule over the fraction of
    edges (module docstring).
    """

    fractions: tuple[float, ...]
    n_edges: tuple[int, ...]
    faithfulness: tuple[float, ...]
    metrics: tuple[float, ...]
    metric_full: float
    metric_empty: float
    cpr: float
    cmd: float
    ablation: str
    n_examples: int
    selection: dict[str, Any] = field(default_factory=dict)


def _check_separates(full: float, empty: float, ablation: Ablation, n_examples: int) -> None:
    """Refuse a faithfulness whose denominator ``M_full - M_empty`` is zero.

    Equal up to a relative 1e-6 (metrics are fp32 means) counts as zero: the ratio would be
    NaN or rounding noise blown up, and either way it says nothing about the circuit.
    """
    if abs(full - empty) > 1e-6 * max(1.0, abs(full), abs(empty)):
        return
    raise ValueError(
        f"faithfulness is undefined on this data: the full model and the empty circuit give "
        f"the same metric (M_full = {full:.6g}, M_empty = {empty:.6g}; {ablation.value} "
        f"ablation, {n_examples} examples), so (M_circuit - M_empty) / (M_full - M_empty) "
        "divides by zero. The task does not separate the model from its fully ablated "
        "version here: check that the model solves the task and that the reference changes "
        "the answer (corrupt prompts that differ from the clean ones, or another ablation)"
    )


def _normalize(value: float, full: float, empty: float) -> float:
    return (value - empty) / (full - empty)


def _evaluate(
    model: Any,
    data: TaskData,
    graph: Graph,
    circuits: Sequence[Circuit],
    ablation: Ablation,
    reference: TaskData | torch.Tensor | None,
    batch_size: int | None,
) -> tuple[float, list[float]]:
    """Mean metric of the unmasked model and of each circuit (of ``graph``, the model's,
    checked by the caller), over ``data`` in batches.

    One set of hooks serves all circuits: per batch, one plain forward, (corrupt) one
    reference forward, then one masked forward per circuit with its precomputed plan. Under
    corrupt ablation the empty circuit is the corrupt run itself (every receiver reads the
    corrupt senders plus the same biases), so its metric comes from the reference forward;
    `tests/test_masking.py` checks that identity on the masked forward.
    """
    if not isinstance(data, TaskData):
        raise TypeError(f"data must be a ctlens.TaskData, got {type(data).__name__}")
    if graph.positional:  # each (edge, span) pair is patched at its span's positions
        graph.check_spans(data.span_names, "the task data")
    data.check_vocab(model.cfg.d_vocab)
    data.check_context(getattr(model.cfg, "n_ctx", None))
    device = model_device(model)
    full_total = 0.0
    totals = [0.0] * len(circuits)
    with eval_mode(model), torch.no_grad():
        corrupt, means = resolve_reference(model, graph, data, ablation, reference, batch_size)
        mask = EdgeMask(model, circuits[0], ablation, graph)
        if means is not None:
            mask.set_means(means)
        plans = [mask.plan(c) for c in circuits]
        offset = 0
        with model.hooks(fwd_hooks=mask.hooks()):
            for batch in data.batches(batch_size):
                rows = slice(offset, offset + len(batch))
                offset += len(batch)
                batch = batch.trimmed().to(device)
                with mask.paused():
                    full_logits = model(batch.clean)
                full_total += float(batch.metric_values(full_logits, full_logits).sum())
                if graph.positional:
                    mask.set_spans(batch.spans)
                ref_logits = None
                if corrupt is not None:
                    tokens = corrupt[rows, : batch.clean.shape[1]].to(device)
                    ref_logits = mask.set_reference(tokens)
                for k, plan in enumerate(plans):
                    if ref_logits is not None and plan.circuit.n_edges == 0:
                        logits = ref_logits  # every edge ablated = the corrupt run itself
                    else:
                        mask.use(plan)
                        logits = model(batch.clean)
                    totals[k] += float(batch.metric_values(logits, full_logits).sum())
    n = len(data)
    return full_total / n, [t / n for t in totals]


def faithfulness(
    model: Any,
    data: TaskData,
    circuit: Circuit,
    ablation: str | Ablation = "corrupt",
    reference: TaskData | torch.Tensor | None = None,
    batch_size: int | None = 32,
) -> FaithfulnessResult:
    """Run ``data`` with every edge outside ``circuit`` ablated exactly; compare to full/empty.

    Args:
        model: a bridge from `ctlens.load_model`.
        data: the task examples and metric.
        circuit: the circuit to keep.
        ablation: ``"corrupt"`` (the paired corrupt prompts, or ``reference`` token ids of
            the same shape as ``data.clean``), ``"mean"`` (means over the clean prompts, or
            over ``reference``: a `TaskData`, token ids or precomputed means) or ``"zero"``.
        reference: see ``ablation`` (the same meaning as in `ctlens.attribute`).
        batch_size: examples per forward pass (``None``: all at once).

    Returns:
        A frozen `FaithfulnessResult`. Runs in eval mode without gradients and restores
        every module's own mode; the model is left unchanged.

    Raises:
        ValueError: when the full model and the empty circuit give the same metric on
            ``data`` (up to a relative 1e-6): faithfulness would divide by zero, because the
            task does not separate the model from its fully ablated version on this data.
    """
    ablation = Ablation.parse(ablation)
    graph = circuit_graph(model, circuit)
    empty = Circuit.empty(graph)
    full, (m_circuit, m_empty) = _evaluate(
        model, data, graph, [circuit, empty], ablation, reference, batch_size
    )
    _check_separates(full, m_empty, ablation, len(data))
    value = _normalize(m_circuit, full, m_empty)
    return FaithfulnessResult(
        faithfulness=value,
        metric_circuit=m_circuit,
        metric_full=full,
        metric_empty=m_empty,
        n_edges=circuit.n_edges,
        n_total_edges=graph.n_edges,
        n_examples=len(data),
        ablation=ablation.value,
    )


def faithfulness_curve(
    model: Any,
    data: TaskData,
    scores: Any,
    sizes: Sequence[float] | None = None,
    ablation: str | Ablation = "corrupt",
    reference: TaskData | torch.Tensor | None = None,
    batch_size: int | None = 32,
    method: str = "top_n",
    prune: bool = False,
) -> FaithfulnessCurve:
    """Faithfulness of the top-|score| circuits over a grid of sizes, with CPR and CMD.

    Args:
        model: a bridge from `ctlens.load_model`.
        data: the task examples and metric.
        scores: `ctlens.EdgeScores` of this model.
        sizes: increasing fractions of the valid edges in (0, 1]; default MIB's grid
            `MIB_FRACTIONS` (0.1 % ... 100 %). Each gives ``fraction_edges(f, n_edges)``
            edges (``f * n_edges`` rounded to the nearest count, at least one).
        method: ``"top_n"`` (default) or ``"greedy"`` (see `Circuit.from_scores`).
        prune: prune each circuit (`Circuit.from_scores`).
        ablation: ``"corrupt"``, ``"mean"`` or ``"zero"``, as in `faithfulness`.
        reference: overrides the default reference, as in `faithfulness`.
        batch_size: examples per forward pass (``None``: all at once).

    Returns:
        A frozen `FaithfulnessCurve`.

    Raises:
        ValueError: when the full model and the empty circuit agree, as in `faithfulness`.
    """
    ablation = Ablation.parse(ablation)
    graph = getattr(scores, "graph", None)
    if not (isinstance(graph, Graph) and graph.belongs_to(model)):
        raise ValueError(
            "scores must be ctlens.EdgeScores computed on this model (their graph differs or "
            "they are not EdgeScores)"
        )
    fractions = tuple(float(f) for f in (MIB_FRACTIONS if sizes is None else sizes))
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"sizes must be fractions of the edges in (0, 1], got {fractions}")
    if any(b <= a for a, b in zip(fractions, fractions[1:], strict=False)):
        raise ValueError(f"sizes must be strictly increasing, got {fractions}")
    if method not in ("top_n", "greedy"):
        raise ValueError(f"method must be 'top_n' or 'greedy', got {method!r}")
    counts = tuple(fraction_edges(f, graph.n_edges) for f in fractions)
    circuits = [Circuit.from_scores(scores, method, top_n=n, prune=prune) for n in counts]
    empty = Circuit.empty(graph)
    full, metrics = _evaluate(model, data, graph, [*circuits, empty], ablation, reference,
                              batch_size)
    m_empty = metrics.pop()
    _check_separates(full, m_empty, ablation, len(data))
    faith = tuple(_normalize(m, full, m_empty) for m in metrics)
    cpr, cmd = curve_areas(fractions, faith)
    return FaithfulnessCurve(
        fractions=fractions,
        n_edges=tuple(c.n_edges for c in circuits),
        faithfulness=faith,
        metrics=tuple(metrics),
        metric_full=full,
        metric_empty=m_empty,
        cpr=cpr,
        cmd=cmd,
        ablation=ablation.value,
        n_examples=len(data),
        selection={"method": method, "prune": prune},
    )


def curve_areas(fractions: Sequence[float], faith: Sequence[float]) -> tuple[float, float]:
    """MIB's CPR and CMD: trapezoid areas of ``f`` and ``|1 - f|`` over the edge fractions."""
    if len(fractions) != len(faith):
        raise ValueError("fractions and faithfulness values must have the same length")
    cpr = cmd = 0.0
    for i in range(len(fractions) - 1):
        width = fractions[i + 1] - fractions[i]
        cpr += width * (faith[i] + faith[i + 1]) / 2
        cmd += width * (abs(1 - faith[i]) + abs(1 - faith[i + 1])) / 2
    return cpr, cmd



__all__ = [
    "MIB_FRACTIONS",
    "FaithfulnessCurve",
    "FaithfulnessResult",
    "curve_areas",
    "faithfulness",
    "faithfulness_curve",
]
