"""`plot_evolution`: a run's circuit snapshots on a slider above its metric curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ctlens.viz.figures import diff_mask_counts
from ctlens.viz.layout import EdgeSet, Layout, active_senders, as_edge_set
from ctlens.viz.run import Run, read_run
from ctlens.viz.traces import (
    EDGE_BUDGET,
    EDGE_LABELS,
    LEGEND_TITLE,
    Trace,
    budget_buttons,
    circuit_axes,
    circuit_height,
    edge_hover,
    edge_traces,
    hidden_edge_traces,
    mark_legend,
    node_hover,
    node_traces,
    port_traces,
    ranked_edges_box,
    scatter,
    style,
)


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
        first = diff_mask_counts(layout, masks[0], mask)
        prev = diff_mask_counts(layout, masks[max(0, k - 1)], mask)
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


#: curve colours: other tasks get their own set, unlike the Jaccard curves (blues, see below)
_TASK_COLOURS = ("#d95f02", "#7570b3", "#1b9e77", "#e7298a", "#66a61e", "#e6ab02", "#a6761d")
#: the two parameter shares, in plain words (docs/run-format.md: params_moved and
#: trainable_fraction)
PARAMS_MOVED = "changed since step 0"
TRAINABLE = "trainable at this step"
_JACCARD_STYLE = {
    "edge Jaccard to first": ("#08519c", "solid"), "node Jaccard to first": ("#08519c", "dash"),
    "edge Jaccard to previous": ("#6baed6", "solid"),
    "node Jaccard to previous": ("#6baed6", "dash"),
    PARAMS_MOVED: ("#1f4e79", "solid"), TRAINABLE: ("#1f4e79", "dot"),
}
_GOAL = {"maximize": "goal: higher ↑", "minimize": "goal: lower ↓", "zero": "goal: 0"}


def plot_evolution(
    run_dir: str | Path | Run,
    top: int | None = 300,
    max_frames: int = 40,
    height: int | None = None,
    budget: int | None = EDGE_BUDGET,
) -> go.Figure:
    """A run's circuit over time (slider and play button) above its metric curves.

    The top panel shows one circuit snapshot per slider position (its ``top`` edges by
    |score|, at most ``max_frames`` snapshots evenly spread, edge widths on one scale for
    all frames; the ``budget`` strongest drawn at first, the rest behind "all edges").
    Below: target metric (its title says which direction is the goal, when the run or its
    built-in task records it), general loss, circuit size, node/edge Jaccard to the first
    and the previous snapshot, fraction of parameters moved, and the other tasks' metrics;
    a dotted line marks the step on show. Jaccard and other tasks have legends of their own.
    """
    run = run_dir if isinstance(run_dir, Run) else read_run(run_dir)
    layout = Layout(run.graph)
    steps = _frame_steps(run.steps, max_frames)
    sets = {}
    for s in steps:
        # a positional run's snapshots are drawn with their spans merged (plot_circuit and
        # plot_diff draw the span columns)
        es = as_edge_set(run.circuits[s], label=f"step {s}").merged_spans()
        sets[s] = es.strongest(top if es.scores is not None else None)
    max_abs = max(
        (float((e.scores * e.mask).abs().max()) for e in sets.values() if e.scores is not None),
        default=1.0,
    ) or 1.0
    evals = run.eval_series()
    goal = _GOAL.get(target_objective(run) or "", "")
    titles = ["", f"target metric ({goal})" if goal else "target metric",
              "general loss (held-out LM)", "circuit size (edges)",
              "Jaccard similarity", "share of the model's parameters",
              "other tasks" if evals else "training loss"]
    fig = make_subplots(
        rows=4, cols=3,
        specs=[[{"colspan": 3}, None, None], [None, None, None], [{}, {}, {}], [{}, {}, {}]],
        row_heights=[0.55, 0.06, 0.195, 0.195], vertical_spacing=0.06,
        horizontal_spacing=0.08, subplot_titles=titles,
    )

    def frame_traces(step: int) -> list[Trace]:
        es = sets[step]
        rows, cols = es.mask.nonzero(as_tuple=True)
        traces = edge_traces(layout, es, max_abs, all_legend=True,
                             budget=budget if es.scores is not None else None)
        traces += port_traces(layout, es.mask)
        traces.append(edge_hover(layout, rows, cols, es.scores))
        active = active_senders(layout, es.mask)
        traces += node_traces(layout, [("in circuit", active, "#333333")],
                              node_hover(layout, es))
        return traces

    first = frame_traces(steps[0])
    n_circuit = len(first)
    for trace in first:
        fig.add_trace(trace, row=1, col=1)
    circuit_axes(fig, layout, row=1, col=1)
    axes = _metric_panels(fig, run, evals)
    fig.add_traces(mark_legend())
    titles = list(fig.layout.annotations)  # the panels' titles, kept in every frame
    beside = fig.get_subplot(3, 3).yaxis.domain[1]  # right of the first charts

    def frame_title(step: int) -> str:
        es = sets[step]
        full = run.circuits[step].n_edges
        shown = f"top {es.n_edges} of {full}" if es.n_edges < full else f"{full}"
        return f"{run.info.get('model', 'model')} · {run.info.get('task', 'task')} · " \
               f"step {step}: {shown} circuit edges"

    def frame_data(step: int) -> list[Trace]:
        # no "visible" in frames: the "show all" choice survives moving the slider
        return [{k: v for k, v in t.items() if k != "visible"} for t in frame_traces(step)]

    fig.frames = [
        go.Frame(name=str(s), data=frame_data(s), traces=list(range(n_circuit)),
                 layout={"shapes": _step_markers(axes, s), "title": {"text": frame_title(s)},
                         "annotations": _annotations(titles, layout, sets[s], s, beside)})
        for s in steps
    ]
    total_height = height or max(1250, circuit_height(layout) + 750)
    style(fig, frame_title(steps[0]), total_height)
    # slider and buttons sit in the empty second row, below the circuit's tick labels
    below_circuit = fig.layout.yaxis.domain[0] - 28 / total_height
    slider, buttons = _animation_controls(steps, below_circuit)
    menus = [buttons] if len(steps) > 1 else []
    if budget is not None and any(e.scores is not None and e.n_edges > budget
                                  for e in sets.values()):
        menus.append(budget_buttons(hidden_edge_traces(first), budget, None, 1.0, 1.01))
    fig.update_layout(margin={"t": 90, "b": 150})
    fig.update_layout(
        sliders=[slider] if len(steps) > 1 else [], updatemenus=menus,
        shapes=_step_markers(axes, steps[0]),
        annotations=_annotations(titles, layout, sets[steps[0]], steps[0], beside),
        legend={"x": 1.01, "y": 1.0, "yanchor": "top", "title": {"text": LEGEND_TITLE}},
        **_panel_legends(fig, total_height),
    )
    return fig


def _annotations(titles: list[Any], layout: Layout, es: EdgeSet, step: int,
                 y: float) -> list[Any]:
    """A frame's annotations: the panels' titles and its ranked strongest edges, listed in
    the right margin from paper height ``y`` down (beside the charts, off the drawing)."""
    box = ranked_edges_box(layout, es, EDGE_LABELS, x=1.02, y=y)
    if box is None:
        return titles
    box["text"] = box["text"].replace("edges</b>", f"edges at step {step}</b>", 1)
    return [*titles, box]


def target_objective(run: Run) -> str | None:
    """Which direction of the target metric is the goal: the run's record, else the
    built-in task's (``"maximize"`` or ``"zero"``), else None (a task ctlens does not know)."""
    recorded = run.info.get("objective") or run.config.get("objective")
    if recorded:
        return str(recorded)
    from ctlens import tasks

    name = run.info.get("task")
    if name not in tasks.names():
        return None
    return tasks.load(str(name), n=8, n_train=8, n_general=8).objective


def _panel_legends(fig: go.Figure, total_height: int) -> dict[str, Any]:
    """The Jaccard, parameter and other tasks' legends, each under its chart."""
    margin = fig.layout.margin
    plot_px = total_height - (margin.t or 0) - (margin.b or 0)
    out = {}
    for name, col in (("legend2", 1), ("legend4", 2), ("legend3", 3)):
        ax = fig.get_subplot(4, col)
        out[name] = {"x": ax.xaxis.domain[0], "xanchor": "left", "yanchor": "top",
                     "y": ax.yaxis.domain[0] - 42 / plot_px, "font": {"size": 11},
                     "bgcolor": "rgba(255,255,255,0)"}
    return out


Series = dict[str, tuple[list[int], list[float]]]


def _metric_panels(fig: go.Figure, run: Run, evals: Series) -> list[Any]:
    """Draw the six metric charts in rows 3 and 4 (every axis titled); return their axes."""
    others = ({f"eval: {k}": v for k, v in evals.items()}
              or {"train loss": run.metric_series("train_loss")})
    panels: list[tuple[int, int, Series, str]] = [
        (3, 1, {"target metric": run.metric_series("target_metric")}, "target metric"),
        (3, 2, {"general loss": run.metric_series("general_loss")}, "LM loss (nats)"),
        (3, 3, {"circuit edges": run.metric_series("circuit_edges")}, "edges"),
        (4, 1, jaccard_series(run), "Jaccard"),
        (4, 2, {PARAMS_MOVED: run.metric_series("params_moved"),
                TRAINABLE: _trainable_series(run)}, "share"),
        (4, 3, others, "metric" if evals else "loss"),
    ]
    for row, col, series, ytitle in panels:
        own = {(4, 1): "legend2", (4, 2): "legend4", (4, 3): "legend3"}.get((row, col))
        for k, (name, (xs, ys)) in enumerate(series.items()):
            single = ("#1f4e79", "solid") if len(series) == 1 else None
            colour, dash = _JACCARD_STYLE.get(name) or single or (_TASK_COLOURS[k % 7], "solid")
            fig.add_trace(
                scatter(x=xs, y=ys, mode="lines+markers", name=name, legend=own or "legend",
                        showlegend=own is not None and len(series) > 1, marker={"size": 4},
                        line={"color": colour, "width": 1.6, "dash": dash},
                        hovertemplate=f"{name}<br>step %{{x}}: %{{y:.4g}}<extra></extra>"),
                row=row, col=col,
            )
        fig.update_xaxes(title_text="step", title_standoff=4, row=row, col=col)
        fig.update_yaxes(title_text=ytitle, title_standoff=4, row=row, col=col)
    fig.update_yaxes(range=[-0.02, 1.02], row=4, col=1)
    fig.update_yaxes(range=[-0.02, 1.02], tickformat=".0%", row=4, col=2)
    fig.update_yaxes(**_integer_axis(run.metric_series("circuit_edges")[1]), row=3, col=3)
    return [fig.get_subplot(r, c) for r, c, _, _ in panels]


def _trainable_series(run: Run) -> tuple[list[int], list[float]]:
    """``trainable_fraction`` at the steps where a circuit was in force (not at step 0,
    where the circuit is only measured and nothing is restricted yet)."""
    monitored = {row["step"] for row in run.metrics if row.get("circuit_source") == "monitor"}
    xs, ys = run.metric_series("trainable_fraction")
    kept = [(x, y) for x, y in zip(xs, ys, strict=True) if x not in monitored]
    return [x for x, _ in kept], [y for _, y in kept]


def _integer_axis(values: list[float]) -> dict[str, Any]:
    """A y axis from 0 to a little above the largest count, ticks on round integers (a
    constant count would otherwise get a range of +-0.5 around it and fractional ticks)."""
    top = max((v for v in values if np.isfinite(v)), default=1.0)
    top = max(1.0, float(top))
    raw = top / 4
    magnitude = 10 ** int(np.floor(np.log10(raw))) if raw >= 1 else 1
    dtick = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return {"range": [0, top * 1.15], "dtick": max(1, int(dtick)), "tickformat": "d"}


def _step_markers(axes: list[Any], step: int) -> list[dict[str, Any]]:
    """A dotted vertical line at ``step`` in each metric chart."""
    shapes = []
    for ax in axes:
        xref = ax.xaxis.plotly_name.replace("axis", "")
        yref = ax.yaxis.plotly_name.replace("axis", "")
        shapes.append({"type": "line", "x0": step, "x1": step, "xref": xref,
                       "yref": f"{yref} domain", "y0": 0, "y1": 1,
                       "line": {"color": "#888888", "width": 1, "dash": "dot"}})
    return shapes


def _animation_controls(steps: list[int], y: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The snapshot slider and the play/pause buttons, both top-anchored at ``y``."""
    slider = {
        "active": 0, "x": 0.08, "len": 0.9, "y": y, "yanchor": "top",
        # shown at the slider's right end: at its left the play buttons would cover it
        "currentvalue": {"prefix": "snapshot at step ", "font": {"size": 12},
                         "xanchor": "right"},
        "pad": {"t": 0, "b": 0},
        "steps": [
            {"label": str(s), "method": "animate",
             "args": [[str(s)], {"mode": "immediate", "frame": {"duration": 0, "redraw": True},
                                 "transition": {"duration": 0}}]}
            for s in steps
        ],
    }
    buttons = {
        "type": "buttons", "direction": "left", "x": 0.0, "y": y, "yanchor": "top",
        "xanchor": "left", "showactive": False, "pad": {"t": 0, "r": 6},
        "buttons": [
            {"label": "▶", "method": "animate",
             "args": [None, {"frame": {"duration": 700, "redraw": True}, "fromcurrent": True,
                             "transition": {"duration": 0}}]},
            {"label": "❚❚", "method": "animate",
             "args": [[None], {"frame": {"duration": 0, "redraw": False}, "mode": "immediate"}]},
        ],
    }
    return slider, buttons
