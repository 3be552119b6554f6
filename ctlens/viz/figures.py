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
from ctlens.viz.positional import plot_span_circuit, span_axes, span_layouts
from ctlens.viz.run import Run, read_run
from ctlens.viz.traces import (
    BOTH,
    CLASS_DASH,
    CLASS_LABEL,
    EDGE_BUDGET,
    EDGE_LABELS,
    LEGEND_TITLE,
    MARKS,
    ONLY_A,
    ONLY_B,
    Trace,
    budget_buttons,
    circuit_axes,
    circuit_height,
    edge_hover,
    edge_traces,
    hidden_edge_traces,
    legend_entry,
    line_xy,
    mark_legend,
    node_hover,
    node_traces,
    port_traces,
    ranked_edges_box,
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
        labels: how many of the strongest edges are listed, ranked with their scores, in
            the margin beside the drawing (0: none). Nothing is written on the drawing.

    A positional circuit (token spans) is drawn with a span axis: one column of this layout
    per span, headed by its name (`ctlens.viz.positional`).

    Colour says what an edge does to the metric (score = M(edge ablated) - M(clean)): blue
    edges raise it (score < 0, ablating them lowers the metric), red edges lower it (score
    > 0), grey edges carry no score. Width and opacity grow with |score| (thirds of |score|
    / max |score|), dash says the receiver (q solid, k dashed, v dotted). The legend names
    every mark (heads, MLPs, input, logits, the q/k/v inputs below each head). Hover an
    edge's midpoint or a node for names and scores.
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
    active = active_senders(layout, es.mask)
    fig.add_traces(node_traces(layout, [("in circuit", active, "#333333")],
                               node_hover(layout, es)))
    fig.add_traces(mark_legend())
    # the ranked list goes under the drawing, below the head ticks, never on it
    box = ranked_edges_box(layout, es, labels, x=0.0, y=0.0, yshift=-30)
    below = 0 if box is None else 16 * (min(labels, es.n_edges) + 1) + 40
    if box is not None:
        fig.add_annotation(box)
    circuit_axes(fig, layout)
    shown = es.n_edges
    if es.scores is not None and budget is not None and es.n_edges > budget:
        shown = budget
        fig.update_layout(updatemenus=[
            budget_buttons(hidden_edge_traces(edges), budget, es.n_edges, 1.0, 1.01)
        ])
    if title is None:
        title = f"{es.label}: {es.n_edges} edges between {int(active.sum()) + 1} nodes " \
                "(heads, MLPs, input, logits)"
        if shown < es.n_edges:
            title += f"<br><sup>the {shown} strongest drawn; the rest behind 'all " \
                     f"{es.n_edges} edges' or the legend</sup>"
    style(fig, title, (height or circuit_height(layout)) + below)
    fig.update_layout(legend_title_text=LEGEND_TITLE, margin={"t": 90, "b": 40 + below})
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


def diff_pair(
    a: Any, b: Any = None, steps: tuple[int, int] | None = None,
    labels: tuple[str, str] | None = None,
) -> tuple[EdgeSet, EdgeSet]:
    """The two edge sets `plot_diff` compares (same arguments), checked to share a graph."""
    ea, eb = _resolve_pair(a, b, steps, labels)
    check_same_graph([(ea.label, ea.graph), (eb.label, eb.graph)])
    return ea, eb


#: how many of the strongest entered and left edges a diff draws at first
DIFF_BUDGET = 20


def plot_diff(
    a: Any,
    b: Any = None,
    steps: tuple[int, int] | None = None,
    labels: tuple[str, str] | None = None,
    title: str | None = None,
    height: int | None = None,
    budget: int | None = DIFF_BUDGET,
) -> go.Figure:
    """Compare two circuits on one layout: the edges that left (only in a), entered (only in
    b) and were kept (in both).

    Call it as ``plot_diff(circuit_a, circuit_b)`` (circuits or saved-circuit paths) or
    ``plot_diff(run_dir, steps=(s1, s2))`` (two snapshots of a run; default first and last).
    Orange: left; blue: entered (colours colour-blind readers can tell apart); grey: kept.
    At first only the ``budget`` strongest edges that left and that entered are drawn (by
    |score| in the circuit each belongs to; None: all); the buttons above the drawing show
    all that entered, all that left, all changes, or everything with the kept edges.
    Hovering an edge gives its score in its own circuit. The title gives the counts and the
    edge and node Jaccard similarities. Positional circuits are drawn with a column per span
    and counted in (edge, span) pairs (`ctlens.viz.positional`).
    """
    ea, eb = diff_pair(a, b, steps, labels)
    layout = Layout(ea.graph)
    ma, mb = ea.mask, eb.mask
    counts = diff_mask_counts(layout, ma, mb)
    positional = ea.graph.positional  # then a column per span (ctlens.viz.positional)
    columns = span_layouts(layout) if positional else [layout]
    spans = ea.graph.spans if positional else ("",)

    def at(tensor: torch.Tensor | None, c: int) -> torch.Tensor | None:
        """Column ``c``'s part of a (positional) mask or score tensor."""
        return tensor[..., c] if positional and tensor is not None else tensor

    a_scores = ea.scores if ea.scores is not None else eb.scores
    b_scores = eb.scores if eb.scores is not None else ea.scores
    groups = [  # (legend name, edges, colour, width, opacity, scores), one per class
        (f"left: only in {ea.label} ({counts['edges_only_a']})", ma & ~mb, ONLY_A, 2.2, 0.85,
         a_scores),
        (f"entered: only in {eb.label} ({counts['edges_only_b']})", mb & ~ma, ONLY_B, 2.2, 0.85,
         b_scores),
        (f"kept: in both ({counts['edges_both']})", ma & mb, BOTH, 0.9, 0.35, b_scores),
    ]
    fig = go.Figure()
    owner: list[int] = []  # per trace: its part (see _DIFF_PARTS), -1 for always shown
    for k, (name, mask, colour, width, alpha, scores) in enumerate(groups):
        strong = _strongest(mask, scores, budget if k < 2 else None)
        for part, edges in ((2 * k, strong), (2 * k + 1, mask & ~strong)):
            for c, (column, span) in enumerate(zip(columns, spans, strict=True)):
                traces = _class_traces(column, at(edges, c), name, colour, width, alpha,
                                       legend=part == 2 * k and c == 0)
                shown = part in _DIFF_PARTS[0][1]
                for t in traces:
                    t["visible"] = True if shown else "legendonly"
                rows, cols = at(edges, c).nonzero(as_tuple=True)  # type: ignore[union-attr]
                where = f"span {span}<br>" if positional else ""
                hover = edge_hover(column, rows, cols, at(scores, c), prefix=f"{name}<br>{where}")
                fig.add_traces([*traces, {**hover, "visible": shown}])
                owner += [part] * (len(traces) + 1)
    ports = [t for c, column in enumerate(columns) for t in port_traces(column, at(ma | mb, c))]
    nodes = []
    for c, column in enumerate(columns):  # per span: a node's edges at that span
        na, nb = _components(column, at(ma, c)), _components(column, at(mb, c))
        n = {k: "at that span" if positional else counts[k]
             for k in ("nodes_both", "nodes_only_a", "nodes_only_b")}
        nodes += [{**t, "showlegend": t.get("showlegend") and c == 0} for t in node_traces(
            column,
            [(f"nodes in both ({n['nodes_both']})", na & nb, "#555555"),
             (f"nodes only in {ea.label} ({n['nodes_only_a']})", na & ~nb, ONLY_A),
             (f"nodes only in {eb.label} ({n['nodes_only_b']})", nb & ~na, ONLY_B)],
        )]
    fig.add_traces([*ports, *nodes, *mark_legend()])
    owner += [-1] * (len(ports) + len(nodes) + len(MARKS))
    if positional:
        span_axes(fig, layout, columns)
    else:
        circuit_axes(fig, layout)
    if title is None:
        drawn = "" if budget is None else (f" · drawn at first: the {budget} strongest that "
                                           "left and that entered")
        unit = "(edge, span) pairs" if positional else "edges"
        title = (
            f"{ea.label} ({counts['edges_a']} {unit}) → {eb.label} ({counts['edges_b']} {unit}): "
            f"{counts['edges_only_a']} left, {counts['edges_only_b']} entered, "
            f"{counts['edges_both']} kept<br>"
            f"<sup>edge Jaccard {counts['edge_jaccard']:.3f} · node Jaccard "
            f"{counts['node_jaccard']:.3f}{drawn}</sup>"
        )
    style(fig, title, height or circuit_height(layout))
    fig.update_layout(margin={"t": 120}, updatemenus=[_diff_filter(fig, owner)],
                      legend_title_text="<b>edges</b> (a faded entry is hidden: click to "
                      "show it)<br>")
    return fig


#: the diff's filter buttons: label and the parts shown (2k: the strongest of class k, 2k+1
#: the rest; classes left, entered, kept)
_DIFF_PARTS: tuple[tuple[str, set[int]], ...] = (
    ("strongest changes", {0, 2}), ("all entered", {2, 3}), ("all left", {0, 1}),
    ("all changes", {0, 1, 2, 3}), ("with kept edges", {0, 1, 2, 3, 4, 5}),
)


def _strongest(mask: torch.Tensor, scores: torch.Tensor | None, k: int | None) -> torch.Tensor:
    """The ``k`` edges of ``mask`` with the largest |score| (all of them without a budget
    or scores)."""
    if k is None or scores is None or int(mask.sum()) <= k:
        return mask.clone()
    flat = scores.abs().masked_fill(~mask, -1.0).flatten()
    out = torch.zeros_like(flat, dtype=torch.bool)
    out[flat.topk(k).indices] = True
    return out.view_as(mask)


def _class_traces(layout: Layout, mask: torch.Tensor, name: str, colour: str, width: float,
                  alpha: float, legend: bool) -> list[Trace]:
    """One line trace per receiver class for the edges of ``mask``, in one legend group,
    and (when ``legend``) the group's entry; `mark_legend` gives the dashes."""
    rows, cols = mask.nonzero(as_tuple=True)
    cls = receiver_class_index(layout)[cols]
    traces = []
    for c, cname in enumerate(RECEIVER_CLASSES):
        x, y = line_xy(layout, rows[cls == c], cols[cls == c])
        traces.append(scatter(
            x=x, y=y, mode="lines", hoverinfo="skip", name=f"{name} → {CLASS_LABEL[cname]}",
            legendgroup=name, showlegend=False,
            line={"color": rgba(colour, alpha), "width": width, "dash": CLASS_DASH[cname]},
        ))
    if legend:
        traces.append(legend_entry(name, name, rgba(colour, alpha), True, width))
    return traces


def _diff_filter(fig: go.Figure, owner: list[int]) -> dict[str, Any]:
    """Buttons showing a choice of parts (`_DIFF_PARTS`); ``owner[i]`` is trace ``i``'s
    part, or -1 (always shown). An edge trace left out is "legendonly" (its legend entry
    stays, faded); a hover trace is hidden outright, so hidden edges do not answer the
    mouse."""
    hover = {i for i, t in enumerate(fig.data) if t.name == "edges"}

    def showing(parts: set[int]) -> dict[str, Any]:
        return {"visible": [True if k == -1 or k in parts else (False if i in hover
                                                                else "legendonly")
                            for i, k in enumerate(owner)]}

    return {
        "type": "buttons", "direction": "left", "x": 0.0, "y": 1.0, "xanchor": "left",
        "yanchor": "bottom", "showactive": True, "active": 0, "pad": {"t": 0, "b": 6},
        "font": {"size": 11},
        "buttons": [{"label": label, "method": "restyle", "args": [showing(parts)]}
                    for label, parts in _DIFF_PARTS],
    }
