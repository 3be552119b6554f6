"""Positional circuits drawn with a span axis: one column of the layered layout per span.

PEAP and circuit-tracer draw a circuit over token positions as columns; a positional ctlens
circuit (`ctlens.graph`, token spans) is drawn the same way: span ``k``'s column is the usual
layered layout (input at the bottom, heads and MLPs by layer, logits on top) shifted right,
headed by the span's name, and an edge ``(s, r, span)`` runs inside its span's column (the
sender writes, and the receiver reads, at that span's positions; attention moves information
between columns inside a head, which the figure does not draw). The traces are those of the
position-free figures (`ctlens.viz.traces`), built per column on a shifted `Layout`, with
one legend entry per class and one edge budget and colour scale for the whole figure.
`ctlens.viz.plot_circuit` hands positional circuits here, and `ctlens.viz.plot_diff` draws
its columns with `span_layouts` and `span_axes`.
"""

from __future__ import annotations

import copy

import plotly.graph_objects as go

from ctlens.viz.layout import EdgeSet, Layout, active_senders
from ctlens.viz.traces import (
    LEGEND_TITLE,
    Trace,
    budget_buttons,
    circuit_height,
    edge_hover,
    edge_traces,
    mark_legend,
    node_hover,
    node_traces,
    port_traces,
    ranked_edges_box,
    style,
)

COLUMN_GAP = 1.5
"""Empty x units between two span columns."""


def span_layouts(layout: Layout) -> list[Layout]:
    """One copy of ``layout`` per span of its graph, each shifted right by a column."""
    (x0, x1), _ = layout.axis_ranges()
    width = x1 - x0 + COLUMN_GAP
    columns = []
    for k in range(layout.graph.n_spans):
        shifted = copy.copy(layout)
        shifted.sender_x = layout.sender_x + k * width
        shifted.receiver_x = layout.receiver_x + k * width
        shifted.centre = layout.centre + k * width
        shifted.mlp_x = layout.mlp_x + k * width
        columns.append(shifted)
    return columns


def span_slice(es: EdgeSet, k: int) -> EdgeSet:
    """Span ``k`` of a positional edge set, as a position-free one (mask and scores)."""
    scores = None if es.scores is None else es.scores[..., k]
    return EdgeSet(es.graph, es.mask[..., k], scores, es.label, es.metadata)


def per_span_share(es: EdgeSet, count: int | None) -> list[int | None]:
    """How many of the figure's ``count`` strongest (edge, span) pairs fall in each span
    (``None``: no limit)."""
    n_spans = es.graph.n_spans
    if count is None or es.scores is None:
        return [None] * n_spans
    magnitude = es.scores.abs().masked_fill(~es.mask, -1.0).flatten()
    order = magnitude.argsort(descending=True, stable=True)[: min(count, es.n_edges)]
    spans = order % n_spans
    return [int((spans == k).sum()) for k in range(n_spans)]


def _one_legend_entry(traces: list[Trace]) -> list[Trace]:
    """Drop empty traces without a legend entry; keep each legend entry once (per group)."""
    kept: list[Trace] = []
    seen: set[str] = set()
    for trace in traces:
        key = str(trace.get("legendgroup") or trace.get("name"))
        if trace.get("showlegend"):
            if key in seen:
                trace = {**trace, "showlegend": False}
            seen.add(key)
        x = trace.get("x")
        if x is not None and len(x) == 0 and not trace.get("showlegend"):
            continue
        kept.append(trace)
    return kept


def span_axes(fig: go.Figure, layout: Layout, columns: list[Layout]) -> None:
    """x ticks naming each span column, dotted separators, the layer ticks on y."""
    (x0, x1), (y0, y1) = layout.axis_ranges()
    width = x1 - x0 + COLUMN_GAP
    spans = layout.graph.spans
    centres = [(x0 + x1) / 2 + k * width for k in range(len(spans))]
    yvals, ytext = layout.layer_ticks()
    fig.update_xaxes(range=[x0, x1 + (len(spans) - 1) * width], tickvals=centres,
                     ticktext=[f"<b>{name}</b>" for name in spans], showgrid=False,
                     zeroline=False)
    fig.update_yaxes(range=[y0, y1], tickvals=yvals, ticktext=ytext, showgrid=True,
                     gridcolor="#f0f0f0", zeroline=False)
    for k in range(1, len(columns)):
        x = x1 + (k - 1) * width + COLUMN_GAP / 2
        fig.add_shape(type="line", x0=x, x1=x, y0=y0, y1=y1,
                      line={"color": "#bbbbbb", "width": 1, "dash": "dot"})


def plot_span_circuit(
    es: EdgeSet, title: str | None, height: int | None, budget: int | None, labels: int
) -> go.Figure:
    """`ctlens.viz.plot_circuit` of a positional edge set: a column per span, the same
    legends, budget buttons and ranked list (pairs named with their span)."""
    layout = Layout(es.graph)
    columns = span_layouts(layout)
    budgets = per_span_share(es, budget)
    max_abs = 1.0
    if es.scores is not None and es.n_edges:
        max_abs = float(es.scores[es.mask].abs().max()) or 1.0
    edges: list[Trace] = []
    ports: list[Trace] = []
    hovers: list[Trace] = []
    nodes: list[Trace] = []
    hidden_entry: list[Trace] = []  # the legend entry of the edges beyond the budget
    for k, (column, span) in enumerate(zip(columns, es.graph.spans, strict=True)):
        part = span_slice(es, k)
        column_edges = edge_traces(column, part, max_abs, budget=budgets[k])
        hidden_entry = hidden_entry or [column_edges[-1]]
        edges += column_edges[:-1]
        ports += port_traces(column, part.mask)
        rows, cols = part.mask.nonzero(as_tuple=True)
        hovers.append(edge_hover(column, rows, cols, part.scores, prefix=f"span {span}<br>"))
        active = active_senders(column, part.mask)
        nodes += node_traces(column, [("in circuit", active, "#333333")],
                             node_hover(column, part))
    n_hidden = es.n_edges - sum(b for b in budgets if b is not None) if budget else 0
    hidden_entry[0].update(name=f"{n_hidden} weaker edges", showlegend=n_hidden > 0)
    edges = _one_legend_entry(edges + hidden_entry)
    fig = go.Figure()
    fig.add_traces([*edges, *ports, *hovers, *_one_legend_entry(nodes), *mark_legend()])
    # the ranked list goes under the drawing, below the span names, never on it
    box = ranked_edges_box(layout, es, labels, x=0.0, y=0.0, yshift=-30)
    below = 0 if box is None else 16 * (min(labels, es.n_edges) + 1) + 40
    if box is not None:
        fig.add_annotation(box)
    span_axes(fig, layout, columns)
    if es.scores is not None and budget is not None and es.n_edges > budget:
        hidden = [i for i, t in enumerate(edges) if t.get("visible") == "legendonly"]
        fig.update_layout(updatemenus=[budget_buttons(hidden, budget, es.n_edges, 1.0, 1.01)])
    if title is None:
        active = active_senders(layout, es.mask)
        title = (f"{es.label}: {es.n_edges} (edge, span) pairs between {int(active.sum()) + 1} "
                 f"nodes (heads, MLPs, input, logits), a column per span")
        if n_hidden:
            title += (f"<br><sup>the {es.n_edges - n_hidden} strongest drawn; the rest behind "
                      f"'all {es.n_edges} edges' or the legend</sup>")
    style(fig, title, (height or circuit_height(layout)) + below)
    fig.update_layout(legend_title_text=LEGEND_TITLE, margin={"t": 90, "b": 40 + below})
    return fig
