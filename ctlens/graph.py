"""The edge graph of a transformer: who writes to the residual stream, who reads it.

A pre-norm transformer's residual stream is a sum. Every component that *writes* to it is a
**sender**: ``input`` (token + position embedding), every attention head ``a{l}.h{h}`` (its
own slice of the attention output, ``attn.hook_result``, without the shared bias b_O) and
every MLP ``m{l}``. Every component that *reads* it, before its LayerNorm, is a
**receiver**: each head's query, key and value inputs ``a{l}.h{h}.q/.k/.v`` (with
grouped-query attention the keys and values are read once per KV head: ``a{l}.g{g}.k``),
each MLP ``m{l}`` and the unembedding ``logits``. With ``mlp_groups=G > 1`` each MLP is split
into G equal groups of neurons ("MLP heads"), each both a sender and a receiver named
``m{l}.n{j}`` (see `ctlens.bridge.mlp_groups`). Because the stream is a plain sum, a
receiver's input is exactly the sum of the outputs of the senders computed before it (plus
constant biases), so "the edge s -> r" is well defined: the contribution of s to r's input.

A *positional* graph (``spans=(...)``, `ctlens.spans`) splits every edge by the token span
where the receiver reads it: the edge ``(s, r, span)`` is the contribution of s to r's
input at the positions of that span (the sender writes the residual stream at those same
positions; attention moves information across positions inside the receiving head, so a
head's k input at ``subject`` and its q input at ``end`` are different edges). Dense
tensors then gain a last axis of spans (`Graph.dense_shape`); validity does not depend on
the span. Without spans (the default) the graph is exactly the position-free one.

Storage is dense: ``Graph.valid`` is a bool ``[n_senders, n_receivers]`` tensor. Senders are
ordered by the time they write and receivers by the time they read, so the senders that a
receiver may read are always a *prefix* of the sender list (``Graph.upstream``). The
attribution and masking code relies on that prefix to use one einsum per receiver hook.
Node objects and networkx graphs are views built from these tensors, never the storage.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from functools import cached_property
from typing import Any

import networkx as nx
import torch
from jaxtyping import Bool, Float

from ctlens.bridge.names import HookRef, Role, node_hook
from ctlens.data import TaskData
from ctlens.graph_spec import GraphSpec
from ctlens.types import Node, NodeKind


def mlp_nodes(layer: int, groups: int) -> list[Node]:
    """The node(s) of MLP ``layer``: ``m{l}`` for one group, else ``m{l}.n{j}`` (head = j)."""
    if groups == 1:
        return [Node(f"m{layer}", NodeKind.MLP, layer)]
    return [Node(f"m{layer}.n{j}", NodeKind.MLP, layer, j) for j in range(groups)]


class Graph:
    """Senders, receivers and the validity mask of one model's edge graph.

    Build it with `Graph.from_model` (a ctlens model) or `Graph(GraphSpec(...))`. Two graphs
    are equal when their specs are equal.
    """

    def __init__(self, spec: GraphSpec) -> None:
        self.spec = spec
        L, H, K, G = spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.mlp_groups
        kv = "g" if spec.grouped else "h"

        senders: list[Node] = [Node("input", NodeKind.INPUT)]
        receivers: list[Node] = []
        # write/read "times": a sender s feeds a receiver r iff write[s] < read[r]
        write: list[int] = [0]
        read: list[int] = []
        for layer in range(L):
            attn_time = 2 * layer + 1
            mlp_read = attn_time if spec.parallel_attn_mlp else attn_time + 1
            receivers += [Node(f"a{layer}.h{h}.q", NodeKind.Q, layer, h) for h in range(H)]
            receivers += [Node(f"a{layer}.{kv}{g}.k", NodeKind.K, layer, g) for g in range(K)]
            receivers += [Node(f"a{layer}.{kv}{g}.v", NodeKind.V, layer, g) for g in range(K)]
            mlps = mlp_nodes(layer, G)
            receivers += mlps
            read += [attn_time] * (H + 2 * K) + [mlp_read] * G
            senders += [Node(f"a{layer}.h{h}", NodeKind.HEAD, layer, h) for h in range(H)]
            senders += mlps
            # groups of one MLP write after they all read: they do not feed each other
            write += [attn_time] * H + [2 * layer + 2] * G
        receivers.append(Node("logits", NodeKind.LOGITS))
        read.append(2 * L + 1)

        self.sender_nodes: tuple[Node, ...] = tuple(senders)
        self.receiver_nodes: tuple[Node, ...] = tuple(receivers)
        write_t = torch.tensor(write)
        read_t = torch.tensor(read)
        self.valid: Bool[torch.Tensor, "n_senders n_receivers"] = write_t[:, None] < read_t[None]
        # number of senders each receiver may read (a prefix of the sender list, because
        # senders are ordered by write time): a binary search, not a sum over the dense mask
        self.upstream: tuple[int, ...] = tuple(
            torch.searchsorted(write_t, read_t, side="left").tolist()
        )

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_model(
        cls, model: Any, mlp_groups: int = 1, spans: Sequence[str] | TaskData | None = None
    ) -> Graph:
        """The graph of a model returned by `ctlens.load_model` (reads ``model.cfg``).

        ``mlp_groups`` splits each MLP into that many equal neuron groups; it must divide
        the MLP width ``model.cfg.d_mlp``. ``spans`` (span names, or a `TaskData` whose
        ``span_names`` to use) makes the graph positional (module docstring).
        """
        if isinstance(spans, TaskData):
            if spans.span_names is None:
                raise ValueError(
                    "this TaskData has no spans; build it with spans (TaskData.from_prompts("
                    "..., spans=... or template=...), a built-in task, or "
                    "data.with_position_spans())"
                )
            spans = spans.span_names
        return cls(GraphSpec.from_model(model, mlp_groups, tuple(spans or ())))

    def belongs_to(self, model: Any) -> bool:
        """Whether this is ``model``'s graph (with this graph's MLP grouping, which must
        divide the model's MLP width, and its spans). Compares specs: no graph is built."""
        spec = self.spec
        return GraphSpec.from_model(model, spec.mlp_groups, spec.spans) == spec

    # ----------------------------------------------------------------- names and counts

    @cached_property
    def senders(self) -> list[str]:
        """Sender names in index order."""
        return [n.name for n in self.sender_nodes]

    @cached_property
    def receivers(self) -> list[str]:
        """Receiver names in index order."""
        return [n.name for n in self.receiver_nodes]

    @cached_property
    def sender_index(self) -> dict[str, int]:
        """Sender name -> row of the dense tensors."""
        return {name: i for i, name in enumerate(self.senders)}

    @cached_property
    def receiver_index(self) -> dict[str, int]:
        """Receiver name -> column of the dense tensors."""
        return {name: i for i, name in enumerate(self.receivers)}

    @property
    def n_senders(self) -> int:
        """Number of senders (rows of the dense tensors)."""
        return len(self.sender_nodes)

    @property
    def n_receivers(self) -> int:
        """Number of receivers (columns of the dense tensors)."""
        return len(self.receiver_nodes)

    @cached_property
    def n_edges(self) -> int:
        """Number of valid edges (each receiver's upstream prefix, summed); on a positional
        graph, of valid (edge, span) pairs: `n_sender_receiver_edges` times the spans."""
        return self.n_sender_receiver_edges * max(1, self.n_spans)

    @cached_property
    def n_sender_receiver_edges(self) -> int:
        """Number of valid ``sender -> receiver`` edges, whatever the spans."""
        return sum(self.upstream)

    # ----------------------------------------------------------------- spans

    @property
    def spans(self) -> tuple[str, ...]:
        """Span names of a positional graph, in index order (empty: position-free)."""
        return self.spec.spans

    @property
    def positional(self) -> bool:
        """True when edges are split by token span."""
        return self.spec.positional

    @property
    def n_spans(self) -> int:
        """Number of spans (0 for a position-free graph)."""
        return len(self.spec.spans)

    @property
    def dense_shape(self) -> tuple[int, ...]:
        """Shape of scores and masks: ``(n_senders, n_receivers)``, plus ``n_spans`` when
        positional."""
        base = (self.n_senders, self.n_receivers)
        return (*base, self.n_spans) if self.positional else base

    @cached_property
    def dense_valid(self) -> Bool[torch.Tensor, "n_senders n_receivers *spans"]:
        """`valid` broadcast to `dense_shape` (validity does not depend on the span)."""
        if not self.positional:
            return self.valid
        return self.valid[..., None].expand(*self.dense_shape).contiguous()

    def span_position(self, span: str) -> int:
        """Index of ``span`` on the span axis; a clear error for an unknown name."""
        if not self.positional:
            raise ValueError(
                f"span {span!r} given, but this graph is position-free (built without "
                "spans); build it with Graph.from_model(model, spans=...)"
            )
        if span not in self.spec.spans:
            raise KeyError(
                f"{span!r} is not a span of this graph; its spans are {list(self.spans)}"
            )
        return self.spec.spans.index(span)

    def check_spans(self, span_names: Sequence[str] | None, what: str) -> None:
        """Raise unless ``span_names`` (of ``what``, e.g. "the task data") are this graph's."""
        if tuple(span_names or ()) == self.spans:
            return
        if not self.positional:
            raise ValueError(
                f"{what} has spans {list(span_names or ())} but the graph (circuit or scores) "
                "is position-free; use a positional one, or drop the spans"
            )
        if span_names is None:
            raise ValueError(
                f"the graph (circuit or scores) is positional with spans {list(self.spans)} "
                f"but {what} has no spans; give it the same spans (e.g. the task it was found "
                "on) or use circuit.coarsen() for a position-free circuit"
            )
        raise ValueError(
            f"the spans do not match: the graph (circuit or scores) has {list(self.spans)} "
            f"but {what} has {list(span_names)}; use data with the same span schema"
        )

    def sender_slice(self, layer: int) -> slice:
        """Rows of layer ``layer``'s heads in the sender list."""
        start = 1 + layer * (self.spec.n_heads + self.spec.mlp_groups)
        return slice(start, start + self.spec.n_heads)

    def mlp_senders(self, layer: int) -> slice:
        """Rows of MLP ``layer``'s sender(s) (its ``mlp_groups`` groups) in the sender list."""
        start = self.sender_slice(layer).stop
        return slice(start, start + self.spec.mlp_groups)

    def mlp_sender(self, layer: int) -> int:
        """Row of MLP ``layer`` in the sender list (one-group graphs; else `mlp_senders`)."""
        if self.spec.mlp_groups != 1:
            raise ValueError(
                f"this graph splits each MLP into {self.spec.mlp_groups} groups; use "
                "Graph.mlp_senders(layer) for their rows"
            )
        return self.mlp_senders(layer).start

    def receiver_slice(self, layer: int, kind: NodeKind) -> slice:
        """Columns of layer ``layer``'s q, k, v or MLP (all groups) receivers."""
        H, K, G = self.spec.n_heads, self.spec.n_kv_heads, self.spec.mlp_groups
        start = layer * (H + 2 * K + G)
        offsets = {
            NodeKind.Q: (0, H),
            NodeKind.K: (H, K),
            NodeKind.V: (H + K, K),
            NodeKind.MLP: (H + 2 * K, G),
        }
        offset, width = offsets[kind]
        return slice(start + offset, start + offset + width)

    def edge_index(self, sender: str, receiver: str) -> tuple[int, int]:
        """Dense indices of edge ``sender -> receiver``; a clear error if it does not exist."""
        if sender not in self.sender_index:
            raise KeyError(
                f"{sender!r} is not a sender of this graph ({self._describe()}"
                f"{self._mlp_hint(sender)})"
            )
        if receiver not in self.receiver_index:
            raise KeyError(
                f"{receiver!r} is not a receiver of this graph ({self._describe()}"
                f"{self._mlp_hint(receiver)})"
            )
        i, j = self.sender_index[sender], self.receiver_index[receiver]
        if not self.valid[i, j]:
            raise ValueError(
                f"{sender} -> {receiver} is not a valid edge: {receiver} reads the residual "
                f"stream before {sender} writes to it"
            )
        return i, j

    def edges(self) -> list[tuple[str, ...]]:
        """All valid edges as ``(sender, receiver)`` name pairs, sender-major; on a
        positional graph ``(sender, receiver, span)`` triples, span-minor."""
        return self.named(self.dense_valid)

    def named(
        self, cells: Bool[torch.Tensor, "n_senders n_receivers *spans"]
    ) -> list[tuple[str, ...]]:
        """The True cells of a dense bool tensor as edge names (see `edges`)."""
        return [self.cell_name(index) for index in cells.nonzero().tolist()]

    def cell_name(self, index: Sequence[int]) -> tuple[str, ...]:
        """The edge name of the dense cell ``index``: ``(sender, receiver[, span])``."""
        names = (self.senders[index[0]], self.receivers[index[1]])
        return (*names, self.spans[index[2]]) if self.positional else names

    def cell_label(self, index: Sequence[int] | int) -> str:
        """``"sender -> receiver"`` (``... at span S`` when positional) of a dense cell, given
        by its index or its position in the flattened tensor (for error messages)."""
        if isinstance(index, int):
            index = [int(v) for v in torch.unravel_index(torch.tensor(index), self.dense_shape)]
        name = self.cell_name(index)
        return " -> ".join(name[:2]) + (f" at span {name[2]}" if self.positional else "")

    def cell(self, edge: Sequence[str]) -> tuple[int, ...]:
        """Dense index of an edge given by name: ``(sender, receiver)``, or ``(sender,
        receiver, span)`` on a positional graph; a clear error for anything else."""
        width = 3 if self.positional else 2
        if not isinstance(edge, (tuple, list)) or len(edge) != width:
            shape = "(sender, receiver, span) triple" if self.positional else (
                "(sender, receiver) pair")
            hint = f" (this graph is positional, spans {list(self.spans)})" if self.positional \
                else ""
            raise TypeError(f"each edge must be a {shape}{hint}, got {edge!r:.80}")
        i, j = self.edge_index(str(edge[0]), str(edge[1]))
        return (i, j, self.span_position(str(edge[2]))) if self.positional else (i, j)

    def hook_name(self, node: str | Node, role: Role | None = None) -> HookRef:
        """The TransformerLens hook ``node`` writes (sender) or reads (receiver).

        Returns a `ctlens.bridge.names.HookRef` ``(name, index)``: e.g. ``a3.h5`` ->
        ``("blocks.3.attn.hook_result", 5)``, ``a3.g1.k`` -> ``("blocks.3.hook_k_input", 1)``,
        ``m3`` as a receiver -> ``("blocks.3.hook_mlp_in", None)``. ``ref.take(cache[ref.name])``
        is the node's activation in a ``run_with_cache`` result. An MLP is both a sender and a
        receiver: pass ``role="sender"`` or ``role="receiver"``. Under the frozen-norm
        linearisation an MLP sender is ``blocks.{l}.ln2_post.hook_out``, and a head's sender
        output is its ``hook_result`` slice times ``w_eff / blocks.{l}.ln1_post.hook_scale``
        (`ctlens.bridge.hooks.frozen_norm_hooks`).
        """
        name = node.name if isinstance(node, Node) else node
        both = (("sender", self.sender_index), ("receiver", self.receiver_index))
        roles = [r for r, index in both if name in index]
        if not roles:
            raise KeyError(f"{name!r} is not a node of this graph ({self._describe()})")
        if role is None:
            if len(roles) > 1:
                raise ValueError(
                    f"{name} is both a sender and a receiver; pass role='sender' (the hook it "
                    "writes) or role='receiver' (the hook it reads)"
                )
            role = roles[0]  # type: ignore[assignment]
        if role not in roles:
            raise ValueError(f"{name} is not a {role} of this graph; it is a {roles[0]}")
        nodes = self.sender_nodes if role == "sender" else self.receiver_nodes
        index = self.sender_index if role == "sender" else self.receiver_index
        spec = self.spec
        node_ = nodes[index[name]]
        return node_hook(node_, role, spec.approximate, spec.mlp_groups)  # type: ignore[arg-type]

    def _describe(self) -> str:
        s = self.spec
        text = f"{s.n_layers} layers, {s.n_heads} heads, {s.n_kv_heads} KV heads"
        text += f", {s.mlp_groups} groups per MLP" if s.mlp_groups != 1 else ""
        text += f", spans {list(s.spans)}" if s.spans else ""
        return text + (f", {s.approximate}" if s.approximate else "")

    def _mlp_hint(self, name: str) -> str:
        """For an MLP-like name, what the MLP nodes of this graph are called."""
        if not re.fullmatch(r"m\d+(\.n\d+)?", name):
            return ""
        G = self.spec.mlp_groups
        if G == 1:
            return "; its MLP nodes are m{l}, one per MLP (built with mlp_groups=1)"
        return f"; its MLP nodes are m{{l}}.n0 .. m{{l}}.n{G - 1}"

    # ----------------------------------------------------------------- views

    def to_networkx(self) -> nx.DiGraph:
        """The graph structure as a networkx ``DiGraph``.

        Nodes carry ``kind``, ``layer``, ``head`` and ``role`` ("sender", "receiver" or
        "both" for MLPs), and the TransformerLens hooks they use (`hook_name`): senders
        ``hook_out`` / ``hook_out_index`` (what they write), receivers ``hook_in`` /
        ``hook_in_index`` (what they read); an index is the node's slot on the hook's head
        axis, or None for a whole activation. Each valid edge carries ``internal=False``. So
        that path algorithms see through attention heads, each q/k/v receiver also has an
        edge to the head(s) it feeds, marked ``internal=True``. ``G.graph["spec"]`` holds the
        spec, so `Graph.from_networkx` rebuilds the graph exactly. A positional graph gives
        an ``nx.MultiDiGraph``: one edge per (edge, span), keyed by the span name and
        carrying it as ``span`` (internal edges get integer keys); `network_edges` walks
        either kind.
        """
        g = (nx.MultiDiGraph if self.positional else nx.DiGraph)(spec=self.spec.to_dict())
        senders = set(self.senders)
        receivers = set(self.receivers)
        for node in (*self.sender_nodes, *self.receiver_nodes):
            if node.name in g:
                continue
            role = (
                "both"
                if node.name in senders and node.name in receivers
                else ("sender" if node.name in senders else "receiver")
            )
            g.add_node(node.name, kind=node.kind.value, layer=node.layer, head=node.head, role=role)
            if node.name in senders:
                out = self.hook_name(node.name, "sender")
                g.nodes[node.name].update(hook_out=out.name, hook_out_index=out.index)
            if node.name in receivers:
                into = self.hook_name(node.name, "receiver")
                g.nodes[node.name].update(hook_in=into.name, hook_in_index=into.index)
        if self.positional:
            g.add_edges_from((s, r, k, {"span": k, "internal": False}) for s, r, k in self.edges())
        else:
            g.add_edges_from(self.edges(), internal=False)
        group = self.spec.n_heads // self.spec.n_kv_heads
        for node in self.receiver_nodes:
            if node.kind is NodeKind.Q:
                g.add_edge(node.name, f"a{node.layer}.h{node.head}", internal=True)
            elif node.kind in (NodeKind.K, NodeKind.V):
                for h in range(node.head * group, (node.head + 1) * group):  # type: ignore[operator]
                    g.add_edge(node.name, f"a{node.layer}.h{h}", internal=True)
        return g

    @classmethod
    def from_networkx(cls, g: nx.DiGraph) -> Graph:
        """Rebuild a `Graph` from `to_networkx` output; checks that the nodes match the spec."""
        if "spec" not in g.graph:
            raise ValueError(
                "this networkx graph has no graph['spec']; build it with Graph.to_networkx()"
            )
        graph = cls(GraphSpec.from_dict(g.graph["spec"]))
        expected = set(graph.senders) | set(graph.receivers)
        if set(g.nodes) != expected:
            extra = sorted(set(g.nodes) - expected)[:5]
            missing = sorted(expected - set(g.nodes))[:5]
            raise ValueError(
                f"networkx nodes do not match the spec: extra {extra}, missing {missing}"
            )
        rebuilt = graph.to_networkx().nodes
        for name, attrs in g.nodes(data=True):
            for key in ("hook_out", "hook_out_index", "hook_in", "hook_in_index"):
                if key in attrs and attrs[key] != rebuilt[name].get(key):
                    raise ValueError(
                        f"node {name} says {key}={attrs[key]!r} but this spec puts it at "
                        f"{rebuilt[name].get(key)!r}; the graph was edited or comes from "
                        "another ctlens version"
                    )
        return graph

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Graph) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    def __repr__(self) -> str:
        return (
            f"Graph({self._describe()}: {self.n_senders} senders, "
            f"{self.n_receivers} receivers, {self.n_edges} valid edges)"
        )


def network_edges(
    graph: Graph, g: nx.DiGraph
) -> Iterator[tuple[tuple[int, ...], dict[str, Any]]]:
    """Each non-internal edge of ``g`` (a `Graph.to_networkx` view of ``graph``, possibly
    with attributes added): its dense index and its live attribute dict. An edge unknown to
    ``graph`` (a name, an invalid pair, a span) raises with the edge named."""
    if g.is_multigraph():
        edges: Iterable[tuple[str, str, Any, dict[str, Any]]] = g.edges(keys=True, data=True)
    else:
        edges = ((s, r, None, attrs) for s, r, attrs in g.edges(data=True))
    for s, r, key, attrs in edges:
        if attrs.get("internal", False):
            continue
        name = (s, r, attrs.get("span", key)) if graph.positional else (s, r)
        yield graph.cell(name), attrs


# ----------------------------------------------------------------- MLP groups and spans, summed


def coarse_indices(graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sender and receiver of ``graph``, its index in the one-group graph."""
    coarse = Graph(replace(graph.spec, mlp_groups=1, spans=()))

    def index(names: list[str], lookup: dict[str, int]) -> torch.Tensor:
        return torch.tensor([lookup[name.split(".n")[0]] for name in names])

    return (
        index(graph.senders, coarse.sender_index),
        index(graph.receivers, coarse.receiver_index),
    )


def coarsen_matrix(
    graph: Graph, matrix: Float[torch.Tensor, "n_senders n_receivers *spans"]
) -> tuple[Graph, Float[torch.Tensor, "n_coarse_senders n_coarse_receivers"]]:
    """Sum a dense matrix over the graph's spans and MLP groups: ``(plain graph, summed
    matrix)``.

    Row ``m{l}`` of the result is the sum of rows ``m{l}.n*``; column ``m{l}`` likewise; a
    positional matrix is first summed over its span axis.
    """
    if graph.positional:
        matrix = matrix.sum(-1)
    coarse = Graph(replace(graph.spec, mlp_groups=1, spans=()))
    if graph.spec.mlp_groups == 1:
        return coarse, matrix
    rows, cols = coarse_indices(graph)
    out = torch.zeros(coarse.n_senders, graph.n_receivers, dtype=matrix.dtype)
    out.index_add_(0, rows, matrix.to(out.dtype).cpu())
    summed = torch.zeros(coarse.n_senders, coarse.n_receivers, dtype=matrix.dtype)
    summed.index_add_(1, cols, out)
    return coarse, summed


def require_graph_of(model: Any, graph: Graph, what: str = "circuit") -> Graph:
    """``graph`` when it is ``model``'s graph (`Graph.belongs_to`), else the one error that
    says a ``what`` of another model was given. The public entry points that take a circuit
    ask this once and pass the graph on."""
    if not graph.belongs_to(model):
        own = Graph.from_model(model, mlp_groups=graph.spec.mlp_groups, spans=graph.spans)
        raise ValueError(
            f"the {what} belongs to another model's graph ({graph!r}); this model has "
            f"{own!r}. Use a {what} found on this model."
        )
    return graph
