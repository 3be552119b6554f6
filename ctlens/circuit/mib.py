"""MIB / EAP-IG interoperability: their edge names and their ``{cfg, nodes, edges}`` JSON.

MIB names nodes ``input``, ``a{l}.h{h}``, ``m{l}``, ``logits`` and edges ``sender->receiver``
with a ``<q>``, ``<k>`` or ``<v>`` suffix for attention receivers, e.g. ``a0.h1->a2.h3<k>``;
a file holds ``cfg``, ``nodes`` ``{name: {in_graph}}`` and ``edges`` ``{name: {score,
in_graph}}``. The mapping is explicit and total in both directions for standard multi-head
attention. With grouped-query attention a ctlens k/v receiver ``a{l}.g{g}.k`` stands for the
shared key input of every head in group ``g``; it is exported as one MIB edge per head of
the group, each with an equal share of the group's score (the score of a shared input is the
sum of the per-head scores), and imported by summing scores over the group and taking the
union of membership.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ctlens.file_limits import declared_graph
from ctlens.graph import Graph, GraphSpec
from ctlens.types import NodeKind


def mib_document(
    graph: Graph,
    mask: torch.Tensor,
    scores: torch.Tensor | None,
    model_name: str | None,
    components: list[str],
) -> dict[str, Any]:
    """The EAP-IG / MIB-style ``{cfg, nodes, edges}`` document of a circuit of these parts
    (``components``: `Circuit.components`).

    MIB names one node per MLP and has no edge names for groups of neurons or positions, so
    a circuit on a grouped or positional graph is refused: export ``circuit.coarsen()``
    instead.
    """
    spec = graph.spec
    if spec.spans:
        raise ValueError(
            f"this circuit is positional (spans {list(spec.spans)}); MIB's edge format has no "
            "positions. Export circuit.coarsen() (an edge is in it when it is in the circuit "
            "at any span; scores summed over spans) instead"
        )
    if spec.mlp_groups != 1:
        raise ValueError(
            f"this circuit splits each MLP into {spec.mlp_groups} neuron groups; MIB's edge "
            "format has one node per MLP and no names for groups of neurons. Export "
            "circuit.coarsen() (an MLP is in it when any of its groups is) instead"
        )
    group = spec.n_heads // spec.n_kv_heads
    edges: dict[str, dict[str, Any]] = {}
    rows, cols = graph.valid.nonzero(as_tuple=True)
    in_graph = mask[rows, cols].tolist()
    values = [0.0] * len(in_graph) if scores is None else scores[rows, cols].tolist()
    for k, (i, j) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
        names = mib_edge_names(graph, i, j, group)
        for name in names:
            edges[name] = {"score": values[k] / len(names), "in_graph": bool(in_graph[k])}
    used = set(components)
    nodes = {name: {"in_graph": name in used} for name in _mib_nodes(spec)}
    cfg = {
        "n_layers": spec.n_layers,
        "n_heads": spec.n_heads,
        "n_key_value_heads": spec.n_kv_heads,
        "parallel_attn_mlp": spec.parallel_attn_mlp,
        "model_name": model_name,
    }
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


def parse_mib_document(
    doc: Any, graph: Graph | None, source: str
) -> tuple[Graph, torch.Tensor, torch.Tensor, str | None]:
    """``(graph, mask, scores, model_name)`` from a MIB document; see `Circuit.from_mib_dict`."""
    if not isinstance(doc, dict) or not isinstance(doc.get("edges"), dict):
        raise ValueError(f"{source}: expected a JSON object with an 'edges' object")
    if graph is None:
        cfg = doc.get("cfg")
        if not isinstance(cfg, dict) or "n_layers" not in cfg or "n_heads" not in cfg:
            raise ValueError(
                f"{source}: 'cfg' with n_layers and n_heads is needed to build the graph; "
                "or pass graph=Graph.from_model(model)"
            )
        spec = {
            "n_layers": cfg["n_layers"],
            "n_heads": cfg["n_heads"],
            "n_kv_heads": cfg.get("n_key_value_heads") or cfg["n_heads"],
            "parallel_attn_mlp": bool(cfg.get("parallel_attn_mlp", False)),
        }
        graph = declared_graph(spec, source)
    mask = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
    scores = torch.zeros(graph.n_senders, graph.n_receivers)
    for name, entry in doc["edges"].items():
        try:
            sender, receiver = mib_to_ctlens_edge(graph, name)
            i, j = graph.edge_index(sender, receiver)
        except (KeyError, ValueError) as err:
            raise ValueError(f"{source}: edge {name!r}: {err}") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: edge {name!r} must map to {{score, in_graph}}")
        score = entry.get("score")
        if score is not None:
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise ValueError(f"{source}: edge {name!r} has a non-number score {score!r:.80}")
            if not math.isfinite(score):
                raise ValueError(
                    f"{source}: edge {name!r} has the score {score}; NaN or infinite scores "
                    "cannot rank edges (the run that wrote the file went wrong)"
                )
            scores[i, j] += float(score)
        if entry.get("in_graph", False):
            mask[i, j] = True
    cfg = doc.get("cfg") if isinstance(doc.get("cfg"), dict) else {}
    model_name = cfg.get("model_name") if cfg else None
    return graph, mask, scores, model_name


def _mib_nodes(spec: GraphSpec) -> list[str]:
    names = ["input"]
    for layer in range(spec.n_layers):
        names += [f"a{layer}.h{h}" for h in range(spec.n_heads)]
        names.append(f"m{layer}")
    names.append("logits")
    return names


def mib_edge_names(graph: Graph, i: int, j: int, group: int | None = None) -> list[str]:
    """MIB names of the ctlens edge ``(sender row i, receiver column j)``.

    One name, except for a grouped k/v receiver, which stands for every head of its group.
    """
    group = group or graph.spec.n_heads // graph.spec.n_kv_heads
    sender = graph.senders[i]
    node = graph.receiver_nodes[j]
    if node.kind is NodeKind.Q:
        return [f"{sender}->a{node.layer}.h{node.head}<q>"]
    if node.kind in (NodeKind.K, NodeKind.V):
        assert node.head is not None
        heads = range(node.head * group, (node.head + 1) * group)
        return [f"{sender}->a{node.layer}.h{h}<{node.kind.value}>" for h in heads]
    return [f"{sender}->{node.name}"]


def mib_to_ctlens_edge(graph: Graph, name: str) -> tuple[str, str]:
    """The ctlens ``(sender, receiver)`` pair of a MIB edge name like ``a0.h1->a2.h3<k>``."""
    if not isinstance(name, str) or name.count("->") != 1:
        raise ValueError(f"{name!r} is not a MIB edge name like 'a0.h1->a2.h3<k>'")
    sender, receiver = name.split("->")
    if receiver.endswith(("<q>", "<k>", "<v>")):
        letter = receiver[-2]
        head_name = receiver[:-3]
        try:
            layer_text, head_text = head_name[1:].split(".h")
            layer, head = int(layer_text), int(head_text)
        except ValueError:
            raise ValueError(f"{name!r}: {receiver!r} is not 'a{{l}}.h{{h}}<q|k|v>'") from None
        if not head_name.startswith("a") or not 0 <= head < graph.spec.n_heads:
            raise KeyError(f"{name!r}: no head {head_name!r} in this graph")
        if letter == "q":
            receiver = f"a{layer}.h{head}.q"
        elif graph.spec.grouped:
            group = graph.spec.n_heads // graph.spec.n_kv_heads
            receiver = f"a{layer}.g{head // group}.{letter}"
        else:
            receiver = f"a{layer}.h{head}.{letter}"
    return sender, receiver
