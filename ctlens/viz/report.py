"""One self-contained HTML report per run, and self-contained HTML for single figures.

The file inlines plotly.js exactly once (in ``<head>``) and then each figure as a ``<div>``
and a ``Plotly.newPlot`` call without its own copy of the library, so it opens offline, from
an e-mail attachment or a file share, with no network request. It is written atomically (a
temporary file in the same directory, then ``os.replace``), so a reader never sees half a
report.
"""

from __future__ import annotations

import contextlib
import glob
import html
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from ctlens.files import atomic_write_text
from ctlens.viz.evolution import PARAMS_MOVED, TRAINABLE, plot_evolution
from ctlens.viz.figures import diff_pair, plot_circuit, plot_diff
from ctlens.viz.layout import EdgeSet, Layout, as_edge_set
from ctlens.viz.nodes import plot_node_scores
from ctlens.viz.run import Run, read_run
from ctlens.viz.traces import LOWERS, ONLY_A, ONLY_B, PLOT_CONFIG, RAISES, strongest_edges

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 0 auto; max-width: 1400px; padding: 1rem 2rem; color: #222; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; }
h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; font-size: .85rem; }
th, td { border: 1px solid #e2e2e2; padding: .2rem .55rem; text-align: right; }
th { background: #f6f6f6; position: sticky; top: 0; }
td.k, th.k { text-align: left; }
.scroll { max-height: 32rem; max-width: 100%; overflow: auto; }
.scroll th { white-space: normal; vertical-align: bottom; min-width: 3.2rem; position: static; }
.scroll th.group { text-align: center; }
.scroll td { white-space: nowrap; font-variant-numeric: tabular-nums; }
.scroll table { font-size: .8rem; }
.scroll th, .scroll td { padding: .2rem .4rem; }
.summary td { text-align: left; }
.note { color: #666; font-size: .85rem; }
.fig { margin: .5rem 0 1.5rem 0; }
.tables { display: flex; flex-wrap: wrap; gap: 1rem 2.5rem; align-items: flex-start; }
.tables caption { text-align: left; font-weight: 600; padding-bottom: .3rem; }
.edges td { font-variant-numeric: tabular-nums; }
dl.terms dt { font-weight: 600; margin-top: .4rem; }
dl.terms dd { margin-left: 1.2rem; color: #444; }
"""

#: the number format of each metrics column: the first rule whose pattern finds the column's
#: name (``evals.ioi`` for a nested one) wins, so a column never mixes 0.09649 and 13.15
NUMBER_FORMATS: tuple[tuple[str, Callable[[float], str]], ...] = (
    (r"^(step|circuit_edges|top_n)$", lambda v: f"{v:,.0f}"),
    (r"fraction|accuracy|params_moved", lambda v: f"{100 * v:.1f} %"),
    (r"^lr$", lambda v: f"{v:.1e}"),
    (r"^wall_time$", lambda v: f"{v:.1f} s"),
    (r"loss", lambda v: f"{v:.3f}"),
    (r".", lambda v: f"{v:+.3f}"),  # task metrics: signed, three decimals
)

#: the metrics the page explains in words (docs/run-format.md has the full list)
TERMS: tuple[tuple[str, str], ...] = (
    ("target_metric", "the tuning target: the task's metric on held-out prompts (the "
     "evolution chart's title says whether higher or 0 is the goal)"),
    ("general_loss", "language-model loss on held-out general text: lower is better; its "
     "rise is the cost of tuning"),
    ("params_moved", f"{PARAMS_MOVED}: the share of the model's parameters (each weight "
     "counted once) that differ from the start. The circuit is rediscovered every K steps "
     "and each rediscovery may unlock other parameters, so over a run this covers the union "
     "of every circuit's parameters and can approach the whole model even though each step "
     "trains only its circuit"),
    ("trainable_fraction", f"{TRAINABLE}: the share of the parameters the circuit in force "
     "lets the optimizer change (a circuit node unlocks whole weight slices: a head's "
     "W_Q/W_K/W_V/W_O slice, an MLP's matrices, so a small share of the edges can unlock a "
     "large share of the parameters); 100 % at step 0, before any circuit is in force"),
    ("circuit_edges", "edges in the circuit"),
)



#: a report temporary older than this (seconds) belongs to a writer that died
STALE_AFTER_S = 120.0


def write_page(out: Path, text: str) -> Path:
    """Write ``text`` to ``out`` atomically, first removing stale temporaries of ``out``.

    `atomic_write_text` names its temporary ``.NAME.<random>.tmp`` next to ``out``; a
    writer killed mid-write (SIGKILL, power loss) leaves it behind, and a report is several
    MB. Those older than `STALE_AFTER_S` are removed (a younger one may be another writer's,
    still at work).
    """
    now = time.time()
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if tmp.is_file() and now - tmp.stat().st_mtime > STALE_AFTER_S:
                tmp.unlink()
    return atomic_write_text(out, text)


def figure_div(fig: go.Figure, div_id: str) -> str:
    """A figure as a ``<div>`` plus script, relying on plotly.js already on the page."""
    return fig.to_html(
        full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOT_CONFIG,
        default_width="100%", default_height=f"{int(fig.layout.height or 500)}px",
        auto_play=False,
    )


def html_page(title: str, body: str) -> str:
    """A full HTML page with plotly.js inlined once in its head."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script>\n</head>\n<body>\n"
        f"{body}\n</body>\n</html>\n"
    )


def write_figures(
    figures: Sequence[tuple[str, go.Figure]], out: str | Path, title: str = "ctlens"
) -> Path:
    """Write figures ``(heading, fig)`` into one self-contained HTML file, atomically."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for k, (heading, fig) in enumerate(figures):
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(f"<div class=\"fig\">{figure_div(fig, f'ctlens-fig-{k}')}</div>")
    return write_page(Path(out), html_page(title, "\n".join(parts)))


def _cell(value: Any, column: str = "") -> str:
    """A value as table text: a number in its column's format (`NUMBER_FORMATS`; 4
    significant digits outside a known column), lists and dicts spelled out."""
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, (int, float)) and column:
        return html.escape(_number(column, float(value)))
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return "<br>".join(f"{html.escape(str(k))}: {_cell(v)}" for k, v in sorted(value.items()))
    return html.escape(str(value))


def _number(column: str, value: float) -> str:
    return next(fmt(value) for pattern, fmt in NUMBER_FORMATS if re.search(pattern, column))


def _config_table(config: dict[str, Any]) -> str:
    if not config:
        return "<p class=\"note\">run.json has no config.</p>"
    rows = "".join(
        f"<tr><td class=\"k\">{html.escape(str(k))}</td><td class=\"k\">{_cell(v)}</td></tr>"
        for k, v in sorted(config.items())
    )
    return f"<table class=\"summary\"><tr><th class=\"k\">field</th><th class=\"k\">value</th>" \
           f"</tr>{rows}</table>"


def _metrics_table(run: Run) -> str:
    """One row per evaluation. Nested records (``evals``, ``evals_accuracy``, ...) become
    columns under a shared heading, so no cell holds a raw dict; ``circuit_file`` is left
    out (the snapshot is ``circuits/step_NNNNNN.json`` of the row's step), and columns that
    hold one value in every row are named once above the table."""
    keys = ["step", "target_metric", "general_loss", "circuit_edges", "params_moved"]
    nested = sorted({k for row in run.metrics for k, v in row.items() if isinstance(v, dict)})
    flat = sorted({k for row in run.metrics for k in row} - {*keys, *nested, "circuit_file"})
    constant = {k: run.metrics[0].get(k) for k in flat if len(run.metrics) > 1
                and all(k in row and row[k] == run.metrics[0][k] for row in run.metrics)}
    flat = [k for k in flat if k not in constant]
    groups: list[tuple[str, list[str | None]]] = [(k, [None]) for k in [*keys, *flat]]
    for name in nested:
        groups.append((name, sorted({s for row in run.metrics for s in (row.get(name) or {})})))

    def wrap(key: str) -> str:
        return html.escape(key).replace("_", "_<wbr>")

    top = "".join(
        f"<th rowspan=\"2\">{wrap(k)}</th>" if subs == [None]
        else f"<th colspan=\"{len(subs)}\" class=\"group\">{wrap(k)}</th>"
        for k, subs in groups
    )
    second = "".join(
        f"<th title=\"{html.escape(f'{k}.{s}')}\">{wrap(str(s))}</th>"
        for k, subs in groups if subs != [None] for s in subs
    )
    body = []
    for row in run.metrics:
        cells = [_cell(row.get(k, "") if s is None else (row.get(k) or {}).get(s, ""),
                       k if s is None else f"{k}.{s}")
                 for k, subs in groups for s in subs]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    same = ", ".join(f"{html.escape(k)} {_cell(v, k)}" for k, v in constant.items())
    note = f"<p class=\"note\">The same in every row: {same}.</p>" if same else ""
    terms = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(text)}</dd>" for k, text in TERMS)
    return (f"{note}<div class=\"scroll\"><table><tr>{top}</tr><tr>{second}</tr>"
            f"{''.join(body)}</table></div><dl class=\"terms note\">{terms}</dl>")


def _summary(run: Run) -> str:
    first, last = run.metrics[0], run.metrics[-1]
    info = run.info

    def change(key: str) -> str:
        a, b = first.get(key), last.get(key)
        return f"{_cell(a, key)} → {_cell(b, key)}"

    trainable = last.get("trainable_fraction")
    rows = [
        ("model", info.get("model", "?")), ("task", info.get("task", "?")),
        ("graph", run.graph._describe()), ("created", info.get("created", "?")),
        ("ctlens version", info.get("ctlens_version", "?")),
        ("evaluations", f"{len(run.metrics)} (steps {first['step']} → {last['step']})"),
        ("circuit snapshots", f"{len(run.circuits)}"),
        ("target metric", change("target_metric")), ("general loss", change("general_loss")),
        ("circuit edges", change("circuit_edges")),
        (f"parameters {PARAMS_MOVED}", change("params_moved")),
    ]
    if isinstance(trainable, (int, float)):
        rows.append((f"parameters {TRAINABLE} (step {last['step']})",
                     _cell(trainable, "trainable_fraction")))
    body = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    note = ("<p class=\"note\">Parameters: <i>trainable</i> is what the circuit in force lets "
            "the optimizer change at one step; <i>changed since step 0</i> is the union over "
            "every step, because the circuit is rediscovered as the model changes. The terms "
            "are explained under the metrics table.</p>")
    return f"<table class=\"summary\">{body}</table>{note}"


def _edge_table(caption: str, edges: list[tuple[str, str, float]], total: int,
                colour: str | None = None) -> str:
    """A ranked table of edges with their scores (`strongest_edges`'s order)."""
    shown = f"the {len(edges)} strongest of {total}" if len(edges) < total else f"{total}"
    swatch = (f"<span style=\"color:{colour}\">■</span> " if colour else "")
    rows = "".join(
        f"<tr><td>{rank}</td><td class=\"k\">{html.escape(s)} → {html.escape(r)}</td>"
        f"<td style=\"color:{RAISES if v <= 0 else LOWERS}\">{v:+.4f}</td>"
        f"<td class=\"k\">{'raises' if v <= 0 else 'lowers'} the metric</td></tr>"
        for rank, (s, r, v) in enumerate(edges, start=1))
    if not edges:
        rows = "<tr><td colspan=\"4\" class=\"k\">none</td></tr>"
    return (f"<table class=\"edges\"><caption>{swatch}{html.escape(caption)} ({shown})"
            "</caption><tr><th>rank</th><th class=\"k\">edge</th><th>score</th>"
            f"<th class=\"k\">effect</th></tr>{rows}</table>")


def _circuit_tables(es: EdgeSet, k: int = 15) -> str:
    """The strongest edges of one circuit (what the drawing lists beside itself, longer)."""
    ranked = strongest_edges(Layout(es.graph), es, k)
    if not ranked:
        return ""
    table = _edge_table(f"strongest edges, {es.label}", ranked, es.n_edges)
    return f"<div class=\"tables\">{table}</div>"


def _diff_tables(run: Run, steps: tuple[int, int], k: int = 15) -> str:
    """Ranked tables of the edges that entered and that left between two snapshots, each
    with its score in the snapshot it belongs to."""
    ea, eb = diff_pair(run, steps=steps)
    layout = Layout(ea.graph)
    parts = []
    for caption, mine, other, colour in (
        (f"entered: only in {eb.label}", eb, ea, ONLY_B),
        (f"left: only in {ea.label}", ea, eb, ONLY_A),
    ):
        if mine.scores is None:
            return ""
        only = EdgeSet(mine.graph, mine.mask & ~other.mask, mine.scores, mine.label)
        ranked = strongest_edges(layout, only, k)
        parts.append(_edge_table(caption, ranked, only.n_edges, colour))
    return f"<div class=\"tables\">{''.join(parts)}</div>"


def write_report(
    run_dir: str | Path | Run,
    out: str | Path | None = None,
    top: int | None = 300,
    max_frames: int = 40,
) -> Path:
    """Write ``RUN_DIR/report.html`` (or ``out``): the whole run in one offline HTML file.

    Sections: a summary, the evolution figure (circuit slider and metric curves), the last
    circuit, the diff of the first and last snapshots, node scores of the last snapshot, the
    run's config and its metrics table. ``top`` and ``max_frames`` bound the size of the
    drawn circuits (see `plot_evolution`). ``run_dir`` may be a `Run` already read (the
    command line reads it first to report progress). Returns the path written.
    """
    run = run_dir if isinstance(run_dir, Run) else read_run(run_dir)
    out_path = Path(out) if out is not None else run.path / "report.html"
    first, last = run.steps[0], run.steps[-1]
    last_circuit = run.circuits[last]
    last_fig = plot_circuit(last_circuit, top=_top(last_circuit, top), label=f"step {last}",
                            labels=0)  # the ranked table under it lists the strongest edges
    sections: list[str] = [
        f"<h1>ctlens run: {html.escape(str(run.info.get('task', '?')))} on "
        f"{html.escape(str(run.info.get('model', '?')))}</h1>",
        f"<p class=\"sub\">{html.escape(str(run.path.resolve()))}</p>",
        "<h2>Summary</h2>", _summary(run),
        "<h2>Evolution</h2>",
        "<p class=\"note\">Drag the slider or press ▶ to step through the circuit snapshots; "
        "the dotted lines in the charts mark the step on show. An edge's score is M(edge "
        f"ablated) − M(clean) for the discovery metric M: <b style=\"color:{RAISES}\">blue</b> "
        "edges raise the metric (ablating them lowers it, score &lt; 0), "
        f"<b style=\"color:{LOWERS}\">red</b> edges lower it; width and opacity grow with "
        "|score|; the dash says which input of a head an edge feeds (q solid, k dashed, v "
        "dotted), and the legend names every mark. Only the strongest edges are drawn at "
        "first: press <i>all edges</i> (above the circuit, right) or click the <i>weaker "
        "edges</i> legend entry to show the rest (a faded legend entry is hidden). The "
        "snapshot's strongest edges are listed, ranked, right of the charts below it; hover "
        "edges and nodes for names and scores.</p>",
        f"<div class=\"fig\">"
        f"{figure_div(plot_evolution(run, top=top, max_frames=max_frames), 'ctlens-evolution')}"
        "</div>",
        f"<h2>Circuit at step {last}</h2>",
        *_spans_note(run),
        f"<div class=\"fig\">"
        f"{figure_div(last_fig, 'ctlens-circuit')}"
        "</div>",
        _circuit_tables(as_edge_set(last_circuit, label=f"step {last}")),
    ]
    if len(run.steps) > 1:
        sections += [
            f"<h2>Circuit change: step {first} → step {last}</h2>",
            "<p class=\"note\">Edges that <b style=\"color:" + ONLY_B + "\">entered</b> the "
            "circuit (in the last snapshot only) and that <b style=\"color:" + ONLY_A + "\">left"
            "</b> it (in the first only), ranked by |score| in the snapshot they belong to; "
            "the drawing shows the strongest changes first (its buttons: all that entered, "
            "all that left, all changes, and the kept edges, faint grey).</p>",
            _diff_tables(run, (first, last)),
            f"<div class=\"fig\">{figure_div(plot_diff(run, steps=(first, last)), 'ctlens-diff')}"
            "</div>",
        ]
    if last_circuit.scores is not None:
        sections += [
            f"<h2>Node scores at step {last}</h2>",
            f"<div class=\"fig\">{figure_div(plot_node_scores(last_circuit), 'ctlens-nodes')}"
            "</div>",
        ]
    sections += [
        "<h2>Config</h2>", _config_table(run.config),
        "<h2>Metrics</h2>", _metrics_table(run),
    ]
    title = f"ctlens report: {run.info.get('task', '?')} on {run.info.get('model', '?')}"
    return write_page(out_path, html_page(title, "\n".join(sections)))


def _spans_note(run: Run) -> list[str]:
    """For a positional run: what the span columns are (nothing for a position-free run)."""
    if not run.graph.positional:
        return []
    spans = ", ".join(f"<b>{html.escape(name)}</b>" for name in run.graph.spans)
    return [
        "<p class=\"note\">This run's circuits are positional: every edge is kept or dropped "
        f"per token span ({spans}). The circuit and the change below have one column per "
        "span; the evolution slider above merges the spans (an edge is drawn when it is kept "
        "at any span).</p>"
    ]


def _top(circuit: Any, top: int | None) -> int | None:
    """``top`` if the circuit has scores to rank by, else ``None`` (draw every edge)."""
    return top if circuit.scores is not None else None


def write_diff(a: Any, b: Any, out: str | Path) -> Path:
    """`plot_diff` of two circuits (or saved-circuit paths) as one offline HTML file."""
    fig = plot_diff(a, b)
    return write_figures([("Circuit diff", fig)], out, title="ctlens circuit diff")
