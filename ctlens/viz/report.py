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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from ctlens.files import atomic_write_text
from ctlens.viz.evolution import plot_evolution
from ctlens.viz.figures import plot_circuit, plot_diff
from ctlens.viz.nodes import plot_node_scores
from ctlens.viz.run import Run, read_run
from ctlens.viz.traces import PLOT_CONFIG

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
"""


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


def _cell(value: Any) -> str:
    """A value as table text: numbers to 4 significant digits, lists and dicts spelled out."""
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return "<br>".join(f"{html.escape(str(k))}: {_cell(v)}" for k, v in sorted(value.items()))
    return html.escape(str(value))


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
        cells = [_cell(row.get(k, "") if s is None else (row.get(k) or {}).get(s, ""))
                 for k, subs in groups for s in subs]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    same = ", ".join(f"{html.escape(k)} {_cell(v)}" for k, v in constant.items())
    note = f"<p class=\"note\">The same in every row: {same}.</p>" if same else ""
    return (f"{note}<div class=\"scroll\"><table><tr>{top}</tr><tr>{second}</tr>"
            f"{''.join(body)}</table></div>")


def _summary(run: Run) -> str:
    first, last = run.metrics[0], run.metrics[-1]
    info = run.info

    def change(key: str) -> str:
        a, b = first.get(key), last.get(key)
        return f"{_cell(a)} → {_cell(b)}"

    rows = [
        ("model", info.get("model", "?")), ("task", info.get("task", "?")),
        ("graph", run.graph._describe()), ("created", info.get("created", "?")),
        ("ctlens version", info.get("ctlens_version", "?")),
        ("evaluations", f"{len(run.metrics)} (steps {first['step']} → {last['step']})"),
        ("circuit snapshots", f"{len(run.circuits)}"),
        ("target metric", change("target_metric")), ("general loss", change("general_loss")),
        ("circuit edges", change("circuit_edges")), ("params moved", change("params_moved")),
    ]
    body = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f"<table class=\"summary\">{body}</table>"


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
    last_fig = plot_circuit(last_circuit, top=_top(last_circuit, top), label=f"step {last}")
    sections: list[str] = [
        f"<h1>ctlens run: {html.escape(str(run.info.get('task', '?')))} on "
        f"{html.escape(str(run.info.get('model', '?')))}</h1>",
        f"<p class=\"sub\">{html.escape(str(run.path.resolve()))}</p>",
        "<h2>Summary</h2>", _summary(run),
        "<h2>Evolution</h2>",
        "<p class=\"note\">Drag the slider or press ▶ to step through the circuit snapshots; "
        "the dotted lines in the charts mark the step on show. An edge's score is M(edge "
        "ablated) − M(clean) for the discovery metric M: <b style=\"color:#2166ac\">blue</b> "
        "edges raise the metric (ablating them lowers it, score &lt; 0), "
        "<b style=\"color:#c0392b\">red</b> edges lower it; width and opacity grow with "
        "|score|. Only the strongest edges are drawn at first: press <i>all edges</i> (above "
        "the circuit, right) or click the <i>weaker edges</i> legend entry to show the rest. "
        "Hover edges and nodes for names and scores; click legend entries to hide edge "
        "classes.</p>",
        f"<div class=\"fig\">"
        f"{figure_div(plot_evolution(run, top=top, max_frames=max_frames), 'ctlens-evolution')}"
        "</div>",
        f"<h2>Circuit at step {last}</h2>",
        *_spans_note(run),
        f"<div class=\"fig\">"
        f"{figure_div(last_fig, 'ctlens-circuit')}"
        "</div>",
    ]
    if len(run.steps) > 1:
        sections += [
            f"<h2>Circuit change: step {first} → step {last}</h2>",
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
