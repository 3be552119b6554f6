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

A positional circuit (`ctlens.graph`, token spans) is written as schema version 2: the
graph spec names the spans (``"spans": ["subject", "end", "other"]``), each edge is
``[sender, receiver, span, score]``, and ``scores`` lists every valid (edge, span) pair in
``Graph.dense_valid.nonzero()`` order (sender, receiver, span). Position-free circuits stay
version 1, so files written before spans existed load unchanged and older ctlens versions
still read today's position-free files (and refuse positional ones by their version).
"""

from __future__ import annotations

from typing import Any

import torch

from ctlens.file_limits import check_header, declared_graph, edge_indices, require_finite
from ctlens.graph import Graph, GraphSpec

SCHEMA_VERSION = 1
POSITIONAL_SCHEMA_VERSION = 2
FILE_FORMAT = "ctlens.circuit"


def circuit_document(
    graph: Graph,
    mask: torch.Tensor,
    scores: torch.Tensor | None,
    metadata: dict[str, Any],
    model: str | None,
) -> dict[str, Any]:
    """The JSON document `Circuit.save` writes for a circuit of these parts."""
    cells = mask.nonzero().tolist()
    edges = [
        [*graph.cell_name(c), None if scores is None else float(scores[tuple(c)])]
        for c in cells
    ]
    return {
        "format": FILE_FORMAT,
        "schema_version": POSITIONAL_SCHEMA_VERSION if graph.positional else SCHEMA_VERSION,
        "model": model,
        "graph": graph.spec.to_dict(),
        "n_edges": int(mask.sum()),
        "edges": edges,
        "scores": None if scores is None else scores[graph.dense_valid].tolist(),
        "metadata": metadata,
    }


def parse_circuit_document(
    doc: Any, source: str, expected: GraphSpec | None = None
) -> tuple[Graph, torch.Tensor, torch.Tensor | None, dict[str, Any], str | None]:
    """``(graph, mask, scores, metadata, model)`` from a circuit document, with a clear
    error for every malformed part.

    ``expected`` (the model's graph spec, when a model is given) must equal the declared
    graph; without it the declared graph must stay within `ctlens.file_limits`' bound.
    Nothing is allocated before the declared graph has passed these checks.
    """
    graph = _document_graph(doc, source, expected)
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
        values = _numbers(raw, f"{source}: 'scores'")
        cells = graph.dense_valid.nonzero()

        def valid_edge(k: int) -> str:
            return graph.cell_label(cells[k].tolist())

        require_finite(values, None, valid_edge, f"{source}: 'scores'")
        scores = torch.zeros(graph.dense_shape)
        scores[graph.dense_valid] = values
    elif any_edge_score:
        scores = edge_scores
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{source}: 'metadata' must be a JSON object")
    model = doc.get("model")
    return graph, mask, scores, metadata, None if model is None else str(model)


def _document_graph(doc: Any, source: str, expected: GraphSpec | None) -> Graph:
    """Check the header of a circuit document and build its (bounded) graph."""
    check_header(doc, source, "circuit", FILE_FORMAT, (SCHEMA_VERSION, POSITIONAL_SCHEMA_VERSION),
                 ("graph", "edges"), "for MIB / EAP-IG files use Circuit.from_mib_json",
                 "re-create the circuit")
    graph = declared_graph(doc["graph"], source, expected)
    if graph.positional != (doc["schema_version"] == POSITIONAL_SCHEMA_VERSION):
        raise ValueError(
            f"{source}: schema version {doc['schema_version']} does not fit its graph "
            f"({'with' if graph.positional else 'without'} spans); the file is corrupted"
        )
    return graph


def _parse_edges(
    doc: dict[str, Any], graph: Graph, source: str
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The circuit mask, the scores listed with the edges, and whether any edge had one.

    One pass over the list, then tensor checks (`ctlens.file_limits.edge_indices`): a file
    of millions of edges is checked in seconds and a repeated edge is refused by name.
    """
    items = doc["edges"]
    names = 3 if graph.positional else 2  # sender, receiver (, span)
    shape = "[sender, receiver, span, score]" if graph.positional else "[sender, receiver, score]"
    if not isinstance(items, list):
        raise ValueError(f"{source}: 'edges' must be a list of {shape}")
    malformed = next(
        (k for k, item in enumerate(items)
         if not (isinstance(item, list) and len(item) in (names, names + 1))),
        None,
    )
    if malformed is not None:
        raise ValueError(
            f"{source}: edge {malformed} must be {shape}, got {items[malformed]!r:.200}"
        )
    if "n_edges" in doc and doc["n_edges"] != len(items):
        raise ValueError(
            f"{source}: declares {doc['n_edges']} edges but lists {len(items)}; the file is "
            "corrupted"
        )
    spans = [i[2] for i in items] if graph.positional else None
    index = edge_indices(graph, [i[0] for i in items], [i[1] for i in items], source, spans)
    mask = torch.zeros(graph.dense_shape, dtype=torch.bool)
    mask[index] = True
    edge_scores = torch.zeros(graph.dense_shape)
    scored = [k for k, item in enumerate(items) if len(item) > names and item[names] is not None]
    if scored:
        values = _numbers([items[k][names] for k in scored], f"{source}: edge scores")

        def listed_edge(k: int) -> str:
            item = items[scored[k]]
            at = f" at span {item[2]}" if graph.positional else ""
            return f"edge {scored[k]} ({item[0]} -> {item[1]}{at})"

        require_finite(values, None, listed_edge, source)
        chosen = torch.tensor(scored)
        edge_scores[tuple(t[chosen] for t in index)] = values
    return mask, edge_scores, bool(scored)


def _numbers(values: list[Any], what: str) -> torch.Tensor:
    """fp32 tensor of JSON numbers; a clear error for anything else (strings, lists, bools)."""
    bad = next(
        (k for k, v in enumerate(values) if isinstance(v, bool) or not isinstance(v, (int, float))),
        None,
    )
    if bad is not None:
        raise ValueError(f"{what} holds a non-number ({values[bad]!r:.80}); scores must be numbers")
    try:
        return torch.tensor(values, dtype=torch.float64).float()
    except (OverflowError, RuntimeError):
        raise ValueError(f"{what} holds a number too large for a score") from None
