"""Building blocks shared by the circuit figures: colours, edge/node/port traces, axes, style.

Internal to `ctlens.viz`. Edges are drawn as a fixed, small set of traces: one per (colour
class, receiver class, width bin), segments ``None``-separated, plus one invisible marker
trace at the edge midpoints for hover text. Traces are plain dicts (see `scatter`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch

from ctlens.types import NodeKind
from ctlens.viz.layout import DASH, RECEIVER_CLASSES, EdgeSet, Layout, receiver_class

#: The sign convention (docs/concepts.md): score = M(edge ablated) - M(clean). A negative
#: score means ablating the edge lowers the metric, so the edge *raises* it: blue, the colour
#: figures use for "supports the metric"; a positive score (the edge lowers the metric) red.
RAISES = "#2166ac"
LOWERS = "#c0392b"
SIGN_LABEL = ("raises metric (score < 0)", "lowers metric (score > 0)")
CONVENTION = "score = M(edge ablated) − M(clean)"
LEGEND_TITLE = (f"<b>edge colour</b>: {CONVENTION}<br>"
                "<span style='font-size:10px'>faded entries are hidden: click one to show "
                "it</span><br>")
UNSCORED = "#555555"
#: the diff's colours, safe for colour-blind readers (Okabe and Ito's orange and blue)
ONLY_A = "#e69f00"
ONLY_B = "#0072b2"
BOTH = "#8c8c8c"
INACTIVE = "#d9d9d9"
#: line widths and opacities of the edge bins. Bin 0 holds the edges beyond the figure's edge
#: budget (hidden until "show all"); bins 1-3 the budget's edges by |s| / max |s| in thirds.
WIDTHS = (0.6, 1.2, 2.4, 4.2)
OPACITY = (0.3, 0.45, 0.7, 0.95)
LEGEND_BIN = 2
HIDDEN_BIN = 0
#: how many edges a circuit figure draws at first (the rest behind "show all")
EDGE_BUDGET = 40
#: how many of the strongest edges are listed, ranked, beside the circuit
EDGE_LABELS = 8
CLASS_LABEL = {"q": "q input (solid)", "k": "k input (dashed)", "v": "v input (dotted)",
               "resid": "MLP / logits input"}
CLASS_DASH = {"q": DASH[NodeKind.Q], "k": DASH[NodeKind.K], "v": DASH[NodeKind.V],
              "resid": DASH[NodeKind.MLP]}
PLOT_CONFIG: dict[str, Any] = {"displaylogo": False, "responsive": True}
#: node and port marks: (legend name, marker symbol, size, line dash or None); one legend
#: entry each, a port's drawn on the dash of the edges it receives
MARKS: tuple[tuple[str, str, int, str | None], ...] = (
    ("attention head a{l}.h{h}", "circle", 11, None),
    ("MLP m{l}", "square", 11, None),
    ("input (embeddings)", "diamond", 11, None),
    ("logits", "star", 13, None),
    ("a head's q input: solid edges", "triangle-up", 7, "solid"),
    ("a head's k input: dashed edges", "square", 6, "dash"),
    ("a head's v input: dotted edges", "diamond", 6, "dot"),
)
PORT_SYMBOL = {NodeKind.Q: "triangle-up", NodeKind.K: "square", NodeKind.V: "diamond"}

Trace = dict[str, Any]


def scatter(**props: Any) -> Trace:
    """A scatter trace as a plain dict: plotly validates it once, when it joins a figure or
    frame (a ``go.Scatter`` would be validated on creation and again when added)."""
    return {"type": "scatter", **props}


def rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def line_xy(
    layout: Layout, rows: torch.Tensor, cols: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """None-separated (NaN) polyline coordinates of the edges ``rows[k] -> cols[k]``."""
    n = len(rows)
    xs = np.full((n, 3), np.nan)
    ys = np.full((n, 3), np.nan)
    xs[:, 0] = layout.sender_x[rows].numpy()
    ys[:, 0] = layout.sender_y[rows].numpy()
    xs[:, 1] = layout.receiver_x[cols].numpy()
    ys[:, 1] = layout.receiver_y[cols].numpy()
    return xs.ravel(), ys.ravel()


def receiver_class_index(layout: Layout) -> torch.Tensor:
    """Per receiver column, the index of its class in `RECEIVER_CLASSES`."""
    order = {c: i for i, c in enumerate(RECEIVER_CLASSES)}
    return torch.tensor([order[receiver_class(k)] for k in layout.receiver_kinds])


def fmt_score(value: float | None) -> str:
    """A score with its sign and what the sign means (see `RAISES`)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.4g} ({'raises' if value <= 0 else 'lowers'} metric)"


def edge_hover(
    layout: Layout, rows: torch.Tensor, cols: torch.Tensor, scores: torch.Tensor | None,
    prefix: str = "",
) -> Trace:
    """Invisible markers at the edge midpoints carrying each edge's name and score."""
    g = layout.graph
    mx = ((layout.sender_x[rows] + layout.receiver_x[cols]) / 2).numpy()
    my = ((layout.sender_y[rows] + layout.receiver_y[cols]) / 2).numpy()
    values = scores[rows, cols].tolist() if scores is not None else [None] * len(rows)
    senders, receivers = g.senders, g.receivers
    text = [
        f"{prefix}{senders[i]} → {receivers[j]}<br>score {fmt_score(v)}"
        for i, j, v in zip(rows.tolist(), cols.tolist(), values, strict=True)
    ]
    return scatter(
        x=mx, y=my, mode="markers", text=strings(text), hoverinfo="text", name="edges",
        marker={"size": 8, "color": "rgba(0,0,0,0)"}, showlegend=False,
    )


def strings(items: list[str]) -> np.ndarray:
    """Strings as an object array: plotly stores it as is instead of checking every item."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def port_traces(layout: Layout, mask: torch.Tensor) -> list[Trace]:
    """The q, k and v ports that receive an edge of ``mask`` (one trace per kind, so the
    marker symbol is a scalar), and one trace of links from each port to its head(s)."""
    g = layout.graph
    read = mask.any(0)
    n_in = mask.sum(0)
    symbols = PORT_SYMBOL
    ports: dict[NodeKind, list[int]] = {kind: [] for kind in symbols}
    lx: list[float | None] = []
    ly: list[float | None] = []
    for j, node in enumerate(g.receiver_nodes):
        if node.kind not in symbols or not read[j]:
            continue
        ports[node.kind].append(j)
        x, y = float(layout.receiver_x[j]), float(layout.receiver_y[j])
        for row in layout.port_owner[j]:
            lx += [x, float(layout.sender_x[row]), None]
            ly += [y, float(layout.sender_y[row]), None]
    traces = [
        scatter(x=np.array(lx, dtype=float), y=np.array(ly, dtype=float), mode="lines",
                   hoverinfo="skip", showlegend=False, name="ports",
                   line={"color": "#999999", "width": 0.8}),
    ]
    for kind, cols in ports.items():
        traces.append(scatter(
            x=layout.receiver_x[cols].numpy(), y=layout.receiver_y[cols].numpy(),
            mode="markers", hoverinfo="text", name=f"{kind.value} ports", showlegend=False,
            text=strings([f"{g.receivers[j]}<br>{int(n_in[j])} incoming edge(s)" for j in cols]),
            marker={"symbol": symbols[kind], "size": 6, "color": "#666666", "line": {"width": 0}},
        ))
    return traces


def node_traces(
    layout: Layout,
    groups: Sequence[tuple[str, torch.Tensor, str]],
    hover: Mapping[int, str] | None = None,
) -> list[Trace]:
    """Sender nodes split into groups ``(name, bool[n_senders], colour)``; the rest faint.

    Heads are circles, MLPs squares, ``input`` a diamond; ``logits`` is drawn as a star in
    the colour of the first group (it is in every non-empty circuit).
    """
    g = layout.graph
    symbol = {NodeKind.INPUT: "diamond", NodeKind.HEAD: "circle", NodeKind.MLP: "square"}
    covered = torch.zeros(g.n_senders, dtype=torch.bool)
    traces: list[Trace] = []

    def trace(rows: list[int], name: str, colour: str, size: int, legend: bool,
              label_heads: bool) -> Trace:
        # heads first: the legend shows the first point's symbol
        rows = sorted(rows, key=lambda i: g.sender_nodes[i].kind is not NodeKind.HEAD)
        nodes = [g.sender_nodes[i] for i in rows]
        # a neuron group m{l}.n{j} sits in a tight band beside its layer: label it n{j};
        # a head in the circuit gets its name above-left (its ports hang below it)
        labels = [
            (n.name if label_heads else "") if n.kind is NodeKind.HEAD
            else n.name.split(".")[-1] if "." in n.name else n.name
            for n in nodes
        ]
        where = ["top left" if n.kind is NodeKind.HEAD else "middle right" for n in nodes]
        text = [
            (hover or {}).get(i, g.sender_nodes[i].name) for i in rows
        ]
        return scatter(
            x=layout.sender_x[rows].numpy(), y=layout.sender_y[rows].numpy(),
            mode="markers+text", text=strings(labels), textposition=where,
            textfont={"size": 9, "color": "#555555"}, hovertext=strings(text),
            hoverinfo="text",
            name=name, showlegend=legend,
            marker={"symbol": [symbol[n.kind] for n in nodes], "size": size, "color": colour,
                    "line": {"width": 1, "color": "white"}},
        )

    for name, members, colour in groups:
        members = members & ~covered
        covered |= members
        traces.append(trace(members.nonzero().flatten().tolist(), name, colour, 12, True,
                            True))
    rest = (~covered).nonzero().flatten().tolist()
    traces.append(trace(rest, "not in circuit", INACTIVE, 8, False, False))
    lx, ly = layout.logits_xy
    traces.append(
        scatter(
            x=[lx], y=[ly], mode="markers+text", text=["logits"], textposition="top center",
            hovertext=["logits"], hoverinfo="text", showlegend=False, name="logits",
            marker={"symbol": "star", "size": 16,
                    "color": groups[0][2] if groups else INACTIVE},
        )
    )
    return traces


def circuit_axes(fig: go.Figure, layout: Layout, row: int | None = None,
                  col: int | None = None) -> None:
    H = layout.graph.spec.n_heads
    (x0, x1), (y0, y1) = layout.axis_ranges()
    yvals, ytext = layout.layer_ticks()
    step = max(1, math.ceil(H / 16))
    xvals = [float(h) for h in range(0, H, step)] + [layout.mlp_x]
    xtext = [f"h{h}" for h in range(0, H, step)] + ["MLP"]
    kw: dict[str, Any] = {} if row is None else {"row": row, "col": col}
    fig.update_xaxes(range=[x0, x1], tickvals=xvals, ticktext=xtext, showgrid=False,
                     zeroline=False, **kw)
    fig.update_yaxes(range=[y0, y1], tickvals=yvals, ticktext=ytext, showgrid=True,
                     gridcolor="#f0f0f0", zeroline=False, **kw)


def edge_bins(values: torch.Tensor, max_abs: float, budget: int | None) -> torch.Tensor:
    """Bin per edge: `HIDDEN_BIN` beyond the ``budget`` strongest by |score|, else 1-3 by
    |score| / ``max_abs`` in thirds (the strongest edges widest and most opaque)."""
    magnitude = values.abs()
    bins = 1 + (magnitude / max_abs * 3).long().clamp(0, 2) if max_abs > 0 else (
        torch.ones(len(values), dtype=torch.long))
    if budget is not None and len(values) > budget:
        order = magnitude.argsort(descending=True, stable=True)
        bins[order[budget:]] = HIDDEN_BIN
    return bins


def edge_sign(values: torch.Tensor) -> torch.Tensor:
    """Colour slot per edge: 0 for a score <= 0 (the edge raises the metric), 1 for > 0."""
    return (values > 0).long()


def edge_traces(
    layout: Layout, es: EdgeSet, max_abs: float | None = None, all_legend: bool = False,
    budget: int | None = EDGE_BUDGET,
) -> list[Trace]:
    """A fixed list of ``2 x (4 x 4 + 1)`` line traces (per sign: receiver class x bin, then
    the sign's legend entry), then one legend entry for the edges beyond the budget.

    Always the same traces in the same order, empty ones included, so animation frames can
    replace them one for one. Bin `HIDDEN_BIN` holds the edges beyond the ``budget``
    strongest (all edges are drawn when ``budget`` is None): they start hidden
    (``visible="legendonly"``, one legend group) and show with their legend entry or a
    "show all" button. Without scores every edge is drawn grey, in the first colour slot,
    named "unscored", and nothing is hidden. Each sign has one legend entry (`legend_entry`:
    one legend group, a click hides or shows all its edges); `mark_legend` says which dash
    feeds which input. ``all_legend`` keeps entries for empty signs too (animation frames
    need a legend that does not change).
    """
    rows, cols = es.mask.nonzero(as_tuple=True)
    cls = receiver_class_index(layout)[cols]
    if es.scores is not None:
        values = es.scores[rows, cols]
        if max_abs is None:
            max_abs = float(values.abs().max()) if len(values) else 1.0
        bins = edge_bins(values, max_abs, budget)
        sign_of = edge_sign(values)
        labels, colours = SIGN_LABEL, (RAISES, LOWERS)
    else:
        bins = torch.ones(len(rows), dtype=torch.long)
        sign_of = torch.zeros(len(rows), dtype=torch.long)
        labels, colours = ("unscored", SIGN_LABEL[1]), (UNSCORED, LOWERS)
    traces: list[Trace] = []
    for sign, (label, colour) in enumerate(zip(labels, colours, strict=True)):
        visible_sign = (sign_of == sign) & (bins != HIDDEN_BIN)
        for c, cname in enumerate(RECEIVER_CLASSES):
            select_cls = (sign_of == sign) & (cls == c)
            for b in range(len(WIDTHS)):
                select = select_cls & (bins == b)
                x, y = line_xy(layout, rows[select], cols[select])
                hidden = b == HIDDEN_BIN
                traces.append(
                    scatter(
                        x=x, y=y, mode="lines", hoverinfo="skip",
                        name=f"{label} → {CLASS_LABEL[cname]}",
                        legendgroup="beyond budget" if hidden else f"sign-{sign}",
                        showlegend=False, visible="legendonly" if hidden else True,
                        line={"color": rgba(colour, OPACITY[b]), "width": WIDTHS[b],
                              "dash": CLASS_DASH[cname]},
                    )
                )
        # the sign's one legend entry (a click shows or hides all its edges); the marks
        # legend says which dash feeds which input
        traces.append(legend_entry(label, f"sign-{sign}", rgba(colour, OPACITY[LEGEND_BIN]),
                                   all_legend or bool(visible_sign.any())))
    n_hidden = int((bins == HIDDEN_BIN).sum()) if es.scores is not None else 0
    traces.append(scatter(
        x=[np.nan], y=[np.nan], mode="lines", hoverinfo="skip", legendgroup="beyond budget",
        name=f"{n_hidden} weaker edges" if n_hidden else "no edges hidden",
        showlegend=all_legend or n_hidden > 0, visible="legendonly",
        line={"color": rgba(UNSCORED, OPACITY[HIDDEN_BIN]), "width": 2},
    ))
    return traces


def legend_entry(name: str, group: str, colour: str, show: bool, width: float = 2.4) -> Trace:
    """A legend entry (a solid line swatch) for a legend group whose traces draw the edges
    and stay out of the legend; it draws nothing itself."""
    return scatter(x=[np.nan], y=[np.nan], mode="lines", hoverinfo="skip", name=name,
                   legendgroup=group, showlegend=show,
                   line={"color": colour, "width": width, "dash": "solid"})


def hidden_edge_traces(traces: list[Trace]) -> list[int]:
    """Indices (within `edge_traces`' output) of the traces hidden until "show all"."""
    return [i for i, t in enumerate(traces) if t.get("visible") == "legendonly"]


def budget_buttons(
    indices: list[int], budget: int, n_edges: int | None, x: float, y: float
) -> dict[str, Any]:
    """Two buttons, right-anchored at ``(x, y)``: draw only the ``budget`` strongest edges,
    or every edge."""
    every = f"all {n_edges} edges" if n_edges is not None else "all edges"
    return {
        "type": "buttons", "direction": "left", "x": x, "y": y, "xanchor": "right",
        "yanchor": "bottom", "showactive": True, "active": 0, "pad": {"t": 0, "r": 4},
        "font": {"size": 11},
        "buttons": [
            {"label": f"strongest {budget}", "method": "restyle",
             "args": [{"visible": "legendonly"}, indices]},
            {"label": every, "method": "restyle", "args": [{"visible": True}, indices]},
        ],
    }


def strongest_edges(layout: Layout, es: EdgeSet, k: int = EDGE_LABELS) -> list[
        tuple[str, str, float]]:
    """The ``k`` strongest edges of ``es`` by |score|: ``(sender, receiver, score)``; for a
    positional set the receiver is named with its span, ``"a1.h0.k @ subject"``."""
    cells = es.mask.nonzero()
    if es.scores is None or k < 1 or not len(cells):
        return []
    values = es.scores[es.mask]  # in the order of ``cells``
    order = values.abs().argsort(descending=True, stable=True)[:k]
    g = layout.graph

    def receiver(cell: list[int]) -> str:
        return g.receivers[cell[1]] + (f" @ {g.spans[cell[2]]}" if len(cell) == 3 else "")

    return [(g.senders[c[0]], receiver(c), v) for c, v in
            zip(cells[order].tolist(), values[order].tolist(), strict=True)]


def ranked_edges_box(
    layout: Layout, es: EdgeSet, k: int, x: float, y: float, xanchor: str = "left",
    yanchor: str = "top", yshift: int = 0,
) -> dict[str, Any] | None:
    """The ``k`` strongest edges as a ranked list, an annotation anchored at paper ``(x, y)``.

    Edge names are never written on the drawing, where they would cross edges and nodes;
    this list (placed outside the drawing by the caller) and the hover text (edge
    midpoints) name them instead.
    """
    ranked = strongest_edges(layout, es, k)
    if not ranked:
        return None
    lines = [f"{rank}. {s} → {r}  <span style='color:{RAISES if v <= 0 else LOWERS}'>"
             f"{v:+.3g}</span>" for rank, (s, r, v) in enumerate(ranked, start=1)]
    return {"text": f"<b>strongest {len(ranked)} edges</b> (score)<br>" + "<br>".join(lines),
            "xref": "paper", "yref": "paper", "x": x, "y": y, "xanchor": xanchor,
            "yanchor": yanchor, "yshift": yshift, "align": "left", "showarrow": False,
            "name": "ranked edges",
            "font": {"size": 11, "color": "#333333"}, "bgcolor": "rgba(255,255,255,0.9)",
            "bordercolor": "#dddddd", "borderwidth": 1, "borderpad": 4}


def mark_legend() -> list[Trace]:
    """One legend entry per node and port mark (the drawing's symbols), nothing drawn."""
    return [scatter(x=[np.nan, np.nan], y=[np.nan, np.nan], name=name, hoverinfo="skip",
                    mode="markers" if dash is None else "lines+markers",
                    legendgroup="marks", legendgrouptitle={"text": "<b>marks</b>"},
                    showlegend=True,
                    line={"color": "#888888", "width": 1.5, "dash": dash or "solid"},
                    marker={"symbol": symbol, "size": size,
                            "color": "#333333" if dash is None else "#666666"})
            for name, symbol, size, dash in MARKS]


def node_hover(layout: Layout, es: EdgeSet) -> dict[int, str]:
    """Hover text per sender: name, edges out/in, and the summed score of its shown edges."""
    g = layout.graph
    out_edges = es.mask.sum(1)
    in_edges = (es.mask.sum(0).float() @ layout.owner_matrix).long()
    total = (es.scores * es.mask).sum(1) if es.scores is not None else None
    text: dict[int, str] = {}
    for i, node in enumerate(g.sender_nodes):
        line = f"<b>{node.name}</b><br>{int(out_edges[i])} out, {int(in_edges[i])} in"
        if total is not None:
            line += f"<br>sum of shown out-edge scores {fmt_score(float(total[i]))}"
        text[i] = line
    return text



def circuit_height(layout: Layout) -> int:
    return int(min(1400, max(520, 70 * layout.graph.spec.n_layers + 220)))


def style(fig: go.Figure, title: str, height: int) -> None:
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left"}, height=height,
        template="plotly_white", hovermode="closest", margin={"l": 60, "r": 20, "t": 60, "b": 40},
        legend={"orientation": "v", "x": 1.01, "y": 1, "font": {"size": 11}},
    )
