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

POSITIVE = "#2166ac"  # blue: ablating the edge raises the metric (score > 0)
NEGATIVE = "#b2182b"  # red: ablating the edge lowers the metric (score < 0)
UNSCORED = "#555555"
ONLY_A = "#d62728"
ONLY_B = "#2ca02c"
BOTH = "#8c8c8c"
INACTIVE = "#d9d9d9"
#: line widths and opacities of the |score| bins (bin k holds |s| / max |s| in [k/4, (k+1)/4))
WIDTHS = (0.7, 1.4, 2.6, 4.2)
OPACITY = (0.35, 0.5, 0.7, 0.9)
LEGEND_BIN = 2
CLASS_LABEL = {"q": "q input (solid)", "k": "k input (dashed)", "v": "v input (dotted)",
               "resid": "MLP / logits input"}
CLASS_DASH = {"q": DASH[NodeKind.Q], "k": DASH[NodeKind.K], "v": DASH[NodeKind.V],
               "resid": DASH[NodeKind.MLP]}
PLOT_CONFIG: dict[str, Any] = {"displaylogo": False, "responsive": True}



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
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.4g}"


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
    symbols = {NodeKind.Q: "triangle-up", NodeKind.K: "square", NodeKind.V: "diamond"}
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

    def trace(rows: list[int], name: str, colour: str, size: int, legend: bool) -> Trace:
        # heads first: the legend shows the first point's symbol
        rows = sorted(rows, key=lambda i: g.sender_nodes[i].kind is not NodeKind.HEAD)
        nodes = [g.sender_nodes[i] for i in rows]
        labels = [n.name if n.kind is not NodeKind.HEAD else "" for n in nodes]
        text = [
            (hover or {}).get(i, g.sender_nodes[i].name) for i in rows
        ]
        return scatter(
            x=layout.sender_x[rows].numpy(), y=layout.sender_y[rows].numpy(),
            mode="markers+text", text=strings(labels), textposition="middle right",
            textfont={"size": 10, "color": "#333333"}, hovertext=strings(text),
            hoverinfo="text",
            name=name, showlegend=legend,
            marker={"symbol": [symbol[n.kind] for n in nodes], "size": size, "color": colour,
                    "line": {"width": 1, "color": "white"}},
        )

    for name, members, colour in groups:
        members = members & ~covered
        covered |= members
        traces.append(trace(members.nonzero().flatten().tolist(), name, colour, 12, True))
    rest = (~covered).nonzero().flatten().tolist()
    traces.append(trace(rest, "not in circuit", INACTIVE, 8, False))
    lx, ly = layout.logits_xy
    traces.append(
        scatter(
            x=[lx], y=[ly], mode="markers+text", text=["logits"], textposition="middle right",
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


def score_bins(values: torch.Tensor, max_abs: float) -> torch.Tensor:
    if max_abs <= 0:
        return torch.zeros(len(values), dtype=torch.long)
    return (values.abs() / max_abs * len(WIDTHS)).long().clamp(0, len(WIDTHS) - 1)


def edge_traces(
    layout: Layout, es: EdgeSet, max_abs: float | None = None, all_legend: bool = False
) -> list[Trace]:
    """A fixed list of ``2 x 4 x 4`` line traces (sign x receiver class x width bin).

    Always the same traces in the same order, empty ones included, so animation frames can
    replace them one for one. Without scores every edge is drawn grey, in the "positive"
    slot, and named "unscored". Each (sign, class) has one legend entry, carried by its
    third width bin so the swatch is visible; ``all_legend`` keeps entries for empty classes
    too (animation frames need a legend that does not change).
    """
    rows, cols = es.mask.nonzero(as_tuple=True)
    cls = receiver_class_index(layout)[cols]
    if es.scores is not None:
        values = es.scores[rows, cols]
        if max_abs is None:
            max_abs = float(values.abs().max()) if len(values) else 1.0
        bins = score_bins(values, max_abs)
        negative = values < 0
    else:
        bins = torch.full((len(rows),), 1, dtype=torch.long)
        negative = torch.zeros(len(rows), dtype=torch.bool)
    traces: list[Trace] = []
    for sign, (label, colour) in enumerate(
        [("positive score", POSITIVE if es.scores is not None else UNSCORED),
         ("negative score", NEGATIVE)]
    ):
        if es.scores is None and sign == 0:
            label = "unscored"
        for c, cname in enumerate(RECEIVER_CLASSES):
            select_cls = (negative == bool(sign)) & (cls == c)
            for b in range(len(WIDTHS)):
                select = select_cls & (bins == b)
                x, y = line_xy(layout, rows[select], cols[select])
                legend = b == LEGEND_BIN and (all_legend or bool(select_cls.any()))
                if legend and not len(x):
                    x, y = np.array([np.nan]), np.array([np.nan])  # keeps the legend entry
                traces.append(
                    scatter(
                        x=x, y=y, mode="lines", hoverinfo="skip",
                        name=f"{label} → {CLASS_LABEL[cname]}",
                        legendgroup=f"{sign}-{cname}", showlegend=legend,
                        line={"color": rgba(colour, OPACITY[b]), "width": WIDTHS[b],
                              "dash": CLASS_DASH[cname]},
                    )
                )
    return traces


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
