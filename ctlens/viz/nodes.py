"""`plot_node_scores`: a layer x head heatmap of node scores, MLPs as the last column."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go

from ctlens.graph import Graph
from ctlens.viz.traces import style

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
    ``input``). The colours follow the edge figures: a node score is M(node ablated) -
    M(clean), so blue (< 0) nodes raise the metric, red (> 0) lower it, white is zero; the
    ``input`` score is in the title.
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
        z=z, x=xlabels, y=ylabels, customdata=text, colorscale="RdBu_r", zmid=0.0,
        zmin=-bound or -1.0, zmax=bound or 1.0, xgap=1, ygap=1,
        hovertemplate="%{customdata}: %{z:+.4g}<extra></extra>",
        colorbar={"title": {"text": "score<br>blue: raises M<br>red: lowers M",
                            "font": {"size": 12}}},
    )
    if z.size <= 400:
        heat.update(texttemplate="%{z:.3g}", textfont={"size": 13})
    fig = go.Figure(heat)
    if title is None:
        label = "input" in table and f" · input {table['input']:+.4g}" or ""
        title = f"node scores: {what}{label}"
    fig.update_xaxes(side="bottom", showgrid=False, title_text="head (MLP: the layer's MLP)",
                     tickfont={"size": 12})
    fig.update_yaxes(showgrid=False, title_text="layer", tickfont={"size": 12})
    style(fig, title, height or int(min(900, max(320, 44 * n_layers + 180))))
    return fig
