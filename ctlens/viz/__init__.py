"""Plotly figures of circuits, circuit diffs and tuning runs, and an offline HTML report.

- `plot_circuit` draws a `Circuit` (or the top edges of `EdgeScores`) on a layered layout:
  ``input`` at the bottom, one row of heads per layer with the layer's MLP in a column to
  the right, ``logits`` at the top. Edges end at q/k/v ports below each head (q left, k
  centre, v right; dash q solid, k dashed, v dotted); width is |score|, colour the sign.
  The legend names every mark; edge names are listed beside the drawing, never on it.
- `plot_diff` puts two circuits on that layout: the edges that left (only in a, orange),
  entered (only in b, blue) and were kept (grey), the strongest changes first with filter
  buttons for the rest, counts and Jaccard similarities in the title.
- `plot_evolution` shows a run's circuit snapshots on a slider above its metric curves.
- `plot_node_scores` is a layer x head heatmap (plus an MLP column) of node scores.
- `write_report` writes ``RUN_DIR/report.html``: all of the above plus config and metrics,
  plotly.js inlined once, no network access needed. `read_run` reads a run directory
  (docs/run-format.md) and says exactly what is wrong with a malformed one.

Figures are plain ``plotly.graph_objects.Figure`` objects: they display inline in Jupyter
and ``fig.write_html(path)`` exports them (plotly.js inlined by default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ctlens._lazy import lazy_exports

if TYPE_CHECKING:  # what the lazy table serves, for type checkers and the API docs
    from ctlens.viz.evolution import jaccard_series, plot_evolution
    from ctlens.viz.figures import diff_counts, plot_circuit, plot_diff
    from ctlens.viz.layout import EdgeSet, Layout, as_edge_set
    from ctlens.viz.nodes import plot_node_scores
    from ctlens.viz.report import write_diff, write_figures, write_report
    from ctlens.viz.run import Run, RunFormatError, read_run

# Lazy (ctlens._lazy): plotly loads with the first figure, so that ``ctlens report --help``
# stays light.
__getattr__, __dir__ = lazy_exports(__name__, {
    "EdgeSet": "ctlens.viz.layout",
    "Layout": "ctlens.viz.layout",
    "Run": "ctlens.viz.run",
    "RunFormatError": "ctlens.viz.run",
    "as_edge_set": "ctlens.viz.layout",
    "diff_counts": "ctlens.viz.figures",
    "jaccard_series": "ctlens.viz.evolution",
    "plot_circuit": "ctlens.viz.figures",
    "plot_diff": "ctlens.viz.figures",
    "plot_evolution": "ctlens.viz.evolution",
    "plot_node_scores": "ctlens.viz.nodes",
    "read_run": "ctlens.viz.run",
    "write_diff": "ctlens.viz.report",
    "write_figures": "ctlens.viz.report",
    "write_report": "ctlens.viz.report",
})

__all__ = [
    "EdgeSet",
    "Layout",
    "Run",
    "RunFormatError",
    "as_edge_set",
    "diff_counts",
    "jaccard_series",
    "plot_circuit",
    "plot_diff",
    "plot_evolution",
    "plot_node_scores",
    "read_run",
    "write_diff",
    "write_figures",
    "write_report",
]
