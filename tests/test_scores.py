"""EdgeScores files (safetensors matrix + JSON sidecar) and the pandas edge tables."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2_module
from safetensors.torch import save as save_safetensors

import ctlens
from ctlens import Circuit, EdgeScores, Graph, GraphSpec

GQA = Graph(GraphSpec(3, 4, 2))


def random_scores(graph: Graph = GQA, seed: int = 0) -> EdgeScores:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(graph.n_senders, graph.n_receivers, generator=gen)
    return EdgeScores(scores, graph, {"method": "eap", "ablation": "corrupt", "n_examples": 8})


def _rewrite(sidecar: Path, matrix: Path, tensor: torch.Tensor, **fields: object) -> None:
    """Replace the matrix with ``tensor`` and update the sidecar (checksum included)."""
    data = save_safetensors({"scores": tensor})
    matrix.write_bytes(data)
    doc = json.loads(sidecar.read_text())
    doc.update(sha256=hashlib.sha256(data).hexdigest(), **fields)
    sidecar.write_text(json.dumps(doc))


# ------------------------------------------------------------------ save / load


@pytest.mark.parametrize("name", ["scores", "scores.safetensors", "scores.json"])
def test_save_load_round_trip(tmp_path: Path, name: str) -> None:
    scores = random_scores()
    matrix = scores.save(tmp_path / "sub" / name)
    assert matrix == tmp_path / "sub" / "scores.safetensors"
    assert sorted(p.name for p in matrix.parent.iterdir()) == ["scores.json", "scores.safetensors"]
    for path in (matrix, tmp_path / "sub" / "scores.json", tmp_path / "sub" / "scores"):
        back = EdgeScores.load(path)
        assert torch.equal(back.scores, scores.scores)
        assert back.graph == scores.graph and back.metadata == scores.metadata
    sidecar = json.loads((tmp_path / "sub" / "scores.json").read_text())
    assert sidecar["format"] == "ctlens.edge_scores" and sidecar["schema_version"] == 1
    assert sidecar["shape"] == [GQA.n_senders, GQA.n_receivers]


def test_load_checks_the_model_and_shapes(tmp_path: Path) -> None:
    model = ctlens.load_model(tiny_gpt2_module())
    graph = Graph.from_model(model)
    mine = random_scores(graph)
    assert torch.equal(
        EdgeScores.load(mine.save(tmp_path / "mine"), model=model).scores, mine.scores
    )
    other = random_scores(GQA).save(tmp_path / "other")
    with pytest.raises(ValueError, match="another model's graph"):
        EdgeScores.load(other, model=model)
    # a sidecar whose shape disagrees with its own graph
    matrix, sidecar = tmp_path / "other.safetensors", tmp_path / "other.json"
    doc = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**doc, "shape": [3, 3]}))
    with pytest.raises(ValueError, match=r"'shape' is \[3, 3\] but its graph has 16 senders"):
        EdgeScores.load(sidecar)
    # a matrix of the wrong shape, with a matching checksum
    sidecar.write_text(json.dumps(doc))
    _rewrite(sidecar, matrix, torch.zeros(5, 7))
    with pytest.raises(ValueError, match=r"matrix of shape \[5, 7\], but its sidecar's graph"):
        EdgeScores.load(sidecar)


def test_mismatched_or_corrupted_pair_is_refused(tmp_path: Path) -> None:
    a = random_scores(seed=1).save(tmp_path / "a")
    b = random_scores(seed=2).save(tmp_path / "b")
    (tmp_path / "a.safetensors").write_bytes(b.read_bytes())  # the matrix of another save
    with pytest.raises(ValueError, match="does not match the checksum in its sidecar"):
        EdgeScores.load(a)
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="keep them together"):
        EdgeScores.load(tmp_path / "b.json")
    sidecar = tmp_path / "a.json"
    doc = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**doc, "schema_version": 99}))
    with pytest.raises(ValueError, match="schema version 99 is not supported"):
        EdgeScores.load(a)
    sidecar.write_text(json.dumps({**doc, "format": "ctlens.circuit"}))
    with pytest.raises(ValueError, match="not a ctlens edge-score file"):
        EdgeScores.load(a)
    sidecar.write_text(json.dumps(doc)[:-10])
    with pytest.raises(ValueError, match="not valid JSON"):
        EdgeScores.load(a)


def test_hostile_sidecar_and_non_finite_scores(tmp_path: Path) -> None:
    path = random_scores().save(tmp_path / "s")
    sidecar = tmp_path / "s.json"
    doc = json.loads(sidecar.read_text())
    huge = {**doc, "graph": {**doc["graph"], "n_layers": 100_000}}
    sidecar.write_text(json.dumps(huge))
    with pytest.raises(ValueError, match="more than the 1,073,741,824"):
        EdgeScores.load(path)
    sidecar.write_text(json.dumps(doc))
    nan = torch.full((GQA.n_senders, GQA.n_receivers), math.nan)
    _rewrite(sidecar, path, nan)
    with pytest.raises(ValueError, match=r"score\(s\) are not finite \(the first is nan on input"):
        EdgeScores.load(path)
    with pytest.raises(ValueError, match="cannot save edge scores: .* not finite"):
        EdgeScores(nan, GQA).save(tmp_path / "nan")
    with pytest.raises(ValueError, match="metadata is not plain JSON"):
        EdgeScores(torch.zeros_like(nan), GQA, {"fn": print}).save(tmp_path / "meta")
    assert not list(tmp_path.glob("nan*")) and not list(tmp_path.glob("meta*"))


# ------------------------------------------------------------------ pandas


def test_scores_to_pandas_has_one_row_per_valid_edge() -> None:
    scores = random_scores()
    df = scores.to_pandas()
    assert len(df) == GQA.n_edges
    assert list(df.columns) == [
        "sender",
        "receiver",
        "sender_kind",
        "sender_layer",
        "sender_head",
        "sender_mlp_group",
        "sender_hook",
        "sender_neuron_start",
        "sender_neuron_stop",
        "receiver_kind",
        "receiver_layer",
        "receiver_head",
        "receiver_mlp_group",
        "receiver_hook",
        "receiver_neuron_start",
        "receiver_neuron_stop",
        "score",
    ]
    for _, row in df.sample(25, random_state=0).iterrows():
        i, j = GQA.edge_index(row.sender, row.receiver)
        assert row.score == pytest.approx(float(scores.scores[i, j]))
    row = df[(df.sender == "a0.h3") & (df.receiver == "a1.g1.k")].iloc[0]
    assert (row.sender_kind, row.sender_layer, row.sender_head) == ("head", 0, 3)
    assert (row.receiver_kind, row.receiver_layer, row.receiver_head) == ("k", 1, 1)
    assert (row.sender_hook, row.receiver_hook) == (
        "blocks.0.attn.hook_result",
        "blocks.1.hook_k_input",
    )
    logits = df[df.receiver == "logits"]
    assert len(logits) == GQA.n_senders and logits.receiver_layer.isna().all()
    assert df[df.sender == "input"].sender_layer.isna().all()


def test_circuit_to_pandas_marks_the_circuit() -> None:
    circuit = Circuit.from_scores(random_scores(), "top_n", top_n=9)
    df = circuit.to_pandas()
    assert len(df) == GQA.n_edges and int(df.in_circuit.sum()) == 9
    inside = df[df.in_circuit]
    assert list(zip(inside.sender, inside.receiver, strict=True)) == circuit.edges
    assert inside.score.abs().min() >= df[~df.in_circuit].score.abs().max()
    bare = Circuit.from_edges(GQA, [("input", "logits")]).to_pandas()
    assert bare.score.isna().all() and int(bare.in_circuit.sum()) == 1


def test_to_pandas_without_pandas_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "ctlens\[pandas\]"'):
        random_scores().to_pandas()


def test_grouped_mlp_nodes_in_tables_and_files(tmp_path: Path) -> None:
    """Neuron-group nodes m{l}.n{j} get their group in ``mlp_group``; a grouped file loads
    against a model whose MLP width the grouping divides, and is refused otherwise."""
    model = ctlens.load_model(tiny_gpt2_module())  # d_mlp = 128
    graph = Graph.from_model(model, mlp_groups=4)
    scores = random_scores(graph)
    df = scores.to_pandas()
    row = df[(df.sender == "m0.n2") & (df.receiver == "m1.n3")].iloc[0]
    assert (row.sender_kind, row.sender_layer, row.sender_mlp_group) == ("mlp", 0, 2)
    assert (
        row.receiver_mlp_group == 3 and row.sender_head is pd_na() and row.receiver_head is pd_na()
    )
    assert df[df.sender_kind == "head"].sender_mlp_group.isna().all()
    assert (row.sender_hook, row.receiver_hook) == (
        "blocks.0.mlp.out.hook_in",
        "blocks.1.hook_mlp_in",
    )
    path = scores.save(tmp_path / "grouped")
    assert EdgeScores.load(path, model=model).graph == graph
    sidecar = tmp_path / "grouped.json"
    doc = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**doc, "graph": {**doc["graph"], "mlp_groups": 3}}))
    with pytest.raises(ValueError, match="splits each MLP into 3 neuron groups, which this model"):
        EdgeScores.load(path, model=model)
    circuit = Circuit.from_scores(scores, "top_n", top_n=10)
    back = Circuit.load(circuit.save(tmp_path / "c.json"), model=model)
    assert back == circuit


@pytest.mark.parametrize("groups", [1, 4])
def test_to_pandas_names_each_node_by_its_hook_and_neuron_slice(groups: int) -> None:
    """Every node's hook column is `Graph.hook_name`'s; with the MLP width, group j of G
    covers neurons [j*W/G, (j+1)*W/G) (a whole MLP: [0, W)), and the slices of one MLP's
    groups tile its neurons exactly."""
    model = ctlens.load_model(tiny_gpt2_module())
    width = model.cfg.d_mlp  # 128
    graph = Graph.from_model(model, mlp_groups=groups)
    circuit = Circuit.from_scores(random_scores(graph), "top_n", top_n=10)
    df = circuit.to_pandas(d_mlp=width)
    for end, names in (("sender", graph.senders), ("receiver", graph.receivers)):
        nodes = df.drop_duplicates(end).set_index(end)
        assert set(nodes.index) == set(names)
        for name in names:
            ref = graph.hook_name(name, end)
            row = nodes.loc[name]
            assert row[f"{end}_hook"] == ref.name
            if name.startswith("m"):
                j = int(name.split(".n")[1]) if groups > 1 else 0
                start, stop = j * width // groups, (j + 1) * width // groups
                assert (row[f"{end}_neuron_start"], row[f"{end}_neuron_stop"]) == (start, stop)
            else:
                assert row[f"{end}_neuron_start"] is pd_na()
                assert row[f"{end}_neuron_stop"] is pd_na()
    senders = df.drop_duplicates("sender")
    layer0 = senders[(senders.sender_kind == "mlp") & (senders.sender_layer == 0)]
    covered = sorted(zip(layer0.sender_neuron_start, layer0.sender_neuron_stop, strict=True))
    assert covered[0][0] == 0 and covered[-1][1] == width and len(covered) == groups
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False))
    if groups > 1:
        row = df[df.sender == "m0.n1"].iloc[0]
        assert (row.sender_hook, row.sender_neuron_start, row.sender_neuron_stop) == (
            "blocks.0.mlp.out.hook_in",
            32,
            64,
        )
        receiver = df[df.receiver == "m1.n3"].iloc[0]
        assert receiver.receiver_hook == "blocks.1.hook_mlp_in"
        assert (receiver.receiver_neuron_start, receiver.receiver_neuron_stop) == (96, 128)
    assert circuit.to_pandas().sender_neuron_start.isna().all()  # no width, no slice
    if groups > 1:
        with pytest.raises(ValueError, match="mlp_groups=4 does not split the MLP width 130"):
            circuit.to_pandas(d_mlp=130)


def pd_na() -> object:
    import pandas

    return pandas.NA
