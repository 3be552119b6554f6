"""The circuit file: versioned JSON (never pickle), written atomically, read defensively.

::

    {"format": "ctlens.circuit", "schema_version": 1, "model": "zoo:tiny-gpt2",
     "graph": {"version": 1, "n_layers": 2, ...},        # GraphSpec.to_dict()
     "n_edges": 3,
     "edges": [["input", "a0.h0.q", 0.12], ...],          # circuit edges; score or null
     "scores": [0.12, -0.03, ...] | null,                 # every valid edge, graph order
     "metadata": {...}}

``scores`` lists the score of every valid edge in the order of ``graph.valid.nonzero()``
(sender-major) so that a circuit with scores round-trips losslessly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ctlens.graph import Graph, GraphSpec

if TYPE_CHECKING:
    from ctlens.circuit.core import Circuit

SCHEMA_VERSION = 1
FILE_FORMAT = "ctlens.circuit"


def circuit_document(circuit: Circuit) -> dict[str, Any]:
    """The JSON document `Circuit.save` writes."""
    edges = [[s, r, score] for (s, r), score in circuit.edge_scores().items()]
    all_scores = None
    if circuit.scores is not None:
        all_scores = circuit.scores[circuit.graph.valid].tolist()
    return {
        "format": FILE_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "model": circuit.model_name,
        "graph": circuit.graph.spec.to_dict(),
        "n_edges": circuit.n_edges,
        "edges": edges,
        "scores": all_scores,
        "metadata": circuit.metadata,
    }


def parse_circuit_document(
    doc: Any, source: str
) -> tuple[Graph, torch.Tensor, torch.Tensor | None, dict[str, Any], str | None]:
    """``(graph, mask, scores, metadata, model)`` from a circuit document, with a clear
    error for every malformed part."""
    graph = _document_graph(doc, source)
    mask, edge_scores, any_edge_score = _parse_edges(doc, graph, source)
    scores: torch.Tensor | None = None
    raw = doc.get("scores")
    if raw is not None:
        if not isinstance(raw, list) or len(raw) != graph.n_edges:
            got = len(raw) if isinstance(raw, list) else type(raw).__name__
            raise ValueError(
                f"{source}: 'scores' must list one number per valid edge "
                f"({graph.n_edges}), got {got}"
            )
        try:
            values = torch.tensor([float(v) for v in raw], dtype=torch.float32)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: 'scores' holds a non-number") from None
        scores = torch.zeros(graph.n_senders, graph.n_receivers)
        scores[graph.valid] = values
    elif any_edge_score:
        scores = edge_scores
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{source}: 'metadata' must be a JSON object")
    model = doc.get("model")
    return graph, mask, scores, metadata, None if model is None else str(model)


def _document_graph(doc: Any, source: str) -> Graph:
    """Check the header of a circuit document and build its graph."""
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(doc).__name__}")
    if doc.get("format") != FILE_FORMAT:
        raise ValueError(
            f"{source}: not a ctlens circuit file (format={doc.get('format')!r}, expected "
            f"{FILE_FORMAT!r}); for MIB / EAP-IG files use Circuit.from_mib_json"
        )
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{source}: circuit schema version {version!r} is not supported (this ctlens "
            f"reads version {SCHEMA_VERSION}); use the ctlens version that wrote it, or "
            "re-create the circuit"
        )
    missing = [k for k in ("graph", "edges") if k not in doc]
    if missing:
        raise ValueError(f"{source}: missing field(s) {missing}")
    try:
        return Graph(GraphSpec.from_dict(doc["graph"]))
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{source}: bad graph spec ({err})") from None


def _parse_edges(
    doc: dict[str, Any], graph: Graph, source: str
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The circuit mask, the scores listed with the edges, and whether any edge had one."""
    if not isinstance(doc["edges"], list):
        raise ValueError(f"{source}: 'edges' must be a list of [sender, receiver, score]")
    mask = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
    edge_scores = torch.zeros(graph.n_senders, graph.n_receivers)
    any_score = False
    for k, item in enumerate(doc["edges"]):
        if not (isinstance(item, list) and len(item) in (2, 3)):
            raise ValueError(f"{source}: edge {k} must be [sender, receiver, score], got {item!r}")
        try:
            i, j = graph.edge_index(str(item[0]), str(item[1]))
        except (KeyError, ValueError) as err:
            raise ValueError(f"{source}: edge {k}: {err}") from None
        mask[i, j] = True
        if len(item) == 3 and item[2] is not None:
            edge_scores[i, j] = float(item[2])
            any_score = True
    if "n_edges" in doc and doc["n_edges"] != int(mask.sum()):
        raise ValueError(
            f"{source}: declares {doc['n_edges']} edges but lists {int(mask.sum())} distinct "
            "ones; the file is corrupted"
        )
    return mask, edge_scores, any_score
