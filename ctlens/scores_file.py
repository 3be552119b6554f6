"""The edge-score file pair written by `EdgeScores.save` and read by `EdgeScores.load`.

``NAME.safetensors`` holds the dense fp32 ``[n_senders, n_receivers]`` matrix as one tensor,
``scores`` (``[n_senders, n_receivers, n_spans]`` for positional scores); ``NAME.json`` (the
sidecar) says what it is::

    {"format": "ctlens.edge_scores", "schema_version": 1,  # 2 for positional scores
     "graph": {"version": 1, "n_layers": 2, ...},       # GraphSpec.to_dict(), with spans
     "shape": [n_senders, n_receivers],                   # (+ n_spans)
     "matrix": "NAME.safetensors", "sha256": "...",      # the matrix file and its checksum
     "metadata": {...}}                                   # EdgeScores.metadata

Both files are written atomically, the matrix first; the sidecar's checksum ties the two
together, so a matrix from another save (or a crash between the two writes) is refused
rather than silently paired with the wrong graph or metadata. Reading checks the sidecar's
graph (against the model when one is given, else against `ctlens.file_limits`' bound), the
matrix file's size, shape and dtype before loading it, and refuses non-finite scores.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ctlens.file_limits import (
    check_header,
    declared_graph,
    model_spec,
    plain_json,
    require_finite,
)
from ctlens.files import atomic_write_bytes, atomic_write_text, read_json, require_file
from ctlens.graph import Graph

FILE_FORMAT = "ctlens.edge_scores"
SCHEMA_VERSION = 1
POSITIONAL_SCHEMA_VERSION = 2
"""Positional scores are written as version 2 (a span axis; a reader of version 1 only
refuses them clearly); position-free scores stay version 1, readable by older ctlens."""
TENSOR_NAME = "scores"
HEADER_SLACK = 1 << 16
"""Bytes a matrix file may hold beyond its fp32 data (the safetensors header)."""


def file_pair(path: str | Path) -> tuple[Path, Path]:
    """``(matrix, sidecar)`` paths for ``path``: ``NAME.safetensors`` and ``NAME.json``.

    ``path`` may name either file or the common stem; any other suffix is replaced.
    """
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_scores(
    scores: torch.Tensor, graph: Graph, metadata: dict[str, Any], path: str | Path
) -> Path:
    """Write the file pair (see the module docstring); returns the matrix path."""
    matrix_path, sidecar_path = file_pair(path)
    require_finite(scores, graph.dense_valid, graph.cell_label, "cannot save edge scores")
    data = save_safetensors({TENSOR_NAME: scores.detach().float().cpu().contiguous()})
    doc = {
        "format": FILE_FORMAT,
        "schema_version": POSITIONAL_SCHEMA_VERSION if graph.positional else SCHEMA_VERSION,
        "graph": graph.spec.to_dict(),
        "shape": list(graph.dense_shape),
        "matrix": matrix_path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "metadata": metadata,
    }
    text = plain_json(doc, "cannot save edge scores: their metadata is")
    atomic_write_bytes(matrix_path, data)
    atomic_write_text(sidecar_path, text)
    return matrix_path


def load_scores(
    path: str | Path, model: Any | None = None
) -> tuple[torch.Tensor, Graph, dict[str, Any]]:
    """``(scores, graph, metadata)`` from a file pair, every part checked (module docstring);
    with ``model``, the declared graph must be that model's (with the declared MLP groups)."""
    matrix_path, sidecar_path = file_pair(path)
    keep = (f"EdgeScores.save writes {matrix_path.name} and {sidecar_path.name} side by side: "
            "keep them together")
    doc = _read_sidecar(require_file(sidecar_path, "edge-score file", keep))  # a circuit
    require_file(matrix_path, "edge-score file", keep)  # file is named as one first
    source = str(sidecar_path)
    expected = None if model is None else model_spec(model, doc["graph"], source)
    graph = declared_graph(doc["graph"], source, expected)
    if graph.positional != (doc["schema_version"] == POSITIONAL_SCHEMA_VERSION):
        raise ValueError(
            f"{source}: schema version {doc['schema_version']} does not fit its graph "
            f"({'with' if graph.positional else 'without'} spans); the file is corrupted"
        )
    shape = list(graph.dense_shape)
    if doc.get("shape") != shape:
        spans = f" x {shape[2]} spans" if graph.positional else ""
        raise ValueError(
            f"{source}: 'shape' is {doc.get('shape')!r} but its graph has {shape[0]} senders "
            f"x {shape[1]} receivers{spans}; the file is corrupted"
        )
    scores = _read_matrix(matrix_path, shape, doc.get("sha256"))
    require_finite(scores, graph.dense_valid, graph.cell_label, str(matrix_path))
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{source}: 'metadata' must be a JSON object")
    return scores, graph, metadata


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        doc = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); the file is corrupted or not an edge-score file"
        ) from None
    return check_header(doc, str(path), "edge-score", FILE_FORMAT,
                        (SCHEMA_VERSION, POSITIONAL_SCHEMA_VERSION),
                        ("graph", "shape", "sha256"),
                        "circuit files load with Circuit.load", "re-run attribution")


def _read_matrix(path: Path, shape: list[int], sha256: Any) -> torch.Tensor:
    """The fp32 matrix, after its size, checksum, name, shape and dtype are checked."""
    limit = 4 * math.prod(shape) + HEADER_SLACK
    size = path.stat().st_size
    if size > limit:
        raise ValueError(
            f"{path} is {size:,} bytes, more than a {' x '.join(map(str, shape))} fp32 "
            f"matrix needs ({limit:,} at most); it does not belong to this sidecar"
        )
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(
            f"{path} does not match the checksum in its sidecar: the matrix was replaced, "
            "truncated or corrupted (or the save was interrupted between the two files); "
            "save the scores again"
        )
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    if set(tensors) != {TENSOR_NAME}:
        raise ValueError(
            f"{path} must hold one tensor named {TENSOR_NAME!r}, got {sorted(tensors)}"
        )
    scores = tensors[TENSOR_NAME]
    if list(scores.shape) != shape or scores.dtype != torch.float32:
        raise ValueError(
            f"{path} holds a {scores.dtype} matrix of shape {list(scores.shape)}, but its "
            f"sidecar's graph needs float32 {shape}; the files do not belong together"
        )
    return scores
