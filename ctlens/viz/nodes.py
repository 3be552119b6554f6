"""`plot_node_scores`: a layer x head heatmap of node scores, MLPs as the last column."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go

from ctlens.graph import Graph
from ctlens.viz.traces import style

_NODE = re.compile(r"^(?:a(\d+)\.h(\d+)|m(\d+)(?:\.n(\d+))?|input)$")


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
        totals = dense.flatten(1).sum(1)  # a positional circuit: over receivers and spans
        return ({n: float(v) for n, v in zip(names, totals.tolist(), strict=True)},
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
    """A layer x head heatmap of node scores, with the MLP of each layer as the last column
    (on a grouped graph, one column per neuron group ``m{l}.n{j}``).

    ``scores`` is `EdgeScores` (uses `EdgeScores.node_scores`), a circuit with scores (sums
    its edges per sender) or a ``{node: score}`` mapping (``a{l}.h{h}``, ``m{l}``,
    ``input``). The colours follow the edge figures: a node score is M(node ablated) -
    M(clean), so blue (< 0) nodes raise the metric, red (> 0) lower it, white is zero; the
    ``input`` score is in the title.
    """
    table, what = _node_score_table(scores)
    if graph is None:
        graph = getattr(scores, "graph", None)
    cells: dict[tuple[int, int], float] = {}  # (layer, head); MLP group j: (layer, -1 - j)
    n_layers = n_heads = 0
    n_groups = 1
    for name, value in table.items():
        match = _NODE.match(name)
        if not match:
            raise ValueError(
                f"{name!r} is not a sender name (a{{l}}.h{{h}}, m{{l}}, m{{l}}.n{{j}} or input)"
            )
        if match.group(1) is not None:
            layer, head = int(match.group(1)), int(match.group(2))
            cells[(layer, head)] = value
            n_heads = max(n_heads, head + 1)
            n_layers = max(n_layers, layer + 1)
        elif match.group(3) is not None:
            layer = int(match.group(3))
            group = int(match.group(4) or 0)
            cells[(layer, -1 - group)] = value
            n_layers = max(n_layers, layer + 1)
            n_groups = max(n_groups, group + 1)
    if graph is not None:
        n_layers, n_heads = graph.spec.n_layers, graph.spec.n_heads
        n_groups = graph.spec.mlp_groups
    if n_layers == 0:
        raise ValueError("no head or MLP scores to plot")
    grouped = n_groups > 1 or any(".n" in name for name in table)
    z = np.full((n_layers, n_heads + n_groups), np.nan)
    text = np.full(z.shape, "", dtype=object)
    for (layer, head), value in cells.items():
        col = n_heads - 1 - head if head < 0 else head
        z[layer, col] = value
        mlp = f"m{layer}.n{-1 - head}" if grouped else f"m{layer}"
        text[layer, col] = mlp if head < 0 else f"a{layer}.h{head}"
    finite = z[np.isfinite(z)]
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    mlp_labels = [f"n{j}" for j in range(n_groups)] if grouped else ["MLP"]
    xlabels = [f"h{h}" for h in range(n_heads)] + mlp_labels
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
    axis = "head, then the MLP's neuron groups n{j}" if grouped else "head (MLP: the layer's MLP)"
    fig.update_xaxes(side="bottom", showgrid=False, title_text=axis,
                     tickfont={"size": 12})
    fig.update_yaxes(showgrid=False, title_text="layer", tickfont={"size": 12})
    style(fig, title, height or int(min(900, max(320, 44 * n_layers + 180))))
    return fig
