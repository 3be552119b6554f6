"""Token spans: the built-in tasks' spans, the positional graph, positional scores and
circuits (selection, files, networkx, pandas, MIB refusal, gradient rules) and their
figures. TaskData spans from text are tested in test_data.py."""

from __future__ import annotations

import json

import networkx as nx
import numpy as np
import pytest
import torch
from conftest import tiny_gpt2_module

import ctlens
from ctlens import Circuit, EdgeScores, Graph, GraphSpec
from ctlens.circuit import SCHEMA_VERSION
from ctlens.data import TaskData
from ctlens.masking.rules import parameter_rules
from ctlens.spans import OTHER, PADDING

SPANS = ("subject", "end", OTHER)


@pytest.fixture(scope="module")
def model():
    return ctlens.load_model(tiny_gpt2_module())


def labelled(data: TaskData, tokenizer, row: int = 0) -> list[tuple[str, str]]:
    """(token, span name) of one example's real tokens."""
    n = int(data.attention_mask[row].sum())
    tokens = tokenizer.convert_ids_to_tokens(data.clean[row, :n].tolist())
    return [(t, data.span_names[k]) for t, k in zip(tokens, data.spans[row, :n].tolist(),
                                                    strict=True)]


# ---------------------------------------------------------------- built-in tasks


@pytest.mark.parametrize("name", ctlens.tasks.names())
def test_every_builtin_task_fills_spans(name):
    task = ctlens.tasks.load(name, n=16, n_train=8, n_general=2, context=12)
    data = task.discovery
    assert data.span_names and data.spans is not None
    real = data.attention_mask
    assert bool((data.spans[real] >= 0).all()) and bool((data.spans[~real] == PADDING).all())
    assert task.train_data is not None and task.train_data.span_names == data.span_names
    used = set(data.spans[real].unique().tolist())
    assert used == set(range(len(data.span_names))), "every span of the schema occurs"
    if "end" in data.span_names:  # the answer is predicted at the end span
        end = data.span_names.index("end")
        assert bool((data.spans.gather(1, data.positions_2d) == end).all())
        train = task.train_data
        assert bool((train.spans.gather(1, train.positions_2d) == end).all())


def test_builtin_spans_follow_the_roles():
    agreement = ctlens.tasks.load("agreement", n=32).discovery
    tokenizer = ctlens.tasks.tokenizer()
    subject = agreement.span_names.index("subject")
    assert bool((agreement.spans[:, 1] == subject).all())  # "the" after <bos>
    ioi = ctlens.tasks.load("ioi", n=32).discovery
    names = ioi.span_names
    for row in range(8):
        words = dict((s, t) for t, s in labelled(ioi, tokenizer, row) if s in ("s1", "s2"))
        assert words["s1"] == words["s2"], "s1 and s2 are the same name"
        io = [t for t, s in labelled(ioi, tokenizer, row) if s == "io"]
        assert tokenizer.convert_ids_to_tokens([int(ioi.correct[row])]) == io
    assert names == ("io", "s1", "s2", "end", OTHER)


# ---------------------------------------------------------------- graph


def test_positional_graph_keeps_the_default_graph(model):
    plain = Graph.from_model(model)
    graph = Graph.from_model(model, spans=SPANS)
    assert plain.dense_shape == (plain.n_senders, plain.n_receivers) and not plain.positional
    assert graph.dense_shape == (*plain.dense_shape, 3)
    assert graph.n_edges == 3 * plain.n_edges == 3 * graph.n_sender_receiver_edges
    assert graph != plain and torch.equal(graph.valid, plain.valid)
    assert plain.spec.to_dict() == GraphSpec.from_dict(plain.spec.to_dict()).to_dict()
    assert "spans" not in plain.spec.to_dict()
    assert GraphSpec.from_dict(graph.spec.to_dict()) == graph.spec
    assert graph.edges()[:2] == [("input", "a0.h0.q", "subject"), ("input", "a0.h0.q", "end")]
    assert graph.cell(("a0.h1", "logits", "end")) == (2, graph.n_receivers - 1, 1)
    with pytest.raises(KeyError, match=r"'verb' is not a span of this graph; its spans are "
                       r"\['subject', 'end', 'other'\]"):
        graph.cell(("a0.h1", "logits", "verb"))
    with pytest.raises(TypeError, match="must be a .sender, receiver, span. triple"):
        graph.cell(("a0.h1", "logits"))
    with pytest.raises(ValueError, match="position-free"):
        plain.span_position("end")
    with pytest.raises(ValueError, match="this TaskData has no spans"):
        Graph.from_model(model, spans=TaskData(clean=torch.ones(1, 2, dtype=torch.long),
                                               metric="kl"))
    assert Graph.from_model(model, spans=ctlens.tasks.load("ioi", n=2).discovery).spans[0] == "io"


def test_spans_must_match_the_data(model):
    graph = Graph.from_model(model, spans=SPANS)
    graph.check_spans(SPANS, "the task data")
    with pytest.raises(ValueError, match=r"the spans do not match: .* has \['subject', 'end', "
                       r"'other'\] but the task data has \['io', 'other'\]"):
        graph.check_spans(("io", OTHER), "the task data")
    with pytest.raises(ValueError, match="but the task data has no spans"):
        graph.check_spans(None, "the task data")
    with pytest.raises(ValueError, match="is position-free"):
        Graph.from_model(model).check_spans(SPANS, "the task data")


def test_networkx_has_one_edge_per_span(model):
    graph = Graph.from_model(model, spans=SPANS)
    g = graph.to_networkx()
    assert isinstance(g, nx.MultiDiGraph)
    assert g.edges["input", "logits", "end"] == {"span": "end", "internal": False}
    assert sum(not a["internal"] for *_, a in g.edges(data=True)) == graph.n_edges
    assert Graph.from_networkx(g) == graph


# ---------------------------------------------------------------- scores


def positional_scores(model, seed: int = 0) -> EdgeScores:
    graph = Graph.from_model(model, spans=SPANS)
    gen = torch.Generator().manual_seed(seed)
    return EdgeScores(torch.randn(graph.dense_shape, generator=gen), graph, {"method": "eap"})


def test_scores_sum_over_spans_and_round_trip(model, tmp_path):
    scores = positional_scores(model)
    assert scores.spans == SPANS
    assert torch.equal(scores.scores[~scores.graph.valid], torch.zeros(
        int((~scores.graph.valid).sum()), 3))
    coarse = scores.coarsen()
    assert not coarse.graph.positional and coarse.metadata["coarsened_from_spans"] == list(SPANS)
    assert torch.allclose(coarse.scores, scores.scores.sum(-1))
    assert scores.node_scores()["a0.h1"] == pytest.approx(coarse.node_scores()["a0.h1"], abs=1e-5)
    best = scores.top(3)
    assert len(best[0]) == 4 and best[0][2] in SPANS
    assert abs(best[0][3]) == pytest.approx(float(scores.scores.abs().max()))
    path = scores.save(tmp_path / "s")
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["schema_version"] == 2 and sidecar["graph"]["spans"] == list(SPANS)
    loaded = EdgeScores.load(path, model=model)
    assert loaded.graph == scores.graph and torch.equal(loaded.scores, scores.scores)
    back = EdgeScores.from_networkx(scores.to_networkx())
    assert torch.equal(back.scores, scores.scores)
    table = scores.to_pandas()
    assert len(table) == scores.graph.n_edges
    assert list(table.span[:3]) == list(SPANS)
    with pytest.raises(ValueError, match=r"expected \(\d+, \d+, 3\) \(senders, receivers, spans"):
        EdgeScores(torch.zeros(scores.graph.n_senders, scores.graph.n_receivers), scores.graph)


# ---------------------------------------------------------------- circuits


def test_top_n_counts_edge_span_pairs(model):
    scores = positional_scores(model)
    circuit = Circuit.from_scores(scores, top_n=10)
    assert circuit.n_edges == 10 and circuit.mask.shape == scores.graph.dense_shape
    kept = scores.scores.abs()[circuit.mask].min()
    assert float(scores.scores.abs()[~circuit.mask & scores.graph.dense_valid].max()) <= kept
    assert len(circuit.edges[0]) == 3 and circuit.edges[0] in circuit
    threshold = Circuit.from_scores(scores, "threshold", threshold=float(kept))
    assert threshold == circuit
    half = Circuit.from_scores(scores, top_n=0.5)
    assert half.n_edges == round(0.5 * scores.graph.n_edges)


@pytest.mark.parametrize("method", ["top_n", "greedy"])
@pytest.mark.parametrize("prune", [False, True])
def test_one_span_selects_exactly_as_position_free(model, method, prune):
    plain = positional_scores(model).coarsen()
    graph = Graph.from_model(model, spans=("all",))
    one = EdgeScores(plain.scores[..., None], graph)
    a = Circuit.from_scores(plain, method, top_n=40, prune=prune)
    b = Circuit.from_scores(one, method, top_n=40, prune=prune)
    assert torch.equal(a.mask, b.mask[..., 0])


def test_positional_greedy_and_pruning_follow_spans(model):
    graph = Graph.from_model(model, spans=("early", "late"))
    scores = torch.zeros(graph.dense_shape)
    last = graph.n_receivers - 1
    a1 = graph.sender_index["a1.h0"]
    q = graph.receiver_index["a1.h0.q"]
    k = graph.receiver_index["a1.h0.k"]
    scores[a1, last, 1] = 5.0          # a1.h0 -> logits at "late"
    scores[0, q, 0] = 4.0              # input -> its q at "early": not on a path
    scores[0, k, 0] = 3.0              # input -> its k at "early": attention reads it
    scores[0, last, 0] = 0.5
    es = EdgeScores(scores, graph)
    greedy = Circuit.from_scores(es, "greedy", top_n=3)
    assert set(greedy.edges) == {("a1.h0", "logits", "late"), ("input", "a1.h0.k", "early"),
                                 ("input", "logits", "early")}
    top = Circuit.from_scores(es, top_n=3, prune=True)
    assert set(top.edges) == {("a1.h0", "logits", "late"), ("input", "a1.h0.k", "early")}


def test_positional_circuit_file_networkx_pandas(model, tmp_path):
    scores = positional_scores(model)
    circuit = Circuit.from_scores(scores, top_n=25)
    path = circuit.save(tmp_path / "c.json")
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == 2 and doc["graph"]["spans"] == list(SPANS)
    assert len(doc["edges"][0]) == 4 and doc["edges"][0][2] in SPANS
    loaded = Circuit.load(path, model=model)
    assert loaded == circuit and torch.equal(loaded.scores, circuit.scores)
    g = circuit.to_networkx()
    s, r, span = circuit.edges[0]
    assert g.edges[s, r, span]["in_circuit"] and g.edges[s, r, span]["span"] == span
    assert Circuit.from_networkx(g) == circuit
    table = circuit.to_pandas()
    assert int(table.in_circuit.sum()) == 25 and set(table[table.in_circuit].span) <= set(SPANS)
    # a listed span the graph does not have
    doc["edges"][0][2] = "verb"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"edge 0 .* is at span 'verb', which is not one of the "
                       r"file's spans \['subject', 'end', 'other'\]"):
        Circuit.load(path)
    doc["schema_version"] = 1
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="schema version 1 does not fit its graph .with spans"):
        Circuit.load(path)


def test_position_free_files_are_unchanged(model, tmp_path):
    circuit = Circuit.from_scores(positional_scores(model).coarsen(), top_n=5)
    doc = circuit.to_dict()
    assert doc["schema_version"] == SCHEMA_VERSION == 1 and "spans" not in doc["graph"]
    assert len(doc["edges"][0]) == 3
    assert Circuit.from_dict(doc) == circuit


def test_mib_refuses_positional_circuits_and_coarsen_drops_spans(model):
    circuit = Circuit.from_scores(positional_scores(model), top_n=25)
    with pytest.raises(ValueError, match=r"positional .* Export circuit.coarsen\(\)"):
        circuit.to_mib_dict()
    coarse = circuit.coarsen()
    assert not coarse.graph.positional
    assert set(coarse.edges) == {(s, r) for s, r, _ in circuit.edges}
    assert coarse.to_mib_dict()["edges"]
    assert coarse.components == circuit.components


def test_from_edges_names_the_bad_edge(model):
    graph = Graph.from_model(model, spans=SPANS)
    circuit = Circuit.from_edges(graph, [("input", "logits", "end"), ("a0.h0", "m1", "subject")])
    assert circuit.n_edges == 2 and ("input", "logits", "end") in circuit
    assert ("input", "logits", "subject") not in circuit
    with pytest.raises(KeyError, match="'verb' is not a span"):
        Circuit.from_edges(graph, [("input", "logits", "verb")])
    with pytest.raises(TypeError, match="positional"):
        Circuit.from_edges(graph, [("input", "logits")])
    assert "spans ['subject', 'end', 'other']" in repr(circuit)


def test_gradient_rules_open_a_node_for_any_of_its_spans(model):
    circuit = Circuit.from_scores(positional_scores(model), top_n=15)
    positional = parameter_rules(model, circuit)
    plain = parameter_rules(model, circuit.coarsen())
    assert [r.name for r in positional] == [r.name for r in plain]
    for a, b in zip(positional, plain, strict=True):
        assert torch.equal(a.trainable, b.trainable), a.name
    assert sum(r.n_trainable for r in positional) > 0


# ---------------------------------------------------------------- figures


def _segments(fig, name_part: str) -> list[tuple[float, float]]:
    """(x0, x1) of every line segment in the traces whose name contains ``name_part``."""
    out = []
    for trace in fig.data:
        if trace.mode != "lines" or name_part not in (trace.name or ""):
            continue
        xs = [x for x in trace.x]
        out += [(xs[i], xs[i + 1]) for i in range(0, len(xs) - 2, 3)]
    return out


def test_circuit_figure_has_a_column_per_span(model):
    from ctlens.viz import plot_circuit
    from ctlens.viz.layout import Layout
    from ctlens.viz.positional import COLUMN_GAP

    circuit = Circuit.from_scores(positional_scores(model), top_n=30)
    fig = plot_circuit(circuit, budget=None)
    assert [t.replace("<b>", "").replace("</b>", "") for t in fig.layout.xaxis.ticktext] \
        == list(SPANS)
    (x0, x1), _ = Layout(circuit.graph).axis_ranges()
    width = x1 - x0 + COLUMN_GAP
    segments = _segments(fig, "metric")
    assert len(segments) == circuit.n_edges  # every (edge, span) pair drawn once
    per_span = [0] * len(SPANS)
    for a, b in segments:
        k = int((a - x0) // width)
        assert x0 + k * width <= min(a, b) and max(a, b) <= x1 + k * width, "inside its column"
        per_span[k] += 1
    assert per_span == circuit.mask.flatten(0, 1).sum(0).tolist()
    hover = [t for trace in fig.data if trace.name == "edges" for t in trace.text]
    assert len(hover) == circuit.n_edges and all("span " in t for t in hover)
    budgeted = plot_circuit(circuit, budget=10, labels=3)
    assert "the 10 strongest drawn" in budgeted.layout.title.text
    assert any("20 weaker edges" in (t.name or "") for t in budgeted.data)
    ranked = budgeted.layout.annotations[0].text  # the ranked list under the drawing
    (s, r, span), value = max(circuit.edge_scores().items(), key=lambda kv: abs(kv[1]))
    assert f"1. {s} → {r} @ {span}" in ranked and "<br>4. " not in ranked
    assert any(t.legendgroup == "marks" for t in budgeted.data)  # mark_legend


def test_diff_and_node_scores_of_positional_circuits(model):
    from ctlens.viz import diff_counts, plot_diff, plot_node_scores

    a = Circuit.from_scores(positional_scores(model, 0), top_n=30)
    b = Circuit.from_scores(positional_scores(model, 1), top_n=30)
    counts = diff_counts(a, b)
    assert counts["edges_both"] == int((a.mask & b.mask).sum())
    assert counts["node_jaccard"] == pytest.approx(a.node_jaccard(b))
    fig = plot_diff(a, b)
    assert len(_segments(fig, "only in a")) == counts["edges_only_a"]
    assert len(_segments(fig, "in both")) == counts["edges_both"]
    assert "(edge, span) pairs" in fig.layout.title.text
    assert [t.strip("<b/>") for t in fig.layout.xaxis.ticktext] == list(SPANS)
    hover = [t for trace in fig.data if trace.name == "edges" for t in trace.text]
    assert len(hover) == int((a.mask | b.mask).sum()) and all("span " in t for t in hover)
    heat = np.array(plot_node_scores(a).data[0].z, dtype=float)
    # heads and MLPs: the sum of their kept (edge, span) pairs' scores
    assert np.nansum(heat) == pytest.approx(float((a.scores * a.mask)[1:].sum()), rel=1e-5)


# ---------------------------------------------------------------- products per span


def test_span_order_products_equal_one_hot_sums():
    from ctlens.spans import SpanOrder, span_one_hot

    gen = torch.Generator().manual_seed(0)
    b, p, d, n, w, k = 3, 5, 4, 6, 2, 4
    labels = torch.randint(0, k - 1, (b, p), generator=gen)  # span k-1 stays empty
    labels[1, 3:] = PADDING
    rows = torch.randn(n, b, p, d, generator=gen, dtype=torch.float64)
    grads = torch.randn(w, b, p, d, generator=gen, dtype=torch.float64)
    expected = torch.einsum("nbpd,wbpd,bpk->nwk", rows, grads,
                            span_one_hot(labels, k, torch.float64))
    order = SpanOrder(labels, k)
    assert order.bounds[-1] == int((labels >= 0).sum()) and order.bounds[-2] == order.bounds[-1]
    sorted_rows = rows.clone()
    order.sort_rows_(sorted_rows)
    got = order.products(sorted_rows.view(n, b * p, d), order.sorted_cells(grads))
    torch.testing.assert_close(got, expected.float())
    torch.testing.assert_close(order.unsort(sorted_rows[2]), rows[2])
    torch.testing.assert_close(got.sum(-1), torch.einsum(
        "nbpd,wbpd->nw", rows * (labels >= 0)[None, ..., None], grads).float())
