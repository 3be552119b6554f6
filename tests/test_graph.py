"""Tests of ctlens.graph: node lists, counts, the validity rule, slices and networkx views."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB
from transformers import GPT2Config, GPT2LMHeadModel

import ctlens
from ctlens.graph import Graph, GraphSpec
from ctlens.types import NodeKind


def closed_form_edges(n_layers: int, n_heads: int, n_kv: int, parallel: bool = False) -> int:
    """Edge count from the definition, independent of Graph's construction.

    Layer l's q/k/v receivers read ``input`` and everything of layers < l (1 + l(H+1)
    senders); its MLP also reads layer l's own heads unless the block is parallel; the
    logits read every sender.
    """
    total = 0
    for layer in range(n_layers):
        before = 1 + layer * (n_heads + 1)
        total += (n_heads + 2 * n_kv) * before
        total += before + (0 if parallel else n_heads)
    return total + 1 + n_layers * (n_heads + 1)


def test_gpt2_small_counts_from_spec():
    graph = Graph(GraphSpec(n_layers=12, n_heads=12, n_kv_heads=12))
    assert (graph.n_senders, graph.n_receivers, graph.n_edges) == (157, 445, 32_491)
    assert graph.n_edges == closed_form_edges(12, 12, 12)
    assert len(graph.edges()) == 32_491


def test_gpt2_small_counts_from_model_config():
    """A GPT-2 with GPT-2 small's layer and head counts (narrow, so it builds in a blink)."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_head=12, n_embd=48, vocab_size=VOCAB, n_positions=8)
    model = ctlens.load_model(GPT2LMHeadModel(config))
    graph = Graph.from_model(model)
    assert graph.spec == GraphSpec(n_layers=12, n_heads=12, n_kv_heads=12)
    assert (graph.n_senders, graph.n_receivers, graph.n_edges) == (157, 445, 32_491)


def test_from_model_reads_gqa_config(tiny_model, family):
    graph = Graph.from_model(tiny_model)
    kv = 2 if family == "llama" else 4
    assert graph.spec == GraphSpec(n_layers=2, n_heads=4, n_kv_heads=kv)
    if family == "llama":
        assert "a1.g1.k" in graph.receivers and "a1.h1.k" not in graph.receivers
    else:
        assert "a1.h3.k" in graph.receivers


@pytest.mark.parametrize(
    ("spec", "edges"),
    [
        (GraphSpec(48, 32, 8), 1_829_449),
        (GraphSpec(80, 64, 8), 16_654_201),
        (GraphSpec(2, 4, 2), None),
        (GraphSpec(3, 6, 6, parallel_attn_mlp=True), None),
    ],
)
def test_counts_match_closed_form(spec, edges):
    graph = Graph(spec)
    expected = closed_form_edges(
        spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.parallel_attn_mlp
    )
    assert graph.n_edges == expected
    if edges is not None:
        assert graph.n_edges == edges
    assert graph.n_senders == 1 + spec.n_layers * (spec.n_heads + 1)
    assert graph.n_receivers == spec.n_layers * (spec.n_heads + 2 * spec.n_kv_heads + 1) + 1


def test_upstream_is_a_prefix_and_matches_valid():
    graph = Graph(GraphSpec(3, 4, 2))
    for col, n_up in enumerate(graph.upstream):
        column = graph.valid[:, col]
        assert column[:n_up].all() and not column[n_up:].any()


def test_validity_rule_by_name():
    graph = Graph(GraphSpec(3, 4, 2))
    valid = lambda s, r: bool(graph.valid[graph.sender_index[s], graph.receiver_index[r]])  # noqa: E731
    assert valid("input", "a0.h0.q") and valid("input", "logits")
    assert not valid("a0.h1", "a0.h0.q")  # same layer's heads cannot feed its q/k/v
    assert not valid("a0.h1", "a0.g1.v")
    assert valid("a0.h1", "m0")  # sequential block: the MLP reads the heads' outputs
    assert not valid("m0", "m0") and valid("m0", "a1.g0.k") and valid("m2", "logits")
    assert not valid("m1", "a1.h3.q")


def test_parallel_block_validity():
    seq = Graph(GraphSpec(3, 4, 4))
    par = Graph(GraphSpec(3, 4, 4, parallel_attn_mlp=True))
    assert seq.senders == par.senders and seq.receivers == par.receivers
    for layer in range(3):
        mlp = par.receiver_index[f"m{layer}"]
        q = par.receiver_index[f"a{layer}.h0.q"]
        # the MLP of a parallel block reads exactly what that layer's heads read
        assert torch.equal(par.valid[:, mlp], par.valid[:, q])
        assert not par.valid[par.sender_slice(layer), mlp].any()
        assert seq.valid[seq.sender_slice(layer), mlp].all()
        if layer + 1 < 3:
            assert par.valid[par.sender_slice(layer), par.receiver_index[f"m{layer + 1}"]].all()
    only_seq = seq.valid & ~par.valid
    assert int(only_seq.sum()) == 3 * 4  # exactly the same-layer head -> MLP edges


def test_slices_name_the_right_nodes():
    graph = Graph(GraphSpec(3, 4, 2))
    assert graph.senders[graph.sender_slice(1)] == ["a1.h0", "a1.h1", "a1.h2", "a1.h3"]
    assert graph.senders[graph.mlp_sender(2)] == "m2"
    names = {
        NodeKind.Q: ["a2.h0.q", "a2.h1.q", "a2.h2.q", "a2.h3.q"],
        NodeKind.K: ["a2.g0.k", "a2.g1.k"],
        NodeKind.V: ["a2.g0.v", "a2.g1.v"],
        NodeKind.MLP: ["m2"],
    }
    for kind, expected in names.items():
        assert graph.receivers[graph.receiver_slice(2, kind)] == expected
    assert graph.receivers[-1] == "logits"
    for node in graph.receiver_nodes:
        if node.kind in (NodeKind.K, NodeKind.V):
            assert node.head is not None and node.head < 2


def test_edge_index_errors_name_the_problem():
    graph = Graph(GraphSpec(2, 2, 2))
    assert graph.edge_index("a0.h1", "m1") == (
        graph.sender_index["a0.h1"],
        graph.receiver_index["m1"],
    )
    with pytest.raises(KeyError, match="not a sender"):
        graph.edge_index("a9.h0", "logits")
    with pytest.raises(KeyError, match="not a receiver"):
        graph.edge_index("input", "a0.g0.k")
    with pytest.raises(ValueError, match="reads the residual stream before"):
        graph.edge_index("m1", "a1.h0.q")


def test_spec_validation_and_dict_roundtrip():
    spec = GraphSpec(4, 8, 2, parallel_attn_mlp=True)
    assert GraphSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        GraphSpec(2, 6, 4)
    with pytest.raises(ValueError, match="at least one layer"):
        GraphSpec(0, 4, 4)
    with pytest.raises(ValueError, match="version 99 is not supported"):
        GraphSpec.from_dict({**spec.to_dict(), "version": 99})
    with pytest.raises(ValueError, match="missing"):
        GraphSpec.from_dict({"n_layers": 2})


@pytest.mark.parametrize("spec", [GraphSpec(2, 4, 4), GraphSpec(2, 4, 2), GraphSpec(2, 4, 4, True)])
def test_networkx_roundtrip_is_lossless(spec):
    graph = Graph(spec)
    g = graph.to_networkx()
    external = [(s, r) for s, r, d in g.edges(data=True) if not d["internal"]]
    assert sorted(external) == sorted(graph.edges())
    assert g.nodes["a1.h3"]["kind"] == "head" and g.nodes["a1.h3"]["layer"] == 1
    assert g.nodes["a1.h3"]["head"] == 3 and g.nodes["m0"]["role"] == "both"
    assert g.nodes["logits"]["role"] == "receiver" and g.nodes["input"]["role"] == "sender"
    back = Graph.from_networkx(g)
    assert back == graph and back.senders == graph.senders and back.receivers == graph.receivers
    assert torch.equal(back.valid, graph.valid)


def test_networkx_internal_edges_connect_receivers_to_their_heads():
    g = Graph(GraphSpec(2, 4, 2)).to_networkx()
    assert g.edges["a0.h1.q", "a0.h1"]["internal"]
    assert {v for _, v in g.out_edges("a0.g1.k")} == {"a0.h2", "a0.h3"}
    import networkx as nx

    assert nx.has_path(g, "input", "logits") and nx.is_directed_acyclic_graph(g)


def test_from_networkx_refuses_foreign_graphs():
    import networkx as nx

    with pytest.raises(ValueError, match="no graph\\['spec'\\]"):
        Graph.from_networkx(nx.DiGraph())
    g = Graph(GraphSpec(2, 2, 2)).to_networkx()
    g.add_node("a7.h0")
    with pytest.raises(ValueError, match="extra \\['a7.h0'\\]"):
        Graph.from_networkx(g)


def test_graph_equality_and_repr():
    assert Graph(GraphSpec(2, 2, 2)) == Graph(GraphSpec(2, 2, 2))
    assert Graph(GraphSpec(2, 2, 2)) != Graph(GraphSpec(2, 2, 1))
    assert "32491 valid edges" in repr(Graph(GraphSpec(12, 12, 12)))


# ------------------------------------------------------------------------------ hook names


def test_hook_names_of_each_node_kind():
    graph = Graph(GraphSpec(4, 6, 2))
    assert graph.hook_name("a3.h5") == ("blocks.3.attn.hook_result", 5)
    assert graph.hook_name("a3.g1.k") == ("blocks.3.hook_k_input", 1)
    assert graph.hook_name("a2.h4.q") == ("blocks.2.hook_q_input", 4)
    assert graph.hook_name("a0.g0.v") == ("blocks.0.hook_v_input", 0)
    assert graph.hook_name("m3", role="receiver") == ("blocks.3.hook_mlp_in", None)
    assert graph.hook_name("m3", role="sender") == ("blocks.3.hook_mlp_out", None)
    assert graph.hook_name("input") == ("blocks.0.hook_resid_pre", None)
    assert graph.hook_name(graph.receiver_nodes[-1]) == ("ln_final.hook_in", None)
    with pytest.raises(ValueError, match="both a sender and a receiver; pass role"):
        graph.hook_name("m0")
    with pytest.raises(ValueError, match="logits is not a sender"):
        graph.hook_name("logits", role="sender")
    with pytest.raises(KeyError, match="'a9.h0' is not a node"):
        graph.hook_name("a9.h0")
    grouped = Graph(GraphSpec(2, 4, 4, mlp_groups=4))
    assert grouped.hook_name("m1.n3", role="sender") == ("blocks.1.mlp.out.hook_in", 3)
    assert grouped.hook_name("m1.n3", role="receiver") == ("blocks.1.hook_mlp_in", None)
    with pytest.raises(ValueError, match="not supported under the frozen-norm"):
        GraphSpec(2, 4, 4, mlp_groups=2, approximate="frozen-norm")


def test_networkx_nodes_carry_hook_names_and_round_trip():
    graph = Graph(GraphSpec(2, 4, 2))
    g = graph.to_networkx()
    assert (g.nodes["a1.h3"]["hook_out"], g.nodes["a1.h3"]["hook_out_index"]) == (
        "blocks.1.attn.hook_result",
        3,
    )
    assert "hook_in" not in g.nodes["a1.h3"] and "hook_out" not in g.nodes["logits"]
    assert g.nodes["a1.g1.v"]["hook_in"] == "blocks.1.hook_v_input"
    assert g.nodes["m0"]["hook_in"] == "blocks.0.hook_mlp_in"
    assert g.nodes["m0"]["hook_out"] == "blocks.0.hook_mlp_out"
    back = Graph.from_networkx(g)
    assert back == graph and dict(back.to_networkx().nodes(data=True)) == dict(g.nodes(data=True))
    g.nodes["a0.h1"]["hook_out_index"] = 2
    with pytest.raises(ValueError, match="node a0.h1 says hook_out_index=2"):
        Graph.from_networkx(g)


@pytest.mark.parametrize("groups", [1, 2])
def test_hook_names_read_what_ctlens_records(tiny_model, groups):
    """``run_with_cache`` on each node's hook gives the activation ctlens's own sender and
    receiver hooks see, for every node (an MLP group sender: its neurons times its rows of
    W_out)."""
    from ctlens.bridge.hooks import receiver_hooks, sender_hooks
    from ctlens.bridge.mlp_groups import mlp_parts
    from ctlens.bridge.names import NeuronGroupRef

    graph = Graph.from_model(tiny_model, mlp_groups=groups)
    tokens = torch.tensor([[1, 5, 9, 13, 2, 7], [3, 3, 8, 40, 49, 1]])
    sent = torch.zeros(graph.n_senders, *tokens.shape, tiny_model.cfg.d_model, dtype=torch.float64)
    read: dict[int, torch.Tensor] = {}

    def on_sender(rows: slice, act: torch.Tensor) -> None:
        sent[rows] += (act[:, :, None] if act.ndim == 3 else act).permute(2, 0, 1, 3)

    def on_receiver(columns: slice, n_up: int, x: torch.Tensor) -> torch.Tensor:
        for offset, j in enumerate(range(columns.start, columns.stop)):
            read[j] = x[:, :, offset] if x.ndim == 4 else x
        return x

    names = {graph.hook_name(n, "sender").name for n in graph.senders}
    names |= {graph.hook_name(n, "receiver").name for n in graph.receivers}
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tokens, names_filter=lambda name: name in names)
        tiny_model.run_with_hooks(
            tokens,
            fwd_hooks=sender_hooks(tiny_model, graph, on_sender)
            + receiver_hooks(tiny_model, graph, on_receiver),
        )
    for i, node in enumerate(graph.sender_nodes):
        ref = graph.hook_name(node, "sender")
        got = ref.take(cache[ref.name])
        if isinstance(ref, NeuronGroupRef):
            assert ref.name == f"blocks.{node.layer}.mlp.out.hook_in" and ref.groups == groups
            w_out = mlp_parts(tiny_model, node.layer).w_out
            width = w_out.shape[0] // groups
            got = got @ w_out[node.head * width : (node.head + 1) * width]
        torch.testing.assert_close(got, sent[i], rtol=0, atol=1e-12)
    for j, node in enumerate(graph.receivers):
        ref = graph.hook_name(node, "receiver")
        torch.testing.assert_close(ref.take(cache[ref.name]), read[j], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ real shapes


def test_real_shape_table_in_the_docs_is_the_scripts_output():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "real_shape_graphs", root / "scripts" / "real_shape_graphs.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    page = (root / "docs" / "concepts.md").read_text()
    start, end = "<!-- real-shape-graphs:start -->\n", "\n<!-- real-shape-graphs:end -->"
    shown = page[page.index(start) + len(start) : page.index(end)]
    assert shown == script.table(), "docs/concepts.md is stale: run scripts/real_shape_graphs.py"
    rows = {row[0]: row for row in script.rows()}
    assert rows["gpt2"][2:5] == (157, 445, 32_491)  # DESIGN.md's GPT-2 small counts
    for name, _, s, r, e, gs, gr, ge in rows.values():
        assert gs > s and gr > r and ge > e, name


@pytest.mark.parametrize(
    "spec", [GraphSpec(3, 4, 2), GraphSpec(2, 4, 4, True), GraphSpec(2, 4, 2, mlp_groups=3)]
)
def test_upstream_prefixes_match_the_dense_mask(spec):
    graph = Graph(spec)
    assert list(graph.upstream) == graph.valid.sum(0).tolist()
    assert graph.n_edges == int(graph.valid.sum())
    for j, n in enumerate(graph.upstream):
        assert graph.valid[:n, j].all() and not graph.valid[n:, j].any()
