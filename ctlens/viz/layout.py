"""Node positions and edge geometry shared by every circuit figure.

The layout is layered, bottom to top, in the order the residual stream is written::

    y = 2L + 1                  logits
    y = 2l + 1.6                                                      m{l}   (MLP column)
    y = 2l + 1       a{l}.h0  a{l}.h1  ...  a{l}.h{H-1}                      (head row)
    y = 2l + 0.65      q k v    q k v  ...    q k v                          (input ports)
    y = 0                              input

Heads sit at x = 0 .. H-1; MLPs in their own column at x = H + 1 (so that the many long
MLP -> MLP edges run beside the heads instead of through them); ``input`` and ``logits``
are centred. Every edge ends at a *port*: an MLP or ``logits`` receiver is its node, but a
q, k or v receiver is a small marker just below its head (q left, k centre, v right; with
grouped-query attention the k/v port of a group sits under the middle of the group), and
the edge's dash says which input it feeds (q solid, k dashed, v dotted). That keeps q/k/v
distinguishable even when a thousand edges overlap.

Figures draw edges as a handful of traces (one per edge class, segments separated by
``None``) instead of one trace per edge, so a 1,000-edge circuit stays a few dozen traces.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import torch

from ctlens.graph import Graph
from ctlens.types import NodeKind

#: vertical offset of a q/k/v port below its head, and horizontal offset of q (-) and v (+)
PORT_DY = 0.35
PORT_DX = 0.27
MLP_BAND = 3.0  # width of the band of an MLP's neuron-group nodes (x units: one per head)
#: edge dash per receiver kind; MLP and logits receivers are solid lines to the node itself
DASH = {NodeKind.Q: "solid", NodeKind.K: "dash", NodeKind.V: "dot", NodeKind.MLP: "solid",
        NodeKind.LOGITS: "solid"}
#: the receiver classes figures draw as separate traces (MLP and logits share one)
RECEIVER_CLASSES: tuple[str, ...] = ("q", "k", "v", "resid")


def receiver_class(kind: NodeKind) -> str:
    """The drawing class of a receiver kind: ``q``, ``k``, ``v`` or ``resid``."""
    return kind.value if kind in (NodeKind.Q, NodeKind.K, NodeKind.V) else "resid"


class Layout:
    """Positions of every sender node and receiver port of one graph."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        spec = graph.spec
        H, L = spec.n_heads, spec.n_layers
        group = H // spec.n_kv_heads
        centre = (H - 1) / 2
        self.mlp_x = H + 1.0
        self.top = 2.0 * L + 1
        self.centre = centre
        sx: list[float] = []
        sy: list[float] = []
        for node in graph.sender_nodes:
            x, y = self._node_xy(node.kind, node.layer, node.head, centre)
            sx.append(x)
            sy.append(y)
        rx: list[float] = []
        ry: list[float] = []
        for node in graph.receiver_nodes:
            if node.kind is NodeKind.Q:
                x, y = node.head - PORT_DX, 2.0 * node.layer + 1 - PORT_DY  # type: ignore[operator]
            elif node.kind in (NodeKind.K, NodeKind.V):
                # a k/v port feeds heads head*group .. (head+1)*group - 1: centre it under them
                mid = node.head * group + (group - 1) / 2  # type: ignore[operator]
                x = mid + (PORT_DX if node.kind is NodeKind.V else 0.0)
                y = 2.0 * node.layer + 1 - PORT_DY  # type: ignore[operator]
            else:
                x, y = self._node_xy(node.kind, node.layer, node.head, centre)
            rx.append(x)
            ry.append(y)
        self.sender_x = torch.tensor(sx, dtype=torch.float64)
        self.sender_y = torch.tensor(sy, dtype=torch.float64)
        self.receiver_x = torch.tensor(rx, dtype=torch.float64)
        self.receiver_y = torch.tensor(ry, dtype=torch.float64)

    def _node_xy(
        self, kind: NodeKind, layer: int | None, head: int | None, centre: float
    ) -> tuple[float, float]:
        if kind is NodeKind.INPUT:
            return centre, 0.0
        if kind is NodeKind.LOGITS:
            return centre, self.top
        if kind is NodeKind.MLP:
            y = 2.0 * layer + 1.6  # type: ignore[operator]
            groups = self.graph.spec.mlp_groups
            if groups == 1 or head is None:
                return self.mlp_x, y
            # neuron groups: a band of small steps to the right of the MLP column
            return self.mlp_x + MLP_BAND * head / (groups - 1), y
        return float(head), 2.0 * layer + 1  # type: ignore[arg-type,operator]

    @cached_property
    def receiver_kinds(self) -> list[NodeKind]:
        return [n.kind for n in self.graph.receiver_nodes]

    @cached_property
    def port_owner(self) -> list[list[int]]:
        """For each receiver, the sender rows of the node(s) it belongs to (its head(s) or MLP).

        ``logits`` belongs to no sender; a k/v port of a grouped model belongs to every head
        of its group.
        """
        graph = self.graph
        group = graph.spec.n_heads // graph.spec.n_kv_heads
        owners: list[list[int]] = []
        for node in graph.receiver_nodes:
            if node.kind is NodeKind.Q:
                owners.append([graph.sender_slice(node.layer).start + node.head])  # type: ignore[arg-type,operator]
            elif node.kind in (NodeKind.K, NodeKind.V):
                start = graph.sender_slice(node.layer).start  # type: ignore[arg-type]
                owners.append(
                    [start + h for h in range(node.head * group, (node.head + 1) * group)]  # type: ignore[operator]
                )
            elif node.kind is NodeKind.MLP:
                # a neuron group's port belongs to that group (head: the group index)
                first = graph.mlp_senders(node.layer).start  # type: ignore[arg-type]
                owners.append([first + (node.head or 0)])
            else:
                owners.append([])
        return owners

    @cached_property
    def owner_matrix(self) -> torch.Tensor:
        """fp32 ``[n_receivers, n_senders]``: 1 where the receiver is a port of that sender."""
        owners = torch.zeros(self.graph.n_receivers, self.graph.n_senders)
        for j, rows in enumerate(self.port_owner):
            owners[j, rows] = 1.0
        return owners

    @property
    def logits_xy(self) -> tuple[float, float]:
        return self.centre, self.top

    def axis_ranges(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """x and y ranges that show every node with a margin."""
        band = MLP_BAND if self.graph.spec.mlp_groups > 1 else 0.0
        return (-1.0, self.mlp_x + band + 1.0), (-0.6, self.top + 0.9)

    def layer_ticks(self) -> tuple[list[float], list[str]]:
        """y tick positions and labels: input, each layer's heads and MLP, logits."""
        vals: list[float] = [0.0]
        text: list[str] = ["input"]
        for layer in range(self.graph.spec.n_layers):
            vals += [2.0 * layer + 1]
            text += [f"L{layer}"]
        vals.append(self.top)
        text.append("logits")
        return vals, text


@dataclass
class EdgeSet:
    """What a circuit figure needs: a graph, a boolean edge mask and optional dense scores.

    Built by `as_edge_set` from a `Circuit`, an `EdgeScores` (its top edges) or a snapshot
    path; ``label`` names it in titles and legends. On a positional graph ``mask`` and
    ``scores`` have a last axis of spans (`ctlens.graph.Graph.dense_shape`).
    """

    graph: Graph
    mask: torch.Tensor
    scores: torch.Tensor | None = None
    label: str = "circuit"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_edges(self) -> int:
        return int(self.mask.sum())

    def strongest(self, top: int | None) -> EdgeSet:
        """The same set restricted to its ``top`` edges by |score| (all of them if ``None``)."""
        if top is None or top >= self.n_edges:
            return self
        if top < 1:
            raise ValueError(f"top must be a positive number of edges, got {top}")
        if self.scores is None:
            raise ValueError(
                f"cannot keep the top {top} edges of {self.label}: it has no scores; "
                "pass top=None to draw every edge"
            )
        magnitude = self.scores.abs().masked_fill(~self.mask, -1.0).flatten()
        keep = torch.zeros_like(self.mask).flatten()
        keep[magnitude.topk(top).indices] = True
        return EdgeSet(
            self.graph, keep.view_as(self.mask), self.scores, self.label, dict(self.metadata)
        )

    def merged_spans(self) -> EdgeSet:
        """A positional set with its spans merged (an edge is in it when it is at any span;
        scores summed over spans, the position-free score); a position-free set unchanged."""
        if not self.graph.positional:
            return self
        from ctlens.graph import coarsen_matrix

        graph = Graph(replace(self.graph.spec, spans=()))
        scores = None if self.scores is None else coarsen_matrix(self.graph, self.scores)[1]
        return EdgeSet(graph, self.mask.any(-1), scores, self.label, dict(self.metadata))


def active_senders(layout: Layout, mask: torch.Tensor) -> torch.Tensor:
    """Bool per sender row: the node sends an edge of ``mask`` or owns a port that receives one
    (at any span, for a positional mask)."""
    mask = mask.any(-1) if mask.ndim == 3 else mask
    return mask.any(1) | ((mask.any(0).float() @ layout.owner_matrix) > 0)


def _dense_scores(obj: Any, graph: Graph) -> torch.Tensor | None:
    """Dense fp32 scores (`Graph.dense_shape`) from a tensor, EdgeScores or None."""
    if obj is None:
        return None
    tensor = obj.scores if hasattr(obj, "scores") and not isinstance(obj, torch.Tensor) else obj
    if not isinstance(tensor, torch.Tensor):
        return None
    expected = graph.dense_shape
    if tuple(tensor.shape) != expected:
        raise ValueError(f"scores have shape {tuple(tensor.shape)}, expected {expected}")
    return tensor.detach().float().cpu()


def as_edge_set(obj: Any, top: int | None = None, label: str | None = None) -> EdgeSet:
    """Turn a `Circuit`, `EdgeScores`, snapshot path or `EdgeSet` into an `EdgeSet`.

    ``EdgeScores`` become their ``top`` edges by |score| (default 200). A circuit keeps all of
    its edges unless ``top`` is given.
    """
    from pathlib import Path

    from ctlens.scores import EdgeScores

    if isinstance(obj, EdgeSet):
        result = obj
    elif isinstance(obj, (str, Path)):
        from ctlens.viz.run import load_circuit

        path = Path(obj)
        return as_edge_set(load_circuit(path), top=top, label=label or path.stem)
    elif isinstance(obj, EdgeScores):
        k = min(200 if top is None else top, obj.graph.n_edges)
        if k < 1:
            raise ValueError(f"top must be a positive number of edges, got {top}")
        magnitude = obj.scores.abs().masked_fill(~obj.graph.dense_valid, -1.0).flatten()
        mask = torch.zeros(magnitude.numel(), dtype=torch.bool)
        mask[magnitude.topk(k).indices] = True
        method = obj.metadata.get("method")
        result = EdgeSet(
            obj.graph,
            mask.view(obj.graph.dense_shape),
            obj.scores,
            label or (f"top {k} edges ({method})" if method else f"top {k} edges"),
            dict(obj.metadata),
        )
        return result
    elif hasattr(obj, "graph") and hasattr(obj, "mask"):
        graph = obj.graph
        mask = torch.as_tensor(obj.mask).bool().cpu()
        if tuple(mask.shape) != graph.dense_shape:
            raise ValueError(
                f"circuit mask has shape {tuple(mask.shape)}, expected {graph.dense_shape}"
            )
        result = EdgeSet(
            graph,
            mask,
            _dense_scores(getattr(obj, "scores", None), graph),
            label or "circuit",
            dict(getattr(obj, "metadata", None) or {}),
        )
    else:
        raise TypeError(
            "expected a ctlens.Circuit, ctlens.EdgeScores or the path of a saved circuit, got "
            f"{type(obj).__name__}"
        )
    if label is not None:
        result = EdgeSet(result.graph, result.mask, result.scores, label, result.metadata)
    return result.strongest(top)


def check_same_graph(items: Iterable[tuple[str, Graph]]) -> Graph:
    """The common graph of named items; a clear error naming the first one that differs."""
    first: tuple[str, Graph] | None = None
    for name, graph in items:
        if first is None:
            first = (name, graph)
        elif graph != first[1]:
            raise ValueError(
                f"{name} and {first[0]} are circuits of different graphs ({graph._describe()} "
                f"vs {first[1]._describe()}); only circuits of one model can be compared"
            )
    if first is None:
        raise ValueError("no circuits given")
    return first[1]
