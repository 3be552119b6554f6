"""Circuit figures: one circuit (`plot_circuit`) and the diff of two (`plot_diff`).

Each returns a ``plotly.graph_objects.Figure``: it shows inline in Jupyter and exports with
``fig.write_html(path, include_plotlyjs=True)`` (plotly.js inlined, works offline). They use
`ctlens.viz.layout` (where nodes sit) and `ctlens.viz.traces` (how edges and nodes are drawn).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch

from ctlens.viz.layout import (
    RECEIVER_CLASSES,
    EdgeSet,
    Layout,
    active_senders,
    as_edge_set,
    check_same_graph,
)
from ctlens.viz.positional import plot_span_circuit, plot_span_diff
from ctlens.viz.run import Run, read_run
from ctlens.viz.traces import (
    BOTH,
    CLASS_DASH,
    CLASS_LABEL,
    EDGE_BUDGET,
    EDGE_LABELS,
    LEGEND_TITLE,
    ONLY_A,
    ONLY_B,
    budget_buttons,
    circuit_axes,
    circuit_height,
    edge_hover,
    edge_labels,
    edge_traces,
    hidden_edge_traces,
    line_xy,
    node_hover,
    node_traces,
    port_traces,
    receiver_class_index,
    rgba,
    scatter,
    style,
)


def plot_circuit(
    circuit: Any,
    top: int | None = None,
    title: str | None = None,
    height: int | None = None,
    label: str | None = None,
    budget: int | None = EDGE_BUDGET,
    labels: int = EDGE_LABELS,
) -> go.Figure:
    """Draw a circuit (or the strongest edges of `EdgeScores`) on the layered layout.

    Args:
        circuit: a `ctlens.Circuit`, `ctlens.EdgeScores` or the path of a saved circuit.
        top: include only the ``top`` edges by |score| (default: every circuit edge; 200
            for ``EdgeScores``).
        title: figure title (default: what was drawn and how many edges).
        height: figure height in pixels (default grows with the number of layers).
        label: what to call the circuit in the default title (default "circuit").
        budget: how many of the strongest edges are drawn at first; the rest are hidden
            behind the "all N edges" button and their legend entry (None: draw all).
        labels: how many of the strongest edges get a text label.

    A positional circuit (token spans) is drawn with a span axis: one column of this layout
    per span, headed by its name (`ctlens.viz.positional`).

    Colour says what an edge does to the metric (score = M(edge ablated) - M(clean)): blue
    edges raise it (score < 0, ablating them lowers the metric), red edges lower it (score
    > 0), grey edges carry no score. Width and opacity grow with |score| (thirds of |score|
    / max |score|), dash says the receiver (q solid, k dashed, v dotted). Hover an edge's
    midpoint or a node for names and scores.
    """
    es = as_edge_set(circuit, top=top, label=label)
    if es.graph.positional:  # a column per span (ctlens.viz.positional)
        return plot_span_circuit(es, title, height, budget, labels)
    layout = Layout(es.graph)
    fig = go.Figure()
    edges = edge_traces(layout, es, budget=budget if es.scores is not None else None)
    fig.add_traces(edges)
    rows, cols = es.mask.nonzero(as_tuple=True)
    fig.add_traces(port_traces(layout, es.mask))
    fig.add_trace(edge_hover(layout, rows, cols, es.scores))
    fig.add_trace(edge_labels(layout, es, labels))
    active = active_senders(layout, es.mask)
    fig.add_traces(node_traces(layout, [("in circuit", active, "#333333")],
                               node_hover(layout, es)))
    circuit_axes(fig, layout)
    shown = es.n_edges
    if es.scores is not None and budget is not None and es.n_edges > budget:
        shown = budget
        fig.update_layout(updatemenus=[
            budget_buttons(hidden_edge_traces(edges), budget, es.n_edges, 1.0, 1.01)
        ])
    if title is None:
        title = f"{es.label}: {es.n_edges} edges, {int(active.sum()) + 1} components"
        if shown < es.n_edges:
            title += f"<br><sup>the {shown} strongest drawn; the rest behind 'all " \
                     f"{es.n_edges} edges' or the legend</sup>"
    style(fig, title, height or circuit_height(layout))
    fig.update_layout(legend_title_text=LEGEND_TITLE, margin={"t": 90})
    return fig


# ---------------------------------------------------------------------------- plot_diff


def _resolve_pair(
    a: Any, b: Any, steps: tuple[int, int] | None, labels: tuple[str, str] | None
) -> tuple[EdgeSet, EdgeSet]:
    """Two edge sets from two circuits/paths, or from a run directory and two steps."""
    if isinstance(a, Run) or (isinstance(a, (str, Path)) and Path(a).is_dir()):
        if b is not None:
            raise TypeError(
                "plot_diff(run_dir, steps=(s1, s2)) compares two snapshots of one run; "
                "to compare two runs pass two circuit files"
            )
        run = a if isinstance(a, Run) else read_run(a)
        s1, s2 = steps if steps is not None else (run.steps[0], run.steps[-1])
        la, lb = labels or (f"step {s1}", f"step {s2}")
        return (as_edge_set(run.circuit(s1), label=la), as_edge_set(run.circuit(s2), label=lb))
    if b is None:
        raise TypeError("plot_diff needs two circuits (or a run directory and steps=(s1, s2))")
    if steps is not None:
        raise TypeError("steps=... is only for plot_diff(run_dir, steps=(s1, s2))")
    la, lb = labels or ("a", "b")
    ea = as_edge_set(a, label=la if labels or not isinstance(a, (str, Path)) else None)
    eb = as_edge_set(b, label=lb if labels or not isinstance(b, (str, Path)) else None)
    if ea.label == eb.label:
        ea = EdgeSet(ea.graph, ea.mask, ea.scores, f"{ea.label} (a)", ea.metadata)
        eb = EdgeSet(eb.graph, eb.mask, eb.scores, f"{eb.label} (b)", eb.metadata)
    return ea, eb


def _components(layout: Layout, mask: torch.Tensor) -> torch.Tensor:
    """Bool per sender: the components a circuit uses (as `Circuit.components`, less logits)."""
    return active_senders(layout, mask)


def diff_counts(a: Any, b: Any) -> dict[str, float]:
    """Edge and component counts of two circuits: only in a, only in b, in both, Jaccards.

    Components follow `Circuit.components` (a q/k/v receiver counts as its head; ``logits``
    is a component of every non-empty circuit), so ``node_jaccard`` equals
    `Circuit.node_jaccard`.
    """
    ea, eb = as_edge_set(a), as_edge_set(b)
    graph = check_same_graph([("a", ea.graph), ("b", eb.graph)])
    layout = Layout(graph)
    return diff_mask_counts(layout, ea.mask, eb.mask)


def diff_mask_counts(layout: Layout, ma: torch.Tensor, mb: torch.Tensor) -> dict[str, float]:
    """`diff_counts` of two edge masks of ``layout``'s graph."""
    na, nb = _components(layout, ma), _components(layout, mb)
    # logits is a component of any circuit with an edge
    la, lb = int(bool(ma.any())), int(bool(mb.any()))
    edges_union = int((ma | mb).sum())
    nodes_union = int((na | nb).sum()) + max(la, lb)
    nodes_both = int((na & nb).sum()) + min(la, lb)
    return {
        "edges_a": int(ma.sum()), "edges_b": int(mb.sum()),
        "edges_only_a": int((ma & ~mb).sum()), "edges_only_b": int((mb & ~ma).sum()),
        "edges_both": int((ma & mb).sum()),
        "nodes_only_a": int((na & ~nb).sum()) + max(0, la - lb),
        "nodes_only_b": int((nb & ~na).sum()) + max(0, lb - la),
        "nodes_both": nodes_both,
        "edge_jaccard": 1.0 if edges_union == 0 else int((ma & mb).sum()) / edges_union,
        "node_jaccard": 1.0 if nodes_union == 0 else nodes_both / nodes_union,
    }


def plot_diff(
    a: Any,
    b: Any = None,
    steps: tuple[int, int] | None = None,
    labels: tuple[str, str] | None = None,
    title: str | None = None,
    height: int | None = None,
) -> go.Figure:
    """Compare two circuits on one layout: edges and nodes only in a, only in b, in both.

    Call it as ``plot_diff(circuit_a, circuit_b)`` (circuits or saved-circuit paths) or
    ``plot_diff(run_dir, steps=(s1, s2))`` (two snapshots of a run; default first and last).
    Red: only in a; green: only in b; grey: in both. The title gives the counts and the
    edge and node (component) Jaccard similarities.
    """
    ea, eb = _resolve_pair(a, b, steps, labels)
    graph = check_same_graph([(ea.label, ea.graph), (eb.label, eb.graph)])
    layout = Layout(graph)
    ma, mb = ea.mask, eb.mask
    counts = diff_mask_counts(layout, ma, mb)
    if graph.positional:  # a column per span (ctlens.viz.positional)
        return plot_span_diff(ea, eb, counts, title, height)
    scores = eb.scores if eb.scores is not None else ea.scores
    classes = [
        (f"only in {ea.label}", ma & ~mb, ONLY_A, 2.2, 0.8),
        (f"only in {eb.label}", mb & ~ma, ONLY_B, 2.2, 0.8),
        ("in both", ma & mb, BOTH, 0.9, 0.35),  # faint: the change is what the figure shows
    ]
    cls_index = receiver_class_index(layout)
    fig = go.Figure()
    for name, mask, colour, width, alpha in classes:
        rows, cols = mask.nonzero(as_tuple=True)
        cls = cls_index[cols]
        for c, cname in enumerate(RECEIVER_CLASSES):
            select = cls == c
            x, y = line_xy(layout, rows[select], cols[select])
            fig.add_trace(scatter(
                x=x, y=y, mode="lines", hoverinfo="skip", name=f"{name} → {CLASS_LABEL[cname]}",
                legendgroup=name, showlegend=bool(select.any()),
                line={"color": rgba(colour, alpha), "width": width, "dash": CLASS_DASH[cname]},
            ))
    fig.add_traces(port_traces(layout, ma | mb))
    for name, mask, *_ in classes:
        rows, cols = mask.nonzero(as_tuple=True)
        fig.add_trace(edge_hover(layout, rows, cols, scores, prefix=f"{name}<br>"))
    na, nb = _components(layout, ma), _components(layout, mb)
    fig.add_traces(node_traces(
        layout,
        [(f"nodes in both ({counts['nodes_both']})", na & nb, "#555555"),
         (f"nodes only in {ea.label} ({counts['nodes_only_a']})", na & ~nb, ONLY_A),
         (f"nodes only in {eb.label} ({counts['nodes_only_b']})", nb & ~na, ONLY_B)],
    ))
    circuit_axes(fig, layout)
    if title is None:
        title = (
            f"{ea.label} ({counts['edges_a']} edges) vs {eb.label} ({counts['edges_b']} edges): "
            f"{counts['edges_only_a']} only in {ea.label}, {counts['edges_only_b']} only in "
            f"{eb.label}, {counts['edges_both']} in both<br>"
            f"<sup>edge Jaccard {counts['edge_jaccard']:.3f} · node Jaccard "
            f"{counts['node_jaccard']:.3f} · nodes: {counts['nodes_only_a']} only in "
            f"{ea.label}, {counts['nodes_only_b']} only in {eb.label}, "
            f"{counts['nodes_both']} in both</sup>"
        )
    style(fig, title, height or circuit_height(layout))
    fig.update_layout(margin={"t": 90})
    return fig
