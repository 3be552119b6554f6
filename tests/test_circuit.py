"""Circuit selection, set algebra, networkx views, versioned JSON files and MIB interop."""

from __future__ import annotations

import json
import math
import re

import networkx as nx
import pytest
import torch
from conftest import tiny_gpt2_module

import ctlens
from ctlens import Circuit, EdgeScores, Graph, GraphSpec, cli
from ctlens.circuit import SCHEMA_VERSION, mib_to_ctlens_edge
from ctlens.types import NodeKind

SPECS = {"mha": GraphSpec(3, 4, 4), "gqa": GraphSpec(3, 4, 2)}


@pytest.fixture(params=sorted(SPECS))
def graph(request: pytest.FixtureRequest) -> Graph:
    return Graph(SPECS[request.param])


def random_scores(graph: Graph, seed: int = 0) -> EdgeScores:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(graph.n_senders, graph.n_receivers, generator=gen)
    return EdgeScores(scores, graph, {"method": "eap", "model": "test-model"})


# ------------------------------------------------------------------ construction


def test_from_edges_and_views(graph: Graph) -> None:
    edges = [("input", "a0.h1.q"), ("a0.h2", "m0"), ("m1", "logits")]
    circuit = Circuit.from_edges(graph, edges)
    assert circuit.n_edges == 3 == len(circuit)
    assert circuit.edges == edges  # sender-major graph order
    assert circuit.nodes == ["input", "a0.h2", "m1", "a0.h1.q", "m0", "logits"]
    assert circuit.components == ["input", "a0.h1", "a0.h2", "m0", "m1", "logits"]
    assert ("input", "a0.h1.q") in circuit and ("input", "m0") not in circuit
    assert circuit.edge_scores() == {e: None for e in edges}


def test_from_edges_rejects_bad_names_and_invalid_edges(graph: Graph) -> None:
    with pytest.raises(KeyError, match="not a sender"):
        Circuit.from_edges(graph, [("a9.h0", "logits")])
    with pytest.raises(KeyError, match="not a receiver"):
        Circuit.from_edges(graph, [("input", "a0.h0.z")])
    with pytest.raises(ValueError, match="not a valid edge"):
        Circuit.from_edges(graph, [("a1.h0", "a0.h0.q")])
    with pytest.raises(TypeError, match="pair"):
        Circuit.from_edges(graph, ["input->logits"])  # type: ignore[list-item]


def test_mask_never_selects_invalid_edges(graph: Graph) -> None:
    with pytest.raises(ValueError, match="invalid edge"):
        Circuit(graph, torch.ones(graph.n_senders, graph.n_receivers, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        Circuit(graph, torch.zeros(2, 2, dtype=torch.bool))


# ------------------------------------------------------------------ selection


def test_top_n_is_exactly_the_largest_magnitudes(graph: Graph) -> None:
    scores = random_scores(graph)
    for n in (1, 7, graph.n_edges):
        circuit = Circuit.from_scores(scores, "top_n", top_n=n)
        assert circuit.n_edges == n
        magnitudes = scores.scores.abs()[graph.valid]
        kth = magnitudes.sort(descending=True).values[n - 1]
        assert bool((scores.scores.abs()[circuit.mask] >= kth).all())
        assert {(s, r) for s, r, _ in scores.top(n)} == set(circuit.edges)
    assert circuit.model_name == "test-model"
    assert torch.equal(circuit.scores, scores.scores)


@pytest.mark.parametrize("bad", [0, -3, 10**9, 2.5, True, None])
def test_top_n_out_of_range(graph: Graph, bad: object) -> None:
    with pytest.raises(ValueError, match="top_n"):
        Circuit.from_scores(random_scores(graph), "top_n", top_n=bad)  # type: ignore[arg-type]


def test_threshold_and_bad_arguments(graph: Graph) -> None:
    scores = random_scores(graph)
    circuit = Circuit.from_scores(scores, "threshold", threshold=1.0)
    assert torch.equal(circuit.mask, (scores.scores.abs() >= 1.0) & graph.valid)
    with pytest.raises(ValueError, match="threshold"):
        Circuit.from_scores(scores, "threshold", threshold=-1.0)
    with pytest.raises(ValueError, match="unknown method"):
        Circuit.from_scores(scores, "best", top_n=3)
    with pytest.raises(TypeError, match="EdgeScores"):
        Circuit.from_scores(torch.zeros(3, 3), "top_n", top_n=1)


def _feeds(graph: Graph, circuit: Circuit) -> set[str]:
    """Sender names whose own inputs are open: components reached from logits."""
    reached = set()
    group = graph.spec.n_heads // graph.spec.n_kv_heads
    for receiver in {r for _, r in circuit.edges}:
        node = graph.receiver_nodes[graph.receiver_index[receiver]]
        if node.kind is NodeKind.Q:
            reached.add(f"a{node.layer}.h{node.head}")
        elif node.kind in (NodeKind.K, NodeKind.V):
            reached |= {
                f"a{node.layer}.h{h}" for h in range(node.head * group, (node.head + 1) * group)
            }
        else:
            reached.add(node.name)
    return reached


def test_greedy_grows_from_logits(graph: Graph) -> None:
    scores = random_scores(graph, seed=3)
    circuit = Circuit.from_scores(scores, "greedy", top_n=25)
    assert circuit.n_edges == 25
    # every edge's sender is a component whose output is read by an edge already chosen,
    # i.e. each circuit edge leads towards logits
    g = nx.DiGraph()
    g.add_edges_from(circuit.edges)
    for node in graph.receiver_nodes:
        if node.kind is NodeKind.Q:
            g.add_edge(node.name, f"a{node.layer}.h{node.head}")
        elif node.kind in (NodeKind.K, NodeKind.V):
            group = graph.spec.n_heads // graph.spec.n_kv_heads
            for h in range(node.head * group, (node.head + 1) * group):
                g.add_edge(node.name, f"a{node.layer}.h{h}")
    for sender, _ in circuit.edges:
        assert nx.has_path(g, sender, "logits"), sender
    # the first edge taken is the best edge into logits
    logits_col = scores.scores[:, -1].abs()
    best = graph.senders[int(logits_col.argmax())]
    assert (best, "logits") in circuit


def _independent_prune(graph: Graph, mask: torch.Tensor) -> torch.Tensor:
    """Fixed-point pruning on dense masks (no networkx): forward and backward liveness."""
    group = graph.spec.n_heads // graph.spec.n_kv_heads
    feeders: dict[int, list[int]] = {0: []}
    for layer in range(graph.spec.n_layers):
        heads = graph.sender_slice(layer)
        q = graph.receiver_slice(layer, NodeKind.Q).start
        k = graph.receiver_slice(layer, NodeKind.K).start
        v = graph.receiver_slice(layer, NodeKind.V).start
        for h in range(graph.spec.n_heads):
            feeders[heads.start + h] = [q + h, k + h // group, v + h // group]
        feeders[graph.mlp_sender(layer)] = [graph.receiver_slice(layer, NodeKind.MLP).start]
    mask = mask.clone()
    while True:
        live_recv = mask.any(0)
        live_send = mask.any(1)
        keep = mask.clone()
        for s, cols in feeders.items():
            # a sender other than input needs an incoming circuit edge on one of its inputs
            if s != 0 and not any(bool(live_recv[c]) for c in cols):
                keep[s] = False
        receiver_live = torch.zeros(graph.n_receivers, dtype=torch.bool)
        receiver_live[-1] = True  # logits
        for s, cols in feeders.items():
            for c in cols:  # a receiver needs one of the components it feeds to send
                receiver_live[c] |= bool(live_send[s])
        keep[:, ~receiver_live] = False
        if torch.equal(keep, mask):
            return mask
        mask = keep


def test_prune_keeps_only_input_to_logits_paths(graph: Graph) -> None:
    for seed in range(4):
        scores = random_scores(graph, seed)
        raw = Circuit.from_scores(scores, "top_n", top_n=30)
        pruned = Circuit.from_scores(scores, "top_n", top_n=30, prune=True)
        assert torch.equal(pruned.mask, _independent_prune(graph, raw.mask))
        assert pruned.n_edges <= raw.n_edges
    edges = [("input", "a0.h0.q"), ("a0.h0", "logits"), ("a0.h1", "logits"), ("input", "m2")]
    circuit = Circuit.from_edges(graph, edges)
    kept = Circuit(graph, ctlens.circuit.prune_mask(graph, circuit.mask))
    assert kept.edges == [("input", "a0.h0.q"), ("a0.h0", "logits")]


# ------------------------------------------------------------------ algebra


def test_set_algebra_and_jaccard(graph: Graph) -> None:
    a = Circuit.from_edges(graph, [("input", "logits"), ("a0.h0", "m0"), ("m0", "logits")])
    b = Circuit.from_edges(graph, [("input", "logits"), ("a0.h1", "m0")])
    assert set((a | b).edges) == set(a.edges) | set(b.edges)
    assert (a & b).edges == [("input", "logits")]
    assert set((a - b).edges) == {("a0.h0", "m0"), ("m0", "logits")}
    assert a.edge_jaccard(b) == pytest.approx(1 / 4)
    # components: a = {input, a0.h0, m0, logits}, b = {input, a0.h1, m0, logits}
    assert a.node_jaccard(b) == pytest.approx(3 / 5)
    empty = Circuit.empty(graph)
    assert empty.edge_jaccard(empty) == 1.0 == empty.node_jaccard(empty)
    other = Circuit.empty(Graph(GraphSpec(2, 4, 4)))
    with pytest.raises(ValueError, match="different graphs"):
        _ = a | other
    with pytest.raises(TypeError):
        _ = a | 3  # type: ignore[operator]


# ------------------------------------------------------------------ networkx and files


def _same(a: Circuit, b: Circuit) -> None:
    assert a == b
    assert a.graph == b.graph
    assert (a.scores is None) == (b.scores is None)
    if a.scores is not None:
        assert torch.equal(a.scores, b.scores)
    assert a.metadata == b.metadata
    assert a.model_name == b.model_name


def test_networkx_round_trip(graph: Graph) -> None:
    circuit = Circuit.from_scores(random_scores(graph), "top_n", top_n=12)
    g = circuit.to_networkx()
    assert sum(1 for *_, d in g.edges(data=True) if d["in_circuit"]) == 12
    _same(circuit, Circuit.from_networkx(g))
    plain = Circuit.from_edges(graph, [("input", "logits")])
    _same(plain, Circuit.from_networkx(plain.to_networkx()))


def test_json_round_trip_is_lossless(graph: Graph, tmp_path) -> None:
    circuit = Circuit.from_scores(random_scores(graph), "greedy", top_n=9, prune=True)
    circuit.metadata["note"] = "hello"
    path = circuit.save(tmp_path / "sub" / "c.json")
    _same(circuit, Circuit.load(path))
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == SCHEMA_VERSION and doc["model"] == "test-model"
    assert doc["graph"]["n_layers"] == graph.spec.n_layers
    assert len(doc["edges"]) == circuit.n_edges
    assert [p.name for p in path.parent.iterdir()] == ["c.json"]  # no temp files left
    no_scores = Circuit.from_edges(graph, [("input", "logits")])
    _same(no_scores, Circuit.load(no_scores.save(tmp_path / "d.json")))


def _write(tmp_path, doc) -> object:
    path = tmp_path / "bad.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_load_rejects_bad_files(graph: Graph, tmp_path) -> None:
    doc = Circuit.from_scores(random_scores(graph), "top_n", top_n=5).to_dict()
    with pytest.raises(ValueError, match="not valid JSON"):
        Circuit.load(_write(tmp_path, json.dumps(doc)[:-20]))
    with pytest.raises(ValueError, match="schema version 99"):
        Circuit.load(_write(tmp_path, {**doc, "schema_version": 99}))
    with pytest.raises(ValueError, match="not a ctlens circuit"):
        Circuit.load(_write(tmp_path, {"cfg": {}, "edges": {}}))
    with pytest.raises(ValueError, match="not a valid edge"):
        Circuit.load(_write(tmp_path, {**doc, "edges": [["a2.h0", "a0.h0.q", 1.0]], "n_edges": 1}))
    with pytest.raises(ValueError, match="not a sender"):
        Circuit.load(_write(tmp_path, {**doc, "edges": [["zz", "logits", 1.0]], "n_edges": 1}))
    with pytest.raises(ValueError, match="corrupted"):
        Circuit.load(_write(tmp_path, {**doc, "n_edges": 6}))
    with pytest.raises(ValueError, match="one number per valid edge"):
        Circuit.load(_write(tmp_path, {**doc, "scores": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="expected a JSON object"):
        Circuit.load(_write(tmp_path, "[1, 2]"))
    with pytest.raises(FileNotFoundError):
        Circuit.load(tmp_path / "missing.json")


def test_load_checks_the_model(tiny_model, tmp_path) -> None:
    graph = Graph.from_model(tiny_model)
    circuit = Circuit.from_edges(graph, [("input", "logits")])
    path = circuit.save(tmp_path / "c.json")
    assert Circuit.load(path, model=tiny_model) == circuit
    other = Circuit.from_edges(Graph(GraphSpec(3, 4, 4)), [("input", "logits")])
    with pytest.raises(ValueError, match="another model's graph"):
        Circuit.load(other.save(tmp_path / "o.json"), model=tiny_model)


# ------------------------------------------------------------------ MIB / EAP-IG


def test_mib_names_and_round_trip(graph: Graph, tmp_path) -> None:
    circuit = Circuit.from_scores(random_scores(graph), "top_n", top_n=20)
    doc = circuit.to_mib_dict()
    n_heads, n_layers = graph.spec.n_heads, graph.spec.n_layers
    # MIB has one edge per (sender, head input); q/k/v per head even under GQA
    assert len(doc["nodes"]) == 1 + n_layers * (n_heads + 1) + 1
    assert "a0.h1->a2.h3<k>" in doc["edges"] and "input->logits" in doc["edges"]
    expected = (
        sum(
            (1 + layer * (n_heads + 1)) * (3 * n_heads) + (1 + layer * (n_heads + 1) + n_heads)
            for layer in range(n_layers)
        )
        + 1
        + n_layers * (n_heads + 1)
    )
    assert len(doc["edges"]) == expected
    assert mib_to_ctlens_edge(graph, "a0.h1->a2.h3<k>") == (
        "a0.h1",
        "a2.g1.k" if graph.spec.grouped else "a2.h3.k",
    )
    back = Circuit.from_mib_json(circuit.to_mib_json(tmp_path / "mib.json"))
    assert back == circuit
    assert torch.allclose(back.scores, circuit.scores, atol=1e-6)
    with pytest.raises(ValueError, match="MIB edge name"):
        Circuit.from_mib_dict({"cfg": doc["cfg"], "edges": {"bogus": {"score": 1.0}}})
    with pytest.raises(ValueError, match="not a valid edge"):
        Circuit.from_mib_dict({"cfg": doc["cfg"], "edges": {"m2->a0.h0<q>": {"score": 1.0}}})


# ------------------------------------------------------------------ hostile and broken files


def test_nan_scores_are_refused_on_load_and_diff(graph: Graph, tmp_path) -> None:
    """A file whose scores are all NaN used to load, diff and report as if nothing were
    wrong; now every path that reads it says which edge is not finite."""
    good = Circuit.from_scores(random_scores(graph), "top_n", top_n=5)
    doc = good.to_dict()
    nan_all = {**doc, "scores": [math.nan] * graph.n_edges}
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(nan_all))  # json writes NaN literals, and reads them back
    with pytest.raises(ValueError, match=r"'scores'.*score\(s\) are not finite.*nan on input"):
        Circuit.load(path)
    nan_edge = {**doc, "scores": None, "edges": [[*e[:2], math.inf] for e in doc["edges"]]}
    with pytest.raises(ValueError, match=r"not finite \(the first is inf on edge 0 \("):
        Circuit.load(_write(tmp_path, json.dumps(nan_edge)))
    with pytest.raises(ValueError, match="circuit scores: .* not finite"):
        Circuit(graph, good.mask, torch.full((graph.n_senders, graph.n_receivers), math.nan))
    a = good.save(tmp_path / "a.json")
    out = tmp_path / "diff.html"
    assert cli.main(["diff", str(a), str(path), "-o", str(out)]) == 2
    assert not out.exists()


def test_mib_non_finite_scores_are_refused(graph: Graph) -> None:
    doc = Circuit.from_scores(random_scores(graph), "top_n", top_n=5).to_mib_dict()
    name = next(iter(doc["edges"]))
    doc["edges"][name]["score"] = math.nan
    with pytest.raises(ValueError, match=f"edge '{re.escape(name)}' has the score nan"):
        Circuit.from_mib_dict(doc)


def test_declared_graph_is_bounded_before_allocating(tmp_path) -> None:
    """A tiny file declaring 100,000 layers would make ctlens allocate ~2 TB; it is refused
    from the numbers alone (with a model: against the model's graph)."""
    tiny_model = ctlens.load_model(tiny_gpt2_module())
    doc = Circuit.from_edges(Graph.from_model(tiny_model), [("input", "logits")]).to_dict()
    huge = {**doc, "graph": {**doc["graph"], "n_layers": 100_000, "n_heads": 1, "n_kv_heads": 1}}
    path = _write(tmp_path, huge)
    with pytest.raises(ValueError, match=r"100000 layers.*more than the 1,073,741,824"):
        Circuit.load(path)
    with pytest.raises(ValueError, match="another model's graph"):
        Circuit.load(path, model=tiny_model)
    with pytest.raises(ValueError, match="n_layers must be an integer"):
        Circuit.load(_write(tmp_path, {**doc, "graph": {**doc["graph"], "n_layers": 2.5}}))
    groups = {**doc, "graph": {**doc["graph"], "mlp_groups": 10**6}}
    with pytest.raises(ValueError, match="1000000 MLP groups.*more than the"):
        Circuit.load(_write(tmp_path, groups))
    with pytest.raises(ValueError, match="splits each MLP into 1000000 neuron groups"):
        Circuit.load(_write(tmp_path, groups), model=tiny_model)
    mib = {"cfg": {"n_layers": 100_000, "n_heads": 64}, "edges": {}}
    with pytest.raises(ValueError, match="more than the"):
        Circuit.from_mib_dict(mib)


def test_duplicate_edges_are_refused_by_name(graph: Graph, tmp_path) -> None:
    doc = Circuit.from_scores(random_scores(graph), "top_n", top_n=5).to_dict()
    edges = doc["edges"]
    repeated = [*edges[:3], edges[1], *edges[3:], edges[0]]
    bad = {**doc, "edges": repeated, "n_edges": len(repeated)}
    sender, receiver = edges[1][:2]
    with pytest.raises(
        ValueError, match=rf"edge 3 \({sender} -> {receiver}\) repeats edge 1; each edge"
    ):
        Circuit.load(_write(tmp_path, bad))
    # many duplicates (a hostile file): refused, naming the first repeat
    many = {**doc, "edges": [edges[0]] * 20_000, "scores": None}
    del many["n_edges"]
    with pytest.raises(ValueError, match="edge 1 .* repeats edge 0"):
        Circuit.load(_write(tmp_path, many))


def test_run_json_declaring_a_huge_graph_is_refused(tmp_path) -> None:
    """A run directory is a file too: its run.json graph is bounded like a circuit file's."""
    from ctlens import run_format
    from ctlens.viz import RunFormatError, read_run

    spec = {"version": 1, "n_layers": 100_000, "n_heads": 1, "n_kv_heads": 1}
    doc = {"format": run_format.FORMAT, "version": run_format.VERSION, "graph": spec}
    (tmp_path / run_format.RUN_JSON).write_text(json.dumps(doc))
    with pytest.raises(RunFormatError, match="run.json declares a graph of 100000 layers"):
        read_run(tmp_path)
