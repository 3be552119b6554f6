"""ctlens.viz: figures hold the expected traces and counts; run directories are read (or
refused) as docs/run-format.md says; the report is one offline HTML file; the CLI works.

No model is needed: graphs come from `GraphSpec`, scores are random, and the run directory
is written by `make_run` exactly as the format page describes.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from plotly.offline import get_plotlyjs

from ctlens import Circuit, EdgeScores, Graph, GraphSpec, viz
from ctlens.cli.diff import add_diff_command
from ctlens.cli.report import add_report_command

# ---------------------------------------------------------------------------- fixtures


def random_scores(graph: Graph, seed: int = 0) -> EdgeScores:
    """Heavy-tailed random scores of both signs (0 where invalid)."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(graph.n_senders, graph.n_receivers, generator=gen) ** 3
    return EdgeScores(values, graph, {"method": "eap"})


def make_run(
    path: Path,
    spec: GraphSpec | None = None,
    steps: tuple[int, ...] = (0, 10, 20, 30),
    top_n: int = 40,
) -> Path:
    """A run directory in format version 1: run.json, metrics.jsonl, circuits/step_*.json."""
    spec = spec or GraphSpec(n_layers=3, n_heads=4, n_kv_heads=4)
    graph = Graph(spec)
    path.mkdir(parents=True, exist_ok=True)
    run = {
        "format": "ctlens-run", "version": 1, "model": "zoo:tiny-gpt2",
        "task": "agreement-flip", "graph": spec.to_dict(),
        "config": {"mode": "gradient", "top_n": top_n, "every_k": 1, "steps": steps[-1],
                   "lr": 0.001, "seed": 0, "a_future_field": [1, 2]},
        "created": "2026-11-21T07:00:00+00:00", "ctlens_version": "0.1.0",
    }
    (path / "run.json").write_text(json.dumps(run, indent=1))
    (path / "circuits").mkdir(exist_ok=True)
    base = random_scores(graph, seed=0).scores
    rows = []
    for k, step in enumerate(steps):
        drift = random_scores(graph, seed=100 + k).scores
        scores = EdgeScores(base + 0.6 * k * drift, graph, {"method": "eap"})
        circuit = Circuit.from_scores(scores, top_n=top_n)
        circuit.save(path / "circuits" / f"step_{step:06d}.json")
        rows.append({
            "step": step, "target_metric": 1.0 - 0.5 * k, "general_loss": 3.0 + 0.01 * k,
            "circuit_edges": top_n, "params_moved": 0.0 if step == 0 else 0.05 * k,
            "evals": {"ioi": 0.9 - 0.01 * k, "induction": 0.8}, "wall_time": 1.5 * k,
            "train_loss": 2.0 - 0.1 * k, "circuit_file": f"circuits/step_{step:06d}.json",
        })
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run")


@pytest.fixture
def graph() -> Graph:
    return Graph(GraphSpec(n_layers=3, n_heads=4, n_kv_heads=4))


def circuit_of(graph: Graph, seed: int, top_n: int) -> Circuit:
    return Circuit.from_scores(random_scores(graph, seed), top_n=top_n)


# ---------------------------------------------------------------------------- helpers


def edge_line_traces(fig: go.Figure) -> list[go.Scatter]:
    """The edge traces: lines with hover switched off and an arrow in their name."""
    return [t for t in fig.data if t.mode == "lines" and "→" in (t.name or "")]


def n_segments(trace: go.Scatter) -> int:
    """Segments in a None/NaN-separated polyline (each edge is start, end, gap; a lone NaN
    point only keeps a legend entry)."""
    x = np.asarray(trace.x, dtype=float) if trace.x is not None else np.zeros(0)
    return int(len(x) // 3)


def ranked_box(fig: go.Figure) -> tuple[Any, list[tuple[str, str, float]]]:
    """The ranked-edges annotation and its rows ``(sender, receiver, score)``."""
    (box,) = [a for a in fig.layout.annotations if a.name == "ranked edges"]
    rows = []
    for line in box.text.split("<br>")[1:]:
        edge, score = re.match(r"\d+\. (.+?)  <span[^>]*>(.+)</span>", line).groups()
        sender, receiver = edge.split(" → ")
        rows.append((sender, receiver, float(score)))
    return box, rows


def hover_trace(fig: go.Figure, prefix: str = "") -> list[go.Scatter]:
    return [
        t for t in fig.data
        if t.name == "edges" and t.text is not None and all(s.startswith(prefix) for s in t.text)
    ]


# ---------------------------------------------------------------------------- plot_circuit


def test_plot_circuit_draws_every_edge_once_in_few_traces(graph: Graph) -> None:
    circuit = circuit_of(graph, 0, 60)
    fig = viz.plot_circuit(circuit)
    lines = edge_line_traces(fig)
    assert len(lines) == 32  # sign x (q, k, v, MLP/logits) x 4 width bins
    assert sum(n_segments(t) for t in lines) == circuit.n_edges
    assert len(fig.data) < 60  # a fixed handful: edges, ports, nodes and the marks legend
    (hover,) = hover_trace(fig)
    assert len(hover.text) == circuit.n_edges
    names = {tuple(t.split("<br>")[0].split(" → ")) for t in hover.text}
    assert names == set(circuit.edges)
    # colour by what the edge does (score = M(ablated) - M(clean)): the red "lowers metric"
    # traces hold exactly the positive scores, the blue "raises metric" ones the rest
    values = [circuit.scores[graph.edge_index(s, r)].item() for s, r in circuit.edges]
    lowers = sum(n_segments(t) for t in lines if t.name.startswith("lowers metric"))
    raises = sum(n_segments(t) for t in lines if t.name.startswith("raises metric"))
    assert (lowers, raises) == (sum(v > 0 for v in values), sum(v <= 0 for v in values))
    assert all(t.line.color.startswith("rgba(192,57,43") for t in lines
               if t.name.startswith("lowers"))
    assert all(t.line.color.startswith("rgba(33,102,172") for t in lines
               if t.name.startswith("raises"))
    assert "M(edge ablated) − M(clean)" in fig.layout.legend.title.text
    # dash by receiver kind: dashed traces hold exactly the edges into k receivers
    into_k = sum(r.endswith(".k") for _, r in circuit.edges)
    assert sum(n_segments(t) for t in lines if t.line.dash == "dash") == into_k
    assert sum(n_segments(t) for t in lines if t.line.dash == "dot") == sum(
        r.endswith(".v") for _, r in circuit.edges
    )
    # width grows with |score|: the largest edge sits in the widest bin
    widest = max(t.line.width for t in lines)
    strongest = max(values, key=abs)
    sign = "lowers" if strongest > 0 else "raises"
    assert any(n_segments(t) > 0 for t in lines
               if t.line.width == widest and t.name.startswith(sign))
    assert f"{circuit.n_edges} edges" in fig.layout.title.text
    # plain words: the nodes a circuit uses, not "components" (read as connected components)
    assert f"between {len(circuit.components)} nodes" in fig.layout.title.text
    assert "components" not in fig.layout.title.text
    # one legend entry per sign drawn (a click shows or hides all its edges)
    entries = [t.name for t in fig.data if t.showlegend
               and (t.legendgroup or "").startswith("sign-")]
    assert sorted(entries) == sorted({
        "lowers metric (score > 0)" if v > 0 else "raises metric (score < 0)" for v in values
        if abs(v) >= sorted(map(abs, values), reverse=True)[viz.traces.EDGE_BUDGET - 1]
    })


def test_plot_circuit_has_a_legend_entry_for_every_mark(graph: Graph) -> None:
    """Heads, MLPs, input, logits and the q/k/v inputs each have a legend entry with the
    symbol drawn (ports on the dash of the edges they receive); in-circuit heads are named."""
    circuit = circuit_of(graph, 0, 60)
    fig = viz.plot_circuit(circuit)
    marks = [t for t in fig.data if t.legendgroup == "marks"]
    assert all(t.showlegend for t in marks)
    symbols = {t.marker.symbol for t in marks}
    drawn: set[str] = set()
    for t in fig.data:
        if t.mode in ("markers", "markers+text") and t.name != "edges":  # nodes and ports
            symbol = t.marker.symbol
            drawn |= {symbol} if isinstance(symbol, str) else set(symbol or ())
    assert {"circle", "square", "diamond", "star", "triangle-up"} <= drawn <= symbols
    dashes = {t.line.dash for t in marks if t.mode == "lines+markers"}
    assert dashes == {"solid", "dash", "dot"}
    names = " ".join(t.name for t in marks)
    for word in ("head", "MLP", "input", "logits", "q input", "k input", "v input"):
        assert word in names, word
    heads = {c for c in circuit.components if re.fullmatch(r"a\d+\.h\d+", c)}
    (members,) = [t for t in fig.data if t.name == "in circuit"]
    assert heads and heads <= {str(x) for x in members.text}


def test_plot_circuit_writes_no_edge_names_on_the_drawing(graph: Graph) -> None:
    """Edge names never sit on an edge or a node: no text trace carries one, and the ranked
    list of the strongest edges is an annotation below the axes (outside the drawing)."""
    circuit = circuit_of(graph, 0, 60)
    fig = viz.plot_circuit(circuit, labels=6)
    texts = [str(x) for t in fig.data if "text" in (t.mode or "") and t.text is not None
             for x in t.text]
    assert not [x for x in texts if "→" in x]
    box, rows = ranked_box(fig)
    assert box.yref == "paper" and box.y == 0 and box.yanchor == "top" and box.yshift < 0
    ranked = sorted(((s, r, circuit.scores[graph.edge_index(s, r)].item())
                     for s, r in circuit.edges), key=lambda e: -abs(e[2]))[:6]
    assert [(s, r) for s, r, _ in rows] == [(s, r) for s, r, _ in ranked]
    assert [v for *_, v in rows] == pytest.approx([v for *_, v in ranked], rel=1e-2)
    assert fig.layout.margin.b > 6 * 16  # room made for it below the drawing
    assert not [a for a in viz.plot_circuit(circuit, labels=0).layout.annotations
                if a.name == "ranked edges"]


def test_plot_circuit_edge_budget_hides_the_weakest(graph: Graph) -> None:
    circuit = circuit_of(graph, 0, 60)
    fig = viz.plot_circuit(circuit, budget=25, labels=4)
    lines = edge_line_traces(fig)
    magnitude = {e: abs(circuit.scores[graph.edge_index(*e)].item()) for e in circuit.edges}
    ranked = sorted(circuit.edges, key=magnitude.__getitem__, reverse=True)
    hidden = [t for t in lines if t.visible == "legendonly"]
    assert sum(n_segments(t) for t in hidden) == 35
    assert sum(n_segments(t) for t in lines if t not in hidden) == 25
    layout = viz.Layout(graph)

    def ends(traces: list[go.Scatter]) -> set[tuple[float, float, float, float]]:
        out = set()
        for t in traces:
            x, y = np.asarray(t.x, dtype=float), np.asarray(t.y, dtype=float)
            out |= {tuple(round(v, 6) for v in (x[i], y[i], x[i + 1], y[i + 1]))
                    for i in range(0, len(x) - 2, 3)}
        return out

    def coords(edges: list[tuple[str, str]]) -> set[tuple[float, float, float, float]]:
        out = set()
        for s, r in edges:
            i, j = graph.sender_index[s], graph.receiver_index[r]
            out.add(tuple(round(float(v), 6) for v in (
                layout.sender_x[i], layout.sender_y[i], layout.receiver_x[j],
                layout.receiver_y[j])))
        return out

    assert ends(hidden) == coords(ranked[25:])  # the 35 weakest wait behind "show all"
    # one legend entry and two buttons reveal them: the buttons restyle exactly those traces
    # the entry names no state ("click to show"): a faded entry is hidden, a full one shown,
    # so it stays true after "all edges"
    (entry,) = [t for t in fig.data if t.name == "35 weaker edges"]
    assert entry.visible == "legendonly" and entry.legendgroup == hidden[0].legendgroup
    assert {t.legendgroup for t in hidden} == {entry.legendgroup}
    (menu,) = fig.layout.updatemenus
    labels = [b.label for b in menu.buttons]
    assert labels == ["strongest 25", "all 60 edges"]
    indices = set(menu.buttons[1].args[1])
    assert indices == {i for i, t in enumerate(fig.data) if t.visible == "legendonly"}
    assert menu.buttons[1].args[0] == {"visible": True}
    assert "the 25 strongest drawn" in fig.layout.title.text
    # the four strongest edges are listed beside the drawing, with their scores
    _, rows = ranked_box(fig)
    assert [(s, r) for s, r, _ in rows] == ranked[:4]
    # budget=None draws every edge; a circuit within the budget has no buttons
    assert not [t for t in edge_line_traces(viz.plot_circuit(circuit, budget=None))
                if t.visible == "legendonly" and n_segments(t)]
    assert not viz.plot_circuit(circuit, budget=60).layout.updatemenus


def test_plot_circuit_segments_end_at_the_right_ports(graph: Graph) -> None:
    edges = [("input", "a1.h2.q"), ("a0.h1", "a2.h3.k"), ("m1", "logits"), ("a0.h0", "m0")]
    scores = torch.zeros(graph.n_senders, graph.n_receivers)
    for k, edge in enumerate(edges):
        scores[graph.edge_index(*edge)] = (k + 1) * (-1) ** k
    fig = viz.plot_circuit(Circuit.from_edges(graph, edges, scores=scores))
    layout = viz.Layout(graph)
    ends = set()
    for t in edge_line_traces(fig):
        x, y = np.asarray(t.x, dtype=float), np.asarray(t.y, dtype=float)
        ends |= {(round(x[i + 1], 6), round(y[i + 1], 6)) for i in range(0, len(x) - 2, 3)}
    expected = {
        (round(float(layout.receiver_x[graph.receiver_index[r]]), 6),
         round(float(layout.receiver_y[graph.receiver_index[r]]), 6))
        for _, r in edges
    }
    assert ends == expected
    q = graph.receiver_index["a1.h2.q"]
    head = graph.sender_index["a1.h2"]
    assert layout.receiver_x[q] < layout.sender_x[head]  # q port left of its head
    assert layout.receiver_y[q] < layout.sender_y[head]  # and just below it
    assert layout.sender_y[graph.sender_index["input"]] < layout.receiver_y[-1]  # logits on top


def test_plot_circuit_from_edge_scores_takes_the_top_edges(graph: Graph) -> None:
    scores = random_scores(graph, 3)
    fig = viz.plot_circuit(scores, top=25)
    assert sum(n_segments(t) for t in edge_line_traces(fig)) == 25
    (hover,) = hover_trace(fig)
    shown = {tuple(t.split("<br>")[0].split(" → ")) for t in hover.text}
    assert shown == {(s, r) for s, r, _ in scores.top(25)}
    default = viz.plot_circuit(scores)
    assert sum(n_segments(t) for t in edge_line_traces(default)) == 200


def test_plot_circuit_without_scores_is_grey_and_refuses_top(graph: Graph) -> None:
    circuit = Circuit.from_edges(graph, circuit_of(graph, 1, 30).edges)
    fig = viz.plot_circuit(circuit)
    drawn = [t for t in edge_line_traces(fig) if n_segments(t)]
    assert sum(n_segments(t) for t in drawn) == 30
    assert all(t.name.startswith("unscored") for t in drawn)
    (hover,) = hover_trace(fig)
    assert all("score n/a" in t for t in hover.text)
    with pytest.raises(ValueError, match="no scores"):
        viz.plot_circuit(circuit, top=5)


def test_plot_circuit_grouped_query_and_paths(tmp_path: Path) -> None:
    graph = Graph(GraphSpec(n_layers=2, n_heads=4, n_kv_heads=2))
    circuit = circuit_of(graph, 2, 50)
    path = circuit.save(tmp_path / "c.json")
    fig = viz.plot_circuit(path)
    assert sum(n_segments(t) for t in edge_line_traces(fig)) == 50
    layout = viz.Layout(graph)
    k = graph.receiver_index["a1.g1.k"]  # feeds heads 2 and 3: centred under them
    assert layout.receiver_x[k] == pytest.approx(2.5)
    with pytest.raises(TypeError, match="Circuit"):
        viz.plot_circuit(42)


def test_plot_circuit_parallel_blocks() -> None:
    graph = Graph(GraphSpec(n_layers=2, n_heads=4, n_kv_heads=4, parallel_attn_mlp=True))
    circuit = circuit_of(graph, 5, 40)
    fig = viz.plot_circuit(circuit)
    assert sum(n_segments(t) for t in edge_line_traces(fig)) == 40
    assert viz.diff_counts(circuit, circuit)["edge_jaccard"] == 1.0


def test_plot_circuit_gpt2_small_size_is_fast() -> None:
    import time

    graph = Graph(GraphSpec(n_layers=12, n_heads=12, n_kv_heads=12))
    circuit = circuit_of(graph, 0, 1000)
    start = time.perf_counter()
    fig = viz.plot_circuit(circuit)
    assert time.perf_counter() - start < 10  # the benchmark's target is 2 s; CI is shared
    assert len(fig.data) < 60
    assert sum(n_segments(t) for t in edge_line_traces(fig)) == 1000


# ---------------------------------------------------------------------------- plot_diff


def test_plot_diff_counts_equal_the_set_differences(graph: Graph) -> None:
    a, b = circuit_of(graph, 0, 50), circuit_of(graph, 1, 70)
    only_a = set(a.edges) - set(b.edges)
    only_b = set(b.edges) - set(a.edges)
    both = set(a.edges) & set(b.edges)
    assert only_a and only_b and both
    fig = viz.plot_diff(a, b, budget=None)
    lines = edge_line_traces(fig)
    assert len(lines) == 24  # (left, entered, kept) x (strongest, rest) x receiver class

    def drawn(prefix: str) -> int:
        return sum(n_segments(t) for t in lines if t.name.startswith(prefix))

    assert drawn("left: only in a") == len(only_a)
    assert drawn("entered: only in b") == len(only_b)
    assert drawn("kept: in both") == len(both)
    hovered = {
        p: {tuple(t.split("<br>")[1].split(" → ")) for h in hover_trace(fig, p) for t in h.text}
        for p in ("left", "entered", "kept")
    }
    assert hovered == {"left": only_a, "entered": only_b, "kept": both}
    title = fig.layout.title.text
    jaccard = len(both) / len(only_a | only_b | both)
    assert f"{len(only_a)} left, {len(only_b)} entered, {len(both)} kept" in title
    assert f"edge Jaccard {jaccard:.3f}" in title
    assert f"node Jaccard {a.node_jaccard(b):.3f}" in title
    counts = viz.diff_counts(a, b)
    ca, cb = set(a.components), set(b.components)
    assert counts["edge_jaccard"] == pytest.approx(a.edge_jaccard(b))
    assert counts["node_jaccard"] == pytest.approx(a.node_jaccard(b))
    assert (counts["nodes_only_a"], counts["nodes_only_b"], counts["nodes_both"]) == (
        len(ca - cb), len(cb - ca), len(ca & cb)
    )


def test_plot_diff_draws_the_strongest_changes_in_colour_blind_safe_colours(
    graph: Graph,
) -> None:
    """At first the ``budget`` strongest edges that left (by a's scores) and that entered
    (by b's) are drawn, kept edges hidden; the filter buttons show each class in full; hover
    gives each edge's score in its own circuit; orange and blue, not red and green."""
    a, b = circuit_of(graph, 0, 50), circuit_of(graph, 1, 70)
    only_a = set(a.edges) - set(b.edges)
    only_b = set(b.edges) - set(a.edges)
    fig = viz.plot_diff(a, b, budget=5)
    lines = edge_line_traces(fig)

    def shown(prefix: str, visible: list[Any] | None = None) -> set[tuple[str, str]]:
        layout = viz.Layout(graph)
        ends = {}
        for s_, r_ in {*a.edges, *b.edges}:
            i, j = graph.sender_index[s_], graph.receiver_index[r_]
            ends[(round(float(layout.sender_x[i]), 6), round(float(layout.sender_y[i]), 6),
                  round(float(layout.receiver_x[j]), 6), round(float(layout.receiver_y[j]), 6))
                 ] = (s_, r_)
        out = set()
        for k, t in enumerate(fig.data):
            on = (visible[k] if visible is not None else t.visible) is True
            if t in lines and t.name.startswith(prefix) and on:
                x, y = np.asarray(t.x, dtype=float), np.asarray(t.y, dtype=float)
                out |= {ends[tuple(round(v, 6) for v in (x[i], y[i], x[i + 1], y[i + 1]))]
                        for i in range(0, len(x) - 2, 3)}
        return out

    def strongest(circuit: Circuit, edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
        return set(sorted(edges, key=lambda e: -abs(
            circuit.scores[graph.edge_index(*e)].item()))[:5])

    assert shown("left") == strongest(a, only_a)
    assert shown("entered") == strongest(b, only_b)
    assert shown("kept") == set()
    (menu,) = fig.layout.updatemenus
    buttons = {btn.label: btn.args[0]["visible"] for btn in menu.buttons}
    assert list(buttons) == ["strongest changes", "all entered", "all left", "all changes",
                             "with kept edges"]
    assert all(len(v) == len(fig.data) for v in buttons.values())
    assert shown("entered", buttons["all entered"]) == only_b
    assert shown("left", buttons["all entered"]) == set()
    assert shown("left", buttons["all changes"]) == only_a
    assert shown("kept", buttons["with kept edges"]) == set(a.edges) & set(b.edges)
    # hover: an edge that left carries a's score, one that entered b's
    for prefix, circuit in (("left", a), ("entered", b)):
        for h in hover_trace(fig, prefix):
            for text in h.text:
                edge = tuple(text.split("<br>")[1].split(" → "))
                score = float(text.split("score ")[1].split(" ")[0])
                assert score == pytest.approx(circuit.scores[graph.edge_index(*edge)].item(),
                                              rel=1e-3)
    colours = {t.name.split(":")[0]: t.line.color for t in lines}
    assert colours["left"].startswith("rgba(230,159,0") and colours["entered"].startswith(
        "rgba(0,114,178")  # Okabe and Ito's orange and blue


def test_plot_diff_nodes_classified(graph: Graph) -> None:
    a = Circuit.from_edges(graph, [("a0.h0", "logits"), ("a0.h1", "logits")])
    b = Circuit.from_edges(graph, [("a0.h1", "logits"), ("a1.h2", "a2.h0.v")])
    fig = viz.plot_diff(a, b)
    groups = {t.name: set(t.hovertext) for t in fig.data if t.mode == "markers+text"
              and t.name.startswith("nodes")}
    assert groups["nodes only in a (1)"] == {"a0.h0"}
    assert groups["nodes only in b (2)"] == {"a1.h2", "a2.h0"}
    assert groups["nodes in both (2)"] == {"a0.h1"}  # and logits, drawn as the star


def test_plot_diff_of_snapshots_paths_and_run(run_dir: Path) -> None:
    files = sorted((run_dir / "circuits").glob("step_*.json"))
    a, b = Circuit.load(files[0]), Circuit.load(files[-1])
    expected = len(set(a.edges) - set(b.edges))
    by_path = viz.plot_diff(files[0], files[-1])
    assert "step_000000" in by_path.layout.title.text
    by_run = viz.plot_diff(run_dir, steps=(0, 30))
    assert "step 0" in by_run.layout.title.text and "step 30" in by_run.layout.title.text
    for fig in (by_path, by_run):
        only_a = [t for t in edge_line_traces(fig) if t.name.startswith("left: only in step")]
        assert sum(n_segments(t) for t in only_a) == expected
    default = viz.plot_diff(run_dir)
    assert default.layout.title.text == by_run.layout.title.text
    with pytest.raises(KeyError, match="available steps: 0, 10, 20, 30"):
        viz.plot_diff(run_dir, steps=(0, 5))


def test_plot_diff_refuses_circuits_of_different_graphs(graph: Graph) -> None:
    other = Graph(GraphSpec(n_layers=2, n_heads=4, n_kv_heads=4))
    with pytest.raises(ValueError, match="different graphs"):
        viz.plot_diff(circuit_of(graph, 0, 10), circuit_of(other, 0, 10))
    with pytest.raises(TypeError, match="two circuits"):
        viz.plot_diff(circuit_of(graph, 0, 10))


# ---------------------------------------------------------------------------- node scores


def test_plot_node_scores_heatmap(graph: Graph) -> None:
    scores = random_scores(graph, 4)
    fig = viz.plot_node_scores(scores)
    (heat,) = fig.data
    z = np.asarray(heat.z, dtype=float)
    assert z.shape == (3, 5)
    assert list(heat.x) == ["h0", "h1", "h2", "h3", "MLP"]
    nodes = scores.node_scores()
    for layer in range(3):
        for head in range(4):
            assert z[layer, head] == pytest.approx(nodes[f"a{layer}.h{head}"], rel=1e-6)
        assert z[layer, 4] == pytest.approx(nodes[f"m{layer}"], rel=1e-6)
    assert heat.zmid == 0
    # negative (the node raises the metric) is blue, positive red; numbers readable
    scale = heat.colorscale
    assert scale[0][1].startswith("rgb(5,48,97") and scale[-1][1].startswith("rgb(103,0,31")
    assert heat.textfont.size >= 12 and "raises" in heat.colorbar.title.text
    assert f"input {nodes['input']:+.4g}" in fig.layout.title.text
    # a circuit: sums of its own edges' scores; a mapping works too
    circuit = circuit_of(graph, 4, 20)
    zc = np.asarray(viz.plot_node_scores(circuit).data[0].z, dtype=float)
    expected = (circuit.scores * circuit.mask).sum(1)
    assert zc[1, 2] == pytest.approx(float(expected[graph.sender_index["a1.h2"]]), abs=1e-6)
    zm = np.asarray(viz.plot_node_scores({"a0.h1": 2.0, "m1": -1.0}).data[0].z, dtype=float)
    assert zm.shape == (2, 3) and zm[0, 1] == 2.0 and zm[1, 2] == -1.0
    with pytest.raises(ValueError, match="not a sender name"):
        viz.plot_node_scores({"a0.h1.q": 1.0})


# ---------------------------------------------------------------------------- evolution


def test_plot_evolution_frames_and_curves(run_dir: Path) -> None:
    fig = viz.plot_evolution(run_dir)
    run = viz.read_run(run_dir)
    assert [f.name for f in fig.frames] == ["0", "10", "20", "30"]
    assert [s.label for s in fig.layout.sliders[0].steps] == ["0", "10", "20", "30"]
    n_circuit = len(fig.frames[0].data)
    for frame, step in zip(fig.frames, run.steps, strict=True):
        assert list(frame.traces) == list(range(n_circuit))
        lines = [t for t in frame.data if t.mode == "lines" and "→" in (t.name or "")]
        assert sum(n_segments(t) for t in lines) == run.circuits[step].n_edges
        entries = [t for t in frame.data if (t.legendgroup or "").startswith("sign-")
                   and t.showlegend]
        assert len(entries) == 2  # one per sign, in every frame: a legend that does not change
        assert len(frame.layout.shapes) == 6
        assert frame.layout.shapes[0].x0 == step
        # the frame's strongest edges, listed beside the charts, never on the drawing
        (box,) = [a for a in frame.layout.annotations if a.name == "ranked edges"]
        assert f"at step {step}" in box.text and box.x > 1
        first = box.text.split("<br>")[1]
        circuit = run.circuits[step]
        top = max(circuit.edges, key=lambda e: abs(circuit.scores[
            circuit.graph.edge_index(*e)].item()))
        assert first.startswith(f"1. {top[0]} → {top[1]}  ")
    curves = {t.name: t for t in fig.data[n_circuit:]}
    assert list(curves["target metric"].y) == [1.0, 0.5, 0.0, -0.5]
    assert list(curves["changed since step 0"].y) == pytest.approx([0.0, 0.05, 0.1, 0.15])
    assert set(curves) >= {"general loss", "circuit edges", "eval: ioi", "eval: induction",
                           "edge Jaccard to first", "node Jaccard to previous"}
    circuits = [run.circuits[s] for s in run.steps]
    assert list(curves["edge Jaccard to first"].y) == pytest.approx(
        [circuits[0].edge_jaccard(c) for c in circuits]
    )
    assert list(curves["node Jaccard to previous"].y) == pytest.approx(
        [circuits[max(0, k - 1)].node_jaccard(c) for k, c in enumerate(circuits)]
    )
    limited = viz.plot_evolution(run_dir, top=10, max_frames=2)
    assert [f.name for f in limited.frames] == ["0", "30"]
    lines = [t for t in limited.frames[1].data if t.mode == "lines" and "→" in (t.name or "")]
    assert sum(n_segments(t) for t in lines) == 10
    assert "top 10 of 40" in limited.frames[1].layout.title.text


def test_plot_evolution_panels_teach(run_dir: Path) -> None:
    """Each metric chart has titled axes, Jaccard and other tasks have legends (and colour
    sets) of their own, the target's goal is named, and a constant circuit size gets a
    range from zero with integer ticks instead of +-0.5 around the value."""
    fig = viz.plot_evolution(run_dir)
    n_circuit = len(fig.frames[0].data)
    curves = {t.name: t for t in fig.data[n_circuit:]}
    jaccard = [c for n, c in curves.items() if "Jaccard" in n]
    tasks = [c for n, c in curves.items() if n.startswith("eval: ")]
    params = [curves["changed since step 0"], curves["trainable at this step"]]
    marks = [c for c in curves.values() if c.legendgroup == "marks"]
    assert len(jaccard) == 4 and len(tasks) == 2 and len(marks) == len(viz.traces.MARKS)
    assert {c.legend for c in jaccard} == {"legend2"} and {c.legend for c in tasks} == {"legend3"}
    assert {c.legend for c in params} == {"legend4"}
    assert all(c.showlegend for c in jaccard + tasks + params + marks)
    assert not {c.line.color for c in jaccard} & {c.line.color for c in tasks}
    assert not any(c.showlegend for c in curves.values() if c not in jaccard + tasks + params
                   + marks)
    legend2, legend3 = fig.layout.legend2, fig.layout.legend3
    assert legend2.y < fig.get_subplot(4, 1).yaxis.domain[0]  # under its own chart
    assert legend3.x == pytest.approx(fig.get_subplot(4, 3).xaxis.domain[0])
    for row, col in [(3, 1), (3, 2), (3, 3), (4, 1), (4, 2), (4, 3)]:
        sub = fig.get_subplot(row, col)
        assert sub.xaxis.title.text == "step" and sub.yaxis.title.text, (row, col)
    titles = [a.text for a in fig.layout.annotations]
    assert "target metric (goal: higher ↑)" in titles  # agreement-flip maximises its metric
    # the slider's "snapshot at step N" sits at its right end: the play buttons are at its left
    (slider,) = fig.layout.sliders
    assert slider.currentvalue.xanchor == "right" and slider.currentvalue.prefix
    (play,) = [m for m in fig.layout.updatemenus if m.buttons[0].method == "animate"]
    assert play.x < slider.x < slider.x + slider.len
    size = fig.get_subplot(3, 3).yaxis
    assert size.range[0] == 0 and size.range[1] > 40 and size.tickformat == "d"
    assert size.dtick >= 1 and float(size.dtick).is_integer()
    assert "M(edge ablated) − M(clean)" in fig.layout.legend.title.text
    # the edge budget: the "all edges" button reveals exactly the hidden circuit traces, and
    # frames leave visibility alone so the choice survives moving the slider
    assert not [m for m in fig.layout.updatemenus if m.buttons[0].method == "restyle"]
    small = viz.plot_evolution(run_dir, budget=15)  # 40-edge snapshots: 25 hidden in each
    (budget_menu,) = [m for m in small.layout.updatemenus if m.buttons[0].method == "restyle"]
    hidden = {i for i, tr in enumerate(small.data) if tr.visible == "legendonly"}
    assert hidden and set(budget_menu.buttons[1].args[1]) == hidden
    assert max(hidden) < n_circuit
    assert sum(n_segments(small.data[i]) for i in hidden) == 25
    assert all(tr.visible is None for f in small.frames for tr in f.data)
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "task": "my-own-task"}))
    untold = viz.plot_evolution(run_dir)
    assert "target metric" in [a.text for a in untold.layout.annotations]  # no goal claimed
    (run_dir / "run.json").write_text(json.dumps({**info, "objective": "zero"}))
    told = viz.plot_evolution(run_dir)
    assert "target metric (goal: 0)" in [a.text for a in told.layout.annotations]


# ---------------------------------------------------------------------------- bad run dirs


def test_read_run(run_dir: Path) -> None:
    run = viz.read_run(run_dir)
    assert run.steps == [0, 10, 20, 30]
    assert run.config["top_n"] == 40 and run.config["a_future_field"] == [1, 2]
    assert [row["step"] for row in run.metrics] == [0, 10, 20, 30]
    assert run.graph == Graph(GraphSpec(3, 4, 4))


def test_no_snapshots_is_a_clear_error(run_dir: Path) -> None:
    shutil.rmtree(run_dir / "circuits")
    with pytest.raises(viz.RunFormatError, match="no circuit snapshots"):
        viz.plot_evolution(run_dir)
    (run_dir / "circuits").mkdir()
    (run_dir / "circuits" / "notes.txt").write_text("x")
    with pytest.raises(viz.RunFormatError, match=r"step_NNNNNN\.json"):
        viz.write_report(run_dir)


@pytest.mark.parametrize("missing", ["run.json", "metrics.jsonl"])
def test_missing_files_are_clear_errors(run_dir: Path, missing: str) -> None:
    (run_dir / missing).unlink()
    with pytest.raises(viz.RunFormatError, match=f"{missing} is missing"):
        viz.read_run(run_dir)
    with pytest.raises(viz.RunFormatError, match=missing):
        viz.write_report(run_dir)
    assert not (run_dir / "report.html").exists()


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        viz.read_run(tmp_path / "nope")


def test_snapshots_of_different_graphs_are_a_clear_error(run_dir: Path) -> None:
    other = Graph(GraphSpec(n_layers=2, n_heads=4, n_kv_heads=4))
    circuit_of(other, 0, 5).save(run_dir / "circuits" / "step_000040.json")
    with pytest.raises(viz.RunFormatError, match="step_000040.json is a circuit of a different"):
        viz.plot_evolution(run_dir)


def test_malformed_metrics_and_run_json(run_dir: Path) -> None:
    metrics = run_dir / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"step": 40}\n')
    with pytest.raises(viz.RunFormatError, match=r"line 5: missing required key\(s\)"):
        viz.read_run(run_dir)
    metrics.write_text(good.replace("}\n", "}\nnot json\n", 1))
    with pytest.raises(viz.RunFormatError, match="line 2: not valid JSON"):
        viz.read_run(run_dir)
    metrics.write_text(good + '{"step": 40, "targ')  # a live run mid-append: tolerated
    assert len(viz.read_run(run_dir).metrics) == 4
    metrics.write_text(good)
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "version": 2}))
    with pytest.raises(viz.RunFormatError, match="version 2"):
        viz.read_run(run_dir)
    (run_dir / "run.json").write_text(json.dumps({**info, "format": "something"}))
    with pytest.raises(viz.RunFormatError, match="not a ctlens run"):
        viz.read_run(run_dir)


def test_nan_metrics_become_gaps(run_dir: Path) -> None:
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows[2]["general_loss"] = math.nan
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = viz.read_run(run_dir)
    assert run.metric_series("general_loss")[0] == [0, 10, 30]


# ---------------------------------------------------------------------------- report


class _Links(HTMLParser):
    """Collects src/href attributes and script tags (script bodies are not parsed as HTML)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.scripts += tag == "script"
        self.urls += [v or "" for k, v in attrs if k in ("src", "href")]


def test_write_report_is_one_self_contained_file(run_dir: Path) -> None:
    path = viz.write_report(run_dir)
    assert path == run_dir / "report.html"
    text = path.read_text(encoding="utf-8")
    plotlyjs = get_plotlyjs()
    assert text.count(plotlyjs[:200]) == 1  # inlined once, not per figure
    parser = _Links()
    parser.feed(text)
    assert not [u for u in parser.urls if u.startswith(("http://", "https://", "//"))]
    for div in ("ctlens-evolution", "ctlens-circuit", "ctlens-diff", "ctlens-nodes"):
        assert f'id="{div}"' in text
    assert text.count("Plotly.newPlot(") == 4
    assert "a_future_field" in text and "agreement-flip" in text  # config table
    assert "evals.ioi" in text  # metrics table
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    out = viz.write_report(run_dir, out=run_dir.parent / "elsewhere" / "r.html", top=5)
    assert out.is_file()


def test_report_tables_show_formatted_values(run_dir: Path) -> None:
    metrics_file = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    for row in rows:
        row["general_loss"] = 3.0123456789
        row["evals_accuracy"] = {"ioi": 0.5, "induction": 0.25}
    metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = viz.write_report(run_dir).read_text(encoding="utf-8")
    metrics = text[text.index("<h2>Metrics</h2>"):]
    assert "{" not in metrics and "circuit_file" not in metrics  # no raw dicts, no paths
    # evals become columns under one heading; one number format per column (task metrics
    # signed to 3 decimals, losses to 3, shares in percent, counts whole)
    assert '<th colspan="2" class="group">evals</th>' in metrics
    assert 'title="evals.ioi"' in metrics
    assert "<td>+0.890</td>" in metrics and "<td>+0.800</td>" in metrics  # ioi, induction
    assert "<td>3.012</td>" in metrics and "3.01234" not in metrics
    assert '<th colspan="2" class="group">evals_<wbr>accuracy</th>' in metrics
    assert "<td>50.0 %</td>" in metrics and "<td>25.0 %</td>" in metrics
    table = metrics[:metrics.index("</table>")]
    body = [re.findall(r"<td>(.*?)</td>", row) for row in table.split("<tr>")[3:]]
    for column in zip(*body, strict=True):
        shapes = {re.sub(r"\d", "9", re.sub(r"^[+-]?\d+", "±9", cell)) for cell in column
                  if cell}
        assert len(shapes) == 1, column  # 0.09649 beside 13.15 is gone
    config = text[text.index("<h2>Config</h2>"):text.index("<h2>Metrics</h2>")]
    assert "<td class=\"k\">1, 2</td>" in config  # a list, spelled out


def test_report_explains_its_words_and_ranks_the_changes(run_dir: Path) -> None:
    """The page says what "params moved" and "trainable fraction" mean, calls nodes nodes,
    and lists the edges that entered and left with their scores from their own snapshots
    (checked against the circuits read directly)."""
    text = viz.write_report(run_dir).read_text(encoding="utf-8")
    for phrase in ("changed since step 0", "trainable at this step", "the union",
                   "<dt>params_moved</dt>", "<dt>trainable_fraction</dt>"):
        assert phrase in text, phrase
    page = text[text.index("<body>"):text.index("<h2>Config</h2>")]
    assert "components" not in page
    run = viz.read_run(run_dir)
    first, last = run.circuits[0], run.circuits[30]
    diff = text[text.index("<h2>Circuit change"):text.index('id="ctlens-diff"')]
    tables = diff.split('<table class="edges">')[1:]
    assert len(tables) == 2 and "entered" in tables[0] and "left" in tables[1]
    for table, mine, other in ((tables[0], last, first), (tables[1], first, last)):
        rows = re.findall(r"<td>(\d+)</td><td class=\"k\">(.+?) → (.+?)</td><td[^>]*>(.+?)</td>",
                          table)
        only = set(mine.edges) - set(other.edges)
        expected = sorted(only, key=lambda e: -abs(mine.scores[mine.graph.edge_index(*e)].item()))
        assert [(s_, r_) for _, s_, r_, _ in rows] == expected[:15]
        assert f"of {len(only)})" in table or len(only) <= 15
        for _, s_, r_, score in rows:
            assert float(score) == pytest.approx(
                mine.scores[mine.graph.edge_index(s_, r_)].item(), abs=1e-4)


def test_report_removes_stale_temporaries(run_dir: Path) -> None:
    """A report killed mid-write leaves ``.report.html.*.tmp``; the next write removes it
    (and only temporaries of our own naming, and only stale ones)."""
    import os
    import time

    stale = run_dir / ".report.html.k1ll3d.tmp"
    stale.write_text("half a report")
    fresh = run_dir / ".report.html.wr1t1ng.tmp"  # another writer, still at work
    fresh.write_text("a report being written")
    theirs = run_dir / ".notes.txt.abc.tmp"
    theirs.write_text("not ours")
    old = time.time() - 3600
    for path in (stale, theirs):
        os.utime(path, (old, old))
    viz.write_report(run_dir)
    assert not stale.exists()
    assert fresh.exists() and theirs.exists()
    assert (run_dir / "report.html").is_file()


def test_single_snapshot_report_and_unscored_circuits(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "one", steps=(0,))
    for file in (run_dir / "circuits").iterdir():  # strip scores: the report still works
        doc = json.loads(file.read_text())
        doc["scores"] = None
        doc["edges"] = [[s, r, None] for s, r, _ in doc["edges"]]
        file.write_text(json.dumps(doc))
    text = viz.write_report(run_dir).read_text(encoding="utf-8")
    assert 'id="ctlens-evolution"' in text and 'id="ctlens-diff"' not in text
    assert 'id="ctlens-nodes"' not in text


# ---------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctlens")
    commands = parser.add_subparsers(dest="command", required=True)
    add_report_command(commands)
    add_diff_command(commands)
    return parser


def test_cli_report_and_diff(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = _parser().parse_args(["report", str(run_dir), "-o", str(tmp_path / "r.html")])
    assert args.func(args) == 0
    assert (tmp_path / "r.html").is_file()
    a, b = run_dir / "circuits" / "step_000000.json", run_dir / "circuits" / "step_000030.json"
    args = _parser().parse_args(["diff", str(a), str(b), "-o", str(tmp_path / "d.html")])
    assert args.func(args) == 0
    ca, cb = Circuit.load(a), Circuit.load(b)
    out = capsys.readouterr().out
    assert f"only in A: {len(set(ca.edges) - set(cb.edges))} edges" in out
    assert (tmp_path / "d.html").read_text(encoding="utf-8").count("Plotly.newPlot(") == 1
    with pytest.raises(SystemExit):
        _parser().parse_args(["diff", str(a), str(b)])  # -o is required


def test_main_cli_when_registered(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """Through ``ctlens.cli.main`` once the lead's CLI registers the viz commands."""
    from ctlens import cli

    try:
        cli.build_parser().parse_args(["report", str(run_dir)])
    except SystemExit:
        pytest.skip("ctlens.cli does not register the viz commands yet")
    assert cli.main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.html").is_file()
    shutil.rmtree(run_dir / "circuits")
    assert cli.main(["report", str(run_dir)]) == 2
    assert "no circuit snapshots" in capsys.readouterr().err
