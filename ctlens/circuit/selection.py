"""Choosing a circuit's edges from dense scores: ``top_n``, ``threshold``, ``greedy``, pruning.

Every function here works on the dense tensors of a `Graph` (``[n_senders, n_receivers]``,
plus a span axis on a positional graph, where every rule selects (edge, span) pairs) and
returns a bool mask; `ctlens.Circuit.from_scores` wraps `select_mask` and records how the
edges were chosen. The rules are described in the `ctlens.circuit` package docstring.
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import networkx as nx
import torch
from jaxtyping import Bool, Float

from ctlens.graph import Graph
from ctlens.sizes import CircuitSize
from ctlens.types import NodeKind

SELECTION_METHODS = ("top_n", "threshold", "greedy")


def select_mask(
    graph: Graph,
    dense: Float[torch.Tensor, "n_senders n_receivers *spans"],
    method: str,
    top_n: int | float | CircuitSize | None,
    threshold: float | None,
    prune: bool,
) -> Bool[torch.Tensor, "n_senders n_receivers *spans"]:
    """The edges that ``method`` keeps from finite, validity-masked scores ``dense``."""
    if method not in SELECTION_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {SELECTION_METHODS}")
    magnitude = dense.abs()
    if method in ("top_n", "greedy"):
        if threshold is not None:
            raise ValueError(f"method {method!r} takes top_n, not threshold")
        n = CircuitSize.of(top_n, "top_n").edges(graph.n_edges)
        if method == "top_n":
            mask = top_n_mask(magnitude, graph, n)
        else:
            mask = greedy_mask(magnitude, graph, n)
    else:
        if top_n is not None:
            raise ValueError("method 'threshold' takes threshold, not top_n")
        if threshold is None or not math.isfinite(float(threshold)) or threshold < 0:
            raise ValueError(
                f"threshold must be a finite number >= 0 for method 'threshold', got {threshold!r}"
            )
        mask = (magnitude >= float(threshold)) & graph.dense_valid
    return prune_mask(graph, mask) if prune else mask


def unpack_scores(scores: Any) -> tuple[Graph, torch.Tensor]:
    """The graph and the finite, validity-masked fp32 CPU scores of an `EdgeScores`."""
    graph = getattr(scores, "graph", None)
    dense = getattr(scores, "scores", None)
    if not isinstance(graph, Graph) or not isinstance(dense, torch.Tensor):
        raise TypeError(
            f"scores must be a ctlens.EdgeScores (from ctlens.attribute), got "
            f"{type(scores).__name__}"
        )
    dense = dense.detach().float().cpu() * graph.dense_valid
    if not torch.isfinite(dense).all():
        raise ValueError("the edge scores contain NaN or inf; re-run attribution")
    return graph, dense


def top_n_mask(magnitude: torch.Tensor, graph: Graph, top_n: int) -> torch.Tensor:
    """Exactly ``top_n`` valid edges (or (edge, span) pairs) by |score|; ties broken by graph
    order (sender, receiver, span)."""
    keyed = magnitude.masked_fill(~graph.dense_valid, -1.0).flatten()
    order = torch.sort(keyed, descending=True, stable=True).indices[:top_n]
    mask = torch.zeros(keyed.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view_as(magnitude)


def component_inputs(graph: Graph) -> dict[int, list[int]]:
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
        for g in range(spec.mlp_groups):  # each neuron group reads its own input
            out[senders.start + g] = [mlp_in.start + g]
    out[0] = []
    return out


def greedy_mask(magnitude: torch.Tensor, graph: Graph, top_n: int) -> torch.Tensor:
    """Grow from ``logits`` backwards, always taking the best edge into the current circuit.

    On a positional graph the candidates are (edge, span) pairs and a sender joins at a
    span: an MLP then opens its input at that span, a head its q input at that span and its
    k and v inputs at every span (attention reads keys and values at other positions).
    """
    feeders = component_inputs(graph)
    kv_columns = {
        c for layer in range(graph.spec.n_layers) for kind in (NodeKind.K, NodeKind.V)
        for c in range(graph.receiver_slice(layer, kind).start,
                       graph.receiver_slice(layer, kind).stop)
    }
    n_spans = max(1, graph.n_spans)
    cube = magnitude if graph.positional else magnitude[..., None]
    mask = torch.zeros(graph.n_senders, graph.n_receivers, n_spans, dtype=torch.bool)
    heap: list[tuple[float, int, int, int]] = []
    opened: set[tuple[int, int]] = set()
    values = cube.tolist()

    def open_receiver(j: int, k: int) -> None:
        if (j, k) in opened:
            return
        opened.add((j, k))
        for i in range(graph.upstream[j]):
            heapq.heappush(heap, (-values[i][j][k], i, j, k))

    for k in range(n_spans):
        open_receiver(graph.n_receivers - 1, k)
    joined: set[tuple[int, int]] = set()
    taken = 0
    while heap and taken < top_n:
        _, i, j, k = heapq.heappop(heap)
        mask[i, j, k] = True
        taken += 1
        if (i, k) not in joined:
            joined.add((i, k))
            for column in feeders[i]:
                for span in range(n_spans) if column in kv_columns else (k,):
                    open_receiver(column, span)
    return mask if graph.positional else mask[..., 0]


def prune_mask(
    graph: Graph, mask: Bool[torch.Tensor, "n_senders n_receivers *spans"]
) -> Bool[torch.Tensor, "n_senders n_receivers *spans"]:
    """Keep only the edges of ``mask`` that lie on some ``input -> logits`` path.

    The path may pass through components: q/k/v receivers lead into their head(s), and an
    MLP is one node (its receiver and sender share the name ``m{l}``). On a positional graph
    a path runs through (node, span) pairs: an edge stays at its span, a q input leads into
    its head at the same span, a k or v input into its heads at every span (attention moves
    information across positions), an MLP maps a span to itself. Computed with networkx
    reachability on the circuit edges plus these internal links.
    """
    n_spans = max(1, graph.n_spans)
    cube = mask if graph.positional else mask[..., None]
    g = nx.DiGraph()
    g.add_edges_from((("start", 0), ("input", k)) for k in range(n_spans))
    g.add_edges_from((("logits", k), ("end", 0)) for k in range(n_spans))
    cells = cube.nonzero().tolist()
    s, r = graph.senders, graph.receivers
    g.add_edges_from(((s[i], k), (r[j], k)) for i, j, k in cells)
    group = graph.spec.n_heads // graph.spec.n_kv_heads
    for node in graph.receiver_nodes:
        if node.kind is NodeKind.Q:
            g.add_edges_from(
                ((node.name, k), (f"a{node.layer}.h{node.head}", k)) for k in range(n_spans)
            )
        elif node.kind in (NodeKind.K, NodeKind.V):
            assert node.head is not None
            for h in range(node.head * group, (node.head + 1) * group):
                g.add_edges_from(
                    ((node.name, k), (f"a{node.layer}.h{h}", t))
                    for k in range(n_spans) for t in range(n_spans)
                )
    forward = nx.descendants(g, ("start", 0))
    backward = nx.ancestors(g, ("end", 0))
    keep = torch.zeros_like(cube)
    for i, j, k in cells:
        if (s[i], k) in forward and (r[j], k) in backward:
            keep[i, j, k] = True
    return keep if graph.positional else keep[..., 0]
