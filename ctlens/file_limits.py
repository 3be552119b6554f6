"""What a file may declare: checks that run before anything is allocated from a file.

Circuit and edge-score files (and MIB / EAP-IG documents) declare a graph and then list
edges and scores over it. A file is data from anywhere, so nothing it says is trusted:

- its graph must be the model's graph when a model is given, and always stay within
  `MAX_DENSE_CELLS` (a tiny file declaring 100,000 layers would otherwise make ctlens try
  to allocate terabytes for the dense ``[n_senders, n_receivers]`` tensors);
- its edges are mapped to indices in one pass and checked with tensor operations: unknown
  names, invalid edges and repeated edges are refused, naming the first one (a file of
  four million duplicates is refused in seconds, not loaded for minutes);
- its scores must be finite (a circuit whose scores are all NaN would otherwise load, diff
  and report as if nothing were wrong).

Both file kinds also share their header check (`check_header`: format, schema version,
required fields) and how a document is refused when it is not plain JSON (`plain_json`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from jaxtyping import Bool, Float, Int

from ctlens.graph import Graph
from ctlens.graph_spec import GraphSpec, check_mlp_groups

MAX_SPANS = 4096
"""Most token spans a file may declare (a span per position of a 4,096-token context)."""
MAX_DENSE_CELLS = 2**30
"""Largest ``n_senders * n_receivers`` a file may declare without a model to check it
against: about 4 GB of fp32 scores. Llama-3.1-405B's graph has about 0.3e9 cells."""


def check_header(doc: Any, source: str, kind: str, file_format: str,
                 schema_version: int | tuple[int, ...], required: Sequence[str],
                 other_files: str, redo: str) -> dict[str, Any]:
    """``doc`` as a ctlens ``kind`` file of ``file_format`` at ``schema_version`` (one of
    them, when several are read) holding ``required``, or a ValueError that says which part
    is wrong (``other_files``: where a file of another format goes; ``redo``: how to make
    the file again)."""
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(doc).__name__}; not a "
                         f"ctlens {kind} file")
    if doc.get("format") != file_format:
        raise ValueError(
            f"{source}: not a ctlens {kind} file (format={doc.get('format')!r}, expected "
            f"{file_format!r}); {other_files}"
        )
    version = doc.get("schema_version")
    versions = schema_version if isinstance(schema_version, tuple) else (schema_version,)
    if version not in versions or isinstance(version, bool):
        readable = " and ".join(map(str, versions))
        raise ValueError(
            f"{source}: {kind} schema version {version!r} is not supported (this ctlens "
            f"reads version {readable}); use the ctlens version that wrote it, or {redo}"
        )
    missing = [k for k in required if k not in doc]
    if missing:
        raise ValueError(f"{source}: missing field(s) {missing}")
    return doc


def plain_json(doc: Any, what: str) -> str:
    """``doc`` as indented JSON text, or a ValueError saying that ``what`` (e.g. "cannot save
    circuit: its metadata or scores are") is not plain JSON and what to keep it to."""
    try:
        return json.dumps(doc, indent=1, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{what} not plain JSON ({err}); keep metadata to str/int/float/bool/list/dict "
            "and finite numbers"
        ) from None


def graph_shape(spec: GraphSpec) -> tuple[int, int]:
    """``(n_senders, n_receivers)`` of the graph ``spec`` describes, without building it.

    Must follow `Graph`'s node lists: ``input``, then per layer each head and the MLP's
    ``mlp_groups`` nodes (senders); per layer each head's q, each KV head's k and v and the
    MLP's nodes, then ``logits`` (receivers).
    """
    groups = spec.mlp_groups
    n_senders = 1 + spec.n_layers * (spec.n_heads + groups)
    n_receivers = spec.n_layers * (spec.n_heads + 2 * spec.n_kv_heads + groups) + 1
    return n_senders, n_receivers


def dense_cells(spec: GraphSpec) -> int:
    """``n_senders * n_receivers`` (times the spans of a positional graph) of the graph
    ``spec`` describes (`graph_shape`), without building it."""
    n_senders, n_receivers = graph_shape(spec)
    return n_senders * n_receivers * max(1, len(spec.spans))


def declared_graph(doc: Any, source: str, expected: GraphSpec | None = None) -> Graph:
    """The graph a file declares (a `GraphSpec.to_dict` document), checked before building.

    Args:
        doc: the file's graph spec.
        source: names the file in errors.
        expected: the model's spec, when a model is given: the file must declare exactly it.
    """
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: bad graph spec (expected a JSON object, got {doc!r:.80})")
    for key in ("n_layers", "n_heads", "n_kv_heads", "mlp_groups"):
        value = doc.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{source}: bad graph spec ({key} must be an integer, got {value!r})")
    _declared_spans(doc, source)
    try:
        spec = GraphSpec.from_dict(doc)
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{source}: bad graph spec ({err})") from None
    return checked_graph(spec, source, expected)


def checked_graph(spec: GraphSpec, source: str, expected: GraphSpec | None = None) -> Graph:
    """`Graph(spec)` once ``spec`` is the model's (``expected``, if given) and within
    `MAX_DENSE_CELLS` (even a real model's graph beyond it would need over 4 GB per matrix)."""
    if expected is not None and spec != expected:
        raise ValueError(
            f"{source} belongs to another model's graph ({_describe(spec)}) but the model "
            f"has {_describe(expected)}; use a file written for this model"
        )
    hint = (
        "pass model=... to check the file against your model"
        if expected is None
        else "split the MLPs into fewer neuron groups"
    )
    check_graph_size(spec, source, " from a file",
                     f"the file is corrupted or hostile, or else {hint}")
    return Graph(spec)


def check_graph_size(spec: GraphSpec, source: str, where: str, fix: str) -> None:
    """Refuse a graph over `MAX_DENSE_CELLS` before anything is built for it: what a file
    declares (``where``: " from a file") and what the planner reads from a config."""
    cells = dense_cells(spec)
    if cells > MAX_DENSE_CELLS:
        raise ValueError(
            f"{source} declares a graph of {_describe(spec)}: {cells:,} sender x receiver "
            f"cells, more than the {MAX_DENSE_CELLS:,} ctlens accepts{where} (over 4 GB "
            f"per dense matrix); {fix}"
        )


def model_spec(model: Any, declared: Any, source: str) -> GraphSpec:
    """The model's graph spec with the MLP grouping and the token spans a file declares,
    without building it.

    The grouping must split the model's MLP width evenly
    (`ctlens.graph_spec.check_mlp_groups`); spans belong to the data, not the model, so the
    file's are taken as they are (whether they match a task is checked where the task is
    known, `Graph.check_spans`).
    """
    groups = declared.get("mlp_groups", 1) if isinstance(declared, dict) else 1
    spans = _declared_spans(declared, source) if isinstance(declared, dict) else ()
    try:
        spec = GraphSpec.from_model(model, spans=spans)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: bad graph spec ({err})") from None
    try:
        check_mlp_groups(groups, int(getattr(model.cfg, "d_mlp", 0) or 0))
        return replace(spec, mlp_groups=groups)
    except ValueError as err:
        raise ValueError(
            f"{source} splits each MLP into {groups!r} neuron groups, which this model "
            f"cannot: {err}"
        ) from None


def _declared_spans(doc: dict[str, Any], source: str) -> tuple[Any, ...]:
    """The ``spans`` list of a declared graph spec, bounded (names are checked by `GraphSpec`)."""
    spans = doc.get("spans")
    if spans is not None and not (isinstance(spans, list) and len(spans) <= MAX_SPANS):
        raise ValueError(
            f"{source}: bad graph spec (spans must be a list of at most {MAX_SPANS} names, "
            f"got {spans!r:.80})"
        )
    return tuple(spans or ())


def edge_indices(
    graph: Graph,
    senders: Sequence[Any],
    receivers: Sequence[Any],
    source: str,
    spans: Sequence[Any] | None = None,
) -> tuple[Int[torch.Tensor, " n"], ...]:
    """Dense indices (rows, columns and, on a positional graph, spans) of the listed edges;
    refuses unknown, invalid and repeated edges and unknown spans.

    ``senders[k] -> receivers[k]`` (at ``spans[k]``) is the file's edge ``k``; errors name the
    first bad one.
    """
    rows = torch.tensor([graph.sender_index.get(str(s), -1) for s in senders], dtype=torch.long)
    cols = torch.tensor([graph.receiver_index.get(str(r), -1) for r in receivers], dtype=torch.long)
    unknown = (rows < 0) | (cols < 0)
    if bool(unknown.any()):
        k = int(unknown.nonzero()[0])
        _raise_edge_error(graph, str(senders[k]), str(receivers[k]), k, source)
    invalid = ~graph.valid[rows, cols]
    if bool(invalid.any()):
        k = int(invalid.nonzero()[0])
        _raise_edge_error(graph, str(senders[k]), str(receivers[k]), k, source)
    keys = rows * graph.n_receivers + cols
    index: tuple[torch.Tensor, ...] = (rows, cols)
    if spans is not None:
        lookup = {name: k for k, name in enumerate(graph.spans)}
        at = torch.tensor([lookup.get(span, -1) if isinstance(span, str) else -1
                           for span in spans], dtype=torch.long)
        if bool((at < 0).any()):
            k = int((at < 0).nonzero()[0])
            raise ValueError(
                f"{source}: edge {k} ({senders[k]} -> {receivers[k]}) is at span {spans[k]!r}, "
                f"which is not one of the file's spans {list(graph.spans)}"
            )
        keys = keys * graph.n_spans + at
        index = (rows, cols, at)
    later = _repeated(keys)
    if later is not None:
        first = int((keys[:later] == keys[later]).nonzero()[0])
        at_span = "" if spans is None else f" at span {spans[later]}"
        raise ValueError(
            f"{source}: edge {later} ({senders[later]} -> {receivers[later]}{at_span}) repeats "
            f"edge {first}; each edge may be listed once (the file is corrupted or was not "
            "written by ctlens)"
        )
    return index


def _repeated(keys: Int[torch.Tensor, " n"]) -> int | None:
    """Position of the first entry (in list order) equal to an earlier one, or ``None``."""
    if keys.numel() < 2:
        return None
    ordered, order = torch.sort(keys, stable=True)
    same = ordered[1:] == ordered[:-1]
    if not bool(same.any()):
        return None
    return int(order[1:][same].min())


def _raise_edge_error(graph: Graph, sender: str, receiver: str, k: int, source: str) -> None:
    try:
        graph.edge_index(sender, receiver)
    except (KeyError, ValueError) as err:
        message = err.args[0] if err.args else str(err)
        raise ValueError(f"{source}: edge {k}: {message}") from None


def require_finite(
    values: Float[torch.Tensor, "..."],
    where: Bool[torch.Tensor, "..."] | None,
    name: Any,
    source: str,
) -> None:
    """Refuse non-finite ``values`` (only where ``where`` is True), naming the first one.

    ``name(k)`` names the ``k``-th checked entry (e.g. its edge) in the message.
    """
    bad = ~torch.isfinite(values)
    if where is not None:
        bad &= where
    if not bool(bad.any()):
        return
    flat = bad.flatten()
    k = int(flat.nonzero()[0])
    value = float(values.flatten()[k])
    raise ValueError(
        f"{source}: {int(flat.sum())} score(s) are not finite (the first is {value} on "
        f"{name(k)}); NaN or infinite scores cannot rank or compare edges. Recompute them "
        "(the attribution or run that produced them went wrong; a float16 run overflows "
        "easily: use bfloat16 or float32)"
    )


def _describe(spec: GraphSpec) -> str:
    text = f"{spec.n_layers} layers, {spec.n_heads} heads, {spec.n_kv_heads} KV heads"
    text += "" if spec.mlp_groups == 1 else f", {spec.mlp_groups} MLP groups"
    return text + (f", spans {list(spec.spans)}" if spec.spans else "")
