"""The four figures: a circuit, the diff of two circuits, a run's evolution, node scores.

Each returns a ``plotly.graph_objects.Figure``: it shows inline in Jupyter and exports with
``fig.write_html(path, include_plotlyjs=True)`` (plotly.js inlined, works offline). Circuit
figures use `ctlens.viz.layout` (see its docstring for where nodes sit) and draw edges as a
fixed, small set of traces: one per (colour class, receiver class, width bin), segments
``None``-separated, plus one invisible marker trace at the edge midpoints for hover text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ctlens.graph import Graph
from ctlens.types import NodeKind
from ctlens.viz.layout import (
    DASH,
    RECEIVER_CLASSES,
    EdgeSet,
    Layout,
    active_senders,
    as_edge_set,
    check_same_graph,
    receiver_class,
)
from ctlens.viz.run import Run, read_run

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
_CLASS_DASH = {"q": DASH[NodeKind.Q], "k": DASH[NodeKind.K], "v": DASH[NodeKind.V],
               "resid": DASH[NodeKind.MLP]}
PLOT_CONFIG: dict[str, Any] = {"displaylogo": False, "responsive": True}


# ---------------------------------------------------------------------------- helpers

Trace = dict[str, Any]


def scatter(**props: Any) -> Trace:
    """A scatter trace as a plain dict: plotly validates it once, when it joins a figure or
    frame (a ``go.Scatter`` would be validated on creation and again when added)."""
    return {"type": "scatter", **props}


def _rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _line_xy(
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


def _receiver_class_index(layout: Layout) -> torch.Tensor:
    """Per receiver column, the index of its class in `RECEIVER_CLASSES`."""
    order = {c: i for i, c in enumerate(RECEIVER_CLASSES)}
    return torch.tensor([order[receiver_class(k)] for k in layout.receiver_kinds])


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.4g}"


def _edge_hover(
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
        f"{prefix}{senders[i]} → {receivers[j]}<br>score {_fmt(v)}"
        for i, j, v in zip(rows.tolist(), cols.tolist(), values, strict=True)
    ]
    return scatter(
        x=mx, y=my, mode="markers", text=_strings(text), hoverinfo="text", name="edges",
        marker={"size": 8, "color": "rgba(0,0,0,0)"}, showlegend=False,
    )


def _strings(items: list[str]) -> np.ndarray:
    """Strings as an object array: plotly stores it as is instead of checking every item."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _port_traces(layout: Layout, mask: torch.Tensor) -> list[Trace]:
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
            text=_strings([f"{g.receivers[j]}<br>{int(n_in[j])} incoming edge(s)" for j in cols]),
            marker={"symbol": symbols[kind], "size": 6, "color": "#666666", "line": {"width": 0}},
        ))
    return traces


def _node_traces(
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
            mode="markers+text", text=_strings(labels), textposition="middle right",
            textfont={"size": 10, "color": "#333333"}, hovertext=_strings(text),
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


def _circuit_axes(fig: go.Figure, layout: Layout, row: int | None = None,
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


def _score_bins(values: torch.Tensor, max_abs: float) -> torch.Tensor:
    if max_abs <= 0:
        return torch.zeros(len(values), dtype=torch.long)
    return (values.abs() / max_abs * len(WIDTHS)).long().clamp(0, len(WIDTHS) - 1)


def _edge_traces(
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
    cls = _receiver_class_index(layout)[cols]
    if es.scores is not None:
        values = es.scores[rows, cols]
        if max_abs is None:
            max_abs = float(values.abs().max()) if len(values) else 1.0
        bins = _score_bins(values, max_abs)
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
                x, y = _line_xy(layout, rows[select], cols[select])
                legend = b == LEGEND_BIN and (all_legend or bool(select_cls.any()))
                if legend and not len(x):
                    x, y = np.array([np.nan]), np.array([np.nan])  # keeps the legend entry
                traces.append(
                    scatter(
                        x=x, y=y, mode="lines", hoverinfo="skip",
                        name=f"{label} → {CLASS_LABEL[cname]}",
                        legendgroup=f"{sign}-{cname}", showlegend=legend,
                        line={"color": _rgba(colour, OPACITY[b]), "width": WIDTHS[b],
                              "dash": _CLASS_DASH[cname]},
                    )
                )
    return traces


def _node_hover(layout: Layout, es: EdgeSet) -> dict[int, str]:
    """Hover text per sender: name, edges out/in, and the summed score of its shown edges."""
    g = layout.graph
    out_edges = es.mask.sum(1)
    in_edges = (es.mask.sum(0).float() @ layout.owner_matrix).long()
    total = (es.scores * es.mask).sum(1) if es.scores is not None else None
    text: dict[int, str] = {}
    for i, node in enumerate(g.sender_nodes):
        line = f"<b>{node.name}</b><br>{int(out_edges[i])} out, {int(in_edges[i])} in"
        if total is not None:
            line += f"<br>sum of shown out-edge scores {_fmt(float(total[i]))}"
        text[i] = line
    return text


# ---------------------------------------------------------------------------- plot_circuit


def plot_circuit(
    circuit: Any,
    top: int | None = None,
    title: str | None = None,
    height: int | None = None,
    label: str | None = None,
) -> go.Figure:
    """Draw a circuit (or the strongest edges of `EdgeScores`) on the layered layout.

    Args:
        circuit: a `ctlens.Circuit`, `ctlens.EdgeScores` or the path of a saved circuit.
        top: draw only the ``top`` edges by |score| (default: every circuit edge; 200 for
            ``EdgeScores``).
        title: figure title (default: what was drawn and how many edges).
        height: figure height in pixels (default grows with the number of layers).
        label: what to call the circuit in the default title (default "circuit").

    Edge width and opacity grow with |score| (four bins of |score| / max |score|), colour is
    the sign (blue positive, red negative, grey without scores), dash the receiver (q solid,
    k dashed, v dotted). Hover an edge's midpoint or a node for names and scores.
    """
    es = as_edge_set(circuit, top=top, label=label)
    layout = Layout(es.graph)
    fig = go.Figure()
    fig.add_traces(_edge_traces(layout, es))
    rows, cols = es.mask.nonzero(as_tuple=True)
    fig.add_traces(_port_traces(layout, es.mask))
    fig.add_trace(_edge_hover(layout, rows, cols, es.scores))
    active = active_senders(layout, es.mask)
    fig.add_traces(_node_traces(layout, [("in circuit", active, "#333333")],
                                _node_hover(layout, es)))
    _circuit_axes(fig, layout)
    if title is None:
        title = f"{es.label}: {es.n_edges} edges, {int(active.sum()) + 1} components"
    _style(fig, title, height or _circuit_height(layout))
    return fig


def _circuit_height(layout: Layout) -> int:
    return int(min(1400, max(520, 70 * layout.graph.spec.n_layers + 220)))


def _style(fig: go.Figure, title: str, height: int) -> None:
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left"}, height=height,
        template="plotly_white", hovermode="closest", margin={"l": 60, "r": 20, "t": 60, "b": 40},
        legend={"orientation": "v", "x": 1.01, "y": 1, "font": {"size": 11}},
    )


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
    return _diff_counts(layout, ea.mask, eb.mask)


def _diff_counts(layout: Layout, ma: torch.Tensor, mb: torch.Tensor) -> dict[str, float]:
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
    counts = _diff_counts(layout, ma, mb)
    scores = eb.scores if eb.scores is not None else ea.scores
    classes = [
        (f"only in {ea.label}", ma & ~mb, ONLY_A, 2.2),
        (f"only in {eb.label}", mb & ~ma, ONLY_B, 2.2),
        ("in both", ma & mb, BOTH, 1.2),
    ]
    cls_index = _receiver_class_index(layout)
    fig = go.Figure()
    for name, mask, colour, width in classes:
        rows, cols = mask.nonzero(as_tuple=True)
        cls = cls_index[cols]
        for c, cname in enumerate(RECEIVER_CLASSES):
            select = cls == c
            x, y = _line_xy(layout, rows[select], cols[select])
            fig.add_trace(scatter(
                x=x, y=y, mode="lines", hoverinfo="skip", name=f"{name} → {CLASS_LABEL[cname]}",
                legendgroup=name, showlegend=bool(select.any()),
                line={"color": _rgba(colour, 0.75), "width": width, "dash": _CLASS_DASH[cname]},
            ))
    fig.add_traces(_port_traces(layout, ma | mb))
    for name, mask, _, _ in classes:
        rows, cols = mask.nonzero(as_tuple=True)
        fig.add_trace(_edge_hover(layout, rows, cols, scores, prefix=f"{name}<br>"))
    na, nb = _components(layout, ma), _components(layout, mb)
    fig.add_traces(_node_traces(
        layout,
        [(f"nodes in both ({counts['nodes_both']})", na & nb, "#555555"),
         (f"nodes only in {ea.label} ({counts['nodes_only_a']})", na & ~nb, ONLY_A),
         (f"nodes only in {eb.label} ({counts['nodes_only_b']})", nb & ~na, ONLY_B)],
    ))
    _circuit_axes(fig, layout)
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
    _style(fig, title, height or _circuit_height(layout))
    fig.update_layout(margin={"t": 90})
    return fig


# ---------------------------------------------------------------------------- plot_evolution


def jaccard_series(run: Run) -> dict[str, tuple[list[int], list[float]]]:
    """Edge and node Jaccard of every snapshot to the first and to the previous snapshot."""
    layout = Layout(run.graph)
    steps = run.steps
    masks = [run.circuits[s].mask for s in steps]
    out: dict[str, tuple[list[int], list[float]]] = {
        "edge Jaccard to first": (steps, []), "node Jaccard to first": (steps, []),
        "edge Jaccard to previous": (steps, []), "node Jaccard to previous": (steps, []),
    }
    for k, mask in enumerate(masks):
        first = _diff_counts(layout, masks[0], mask)
        prev = _diff_counts(layout, masks[max(0, k - 1)], mask)
        out["edge Jaccard to first"][1].append(first["edge_jaccard"])
        out["node Jaccard to first"][1].append(first["node_jaccard"])
        out["edge Jaccard to previous"][1].append(prev["edge_jaccard"])
        out["node Jaccard to previous"][1].append(prev["node_jaccard"])
    return out


def _frame_steps(steps: list[int], max_frames: int) -> list[int]:
    """At most ``max_frames`` steps, evenly spread, always with the first and the last."""
    if max_frames < 2:
        raise ValueError(f"max_frames must be at least 2, got {max_frames}")
    if len(steps) <= max_frames:
        return steps
    picks = np.linspace(0, len(steps) - 1, max_frames).round().astype(int)
    return [steps[i] for i in sorted(set(picks.tolist()))]


_LINE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")


def plot_evolution(
    run_dir: str | Path | Run,
    top: int | None = 300,
    max_frames: int = 40,
    height: int | None = None,
) -> go.Figure:
    """A run's circuit over time (slider and play button) above its metric curves.

    The top panel shows one circuit snapshot per slider position (its ``top`` edges by
    |score|, at most ``max_frames`` snapshots evenly spread, edge widths on one scale for
    all frames). Below: target metric, general loss, circuit size, node/edge Jaccard to the
    first and the previous snapshot, fraction of parameters moved, and the other tasks'
    metrics; a dotted line marks the step on show.
    """
    run = run_dir if isinstance(run_dir, Run) else read_run(run_dir)
    layout = Layout(run.graph)
    steps = _frame_steps(run.steps, max_frames)
    sets = {}
    for s in steps:
        es = as_edge_set(run.circuits[s], label=f"step {s}")
        sets[s] = es.strongest(top if es.scores is not None else None)
    max_abs = max(
        (float((e.scores * e.mask).abs().max()) for e in sets.values() if e.scores is not None),
        default=1.0,
    ) or 1.0
    evals = run.eval_series()
    titles = ["", "target metric", "general loss (held-out LM)", "circuit size (edges)",
              "Jaccard similarity", "fraction of parameters moved",
              "other tasks" if evals else "training loss"]
    fig = make_subplots(
        rows=4, cols=3,
        specs=[[{"colspan": 3}, None, None], [None, None, None], [{}, {}, {}], [{}, {}, {}]],
        row_heights=[0.55, 0.06, 0.195, 0.195], vertical_spacing=0.045,
        horizontal_spacing=0.07, subplot_titles=titles,
    )

    def frame_traces(step: int) -> list[Trace]:
        es = sets[step]
        rows, cols = es.mask.nonzero(as_tuple=True)
        traces = _edge_traces(layout, es, max_abs, all_legend=True)
        traces += _port_traces(layout, es.mask)
        traces.append(_edge_hover(layout, rows, cols, es.scores))
        active = active_senders(layout, es.mask)
        traces += _node_traces(layout, [("in circuit", active, "#333333")],
                               _node_hover(layout, es))
        return traces

    first = frame_traces(steps[0])
    n_circuit = len(first)
    for trace in first:
        fig.add_trace(trace, row=1, col=1)
    _circuit_axes(fig, layout, row=1, col=1)

    panels: list[tuple[int, int, dict[str, tuple[list[int], list[float]]]]] = [
        (3, 1, {"target metric": run.metric_series("target_metric")}),
        (3, 2, {"general loss": run.metric_series("general_loss")}),
        (3, 3, {"circuit edges": run.metric_series("circuit_edges")}),
        (4, 1, jaccard_series(run)),
        (4, 2, {"params moved": run.metric_series("params_moved")}),
        (4, 3, {f"eval: {k}": v for k, v in evals.items()}
         or {"train loss": run.metric_series("train_loss")}),
    ]
    for row, col, series in panels:
        for k, (name, (xs, ys)) in enumerate(series.items()):
            fig.add_trace(
                scatter(x=xs, y=ys, mode="lines+markers", name=name, legend="legend2",
                           showlegend=len(series) > 1, marker={"size": 4},
                           line={"color": _LINE_COLOURS[k % len(_LINE_COLOURS)], "width": 1.6},
                           hovertemplate=f"{name}<br>step %{{x}}: %{{y:.4g}}<extra></extra>"),
                row=row, col=col,
            )
        if row == 4:
            fig.update_xaxes(title_text="step", title_standoff=2, row=row, col=col)
    fig.update_yaxes(range=[-0.02, 1.02], row=4, col=1)

    axes = [(fig.get_subplot(r, c)) for r, c, _ in panels]

    def marker_shapes(step: int) -> list[dict[str, Any]]:
        shapes = []
        for ax in axes:
            xref = ax.xaxis.plotly_name.replace("axis", "")
            yref = ax.yaxis.plotly_name.replace("axis", "")
            shapes.append({"type": "line", "x0": step, "x1": step, "xref": xref,
                           "yref": f"{yref} domain", "y0": 0, "y1": 1,
                           "line": {"color": "#888888", "width": 1, "dash": "dot"}})
        return shapes

    def frame_title(step: int) -> str:
        es = sets[step]
        full = run.circuits[step].n_edges
        shown = f"top {es.n_edges} of {full}" if es.n_edges < full else f"{full}"
        return f"{run.info.get('model', 'model')} · {run.info.get('task', 'task')} · " \
               f"step {step}: {shown} circuit edges"

    frames = [
        go.Frame(name=str(s), data=frame_traces(s), traces=list(range(n_circuit)),
                 layout={"shapes": marker_shapes(s), "title": {"text": frame_title(s)}})
        for s in steps
    ]
    fig.frames = frames
    total_height = height or max(1100, _circuit_height(layout) + 600)
    # slider and buttons sit in the empty second row, below the circuit's tick labels
    below_circuit = fig.layout.yaxis.domain[0] - 28 / total_height
    legend2_top = fig.get_subplot(3, 3).yaxis.domain[1]
    slider = {
        "active": 0, "x": 0.08, "len": 0.9, "y": below_circuit, "yanchor": "top",
        "currentvalue": {"prefix": "snapshot at step ", "font": {"size": 12}},
        "pad": {"t": 0, "b": 0},
        "steps": [
            {"label": str(s), "method": "animate",
             "args": [[str(s)], {"mode": "immediate", "frame": {"duration": 0, "redraw": True},
                                 "transition": {"duration": 0}}]}
            for s in steps
        ],
    }
    buttons = {
        "type": "buttons", "direction": "left", "x": 0.0, "y": below_circuit, "yanchor": "top",
        "xanchor": "left", "showactive": False, "pad": {"t": 0, "r": 6},
        "buttons": [
            {"label": "▶", "method": "animate",
             "args": [None, {"frame": {"duration": 700, "redraw": True}, "fromcurrent": True,
                             "transition": {"duration": 0}}]},
            {"label": "❚❚", "method": "animate",
             "args": [[None], {"frame": {"duration": 0, "redraw": False}, "mode": "immediate"}]},
        ],
    }
    _style(fig, frame_title(steps[0]), total_height)
    fig.update_layout(
        sliders=[slider] if len(steps) > 1 else [], updatemenus=[buttons] if len(steps) > 1 else [],
        shapes=marker_shapes(steps[0]),
        legend={"x": 1.01, "y": 1.0, "yanchor": "top"},
        legend2={"x": 1.01, "y": legend2_top, "yanchor": "top", "font": {"size": 11}},
    )
    return fig


# ---------------------------------------------------------------------------- plot_node_scores

_NODE = re.compile(r"^(?:a(\d+)\.h(\d+)|m(\d+)|input)$")


def _node_score_table(scores: Any) -> tuple[dict[str, float], str]:
    """``{sender: score}`` and a description, from EdgeScores, a Circuit or a mapping."""
    from ctlens.scores import EdgeScores

    if isinstance(scores, EdgeScores):
        return scores.node_scores(), "total effect (sum of outgoing edge scores)"
    if hasattr(scores, "graph") and hasattr(scores, "mask"):
        if getattr(scores, "scores", None) is None:
            raise ValueError("this circuit has no scores; pass the EdgeScores it came from")
        dense = scores.scores * scores.mask
        names = scores.graph.senders
        return ({n: float(v) for n, v in zip(names, dense.sum(1).tolist(), strict=True)},
                "sum of the node's outgoing circuit-edge scores")
    if isinstance(scores, Mapping):
        return {str(k): float(v) for k, v in scores.items()}, "node score"
    raise TypeError(
        f"plot_node_scores takes EdgeScores, a Circuit with scores or a {{node: score}} "
        f"mapping, got {type(scores).__name__}"
    )


def plot_node_scores(
    scores: Any,
    graph: Graph | None = None,
    title: str | None = None,
    height: int | None = None,
) -> go.Figure:
    """A layer x head heatmap of node scores, with the MLP of each layer as the last column.

    ``scores`` is `EdgeScores` (uses `EdgeScores.node_scores`), a circuit with scores (sums
    its edges per sender) or a ``{node: score}`` mapping (``a{l}.h{h}``, ``m{l}``,
    ``input``). Blue is positive, red negative, white zero; the ``input`` score is in the
    title.
    """
    table, what = _node_score_table(scores)
    if graph is None:
        graph = getattr(scores, "graph", None)
    cells: dict[tuple[int, int], float] = {}
    n_layers = n_heads = 0
    for name, value in table.items():
        match = _NODE.match(name)
        if not match:
            raise ValueError(f"{name!r} is not a sender name (a{{l}}.h{{h}}, m{{l}} or input)")
        if match.group(1) is not None:
            layer, head = int(match.group(1)), int(match.group(2))
            cells[(layer, head)] = value
            n_heads = max(n_heads, head + 1)
            n_layers = max(n_layers, layer + 1)
        elif match.group(3) is not None:
            layer = int(match.group(3))
            cells[(layer, -1)] = value
            n_layers = max(n_layers, layer + 1)
    if graph is not None:
        n_layers, n_heads = graph.spec.n_layers, graph.spec.n_heads
    if n_layers == 0:
        raise ValueError("no head or MLP scores to plot")
    z = np.full((n_layers, n_heads + 1), np.nan)
    text = np.full(z.shape, "", dtype=object)
    for (layer, head), value in cells.items():
        col = n_heads if head == -1 else head
        z[layer, col] = value
        text[layer, col] = f"m{layer}" if head == -1 else f"a{layer}.h{head}"
    finite = z[np.isfinite(z)]
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    xlabels = [f"h{h}" for h in range(n_heads)] + ["MLP"]
    ylabels = [f"L{layer}" for layer in range(n_layers)]
    heat = go.Heatmap(
        z=z, x=xlabels, y=ylabels, customdata=text, colorscale="RdBu", zmid=0.0,
        zmin=-bound or -1.0, zmax=bound or 1.0, xgap=1, ygap=1,
        hovertemplate="%{customdata}: %{z:+.4g}<extra></extra>",
        colorbar={"title": {"text": "score"}},
    )
    if z.size <= 400:
        heat.update(texttemplate="%{z:.3g}", textfont={"size": 9})
    fig = go.Figure(heat)
    if title is None:
        label = "input" in table and f" · input {table['input']:+.4g}" or ""
        title = f"node scores: {what}{label}"
    fig.update_xaxes(side="bottom", showgrid=False)
    fig.update_yaxes(showgrid=False)
    _style(fig, title, height or int(min(900, max(320, 34 * n_layers + 160))))
    return fig
