"""Circuits: a selected set of edges of a `Graph`, how to choose it, compare it and store it.

A `Circuit` is a bool ``mask`` ``[n_senders, n_receivers]`` over a model's edge graph (the
single source of truth: node and edge lists, networkx graphs and files are views of it),
optionally the dense edge ``scores`` it was selected from, and free-form ``metadata``.
Invalid edges (a receiver that reads before the sender writes) are never set.

Selection (`Circuit.from_scores`):

- ``top_n``: exactly the ``top_n`` valid edges with the largest |score| (the paper's rule;
  ties are broken by graph order: sender-major, then receiver).
- ``threshold``: every valid edge with |score| >= ``threshold``.
- ``greedy``: grow from ``logits`` backwards (as EAP-IG / MIB do): start with the edges into
  ``logits`` as candidates; repeatedly take the candidate with the largest |score|; when its
  sender joins, the edges into that sender's own inputs become candidates (a head's q, k and
  v receivers, an MLP's input). Stops at ``top_n`` edges. The result is always connected to
  ``logits``.

Pruning (``prune=True``, any method) removes edges that lie on no ``input -> logits`` path.
Paths are followed through components: a q, k or v receiver leads into the head(s) it feeds
(with grouped-query attention a k/v receiver feeds every head of its group), and an MLP's
receiver and sender are the same node. Without pruning, ``top_n`` is exactly the paper's
top-N.

Files (`Circuit.save` / `Circuit.load`) are versioned JSON, written atomically (a temporary
file in the same directory, then ``os.replace``), never pickle::

    {"format": "ctlens.circuit", "schema_version": 1, "model": "zoo:tiny-gpt2",
     "graph": {"version": 1, "n_layers": 2, ...},        # GraphSpec.to_dict()
     "n_edges": 3,
     "edges": [["input", "a0.h0.q", 0.12], ...],          # circuit edges; score or null
     "scores": [0.12, -0.03, ...] | null,                 # every valid edge, graph order
     "metadata": {...}}

``scores`` lists the score of every valid edge in the order of ``graph.valid.nonzero()``
(sender-major) so that a circuit with scores round-trips losslessly.

MIB / EAP-IG interoperability (`Circuit.to_mib_json`, `Circuit.from_mib_json`,
`mib_edge_name`, `mib_to_ctlens_edge`): MIB names nodes ``input``, ``a{l}.h{h}``, ``m{l}``,
``logits`` and edges ``sender->receiver`` with a ``<q>``, ``<k>`` or ``<v>`` suffix for
attention receivers, e.g. ``a0.h1->a2.h3<k>``; a file holds ``cfg``, ``nodes`` ``{name:
{in_graph}}`` and ``edges`` ``{name: {score, in_graph}}``. The mapping is explicit and
total in both directions for standard multi-head attention. With grouped-query attention a
ctlens k/v receiver ``a{l}.g{g}.k`` stands for the shared key input of every head in group
``g``; it is exported as one MIB edge per head of the group, each with an equal share of
the group's score (the score of a shared input is the sum of the per-head scores), and
imported by summing scores over the group and taking the union of membership.
"""

from __future__ import annotations

import heapq
import json
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from jaxtyping import Bool, Float

from ctlens.files import atomic_write_text
from ctlens.graph import Graph, GraphSpec
from ctlens.mlp_groups import coarsen_matrix
from ctlens.sizes import edge_count
from ctlens.types import NodeKind

SCHEMA_VERSION = 1
FILE_FORMAT = "ctlens.circuit"
SELECTION_METHODS = ("top_n", "threshold", "greedy")


class Circuit:
    """A set of edges of a model's graph. See the module docstring.

    Args:
        graph: the model's edge graph.
        mask: bool ``[n_senders, n_receivers]``; True marks a circuit edge. Must be False
            wherever ``graph.valid`` is False.
        scores: optional fp32 ``[n_senders, n_receivers]`` edge scores (0 where invalid).
        metadata: JSON-serialisable information (how it was selected, from which scores).
        model_name: the name of the model the circuit belongs to, if known.
    """

    def __init__(
        self,
        graph: Graph,
        mask: Bool[torch.Tensor, "n_senders n_receivers"],
        scores: Float[torch.Tensor, "n_senders n_receivers"] | None = None,
        metadata: dict[str, Any] | None = None,
        model_name: str | None = None,
    ) -> None:
        if not isinstance(graph, Graph):
            raise TypeError(f"graph must be a ctlens.Graph, got {type(graph).__name__}")
        expected = (graph.n_senders, graph.n_receivers)
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {expected}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        mask = mask.detach().cpu().clone()
        invalid = mask & ~graph.valid
        if invalid.any():
            i, j = (int(v) for v in invalid.nonzero()[0])
            raise ValueError(
                f"the mask selects {int(invalid.sum())} invalid edge(s), e.g. "
                f"{graph.senders[i]} -> {graph.receivers[j]} ({graph.receivers[j]} reads the "
                f"residual stream before {graph.senders[i]} writes); select only graph.valid edges"
            )
        if scores is not None:
            scores = torch.as_tensor(scores)
            if tuple(scores.shape) != expected:
                raise ValueError(f"scores have shape {tuple(scores.shape)}, expected {expected}")
            scores = scores.detach().float().cpu() * graph.valid
        self.graph = graph
        self.mask = mask
        self.scores = scores
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.model_name = model_name

    # ------------------------------------------------------------------ construction

    @classmethod
    def empty(cls, graph: Graph, model_name: str | None = None) -> Circuit:
        """The circuit with no edges (every edge ablated)."""
        mask = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
        return cls(graph, mask, model_name=model_name)

    @classmethod
    def full(cls, graph: Graph, model_name: str | None = None) -> Circuit:
        """The circuit with every valid edge (the unablated model)."""
        return cls(graph, graph.valid.clone(), model_name=model_name)

    @classmethod
    def from_edges(
        cls,
        graph: Graph,
        edges: Iterable[tuple[str, str]],
        scores: Float[torch.Tensor, "n_senders n_receivers"] | None = None,
        metadata: dict[str, Any] | None = None,
        model_name: str | None = None,
    ) -> Circuit:
        """A circuit from ``(sender, receiver)`` name pairs.

        Unknown names and invalid edges raise with the offending pair named.
        """
        mask = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
        for pair in edges:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"each edge must be a (sender, receiver) pair, got {pair!r}")
            mask[graph.edge_index(str(pair[0]), str(pair[1]))] = True
        return cls(graph, mask, scores, metadata, model_name)

    @classmethod
    def from_scores(
        cls,
        scores: Any,
        method: str = "top_n",
        top_n: int | float | None = None,
        threshold: float | None = None,
        prune: bool = False,
    ) -> Circuit:
        """Select a circuit from `EdgeScores` (see the module docstring for the methods).

        Args:
            scores: an `ctlens.EdgeScores`.
            method: ``"top_n"``, ``"threshold"`` or ``"greedy"``.
            top_n: number of edges for ``top_n`` and ``greedy`` (1 .. number of valid edges),
                or a fraction of the valid edges as a float in (0, 1) (`ctlens.sizes`).
            threshold: minimum |score| for ``threshold``.
            prune: afterwards drop edges on no ``input -> logits`` path (may leave fewer
                than ``top_n`` edges).
        """
        graph, dense = _unpack_scores(scores)
        if method not in SELECTION_METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {SELECTION_METHODS}")
        magnitude = dense.abs()
        if method in ("top_n", "greedy"):
            if threshold is not None:
                raise ValueError(f"method {method!r} takes top_n, not threshold")
            if isinstance(top_n, float) and not isinstance(top_n, bool):
                top_n = edge_count(top_n, graph.n_edges)
            _check_top_n(top_n, graph)
            assert top_n is not None
            if method == "top_n":
                mask = _top_n_mask(magnitude, graph, top_n)
            else:
                mask = _greedy_mask(magnitude, graph, top_n)
        else:
            if top_n is not None:
                raise ValueError("method 'threshold' takes threshold, not top_n")
            if threshold is None or not math.isfinite(float(threshold)) or threshold < 0:
                raise ValueError(
                    f"threshold must be a finite number >= 0 for method 'threshold', "
                    f"got {threshold!r}"
                )
            mask = (magnitude >= float(threshold)) & graph.valid
        if prune:
            mask = prune_mask(graph, mask)
        metadata: dict[str, Any] = {
            "selection": {"method": method, "top_n": top_n, "threshold": threshold, "prune": prune},
            "scores": dict(getattr(scores, "metadata", {}) or {}),
        }
        model_name = metadata["scores"].get("model")
        return cls(graph, mask, dense, metadata, model_name)

    # ------------------------------------------------------------------ views

    @property
    def n_edges(self) -> int:
        """Number of circuit edges."""
        return int(self.mask.sum())

    @property
    def edges(self) -> list[tuple[str, str]]:
        """Circuit edges as ``(sender, receiver)`` name pairs, sender-major graph order."""
        rows, cols = self.mask.nonzero(as_tuple=True)
        s, r = self.graph.senders, self.graph.receivers
        return [(s[i], r[j]) for i, j in zip(rows.tolist(), cols.tolist(), strict=True)]

    @property
    def nodes(self) -> list[str]:
        """Graph node names (senders and receivers, e.g. ``a0.h1``, ``a1.h0.q``, ``m0``) that
        at least one circuit edge touches, in graph order (senders first)."""
        sent = self.mask.any(1).tolist()
        read = self.mask.any(0).tolist()
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
        sent = self.mask.any(1).tolist()
        read = self.mask.any(0).tolist()
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
        """This circuit on the one-group graph: an MLP edge is in it when any group edge is.

        Scores, if any, are summed over groups (as `EdgeScores.coarsen`).
        """
        if self.graph.spec.mlp_groups == 1:
            return self
        graph, counts = coarsen_matrix(self.graph, self.mask.float())
        scores = None if self.scores is None else coarsen_matrix(self.graph, self.scores)[1]
        metadata = {**self.metadata, "coarsened_from_mlp_groups": self.graph.spec.mlp_groups}
        return Circuit(graph, counts > 0, scores, metadata, self.model_name)

    def edge_scores(self) -> dict[tuple[str, str], float | None]:
        """``{(sender, receiver): score}`` for the circuit edges (``None`` without scores)."""
        rows, cols = self.mask.nonzero(as_tuple=True)
        s, r = self.graph.senders, self.graph.receivers
        return {
            (s[i], r[j]): (None if self.scores is None else float(self.scores[i, j]))
            for i, j in zip(rows.tolist(), cols.tolist(), strict=True)
        }

    def __contains__(self, edge: object) -> bool:
        if not (isinstance(edge, tuple) and len(edge) == 2):
            return False
        return bool(self.mask[self.graph.edge_index(str(edge[0]), str(edge[1]))])

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
        return (
            f"Circuit({name}{self.n_edges} of {self.graph.n_edges} edges, "
            f"{len(self.components)} components)"
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
        """
        g = self.graph.to_networkx()
        nx.set_edge_attributes(g, False, "in_circuit")
        rows, cols = self.graph.valid.nonzero(as_tuple=True)
        s, r = self.graph.senders, self.graph.receivers
        mask = self.mask[rows, cols].tolist()
        values = None if self.scores is None else self.scores[rows, cols].tolist()
        for k, (i, j) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            attrs = g.edges[s[i], r[j]]
            attrs["in_circuit"] = bool(mask[k])
            if values is not None:
                attrs["score"] = values[k]
        g.graph["model_name"] = self.model_name
        g.graph["metadata"] = dict(self.metadata)
        return g

    @classmethod
    def from_networkx(cls, g: nx.DiGraph) -> Circuit:
        """Inverse of `to_networkx`: edges with ``in_circuit=True`` form the circuit;
        ``score`` attributes (if any edge has one) become the scores."""
        graph = Graph.from_networkx(g)
        mask = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
        scores = torch.zeros(graph.n_senders, graph.n_receivers)
        has_scores = False
        for s, r, attrs in g.edges(data=True):
            if attrs.get("internal", False):
                continue
            i, j = graph.edge_index(s, r)
            mask[i, j] = bool(attrs.get("in_circuit", False))
            if "score" in attrs:
                has_scores = True
                scores[i, j] = float(attrs["score"])
        return cls(
            graph,
            mask,
            scores if has_scores else None,
            dict(g.graph.get("metadata", {})),
            g.graph.get("model_name"),
        )

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        """The JSON document `save` writes (see the module docstring)."""
        edges = [[s, r, score] for (s, r), score in self.edge_scores().items()]
        all_scores = None
        if self.scores is not None:
            all_scores = self.scores[self.graph.valid].tolist()
        return {
            "format": FILE_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "model": self.model_name,
            "graph": self.graph.spec.to_dict(),
            "n_edges": self.n_edges,
            "edges": edges,
            "scores": all_scores,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, doc: Any, source: str = "circuit document") -> Circuit:
        """Inverse of `to_dict`, with a clear error for every malformed part."""
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
            graph = Graph(GraphSpec.from_dict(doc["graph"]))
        except (TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{source}: bad graph spec ({err})") from None
        if not isinstance(doc["edges"], list):
            raise ValueError(f"{source}: 'edges' must be a list of [sender, receiver, score]")
        mask = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
        edge_scores = torch.zeros(graph.n_senders, graph.n_receivers)
        for k, item in enumerate(doc["edges"]):
            if not (isinstance(item, list) and len(item) in (2, 3)):
                raise ValueError(
                    f"{source}: edge {k} must be [sender, receiver, score], got {item!r}"
                )
            try:
                i, j = graph.edge_index(str(item[0]), str(item[1]))
            except (KeyError, ValueError) as err:
                raise ValueError(f"{source}: edge {k}: {err}") from None
            mask[i, j] = True
            if len(item) == 3 and item[2] is not None:
                edge_scores[i, j] = float(item[2])
        if "n_edges" in doc and doc["n_edges"] != int(mask.sum()):
            raise ValueError(
                f"{source}: declares {doc['n_edges']} edges but lists {int(mask.sum())} distinct "
                "ones; the file is corrupted"
            )
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
        elif any(len(item) == 3 and item[2] is not None for item in doc["edges"]):
            scores = edge_scores
        metadata = doc.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ValueError(f"{source}: 'metadata' must be a JSON object")
        model = doc.get("model")
        return cls(graph, mask, scores, metadata, None if model is None else str(model))

    def save(self, path: str | Path) -> Path:
        """Write the circuit as versioned JSON, atomically (temporary file + ``os.replace``)."""
        path = Path(path)
        try:
            text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"cannot save circuit: its metadata or scores are not plain JSON ({err}); "
                "keep metadata to str/int/float/bool/list/dict and finite numbers"
            ) from None
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
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"circuit file {path} does not exist")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{path} is not valid JSON ({err}); the file is corrupted or not a circuit file"
            ) from None
        circuit = cls.from_dict(doc, source=str(path))
        if model is not None:
            circuit.check_model(model)
        return circuit

    def check_model(self, model: Any) -> None:
        """Raise ``ValueError`` unless the circuit belongs to ``model``'s graph."""
        groups = self.graph.spec.mlp_groups
        try:
            graph = Graph.from_model(model, mlp_groups=groups)
        except ValueError as err:
            raise ValueError(
                f"this circuit splits each MLP into {groups} neuron groups, which this model "
                f"cannot: {err}"
            ) from None
        if graph != self.graph:
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
        """An EAP-IG / MIB-style ``{cfg, nodes, edges}`` document (see module docstring).

        MIB names one node per MLP and has no edge names for neuron groups, so a grouped
        circuit is refused: export ``circuit.coarsen()`` instead.
        """
        spec = self.graph.spec
        if spec.mlp_groups != 1:
            raise ValueError(
                f"this circuit splits each MLP into {spec.mlp_groups} neuron groups; MIB's edge "
                "format has one node per MLP and no names for groups of neurons. Export "
                "circuit.coarsen() (an MLP is in it when any of its groups is) instead"
            )
        group = spec.n_heads // spec.n_kv_heads
        edges: dict[str, dict[str, Any]] = {}
        rows, cols = self.graph.valid.nonzero(as_tuple=True)
        mask = self.mask[rows, cols].tolist()
        values = [0.0] * len(mask) if self.scores is None else self.scores[rows, cols].tolist()
        for k, (i, j) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            names = mib_edge_names(self.graph, i, j, group)
            for name in names:
                edges[name] = {"score": values[k] / len(names), "in_graph": bool(mask[k])}
        used = set(self.components)
        nodes = {name: {"in_graph": name in used} for name in _mib_nodes(spec)}
        cfg = {
            "n_layers": spec.n_layers,
            "n_heads": spec.n_heads,
            "n_key_value_heads": spec.n_kv_heads,
            "parallel_attn_mlp": spec.parallel_attn_mlp,
            "model_name": self.model_name,
        }
        return {"cfg": cfg, "nodes": nodes, "edges": edges}

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
        if not isinstance(doc, dict) or not isinstance(doc.get("edges"), dict):
            raise ValueError(f"{source}: expected a JSON object with an 'edges' object")
        if graph is None:
            cfg = doc.get("cfg")
            if not isinstance(cfg, dict) or "n_layers" not in cfg or "n_heads" not in cfg:
                raise ValueError(
                    f"{source}: 'cfg' with n_layers and n_heads is needed to build the graph; "
                    "or pass graph=Graph.from_model(model)"
                )
            graph = Graph(
                GraphSpec(
                    n_layers=int(cfg["n_layers"]),
                    n_heads=int(cfg["n_heads"]),
                    n_kv_heads=int(cfg.get("n_key_value_heads") or cfg["n_heads"]),
                    parallel_attn_mlp=bool(cfg.get("parallel_attn_mlp", False)),
                )
            )
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
                scores[i, j] += float(score)
            if entry.get("in_graph", False):
                mask[i, j] = True
        cfg = doc.get("cfg") if isinstance(doc.get("cfg"), dict) else {}
        model_name = cfg.get("model_name") if cfg else None
        return cls(graph, mask, scores, {"imported_from": "mib"}, model_name)

    @classmethod
    def from_mib_json(cls, path: str | Path, graph: Graph | None = None) -> Circuit:
        """Read an EAP-IG / MIB edge-score JSON file (see `from_mib_dict`)."""
        path = Path(path)
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from None
        return cls.from_mib_dict(doc, graph, source=str(path))


# ---------------------------------------------------------------------- selection helpers


def _unpack_scores(scores: Any) -> tuple[Graph, torch.Tensor]:
    graph = getattr(scores, "graph", None)
    dense = getattr(scores, "scores", None)
    if not isinstance(graph, Graph) or not isinstance(dense, torch.Tensor):
        raise TypeError(
            f"scores must be a ctlens.EdgeScores (from ctlens.attribute), got "
            f"{type(scores).__name__}"
        )
    dense = dense.detach().float().cpu() * graph.valid
    if not torch.isfinite(dense).all():
        raise ValueError("the edge scores contain NaN or inf; re-run attribution")
    return graph, dense


def _check_top_n(top_n: Any, graph: Graph) -> None:
    if isinstance(top_n, bool) or not isinstance(top_n, int):
        raise ValueError(f"top_n must be an integer number of edges, got {top_n!r}")
    if not 1 <= top_n <= graph.n_edges:
        raise ValueError(
            f"top_n={top_n} is out of range: choose between 1 and the number of valid edges "
            f"({graph.n_edges}), or a fraction of them such as 0.05"
        )


def _top_n_mask(magnitude: torch.Tensor, graph: Graph, top_n: int) -> torch.Tensor:
    """Exactly ``top_n`` valid edges by |score|; ties broken by graph order."""
    keyed = magnitude.masked_fill(~graph.valid, -1.0).flatten()
    order = torch.sort(keyed, descending=True, stable=True).indices[:top_n]
    mask = torch.zeros(keyed.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view_as(magnitude)


def _feeders(graph: Graph) -> dict[int, list[int]]:
    """Sender row -> the receiver columns that are that component's own inputs."""
    spec = graph.spec
    group = spec.n_heads // spec.n_kv_heads
    out: dict[int, list[int]] = {}
    for layer in range(spec.n_layers):
        q = graph.receiver_slice(layer, NodeKind.Q)
        k = graph.receiver_slice(layer, NodeKind.K)
        v = graph.receiver_slice(layer, NodeKind.V)
        heads = graph.sender_slice(layer)
        for h in range(spec.n_heads):
            out[heads.start + h] = [q.start + h, k.start + h // group, v.start + h // group]
        senders, mlp_in = graph.mlp_senders(layer), graph.receiver_slice(layer, NodeKind.MLP)
        for g in range(spec.mlp_groups):  # each group's own input
            out[senders.start + g] = [mlp_in.start + g]
    out[0] = []
    return out


def _greedy_mask(magnitude: torch.Tensor, graph: Graph, top_n: int) -> torch.Tensor:
    """Grow from ``logits`` backwards, always taking the best edge into the current circuit."""
    feeders = _feeders(graph)
    mask = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
    heap: list[tuple[float, int, int]] = []
    opened: set[int] = set()
    values = magnitude.tolist()

    def open_receiver(j: int) -> None:
        if j in opened:
            return
        opened.add(j)
        for i in range(graph.upstream[j]):
            heapq.heappush(heap, (-values[i][j], i, j))

    open_receiver(graph.n_receivers - 1)
    joined: set[int] = set()
    taken = 0
    while heap and taken < top_n:
        _, i, j = heapq.heappop(heap)
        mask[i, j] = True
        taken += 1
        if i not in joined:
            joined.add(i)
            for column in feeders[i]:
                open_receiver(column)
    return mask


def prune_mask(
    graph: Graph, mask: Bool[torch.Tensor, "n_senders n_receivers"]
) -> Bool[torch.Tensor, "n_senders n_receivers"]:
    """Keep only the edges of ``mask`` that lie on some ``input -> logits`` path.

    The path may pass through components: q/k/v receivers lead into their head(s), and an
    MLP is one node (its receiver and sender share the name ``m{l}``). Computed with
    networkx reachability on the circuit edges plus `Graph.to_networkx`'s internal edges.
    """
    g = nx.DiGraph()
    g.add_nodes_from(["input", "logits"])
    rows, cols = mask.nonzero(as_tuple=True)
    s, r = graph.senders, graph.receivers
    circuit_edges = [(s[i], r[j]) for i, j in zip(rows.tolist(), cols.tolist(), strict=True)]
    g.add_edges_from(circuit_edges)
    group = graph.spec.n_heads // graph.spec.n_kv_heads
    for node in graph.receiver_nodes:
        if node.kind is NodeKind.Q:
            g.add_edge(node.name, f"a{node.layer}.h{node.head}")
        elif node.kind in (NodeKind.K, NodeKind.V):
            assert node.head is not None
            for h in range(node.head * group, (node.head + 1) * group):
                g.add_edge(node.name, f"a{node.layer}.h{h}")
    forward = nx.descendants(g, "input") | {"input"}
    backward = nx.ancestors(g, "logits") | {"logits"}
    keep = torch.zeros_like(mask)
    for (sender, receiver), i, j in zip(circuit_edges, rows.tolist(), cols.tolist(), strict=True):
        if sender in forward and receiver in backward:
            keep[i, j] = True
    return keep


# ---------------------------------------------------------------------- MIB names


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
