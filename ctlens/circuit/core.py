"""The `Circuit` class: a bool edge mask over a `Graph`, with its views and set algebra.

Selection lives in `ctlens.circuit.selection`, the JSON file format in
`ctlens.circuit.file_format` and MIB interop in `ctlens.circuit.mib`; the methods here are
the public entry points to them. See the `ctlens.circuit` package docstring for the rules.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
from jaxtyping import Bool, Float

from ctlens.circuit.file_format import circuit_document, parse_circuit_document
from ctlens.circuit.mib import mib_document, parse_mib_document
from ctlens.circuit.selection import select_mask, unpack_scores
from ctlens.file_limits import model_spec, plain_json, require_finite
from ctlens.files import atomic_write_text, read_json, require_file
from ctlens.graph import Graph, coarsen_matrix, network_edges
from ctlens.sizes import CircuitSize
from ctlens.tables import edge_table
from ctlens.types import NodeKind

if TYPE_CHECKING:
    import pandas as pd


class Circuit:
    """A set of edges of a model's graph. See the `ctlens.circuit` package docstring.

    Args:
        graph: the model's edge graph.
        mask: bool ``[n_senders, n_receivers]`` (``[n_senders, n_receivers, n_spans]`` on a
            positional graph: `Graph.dense_shape`); True marks a circuit edge (an (edge,
            span) pair). Must be False wherever ``graph.valid`` is False.
        scores: optional fp32 edge scores of the same shape (0 where invalid).
        metadata: JSON-serialisable information (how it was selected, from which scores).
        model_name: the name of the model the circuit belongs to, if known.

    Scores must be finite on every valid edge (NaN or inf cannot rank edges).
    """

    def __init__(
        self,
        graph: Graph,
        mask: Bool[torch.Tensor, "n_senders n_receivers *spans"],
        scores: Float[torch.Tensor, "n_senders n_receivers *spans"] | None = None,
        metadata: dict[str, Any] | None = None,
        model_name: str | None = None,
    ) -> None:
        if not isinstance(graph, Graph):
            raise TypeError(f"graph must be a ctlens.Graph, got {type(graph).__name__}")
        expected = graph.dense_shape
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {expected}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        mask = mask.detach().cpu().clone()
        invalid = mask & ~graph.dense_valid
        if invalid.any():
            i, j = (int(v) for v in invalid.nonzero()[0][:2])
            raise ValueError(
                f"the mask selects {int(invalid.sum())} invalid edge(s), e.g. "
                f"{graph.senders[i]} -> {graph.receivers[j]} ({graph.receivers[j]} reads the "
                f"residual stream before {graph.senders[i]} writes); select only graph.valid edges"
            )
        if scores is not None:
            scores = torch.as_tensor(scores)
            if tuple(scores.shape) != expected:
                raise ValueError(f"scores have shape {tuple(scores.shape)}, expected {expected}")
            scores = scores.detach().float().cpu() * graph.dense_valid
            require_finite(scores, graph.dense_valid, graph.cell_label, "circuit scores")
        self.graph = graph
        self.mask = mask
        self.scores = scores
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.model_name = model_name

    # ------------------------------------------------------------------ construction

    @classmethod
    def empty(cls, graph: Graph, model_name: str | None = None) -> Circuit:
        """The circuit with no edges (every edge ablated)."""
        return cls(graph, torch.zeros(graph.dense_shape, dtype=torch.bool), model_name=model_name)

    @classmethod
    def full(cls, graph: Graph, model_name: str | None = None) -> Circuit:
        """The circuit with every valid edge (the unablated model)."""
        return cls(graph, graph.dense_valid.clone(), model_name=model_name)

    @classmethod
    def from_edges(
        cls,
        graph: Graph,
        edges: Iterable[tuple[str, ...]],
        scores: Float[torch.Tensor, "n_senders n_receivers *spans"] | None = None,
        metadata: dict[str, Any] | None = None,
        model_name: str | None = None,
    ) -> Circuit:
        """A circuit from ``(sender, receiver)`` name pairs, or ``(sender, receiver, span)``
        triples on a positional graph.

        Unknown names, unknown spans and invalid edges raise with the offending edge named.
        """
        mask = torch.zeros(graph.dense_shape, dtype=torch.bool)
        for edge in edges:
            mask[graph.cell(edge)] = True
        return cls(graph, mask, scores, metadata, model_name)

    @classmethod
    def from_scores(
        cls,
        scores: Any,
        method: str = "top_n",
        top_n: int | float | CircuitSize | None = None,
        threshold: float | None = None,
        prune: bool = False,
    ) -> Circuit:
        """Select a circuit from `EdgeScores` (see the module docstring for the methods).

        Args:
            scores: an `ctlens.EdgeScores`; positional scores give a positional circuit,
                selected over (edge, span) pairs.
            method: ``"top_n"``, ``"threshold"`` or ``"greedy"``.
            top_n: number of edges for ``top_n`` and ``greedy`` (1 .. number of valid edges;
                on a positional graph, of (edge, span) pairs), or a fraction of them as a
                float in (0, 1), or a `CircuitSize` (`ctlens.sizes`: a fraction rounds to the
                nearest count).
            threshold: minimum |score| for ``threshold``.
            prune: afterwards drop edges on no ``input -> logits`` path (may leave fewer
                than ``top_n`` edges).
        """
        graph, dense = unpack_scores(scores)
        mask = select_mask(graph, dense, method, top_n, threshold, prune)
        metadata: dict[str, Any] = {
            "selection": {"method": method, "top_n": top_n, "threshold": threshold, "prune": prune},
            "scores": dict(getattr(scores, "metadata", {}) or {}),
        }
        model_name = metadata["scores"].get("model")
        return cls(graph, mask, dense, metadata, model_name)

    # ------------------------------------------------------------------ views

    @property
    def n_edges(self) -> int:
        """Number of circuit edges ((edge, span) pairs on a positional graph)."""
        return int(self.mask.sum())

    @property
    def spans(self) -> tuple[str, ...]:
        """Span names of a positional circuit (the last axis of `mask`); empty otherwise."""
        return self.graph.spans

    @property
    def edges(self) -> list[tuple[str, ...]]:
        """Circuit edges as ``(sender, receiver)`` name pairs, sender-major graph order; on a
        positional graph ``(sender, receiver, span)`` triples."""
        return self.graph.named(self.mask)

    @property
    def sender_receiver_mask(self) -> Bool[torch.Tensor, "n_senders n_receivers"]:
        """Bool ``[n_senders, n_receivers]``: the edges in the circuit at any span (the mask
        itself for a position-free circuit)."""
        return self.mask.any(-1) if self.graph.positional else self.mask

    @property
    def nodes(self) -> list[str]:
        """Graph node names (senders and receivers, e.g. ``a0.h1``, ``a1.h0.q``, ``m0``) that
        at least one circuit edge touches, in graph order (senders first)."""
        mask = self.sender_receiver_mask
        sent = mask.any(1).tolist()
        read = mask.any(0).tolist()
        names = [n for n, on in zip(self.graph.senders, sent, strict=True) if on]
        seen = set(names)
        names += [
            n for n, on in zip(self.graph.receivers, read, strict=True) if on and n not in seen
        ]
        return names

    @property
    def components(self) -> list[str]:
        """Model components the circuit uses: ``input``, heads ``a{l}.h{h}``, MLPs ``m{l}``
        and ``logits``. A q/k/v receiver counts as the head(s) it feeds."""
        found: set[str] = set()
        group = self.graph.spec.n_heads // self.graph.spec.n_kv_heads
        mask = self.sender_receiver_mask
        sent = mask.any(1).tolist()
        read = mask.any(0).tolist()
        for node, on in zip(self.graph.sender_nodes, sent, strict=True):
            if on:
                found.add(node.name)
        for node, on in zip(self.graph.receiver_nodes, read, strict=True):
            if not on:
                continue
            if node.kind is NodeKind.Q:
                found.add(f"a{node.layer}.h{node.head}")
            elif node.kind in (NodeKind.K, NodeKind.V):
                assert node.head is not None
                found.update(
                    f"a{node.layer}.h{h}" for h in range(node.head * group, (node.head + 1) * group)
                )
            else:
                found.add(node.name)
        order = {n: i for i, n in enumerate([*self.graph.senders, "logits"])}
        return sorted(found, key=order.__getitem__)

    def coarsen(self) -> Circuit:
        """This circuit on the plain graph: an MLP edge is in it when any group edge is, and
        an edge of a positional circuit when it is in it at any span (the spans are dropped).

        Scores, if any, are summed over groups and spans (as `EdgeScores.coarsen`).
        """
        spec = self.graph.spec
        if spec.mlp_groups == 1 and not spec.spans:
            return self
        graph, counts = coarsen_matrix(self.graph, self.mask.float())
        scores = None if self.scores is None else coarsen_matrix(self.graph, self.scores)[1]
        metadata = dict(self.metadata)
        if spec.mlp_groups != 1:
            metadata["coarsened_from_mlp_groups"] = spec.mlp_groups
        if spec.spans:
            metadata["coarsened_from_spans"] = list(spec.spans)
        return Circuit(graph, counts > 0, scores, metadata, self.model_name)

    def edge_scores(self) -> dict[tuple[str, ...], float | None]:
        """``{edge: score}`` for the circuit edges (names as in `edges`; ``None`` without
        scores)."""
        cells = self.mask.nonzero().tolist()
        return {
            self.graph.cell_name(c): None if self.scores is None else float(self.scores[tuple(c)])
            for c in cells
        }

    def __contains__(self, edge: object) -> bool:
        if not (isinstance(edge, tuple) and len(edge) == (3 if self.graph.positional else 2)):
            return False
        return bool(self.mask[self.graph.cell(edge)])

    def __len__(self) -> int:
        return self.n_edges

    def __eq__(self, other: object) -> bool:
        """Same graph and same edges (scores and metadata are not compared)."""
        return (
            isinstance(other, Circuit)
            and other.graph == self.graph
            and bool(torch.equal(other.mask, self.mask))
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        name = f"{self.model_name}, " if self.model_name else ""
        edges = "(edge, span) pairs" if self.graph.positional else "edges"
        spans = f", spans {list(self.spans)}" if self.graph.positional else ""
        return (
            f"Circuit({name}{self.n_edges} of {self.graph.n_edges} {edges}, "
            f"{len(self.components)} components{spans})"
        )

    # ------------------------------------------------------------------ set algebra

    def _check_compatible(self, other: object, op: str) -> Circuit:
        if not isinstance(other, Circuit):
            raise TypeError(f"{op} needs two Circuits, got {type(other).__name__}")
        if other.graph != self.graph:
            raise ValueError(
                f"cannot {op} circuits of different graphs ({self.graph!r} vs {other.graph!r}); "
                "both circuits must come from the same model architecture"
            )
        return other

    def _combine(self, other: Circuit, mask: torch.Tensor, op: str) -> Circuit:
        scores = self.scores if self.scores is not None else other.scores
        names = {self.model_name, other.model_name} - {None}
        return Circuit(
            self.graph,
            mask,
            scores,
            {"operation": op},
            self.model_name if len(names) <= 1 and self.model_name else next(iter(names), None),
        )

    def __or__(self, other: Circuit) -> Circuit:
        """Union: edges in either circuit (scores from the left operand, else the right)."""
        other = self._check_compatible(other, "union")
        return self._combine(other, self.mask | other.mask, "union")

    def __and__(self, other: Circuit) -> Circuit:
        """Intersection: edges in both circuits."""
        other = self._check_compatible(other, "intersect")
        return self._combine(other, self.mask & other.mask, "intersection")

    def __sub__(self, other: Circuit) -> Circuit:
        """Difference: edges in this circuit and not in ``other``."""
        other = self._check_compatible(other, "subtract")
        return self._combine(other, self.mask & ~other.mask, "difference")

    def edge_jaccard(self, other: Circuit) -> float:
        """|edges in both| / |edges in either| (1.0 for two empty circuits)."""
        other = self._check_compatible(other, "compare")
        union = int((self.mask | other.mask).sum())
        return 1.0 if union == 0 else int((self.mask & other.mask).sum()) / union

    def node_jaccard(self, other: Circuit) -> float:
        """Jaccard similarity of the `components` sets (1.0 for two empty circuits)."""
        other = self._check_compatible(other, "compare")
        a, b = set(self.components), set(other.components)
        return 1.0 if not (a | b) else len(a & b) / len(a | b)

    # ------------------------------------------------------------------ networkx

    def to_networkx(self) -> nx.DiGraph:
        """`Graph.to_networkx` with ``in_circuit`` (and ``score`` if known) on every edge.

        ``G.graph`` carries ``spec``, ``model_name`` and ``metadata``, so `from_networkx`
        rebuilds the circuit exactly. Internal q/k/v -> head edges get ``in_circuit=False``.
        A positional circuit gives an ``nx.MultiDiGraph`` with a ``span`` on every edge
        (`Graph.to_networkx`).
        """
        g = self.graph.to_networkx()
        nx.set_edge_attributes(g, False, "in_circuit")
        for index, attrs in network_edges(self.graph, g):
            attrs["in_circuit"] = bool(self.mask[index])
            if self.scores is not None:
                attrs["score"] = float(self.scores[index])
        g.graph["model_name"] = self.model_name
        g.graph["metadata"] = dict(self.metadata)
        return g

    @classmethod
    def from_networkx(cls, g: nx.DiGraph) -> Circuit:
        """Inverse of `to_networkx`: edges with ``in_circuit=True`` form the circuit;
        ``score`` attributes (if any edge has one) become the scores."""
        graph = Graph.from_networkx(g)
        mask = torch.zeros(graph.dense_shape, dtype=torch.bool)
        scores = torch.zeros(graph.dense_shape)
        has_scores = False
        for index, attrs in network_edges(graph, g):
            mask[index] = bool(attrs.get("in_circuit", False))
            if "score" in attrs:
                has_scores = True
                scores[index] = float(attrs["score"])
        return cls(
            graph,
            mask,
            scores if has_scores else None,
            dict(g.graph.get("metadata", {})),
            g.graph.get("model_name"),
        )

    def to_pandas(self, d_mlp: int | None = None) -> pd.DataFrame:
        """One row per valid edge of the graph (not only the circuit's; per edge and span for a
        positional circuit): the columns of `EdgeScores.to_pandas` (names, node attributes,
        hooks, ``span`` when positional and, given the MLP width ``d_mlp``, each MLP node's
        neuron slice), ``score`` (NaN without scores) and ``in_circuit``.

        Filter with ``df[df.in_circuit]``. Needs pandas (``pip install "ctlens[pandas]"``);
        see `ctlens.tables`.
        """
        return edge_table(self.graph, self.scores, self.mask, d_mlp=d_mlp)

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        """The JSON document `save` writes (see `ctlens.circuit.file_format`)."""
        return circuit_document(
            self.graph, self.mask, self.scores, self.metadata, self.model_name
        )

    @classmethod
    def from_dict(cls, doc: Any, source: str = "circuit document") -> Circuit:
        """Inverse of `to_dict`, with a clear error for every malformed part."""
        return cls(*parse_circuit_document(doc, source))

    def save(self, path: str | Path) -> Path:
        """Write the circuit as versioned JSON, atomically (temporary file + ``os.replace``)."""
        path = Path(path)
        text = plain_json(self.to_dict(), "cannot save circuit: its metadata or scores are")
        atomic_write_text(path, text)
        return path

    @classmethod
    def load(cls, path: str | Path, model: Any | None = None) -> Circuit:
        """Read a file written by `save`.

        Args:
            path: the JSON file.
            model: if given, the circuit must belong to this model's graph (else a
                ``ValueError``); a different recorded model name only warns, because a
                fine-tuned or re-saved model keeps its graph under a new name.
        """
        path = require_file(path, "circuit file",
                            "Circuit.load reads the .json file that Circuit.save wrote")
        try:
            doc = read_json(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{path} is not valid JSON ({err}); the file is corrupted or not a circuit file"
            ) from None
        expected = None
        if model is not None:
            declared = doc.get("graph") if isinstance(doc, dict) else None
            expected = model_spec(model, declared, str(path))
        circuit = cls(*parse_circuit_document(doc, str(path), expected))
        if model is not None:
            circuit.check_model(model)
        return circuit

    def check_model(self, model: Any) -> None:
        """Raise ``ValueError`` unless the circuit belongs to ``model``'s graph."""
        groups = self.graph.spec.mlp_groups
        try:
            belongs = self.graph.belongs_to(model)
        except ValueError as err:
            raise ValueError(
                f"this circuit splits each MLP into {groups} neuron groups, which this model "
                f"cannot: {err}"
            ) from None
        if not belongs:
            graph = Graph.from_model(model, mlp_groups=groups, spans=self.graph.spans)
            raise ValueError(
                f"this circuit belongs to another model's graph ({self.graph!r}, model "
                f"{self.model_name!r}) but the model has {graph!r}; use a circuit found on "
                "this model"
            )
        name = getattr(getattr(model, "cfg", None), "model_name", None)
        if self.model_name and name and name != self.model_name:
            warnings.warn(
                f"circuit was found on {self.model_name!r}, the model is {name!r} "
                "(same graph shape)",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ MIB / EAP-IG

    def to_mib_dict(self) -> dict[str, Any]:
        """An EAP-IG / MIB-style ``{cfg, nodes, edges}`` document (see `ctlens.circuit.mib`)."""
        return mib_document(
            self.graph, self.mask, self.scores, self.model_name, self.components
        )

    def to_mib_json(self, path: str | Path) -> Path:
        """Write `to_mib_dict` to ``path`` atomically."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_mib_dict(), allow_nan=False))
        return path

    @classmethod
    def from_mib_dict(
        cls, doc: Any, graph: Graph | None = None, source: str = "MIB document"
    ) -> Circuit:
        """A circuit (with scores) from an EAP-IG / MIB ``{cfg, edges, nodes}`` document.

        Args:
            doc: the parsed JSON.
            graph: the graph to map onto; default: built from ``cfg`` (``n_layers``,
                ``n_heads`` and optionally ``n_key_value_heads``).
        """
        graph, mask, scores, model_name = parse_mib_document(doc, graph, source)
        return cls(graph, mask, scores, {"imported_from": "mib"}, model_name)

    @classmethod
    def from_mib_json(cls, path: str | Path, graph: Graph | None = None) -> Circuit:
        """Read an EAP-IG / MIB edge-score JSON file (see `from_mib_dict`)."""
        path = Path(path)
        try:
            doc = read_json(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from None
        return cls.from_mib_dict(doc, graph, source=str(path))
