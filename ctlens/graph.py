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

Storage is dense: ``Graph.valid`` is a bool ``[n_senders, n_receivers]`` tensor. Senders are
ordered by the time they write and receivers by the time they read, so the senders that a
receiver may read are always a *prefix* of the sender list (``Graph.upstream``). The
attribution and masking code relies on that prefix to use one einsum per receiver hook.
Node objects and networkx graphs are views built from these tensors, never the storage.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from typing import Any

import networkx as nx
import torch
from jaxtyping import Bool, Float

from ctlens.bridge.families import approximation
from ctlens.bridge.names import HookRef, Role, node_hook
from ctlens.types import Node, NodeKind

GRAPH_SPEC_VERSION = 1


@dataclass(frozen=True)
class GraphSpec:
    """Everything that determines a graph: layer and head counts and the block layout.

    ``parallel_attn_mlp`` is True for GPT-NeoX style blocks, where a layer's MLP reads the
    same residual stream as that layer's heads (so it cannot read their outputs).
    ``mlp_groups`` is the number of equal neuron groups each MLP is split into (1: each MLP
    is one node ``m{l}``; G > 1: nodes ``m{l}.n0`` .. ``m{l}.n{G-1}``). Whether it divides
    the MLP width is checked where the model is known (`Graph.from_model`).
    ``approximate`` is ``"frozen-norm"`` for models loaded with that opt-in (Gemma 2/3,
    OLMo-2): senders are then shares of normalised sublayer outputs (docs/attribution.md),
    and scores, circuits and runs on such a graph say so through its spec.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel_attn_mlp: bool = False
    mlp_groups: int = 1
    approximate: str | None = None

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_heads < 1 or self.n_kv_heads < 1:
            raise ValueError(f"a graph needs at least one layer and one head, got {self}")
        if (
            not isinstance(self.mlp_groups, int)
            or isinstance(self.mlp_groups, bool)
            or self.mlp_groups < 1
        ):
            raise ValueError(
                f"mlp_groups must be a positive integer (1: one node per MLP), got "
                f"{self.mlp_groups!r}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.approximate not in (None, "frozen-norm"):
            raise ValueError(
                f"unknown approximation {self.approximate!r}; expected None or 'frozen-norm'"
            )
        if self.approximate and self.mlp_groups != 1:
            raise ValueError(
                "MLP neuron groups are not supported under the frozen-norm approximation "
                "(a group's share of the normalised MLP output is not implemented); use "
                "mlp_groups=1"
            )

    @property
    def grouped(self) -> bool:
        """True when keys and values are shared by groups of heads (grouped-query attention)."""
        return self.n_kv_heads != self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, tagged with the spec version.

        ``mlp_groups`` is written only when it is not 1 and ``approximate`` only when set, so
        files of plain graphs are unchanged.
        """
        fields = asdict(self)
        if self.mlp_groups == 1:
            del fields["mlp_groups"]
        if self.approximate is None:
            del fields["approximate"]
        return {"version": GRAPH_SPEC_VERSION, **fields}

    @classmethod
    def from_model(cls, model: Any, mlp_groups: int = 1) -> GraphSpec:
        """The spec of the graph of a model returned by `ctlens.load_model` (reads
        ``model.cfg``; builds nothing). ``mlp_groups`` must divide the MLP width."""
        cfg = model.cfg
        n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        check_mlp_groups(mlp_groups, int(getattr(cfg, "d_mlp", 0) or 0))
        return cls(
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            n_kv_heads=n_kv,
            parallel_attn_mlp=bool(getattr(cfg, "parallel_attn_mlp", False)),
            mlp_groups=mlp_groups,
            approximate=approximation(model),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphSpec:
        """Inverse of `to_dict`; refuses specs written by an incompatible version."""
        version = data.get("version", GRAPH_SPEC_VERSION)
        if version != GRAPH_SPEC_VERSION:
            raise ValueError(
                f"graph spec version {version} is not supported (this ctlens reads version "
                f"{GRAPH_SPEC_VERSION}); upgrade ctlens or re-create the file"
            )
        fields = (
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "parallel_attn_mlp",
            "mlp_groups",
            "approximate",
        )
        missing = [f for f in fields[:3] if f not in data]
        if missing:
            raise ValueError(f"graph spec is missing {missing}; got keys {sorted(data)}")
        return cls(**{f: data[f] for f in fields if f in data})


def check_mlp_groups(mlp_groups: Any, d_mlp: int) -> None:
    """Raise a clear ``ValueError`` unless ``mlp_groups`` is a positive divisor of ``d_mlp``."""
    divisors = [g for g in range(1, d_mlp + 1) if d_mlp % g == 0] if d_mlp > 0 else []
    valid = isinstance(mlp_groups, int) and not isinstance(mlp_groups, bool) and mlp_groups >= 1
    if valid and (d_mlp <= 0 or d_mlp % mlp_groups == 0):
        return
    shown = ", ".join(map(str, divisors[:24])) + (" ..." if len(divisors) > 24 else "")
    raise ValueError(
        f"mlp_groups={mlp_groups!r} does not split the MLP width {d_mlp} into equal groups; "
        f"choose a divisor of {d_mlp}: {shown}"
    )


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
    def from_model(cls, model: Any, mlp_groups: int = 1) -> Graph:
        """The graph of a model returned by `ctlens.load_model` (reads ``model.cfg``).

        ``mlp_groups`` splits each MLP into that many equal neuron groups; it must divide
        the MLP width ``model.cfg.d_mlp``.
        """
        return cls(GraphSpec.from_model(model, mlp_groups))

    def belongs_to(self, model: Any) -> bool:
        """Whether this is ``model``'s graph (with this graph's MLP grouping, which must
        divide the model's MLP width). Compares specs: no graph is built."""
        return GraphSpec.from_model(model, self.spec.mlp_groups) == self.spec

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
        """Number of valid edges (each receiver's upstream prefix, summed)."""
        return sum(self.upstream)

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

    def edges(self) -> list[tuple[str, str]]:
        """All valid edges as ``(sender, receiver)`` name pairs, sender-major."""
        rows, cols = self.valid.nonzero(as_tuple=True)
        return [
            (self.senders[i], self.receivers[j])
            for i, j in zip(rows.tolist(), cols.tolist(), strict=True)
        ]

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
        spec, so `Graph.from_networkx` rebuilds the graph exactly.
        """
        g = nx.DiGraph(spec=self.spec.to_dict())
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


# ----------------------------------------------------------------- MLP groups, summed


def coarse_indices(graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sender and receiver of ``graph``, its index in the one-group graph."""
    coarse = Graph(replace(graph.spec, mlp_groups=1))

    def index(names: list[str], lookup: dict[str, int]) -> torch.Tensor:
        return torch.tensor([lookup[name.split(".n")[0]] for name in names])

    return (
        index(graph.senders, coarse.sender_index),
        index(graph.receivers, coarse.receiver_index),
    )


def coarsen_matrix(
    graph: Graph, matrix: Float[torch.Tensor, "n_senders n_receivers"]
) -> tuple[Graph, Float[torch.Tensor, "n_coarse_senders n_coarse_receivers"]]:
    """Sum a dense matrix over the graph's MLP groups: ``(one-group graph, summed matrix)``.

    Row ``m{l}`` of the result is the sum of rows ``m{l}.n*``; column ``m{l}`` likewise.
    """
    coarse = Graph(replace(graph.spec, mlp_groups=1))
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
        own = Graph.from_model(model, mlp_groups=graph.spec.mlp_groups)
        raise ValueError(
            f"the {what} belongs to another model's graph ({graph!r}); this model has "
            f"{own!r}. Use a {what} found on this model."
        )
    return graph

